//! What the report says about the run: when, on what, with which commands and tool versions.
use std::{process::Command, time::Duration};

use serde::Serialize;

use crate::Mode;

#[derive(Debug, Serialize)]
pub struct Meta {
    /// UTC, ISO 8601.
    pub date: String,
    pub mode: Mode,
    /// The command that reproduces this run.
    pub command: String,
    /// The bench binary's own command line, as cargo ran it.
    pub invoked_as: String,
    pub duration_seconds: f64,
    pub machine: Machine,
    /// `iptables --version`, `iptables-legacy --version`, `nft --version`.
    pub tools: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Meta {
    pub fn collect(mode: Mode, duration: Duration) -> Self {
        let command = match mode {
            Mode::Full => "cargo xtask bench",
            Mode::Quick => "cargo xtask bench -- --quick",
            Mode::Smoke => "cargo xtask bench -- --smoke",
        };
        Self {
            date: output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            mode,
            command: command.into(),
            invoked_as: std::env::args().collect::<Vec<_>>().join(" "),
            duration_seconds: duration.as_secs_f64(),
            machine: Machine {
                cores: std::thread::available_parallelism().map_or(0, usize::from),
                cpu: proc_field("/proc/cpuinfo", "model name").unwrap_or_default(),
                kernel: output("uname", &["-r"]),
                memory_gib: proc_field("/proc/meminfo", "MemTotal")
                    .and_then(|kib| kib.trim_end_matches("kB").trim().parse::<f64>().ok())
                    .map_or(0.0, |kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0),
            },
            tools: [
                ("iptables", "--version"),
                ("iptables-legacy", "--version"),
                ("nft", "--version"),
            ]
            .iter()
            .map(|(tool, arg)| output(tool, &[arg]))
            .collect(),
        }
    }
}

/// The first line `program args` prints, or "unknown".
fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|text| text.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// The value of the first `key: value` line of a /proc file.
fn proc_field(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}
