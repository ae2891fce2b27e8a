//! `switchboard log-level [LEVEL]`: what the datapath logs, switched at run time through the
//! pinned config map; the agent prints the messages with its own log.
use std::process::ExitCode;

use lb_common::log_level;

use super::PinDir;
use crate::datapath::maps::ServiceMaps;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The most verbose messages the datapath writes: off (the default), error, warn (refused
    /// connections), info (every new flow and its backend), debug, trace. Without it, the
    /// current level is printed.
    #[arg(value_enum)]
    pub level: Option<Level>,
    #[command(flatten)]
    pub pin_dir: PinDir,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    const ALL: [(Level, u64); 6] = [
        (Level::Off, log_level::OFF),
        (Level::Error, log_level::ERROR),
        (Level::Warn, log_level::WARN),
        (Level::Info, log_level::INFO),
        (Level::Debug, log_level::DEBUG),
        (Level::Trace, log_level::TRACE),
    ];

    fn value(self) -> u64 {
        Self::ALL.iter().find(|(l, _)| *l == self).map_or(0, |(_, v)| *v)
    }

    fn from_value(value: u64) -> Self {
        Self::ALL
            .iter()
            .rev()
            .find(|(_, v)| *v <= value)
            .map_or(Level::Off, |(l, _)| *l)
    }
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let mut maps = ServiceMaps::open(&args.pin_dir.pin_dir)?;
    if let Some(level) = args.level {
        maps.set_log_level(level.value())?;
    }
    let level = Level::from_value(maps.log_level()?);
    println!("datapath log level: {level:?}");
    Ok(ExitCode::SUCCESS)
}
