//! `switchboard plan`: the model computed from manifests, for checking them before running.
use std::{path::PathBuf, process::ExitCode};

use crate::{model, source::manifests::ManifestDir};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory of Service and Pod manifests.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
}

/// Prints every frontend and its endpoints; exits 1 when a manifest has errors.
pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let (snapshot, errors) = ManifestDir::new(&args.manifests).read()?;
    for error in &errors {
        eprintln!("error: {error}");
    }
    let model = model::build(&snapshot.services, &snapshot.pods);
    for warning in &model.warnings {
        eprintln!("warning: {warning}");
    }
    for frontend in &model.frontends {
        let endpoints = if frontend.backends.is_empty() {
            "NO ENDPOINTS".to_owned()
        } else {
            frontend
                .backends
                .iter()
                .map(|e| format!("{}:{} ({})", e.address, e.port, e.pod))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<32} {:>21}/{}  →  {endpoints}",
            frontend.service.to_string(),
            format!("{}:{}", frontend.address, frontend.port),
            frontend.protocol.as_str(),
        );
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
