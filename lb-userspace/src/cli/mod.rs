//! The `switchboard` command line.
pub mod demo;
pub mod explain;
pub mod get;
pub mod log_level;
pub mod plan;
pub mod run;
pub mod source;
pub mod status;
pub mod uninstall;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Switchboard: Kubernetes Service load balancing in the kernel (eBPF, TC/XDP).
#[derive(Parser, Debug)]
#[command(name = "switchboard", version)]
pub struct Cli {
    /// Log format. The level comes from RUST_LOG (default: info, and every datapath message that
    /// `switchboard log-level` lets through).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: attach the datapath, program Services from the Kubernetes API (or a manifest
    /// directory) and follow every change.
    Run(run::Args),
    /// Show the load balancer working on network-namespace pods, then clean up (needs root).
    Demo(demo::Args),
    /// Print what the datapath is programmed with: services, backends, counters.
    Status(status::Args),
    /// Print the services and endpoints computed from manifests, without touching the kernel.
    Plan(plan::Args),
    /// List services, endpoints (the model) or backends, conntrack (the kernel's maps).
    Get(get::Args),
    /// Say why a Service has the endpoints it has, and which pods nearly matched.
    Explain(explain::Args),
    /// Detach the datapath and remove the pinned maps and links (stop the agent first).
    Uninstall(uninstall::Args),
    /// Show or switch, at run time, what the datapath logs (printed by the agent); off by default.
    LogLevel(log_level::Args),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the maps are pinned; every command that touches the datapath takes it.
#[derive(clap::Args, Debug, Clone)]
pub struct PinDir {
    /// Directory on a BPF filesystem for the pinned maps (bpffs is mounted if missing).
    #[arg(long, env = "SWITCHBOARD_PIN_DIR", default_value = lb_common::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{}=trace", crate::observe::datapath_log::TARGET)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
