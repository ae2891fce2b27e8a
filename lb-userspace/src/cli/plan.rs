//! `switchboard plan`: the model computed from manifests, for checking them before running.
use std::{path::PathBuf, process::ExitCode};

use super::get::{self, Output};
use crate::{
    model::{self, EndpointsFrom},
    source::manifests::ManifestDir,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory of Service, Pod and EndpointSlice manifests.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Prints every ClusterIP frontend and its endpoints; exits 1 when a manifest has errors.
pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let (snapshot, errors) = ManifestDir::new(&args.manifests).read()?;
    for error in &errors {
        eprintln!("error: {error}");
    }
    let model = model::compute(&model::Input {
        services: &snapshot.services,
        pods: &snapshot.pods,
        endpoint_slices: &snapshot.endpoint_slices,
        endpoints_from: EndpointsFrom::Pods,
        node_name: None,
    });
    get::print_warnings(&model);
    get::print(args.output, &get::endpoints(&model))?;
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
