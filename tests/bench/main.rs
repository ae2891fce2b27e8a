//! `cargo xtask bench`: Switchboard against kube-proxy's iptables and nftables modes and against
//! the direct path, on this machine, in one invocation. Writes `bench/results.json`,
//! `bench/REPORT.md` and the plots it links to.
//!
//! Three sections (see each module): `datapath` (per-packet cost by BPF_PROG_TEST_RUN), `e2e`
//! (connection and request rates through network namespaces), `control_plane` (programming time,
//! endpoint-change latency, memory), and `maglev` (table balance and disruption). Every comparison is between runs interleaved in this
//! invocation, and claims are ratios of those; absolute numbers are printed alongside.
//!
//! Needs root. Rules are only ever loaded into network namespaces the bench creates, and traffic
//! only goes to addresses inside them.
mod agent_run;
mod control_plane;
mod datapath;
mod e2e;
#[path = "../common/fake_api.rs"]
#[expect(
    dead_code,
    reason = "the tests' API server: the bench uses what serves objects, not the faults"
)]
mod fake_api;
mod kube_proxy_rules;
mod losses;
mod machine;
mod maglev;
mod plots;
mod process;
mod report;
mod scratch;
mod services;
mod stats;
mod traffic;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "switchboard-bench",
    about = "Switchboard against kube-proxy (iptables, nftables) and the direct path"
)]
struct Args {
    /// Fewer rounds, shorter samples and smaller sizes: about 5 minutes.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Tiny sizes, to check the bench still works (CI): under 30 seconds.
    #[arg(long)]
    smoke: bool,
    /// Where to write results.json, REPORT.md and the plots [default: bench/ in the workspace].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only these sections.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// The agent's --lb-algorithm in the control-plane section [default: the agent's own,
    /// Maglev]; the report says when it is not the default.
    #[arg(long, value_name = "ALGORITHM")]
    control_plane_lb_algorithm: Option<String>,
    /// The control-plane section without kube-proxy's tools: the agent alone.
    #[arg(long)]
    control_plane_agent_only: bool,
    /// Services counts for the control-plane section instead of the mode's, e.g. `100000`.
    #[arg(long, value_delimiter = ',', value_name = "N,…")]
    control_plane_services: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Section {
    Datapath,
    E2e,
    ControlPlane,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

struct Settings {
    datapath: datapath::Settings,
    e2e: e2e::Settings,
    control_plane: control_plane::Settings,
}

impl Settings {
    fn for_mode(mode: Mode) -> Self {
        match mode {
            Mode::Full => Self {
                datapath: datapath::Settings {
                    service_counts: vec![1, 1_000, 10_000, 100_000],
                    rounds: 31,
                    repeat: 1_000_000,
                    new_flows: 5_000,
                },
                e2e: e2e::Settings {
                    service_counts: vec![1, 1_000, 10_000],
                    rounds: 7,
                    sample: Duration::from_secs(2),
                    warmup: Duration::from_millis(500),
                },
                control_plane: control_plane::Settings {
                    service_counts: vec![1_000, 10_000, 50_000, 100_000],
                    rounds: 3,
                    changes: 300,
                    change_budget: Duration::from_secs(60),
                    tool_timeout: Duration::from_secs(600),
                    kube_proxy_every_round_up_to: 10_000,
                    lb_algorithm: None,
                    agent_only: false,
                },
            },
            Mode::Quick => Self {
                datapath: datapath::Settings {
                    service_counts: vec![1, 1_000, 10_000, 100_000],
                    rounds: 11,
                    repeat: 200_000,
                    new_flows: 1_000,
                },
                // 10k services are left to the full run: loading them takes `nft -f` minutes.
                e2e: e2e::Settings {
                    service_counts: vec![1, 1_000],
                    rounds: 3,
                    sample: Duration::from_millis(500),
                    warmup: Duration::from_millis(200),
                },
                // The goals' size (10k) once each: kube-proxy's tools take tens of seconds there.
                control_plane: control_plane::Settings {
                    service_counts: vec![1_000, 10_000],
                    rounds: 1,
                    changes: 100,
                    change_budget: Duration::from_secs(10),
                    tool_timeout: Duration::from_secs(120),
                    kube_proxy_every_round_up_to: 10_000,
                    lb_algorithm: None,
                    agent_only: false,
                },
            },
            Mode::Smoke => Self {
                datapath: datapath::Settings {
                    service_counts: vec![1, 100],
                    rounds: 3,
                    repeat: 10_000,
                    new_flows: 100,
                },
                e2e: e2e::Settings {
                    service_counts: vec![1, 10],
                    rounds: 1,
                    sample: Duration::from_millis(200),
                    warmup: Duration::from_millis(100),
                },
                control_plane: control_plane::Settings {
                    service_counts: vec![100],
                    rounds: 1,
                    changes: 20,
                    change_budget: Duration::from_secs(2),
                    tool_timeout: Duration::from_secs(30),
                    kube_proxy_every_round_up_to: usize::MAX,
                    lb_algorithm: None,
                    agent_only: false,
                },
            },
        }
    }
}

/// Everything `results.json` holds.
#[derive(Serialize)]
pub struct Results {
    pub meta: machine::Meta,
    pub datapath: Option<datapath::Results>,
    pub e2e: Option<e2e::Results>,
    pub control_plane: Option<control_plane::Results>,
    pub maglev: maglev::Results,
    /// Sections that failed, with why.
    pub errors: Vec<String>,
}

fn main() {
    if let Err(error) = run(Args::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the bench loads eBPF programs and builds network namespaces: run it as root (`cargo xtask bench`)"
        );
    }
    let mode = match (args.quick, args.smoke) {
        (_, true) => Mode::Smoke,
        (true, _) => Mode::Quick,
        _ => Mode::Full,
    };
    let out = args.out.unwrap_or_else(|| workspace_root().join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut settings = Settings::for_mode(mode);
    settings.control_plane.lb_algorithm = args.control_plane_lb_algorithm.clone();
    settings.control_plane.agent_only = args.control_plane_agent_only;
    if !args.control_plane_services.is_empty() {
        settings.control_plane.service_counts = args.control_plane_services.clone();
    }
    let wanted = |section| args.only.is_empty() || args.only.contains(&section);
    let started = Instant::now();
    eprintln!("bench: {mode:?} run, results into {}", out.display());

    let mut errors = Vec::new();
    let mut section = |name: &str, run: &mut dyn FnMut() -> anyhow::Result<()>| {
        let section_started = Instant::now();
        if let Err(error) = run() {
            eprintln!("[{name}] failed: {error:#}");
            errors.push(format!("{name}: {error:#}"));
        }
        eprintln!("[{name}] took {:.0} s", section_started.elapsed().as_secs_f64());
    };
    let (mut datapath, mut e2e, mut control_plane) = (None, None, None);
    if wanted(Section::Datapath) {
        section("datapath", &mut || {
            datapath = Some(datapath::run(&settings.datapath)?);
            Ok(())
        });
    }
    if wanted(Section::E2e) {
        section("e2e", &mut || {
            e2e = Some(e2e::run(&settings.e2e)?);
            Ok(())
        });
    }
    if wanted(Section::ControlPlane) {
        section("control plane", &mut || {
            control_plane = Some(control_plane::run(&settings.control_plane)?);
            Ok(())
        });
    }

    let results = Results {
        meta: machine::Meta::collect(mode, started.elapsed()),
        datapath,
        e2e,
        control_plane,
        maglev: maglev::run(&[3, 10, 100, 1000]),
        errors,
    };
    report::write(&out, &results)?;
    eprintln!(
        "bench: done in {:.0} s; {} and {}",
        started.elapsed().as_secs_f64(),
        out.join("REPORT.md").display(),
        out.join("results.json").display()
    );
    if !results.errors.is_empty() {
        bail!(
            "{} section(s) failed: {}",
            results.errors.len(),
            results.errors.join("; ")
        );
    }
    Ok(())
}

/// The bench is built from lb-userspace, one level below the workspace root.
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-userspace is inside the workspace")
        .to_owned()
}
