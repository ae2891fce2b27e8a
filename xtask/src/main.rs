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
    /// Run the demo: three web pods behind a ClusterIP in network namespaces (needs root).
    Demo {
        /// Extra arguments for `switchboard demo`, e.g. `-- --hold`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, BPF_PROG_TEST_RUN datapath, and netns integration tests (needs root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
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
            cargo(&["test", "--no-fail-fast"], &args)
        }
    }
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
