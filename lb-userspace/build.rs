//! Builds the eBPF datapath (`lb-ebpf`) and leaves the object in OUT_DIR, where `datapath::OBJECT`
//! embeds it: the agent can only ever ship the datapath built from the same sources.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// The rustup toolchain `cargo xtask setup` links to Debian's rustc (which ships the `core`
/// sources `-Z build-std` needs; RUSTC_BOOTSTRAP enables that flag on a stable compiler).
const EBPF_TOOLCHAIN: &str = "switchboard-ebpf";

fn main() -> anyhow::Result<()> {
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    // aya-build watches lb-ebpf; the datapath also compiles the shared map types.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-common")
    );
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(EBPF_TOOLCHAIN))
        .context("building the eBPF datapath failed; `cargo xtask setup` installs the toolchain it needs")
}
