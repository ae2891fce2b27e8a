//! Control plane: how long it takes to program N services × 10 endpoints from nothing, how long one
//! endpoint change takes to reach the maps, and the memory it takes — Switchboard's reconciler
//! writing BPF maps against `iptables-restore` and `nft -f` loading kube-proxy's equivalent rule
//! sets.
//!
//! Switchboard runs as a child process of the bench (this same binary with
//! `--control-plane-child N`), so its peak RSS is that of a process holding the desired state, the
//! reconciler and the maps for N services, not the bench's. Each child starts from a fresh pin
//! directory; each kube-proxy tool loads into an emptied scratch namespace. Its input starts at
//! the planned desired state (the reconciler's input): reading manifests and computing the model
//! are not part of either side's number.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_userspace::{
    datapath::{Capacity, Datapath},
    lab::NetNs,
    reconcile::{DesiredService, FrontendKey, Reconciler},
};
use serde::{Deserialize, Serialize};

use crate::{
    kube_proxy_rules, process,
    scratch::{PIN_OWNER, PinDir, unique_prefix},
    services::{self, CIDRS, ENDPOINTS_PER_SERVICE, Family},
    stats,
};

pub struct Settings {
    pub service_counts: Vec<usize>,
    pub rounds: usize,
    /// Endpoint changes per Switchboard child, at most…
    pub changes: usize,
    /// …and for at most this long (at least three are always made).
    pub change_budget: Duration,
    /// A tool still loading after this long is stopped and its run recorded as failed.
    pub tool_timeout: Duration,
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
            Self::Switchboard => "Switchboard (reconciler → BPF maps)",
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

#[derive(Debug, Serialize)]
pub struct ChangeRow {
    pub services: usize,
    pub changes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub rounds: usize,
    pub endpoints_per_service: usize,
    pub full_sync: Vec<FullSyncRow>,
    pub endpoint_changes: Vec<ChangeRow>,
}

/// What a Switchboard child reports on its standard output, as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    full_sync_seconds: f64,
    change_seconds: Vec<f64>,
    vm_hwm_kib: u64,
}

