//! `switchboard explain service NAME`: why a Service has the endpoints it has.
use std::process::ExitCode;

use super::{get::Output, source::SourceArgs};
use crate::model::explain::explain;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to explain (only `service` for now).
    #[arg(value_parser = ["service"])]
    pub kind: String,
    /// The Service's name.
    pub name: String,
    /// The Service's namespace.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// Exit codes: 0 explained (with or without endpoints), 1 no such Service or unreadable source.
pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let (snapshot, _) = super::source::block_on(args.source.read_once())??;
    let Some(explanation) = explain(&args.source.input(&snapshot), &args.namespace, &args.name) else {
        eprintln!("switchboard: service {}/{} not found", args.namespace, args.name);
        return Ok(ExitCode::FAILURE);
    };
    match args.output {
        Output::Table => print!("{explanation}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(&explanation)?),
    }
    Ok(ExitCode::SUCCESS)
}
