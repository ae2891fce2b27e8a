//! Idempotent installation of the toolchain recipe in DESIGN.md: each step checks first and
//! does nothing when its result is already there.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// The rustup toolchain name lb-userspace's build script builds the datapath with.
pub const EBPF_TOOLCHAIN: &str = "switchboard-ebpf";

/// Debian's rustc ships the `core` sources (rust-web-src) that `-Z build-std` needs; bpf-linker
/// links against LLVM 22; the rest is for the tests and debugging.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    debian_packages()?;
    toolchain_link()?;
    bpf_linker()?;
    bpffs()
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .is_ok_and(|o| o.stdout == b"installed")
}

fn toolchain_link() -> anyhow::Result<()> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("cannot run rustup")?;
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(EBPF_TOOLCHAIN))
    {
        return Ok(());
    }
    eprintln!("setup: linking Debian's rustc as the rustup toolchain {EBPF_TOOLCHAIN}");
    exec(Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 5 minutes)");
    let path = format!("{LLVM_PREFIX}/bin:{}", std::env::var("PATH").unwrap_or_default());
    exec(
        Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path),
    )
}

/// The tests pin maps under /sys/fs/bpf; a fresh machine has nothing mounted there.
fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        bail!("/sys/fs/bpf does not exist: is this a Linux kernel with BPF?");
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    // Not fatal: a container build cannot mount, and the agent and tests mount it themselves.
    if let Err(error) = exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        eprintln!("setup: {error:#}; continuing (the agent mounts bpffs itself when it can)");
    }
    Ok(())
}

fn exec(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