pub fn run(settings: &Settings) -> anyhow::Result<Results> {
    // One scratch namespace per kube-proxy tool, emptied before each load.
    let scratch: Vec<NetNs> = (0..Loader::ALL.len())
        .map(|_| NetNs::create(&unique_prefix('c')))
        .collect::<anyhow::Result<_>>()?;
    let mut full_sync = Vec::new();
    let mut endpoint_changes = Vec::new();
    for &count in &settings.service_counts {
        let ports: Vec<_> = (0..count).map(services::filler).collect();
        let iptables = process::temp_file_with(&kube_proxy_rules::iptables_restore(&ports, CIDRS))?;
        let nft = process::temp_file_with(&kube_proxy_rules::nft_script(&ports, CIDRS))?;
        drop(ports);

        // [loader][round]: (seconds, peak RSS in MiB), NaN for a failed run.
        let mut samples = vec![Vec::<(f64, f64)>::new(); Loader::ALL.len()];
        let mut failures = vec![Vec::<String>::new(); Loader::ALL.len()];
        let mut change_seconds = Vec::new();
        let order: Vec<usize> = (0..Loader::ALL.len()).collect();
        for round in 0..settings.rounds {
            for l in stats::rotated(&order, round) {
                let loader = Loader::ALL[l];
                let outcome = match loader {
                    Loader::Switchboard => switchboard_child(count, settings).map(|report| {
                        change_seconds.extend_from_slice(&report.change_seconds);
                        (report.full_sync_seconds, report.vm_hwm_kib as f64 / 1024.0)
                    }),
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
                            "[control plane] {count:>6} services  {:<36} {:>8.3} s  peak RSS {:>7.1} MiB",
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
            full_sync.push(FullSyncRow {
                services: count,
                loader,
                seconds: stats::median(&seconds(l)),
                ratio_to_switchboard: stats::paired_ratio(&seconds(l), &seconds(0)),
                peak_rss_mib: stats::median(&rss),
                samples_seconds: seconds(l),
                failures: std::mem::take(&mut failures[l]),
            });
        }
        let change = ChangeRow {
            services: count,
            changes: change_seconds.len(),
            p50_ms: stats::percentile(&change_seconds, 50.0) * 1e3,
            p99_ms: stats::percentile(&change_seconds, 99.0) * 1e3,
            max_ms: stats::percentile(&change_seconds, 100.0) * 1e3,
        };
        eprintln!(
            "[control plane] {count:>6} services  one endpoint change → maps: p50 {:.3} ms, p99 {:.3} ms over {} changes",
            change.p50_ms, change.p99_ms, change.changes
        );
        endpoint_changes.push(change);
    }
    Ok(Results {
        rounds: settings.rounds,
        endpoints_per_service: ENDPOINTS_PER_SERVICE,
        full_sync,
        endpoint_changes,
    })
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

fn switchboard_child(count: usize, settings: &Settings) -> anyhow::Result<ChildReport> {
    let exe = std::env::current_exe().context("cannot find the bench binary")?;
    let budget_ms = (settings.change_budget.as_millis() as usize / settings.rounds.max(1)).to_string();
    let changes = settings.changes.div_ceil(settings.rounds.max(1)).to_string();
    let finished = process::run(
        None,
        Command::new(exe).args([
            "--control-plane-child",
            &count.to_string(),
            "--child-changes",
            &changes,
            "--child-change-budget-ms",
            &budget_ms,
        ]),
        None,
        settings.tool_timeout + settings.change_budget,
    )?;
    let line = finished
        .stdout
        .lines()
        .last()
        .context("the Switchboard child printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("cannot read the child's report {line:?}"))
}

/// The child's side: programs `count` services into a fresh datapath, then makes `changes`
/// single-endpoint changes (within `budget`), and prints a [`ChildReport`].
pub fn child(count: usize, changes: usize, budget: Duration) -> anyhow::Result<()> {
    let pins = PinDir::new(PIN_OWNER, "cp");
    let needed = (count * ENDPOINTS_PER_SERVICE) as u32 + 64;
    let default = Capacity::default();
    let capacity = Capacity {
        services: default.services.max(count as u32 + 16),
        backends: default.backends.max(needed),
        ..default
    };
    let datapath = Datapath::load_with_capacity(pins.path(), capacity)?;
    let mut maps = datapath.maps()?;
    let mut reconciler = Reconciler::new(maps.read_programmed()?);
    let ports: Vec<_> = (0..count).map(services::filler).collect();
    let mut desired: BTreeMap<FrontendKey, DesiredService> = services::desired(&ports, &[Family::Ipv4]);
    drop(ports);

    let started = Instant::now();
    let report = reconciler.apply(&desired, &mut maps);
    let full_sync_seconds = started.elapsed().as_secs_f64();
    ensure!(report.failed.is_empty(), "map writes failed: {:?}", report.failed);

    let keys: Vec<FrontendKey> = desired.keys().copied().collect();
    let mut change_seconds = Vec::new();
    let changes_started = Instant::now();
    for k in 0..changes {
        if k >= 3 && changes_started.elapsed() > budget {
            break;
        }
        // A different service each time; one endpoint replaced by a pod never seen before.
        let service = desired
            .get_mut(&keys[(k * 7919) % keys.len()])
            .expect("a key of the map");
        let slot = k % service.backends.len();
        service.backends[slot] = (
            Ipv4Addr::from(u32::from_be_bytes([10, 64, 0, 0]) + k as u32),
            8080,
        )
            .into();
        let started = Instant::now();
        let report = reconciler.apply(&desired, &mut maps);
        change_seconds.push(started.elapsed().as_secs_f64());
        ensure!(
            report.failed.is_empty() && report.writes > 0,
            "the endpoint change was not written: {report:?}"
        );
    }
    let report = ChildReport {
        full_sync_seconds,
        change_seconds,
        vm_hwm_kib: vm_hwm_kib()?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// This process's peak resident set size so far.
fn vm_hwm_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}
