//! `switchboard plan`: the model computed from manifests, for checking them before running.
use std::{path::PathBuf, process::ExitCode};

use super::{
    get::{self, Output},
    source::SourceArgs,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory of Service, Pod and EndpointSlice manifests.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Prints every frontend and its endpoints; exits 1 when a manifest has errors.
pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let source = SourceArgs {
        manifests: Some(args.manifests),
        connection: Default::default(),
        endpoints_from: None,
        node_name: None,
        zone: None,
    };
    let (snapshot, errors) = super::source::block_on(source.read_once())??;
    let model = source.model(&snapshot);
    get::print_warnings(&model);
    get::print(args.output, &get::endpoints(&model))?;
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
