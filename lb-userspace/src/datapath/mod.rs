//! The kernel side, seen from userspace: loading the embedded object with its maps pinned, the
//! typed map handles the reconciler writes through, and attaching programs to interfaces.
pub mod attach;
pub mod bpffs;
pub mod maps;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::{Ebpf, EbpfLoader};
use lb_common::map_names;

/// The datapath object, built from `lb-ebpf` by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The loaded programs, with every map pinned under `pin_dir` (reused when already pinned, so a
/// restarted agent finds the state the datapath kept serving with).
pub struct Datapath {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
}

impl Datapath {
    pub fn load(pin_dir: &Path) -> anyhow::Result<Self> {
        bpffs::prepare_pin_dir(pin_dir)?;
        maps::drop_incompatible_pins(pin_dir)?;
        let pins: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(OBJECT).map_err(|error| {
            anyhow::Error::new(error).context(
                "cannot load the eBPF datapath: switchboard needs root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)",
            )
        })?;
        tracing::info!(pin_dir = %pin_dir.display(), "datapath loaded, maps pinned");
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    pub fn maps(&self) -> anyhow::Result<maps::ServiceMaps> {
        maps::ServiceMaps::open(&self.pin_dir).context("cannot open the pinned maps")
    }
}
