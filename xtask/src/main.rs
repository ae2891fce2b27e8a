//! `cargo xtask …`: the project's own commands. Each one first runs `setup`, which installs only
//! what is missing, so a fresh root VM needs nothing but this checkout.
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Switchboard's build, demo and test commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, bpf-linker, the eBPF toolchain
    /// link, a bpffs mount). Skips whatever is already there.
    Setup,
    /// Build the eBPF object (target/bpfel-unknown-none/release/lb-ebpf).
    BuildEbpf,
    /// Run the demo: three web pods behind a dual-stack Service in network namespaces (needs root).
    Demo {
        /// Extra arguments for `switchboard demo`, e.g. `-- --hold`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, BPF_PROG_TEST_RUN datapath, netns integration tests, the datapath
    /// fuzzer on a million packets and a 20 s churn soak (needs root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the datapath: random and mutated frames through from_pod, to_pod and the nodeport
    /// programs (XDP, TC ingress, TC egress) with BPF_PROG_TEST_RUN, every verdict and output
    /// checked; fails on any violation (needs root).
    Fuzz {
        /// How many packets to run.
        #[arg(long, default_value_t = CI_FUZZ_PACKETS)]
        packets: u64,
        /// The seed of an earlier run, to replay its inputs [default: a new one, printed].
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Churn soak: the real agent on a netns lab with three Services under continuous TCP and UDP
    /// load while pods come, terminate and go and Services change; fails on any failed request
    /// or if conntrack and affinity occupancy do not return to their baseline (needs root).
    Soak {
        /// How long to keep the load and the churn going.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The seed of an earlier run, to replay its churn [default: a new one, printed].
        #[arg(long)]
        seed: Option<u64>,
        /// Starve the agent of CPU meanwhile (nice 19 beside a busy loop per CPU).
        #[arg(long)]
        starve: bool,
    },
    /// Benchmark against kube-proxy's iptables and nftables modes and the direct path; writes
    /// bench/REPORT.md, bench/results.json and plots (needs root).
    Bench {
        /// Extra arguments for the bench, e.g. `-- --quick` (about 5 minutes) or `-- --smoke`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace");
    std::env::set_current_dir(workspace)?;
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::BuildEbpf => {
            setup::run()?;
            build_ebpf()
        }
        Task::Demo { args } => {
            setup::run()?;
            require_root("the demo")?;
            cargo(
                &[
                    "run",
                    "--package",
                    "lb-userspace",
                    "--bin",
                    "switchboard",
                    "--",
                    "demo",
                ],
                &args,
            )
        }
        Task::Test { args } => {
            setup::run()?;
            require_root("the datapath and netns tests")?;
            let mut totals = cargo_test(&args);
            // The fuzzer and the soak count as one more test each, with a new seed each run.
            let fuzzed = totals.count(fuzz(CI_FUZZ_PACKETS, None));
            let soaked = totals.count(soak(CI_SOAK_SECONDS, &[]));
            let smoke = bench_smoke();
            // One closing line for the whole suite: cargo prints a line per test binary, the
            // last of which (a doctest run) may well count none.
            println!("tests: {} passed, {} failed", totals.passed, totals.failed);
            totals.result?;
            fuzzed?;
            soaked?;
            smoke
        }
        Task::Fuzz { packets, seed } => {
            setup::run()?;
            require_root("the fuzzer")?;
            fuzz(packets, seed)
        }
        Task::Soak {
            seconds,
            seed,
            starve,
        } => {
            setup::run()?;
            require_root("the soak")?;
            let mut extra = Vec::new();
            if let Some(seed) = seed {
                extra.extend(["--seed".to_owned(), seed.to_string()]);
            }
            if starve {
                extra.push("--starve".to_owned());
            }
            soak(seconds, &extra)
        }
        Task::Bench { args } => {
            setup::run()?;
            require_root("the benchmarks")?;
            cargo(
                &[
                    "bench",
                    "--package",
                    "lb-userspace",
                    "--bench",
                    "switchboard",
                    "--",
                ],
                &args,
            )
        }
    }
}

/// Packets `cargo xtask test` fuzzes, and the default of `cargo xtask fuzz`.
const CI_FUZZ_PACKETS: u64 = 1_000_000;
/// How long `cargo xtask test` soaks: long enough for every kind of churn to happen to every
/// Service (a change every 150–400 ms), short beside the rest of the suite.
const CI_SOAK_SECONDS: u64 = 20;

/// Runs the datapath fuzzer (tests/fuzz/, an example of lb-userspace so that it shares the test
/// build's artifacts); it prints its seed, counts and any failing input, and exits non-zero on a
/// violation.
fn fuzz(packets: u64, seed: Option<u64>) -> anyhow::Result<()> {
    let mut args = vec!["--packets".to_owned(), packets.to_string()];
    if let Some(seed) = seed {
        args.extend(["--seed".to_owned(), seed.to_string()]);
    }
    cargo(
        &["run", "--package", "lb-userspace", "--example", "fuzz", "--"],
        &args,
    )
}

/// Runs the churn soak (tests/soak/, an example of lb-userspace beside the agent binary it
/// starts), with `extra` arguments (`--seed`, `--starve`); it prints a summary and exits non-zero
/// on a failed request or leaked state.
fn soak(seconds: u64, extra: &[String]) -> anyhow::Result<()> {
    // The example finds the agent beside it; `cargo run` alone would not build the binary.
    cargo(
        &[
            "build",
            "--package",
            "lb-userspace",
            "--bin",
            "switchboard",
            "--example",
            "soak",
        ],
        &[],
    )?;
    let mut args = vec!["--seconds".to_owned(), seconds.to_string()];
    args.extend_from_slice(extra);
    cargo(
        &["run", "--package", "lb-userspace", "--example", "soak", "--"],
        &args,
    )
}

/// Builds lb-ebpf the way lb-userspace's build script (aya-build) does, with BTF for bpftool.
fn build_ebpf() -> anyhow::Result<()> {
    let status = Command::new("rustup")
        .args([
            "run",
            setup::EBPF_TOOLCHAIN,
            "cargo",
            "build",
            "--package",
            "lb-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "--cfg=bpf_target_arch=\"x86_64\"",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        .status()
        .context("cannot run rustup")?;
    if !status.success() {
        bail!("building the eBPF object failed");
    }
    println!("eBPF object: target/bpfel-unknown-none/release/lb-ebpf");
    Ok(())
}

/// Runs the bench with tiny sizes so CI notices when it stops working. It is built with the test
/// profile, whose artifacts `cargo test` just built, so only the bench's own code compiles; its
/// numbers mean nothing and go to a temporary directory.
fn bench_smoke() -> anyhow::Result<()> {
    let out = std::env::temp_dir().join(format!("switchboard-bench-smoke-{}", std::process::id()));
    let out_arg = out
        .to_str()
        .context("temporary directory is not UTF-8")?
        .to_owned();
    let result = cargo(
        &[
            "bench",
            "--profile",
            "test",
            "--package",
            "lb-userspace",
            "--bench",
            "switchboard",
            "--",
            "--smoke",
            "--out",
        ],
        &[out_arg],
    );
    let _ = std::fs::remove_dir_all(&out);
    result
}

struct Totals {
    passed: u64,
    failed: u64,
    result: anyhow::Result<()>,
}

impl Totals {
    /// Counts a run that is one test by itself (the fuzzer, the soak), and hands its result on.
    fn count(&mut self, run: anyhow::Result<()>) -> anyhow::Result<()> {
        match run {
            Ok(()) => self.passed += 1,
            Err(_) => self.failed += 1,
        }
        run
    }
}

/// `cargo test --no-fail-fast`, its output passed through, with the passed and failed tests of
/// every binary added up.
fn cargo_test(extra: &[String]) -> Totals {
    use std::io::{BufRead as _, BufReader};

    let mut totals = Totals {
        passed: 0,
        failed: 0,
        result: Ok(()),
    };
    let child = Command::new(env!("CARGO"))
        .args(["test", "--no-fail-fast"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            totals.result = Err(anyhow::Error::new(error).context("cannot run cargo"));
            return totals;
        }
    };
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        // "test result: ok. 9 passed; 0 failed; 0 ignored; …"
        if let Some(counts) = line.strip_prefix("test result: ") {
            for part in counts.split(['.', ';']) {
                match part.trim().split_once(' ') {
                    Some((n, "passed")) => totals.passed += n.parse::<u64>().unwrap_or(0),
                    Some((n, "failed")) => totals.failed += n.parse::<u64>().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    totals.result = match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(_) => Err(anyhow::anyhow!("cargo test failed")),
        Err(error) => Err(anyhow::Error::new(error).context("cargo test did not finish")),
    };
    totals
}

fn cargo(args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .args(extra)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} need root (network namespaces, eBPF): run as root, e.g. `sudo -E cargo xtask …`");
    }
    Ok(())
}
