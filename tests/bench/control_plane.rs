//! Control plane: how long it takes to program N services × 10 endpoints from nothing, how long one
//! endpoint change takes to reach the maps, and the memory it takes — the Switchboard agent against
//! `iptables-restore` and `nft -f` loading kube-proxy's equivalent rule sets.
//!
//! Switchboard is the agent itself with its default settings (Maglev), fed by an in-process
//! Kubernetes API server (see [`agent_run`]): from its start to every Service in the maps, its
//! memory, the kernel's memory for its maps, endpoint changes from the API to the kernel, and a
//! restart. Each kube-proxy tool loads its rule file into an emptied scratch namespace: the time
//! and memory of the tool alone, with the rules already generated (kube-proxy's own list/watch and
//! rule generation are not in its number).
use std::{path::Path, process::Command, time::Duration};

use lb_userspace::lab::NetNs;
use serde::Serialize;

use crate::{
    agent_run::{self, AgentRun},
    kube_proxy_rules, process,
    scratch::unique_prefix,
    services::{CIDRS, ENDPOINTS_PER_SERVICE},
    stats,
};

pub struct Settings {
    pub service_counts: Vec<usize>,
    pub rounds: usize,
    /// Endpoint changes per agent run, at most…
    pub changes: usize,
    /// …and for at most this long (at least three are always made).
    pub change_budget: Duration,
    /// A run still loading after this long is stopped and recorded as failed.
    pub tool_timeout: Duration,
    /// Above this many services the kube-proxy tools run once, not every round (minutes each).
    pub kube_proxy_every_round_up_to: usize,
    /// `--lb-algorithm` for the agent; `None`: its default (Maglev).
    pub lb_algorithm: Option<String>,
    /// Only the agent, none of kube-proxy's tools.
    pub agent_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loader {
    Switchboard,
    IptablesNftRestore,
    IptablesLegacyRestore,
    NftFile,
}

impl Loader {
    pub const ALL: [Loader; 4] = [
        Self::Switchboard,
        Self::IptablesNftRestore,
        Self::IptablesLegacyRestore,
        Self::NftFile,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Switchboard => "Switchboard agent (API → model → BPF maps)",
            Self::IptablesNftRestore => "iptables-nft-restore",
            Self::IptablesLegacyRestore => "iptables-legacy-restore",
            Self::NftFile => "nft -f",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct FullSyncRow {
    pub services: usize,
    pub loader: Loader,
    /// Median wall time to program every service from empty.
    pub seconds: f64,
    /// Median over rounds of (this loader's time / Switchboard's time in the same round).
    pub ratio_to_switchboard: f64,
    /// Median peak resident memory of the process doing the programming.
    pub peak_rss_mib: f64,
    pub samples_seconds: Vec<f64>,
    /// Runs that failed or timed out, with why.
    pub failures: Vec<String>,
}

/// The agent's own numbers at one size, medians over rounds.
#[derive(Debug, Serialize)]
pub struct AgentRow {
    pub services: usize,
    pub sync_seconds: f64,
    pub serving_seconds: f64,
    pub restart_sync_seconds: f64,
    pub restart_serving_seconds: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub kernel_map_mib: f64,
    pub changes: usize,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
    /// The most Services a run could not program (maps full).
    pub failed_services: u64,
    pub runs: Vec<AgentRun>,
    pub failures: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub rounds: usize,
    pub endpoints_per_service: usize,
    /// The agent's `--lb-algorithm`, when not its default.
    pub lb_algorithm: Option<String>,
    pub full_sync: Vec<FullSyncRow>,
    pub agent: Vec<AgentRow>,
}

pub fn run(settings: &Settings) -> anyhow::Result<Results> {
    // One scratch namespace per kube-proxy tool, emptied before each load.
    let scratch: Vec<NetNs> = (0..Loader::ALL.len())
        .map(|_| NetNs::create(&unique_prefix('c')))
        .collect::<anyhow::Result<_>>()?;
    let mut full_sync = Vec::new();
    let mut agent = Vec::new();
    for &count in &settings.service_counts {
        let ports = agent_run::ports(count);
        let iptables = process::temp_file_with(&kube_proxy_rules::iptables_restore(&ports, CIDRS))?;
        let nft = process::temp_file_with(&kube_proxy_rules::nft_script(&ports, CIDRS))?;
        let options = agent_run::Options {
            changes: settings.changes.div_ceil(settings.rounds.max(1)),
            change_budget: settings.change_budget / settings.rounds.max(1) as u32,
            timeout: settings.tool_timeout,
            lb_algorithm: settings.lb_algorithm.as_deref(),
        };

        // [loader][round]: (seconds, peak RSS in MiB), NaN for a failed or skipped run.
        let mut samples = vec![Vec::<(f64, f64)>::new(); Loader::ALL.len()];
        let mut failures = vec![Vec::<String>::new(); Loader::ALL.len()];
        let mut runs = Vec::new();
        let order: Vec<usize> = (0..Loader::ALL.len()).collect();
        for round in 0..settings.rounds {
            for l in stats::rotated(&order, round) {
                let loader = Loader::ALL[l];
                let outcome = match loader {
                    Loader::Switchboard => agent_run::measure(&ports, &options).map(|run| {
                        let sample = (run.sync_seconds, run.peak_rss_mib);
                        runs.push(run);
                        sample
                    }),
                    _ if settings.agent_only
                        || (round > 0 && count > settings.kube_proxy_every_round_up_to) =>
                    {
                        continue;
                    }
                    _ => {
                        let input = if loader == Loader::NftFile {
                            nft.path()
                        } else {
                            iptables.path()
                        };
                        load_rules(&scratch[l], loader, input, settings.tool_timeout)
                    }
                };
                match outcome {
                    Ok(sample) => {
                        eprintln!(
                            "[control plane] {count:>6} services  {:<44} {:>8.3} s  peak RSS {:>7.1} MiB",
                            loader.label(),
                            sample.0,
                            sample.1
                        );
                        samples[l].push(sample);
                    }
                    Err(error) => {
                        eprintln!(
                            "[control plane] {count:>6} services  {}: {error:#}",
                            loader.label()
                        );
                        failures[l].push(format!("{error:#}"));
                        samples[l].push((f64::NAN, f64::NAN));
                    }
                }
            }
        }
        let seconds = |l: usize| -> Vec<f64> { samples[l].iter().map(|s| s.0).collect() };
        for (l, &loader) in Loader::ALL.iter().enumerate() {
            let rss: Vec<f64> = samples[l].iter().map(|s| s.1).collect();
            let mut switchboard = seconds(0);
            switchboard.truncate(samples[l].len());
            full_sync.push(FullSyncRow {
                services: count,
                loader,
                seconds: stats::median(&seconds(l)),
                ratio_to_switchboard: stats::paired_ratio(&seconds(l), &switchboard),
                peak_rss_mib: stats::median(&rss),
                samples_seconds: seconds(l),
                failures: std::mem::take(&mut failures[l]),
            });
        }
        let row = agent_row(
            count,
            runs,
            full_sync
                .iter()
                .find(|r| r.services == count && r.loader == Loader::Switchboard),
        );
        eprintln!(
            "[control plane] {count:>6} services  agent: serving after {:.3} s, restart in sync {:.3} s, \
             one endpoint change API → maps p50 {:.3} ms p99 {:.3} ms, RSS {:.0} MiB, kernel maps {:.0} MiB",
            row.serving_seconds,
            row.restart_sync_seconds,
            row.change_p50_ms,
            row.change_p99_ms,
            row.rss_mib,
            row.kernel_map_mib
        );
        agent.push(row);
    }
    Ok(Results {
        rounds: settings.rounds,
        endpoints_per_service: ENDPOINTS_PER_SERVICE,
        lb_algorithm: settings.lb_algorithm.clone(),
        full_sync,
        agent,
    })
}

/// Medians of the agent's runs at one size.
fn agent_row(services: usize, runs: Vec<AgentRun>, sync: Option<&FullSyncRow>) -> AgentRow {
    let median = |f: fn(&AgentRun) -> f64| stats::median(&runs.iter().map(f).collect::<Vec<_>>());
    let changes: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.change_seconds.iter().copied())
        .collect();
    AgentRow {
        services,
        sync_seconds: median(|r| r.sync_seconds),
        serving_seconds: median(|r| r.serving_seconds),
        restart_sync_seconds: median(|r| r.restart_sync_seconds),
        restart_serving_seconds: median(|r| r.restart_serving_seconds),
        rss_mib: median(|r| r.rss_mib),
        peak_rss_mib: median(|r| r.peak_rss_mib),
        kernel_map_mib: median(|r| r.kernel_map_mib),
        changes: changes.len(),
        change_p50_ms: stats::percentile(&changes, 50.0) * 1e3,
        change_p99_ms: stats::percentile(&changes, 99.0) * 1e3,
        change_max_ms: stats::percentile(&changes, 100.0) * 1e3,
        failures: sync.map(|s| s.failures.clone()).unwrap_or_default(),
        failed_services: runs.iter().map(|r| r.failed_services).max().unwrap_or(0),
        runs,
    }
}

/// Empties `ns`, then loads `input` with `loader` there: (wall seconds, peak RSS MiB).
fn load_rules(ns: &NetNs, loader: Loader, input: &Path, timeout: Duration) -> anyhow::Result<(f64, f64)> {
    let (program, args): (&str, &[&str]) = match loader {
        Loader::IptablesNftRestore => ("iptables-nft-restore", &[]),
        Loader::IptablesLegacyRestore => ("iptables-legacy-restore", &["-w"]),
        Loader::NftFile => ("nft", &["-f", "-"]),
        Loader::Switchboard => unreachable!("Switchboard runs as a child"),
    };
    // Restoring empty tables replaces whatever the last round loaded.
    let empty = match loader {
        Loader::NftFile => "flush ruleset\n",
        _ => "*filter\nCOMMIT\n*nat\nCOMMIT\n",
    };
    let empty = process::temp_file_with(empty)?;
    process::run(
        Some(ns),
        Command::new(program).args(args),
        Some(empty.path()),
        timeout,
    )?;
    // Freeing a large rule set finishes in kernel workers; let it, so it does not slow the load.
    std::thread::sleep(Duration::from_millis(200));
    let finished = process::run(Some(ns), Command::new(program).args(args), Some(input), timeout)?;
    Ok((finished.wall.as_secs_f64(), finished.max_rss_kib as f64 / 1024.0))
}
