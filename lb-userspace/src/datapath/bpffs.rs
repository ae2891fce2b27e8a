//! The BPF filesystem the maps are pinned in. A fresh machine may not have it mounted.
use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Makes sure `pin_dir` is a directory on a bpffs, mounting bpffs at its parent (normally
/// `/sys/fs/bpf`) when nothing is mounted there.
pub fn prepare_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    let mount_point = pin_dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    if !is_bpffs(mount_point) {
        std::fs::create_dir_all(mount_point)
            .with_context(|| format!("cannot create {}", mount_point.display()))?;
        mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "{} is not a BPF filesystem and mounting one failed; run as root or mount it: \
                 mount -t bpf bpf {}",
                mount_point.display(),
                mount_point.display()
            )
        })?;
        tracing::info!(path = %mount_point.display(), "mounted bpffs");
    }
    std::fs::create_dir_all(pin_dir).with_context(|| format!("cannot create {}", pin_dir.display()))?;
    if !is_bpffs(pin_dir) {
        bail!("{} is not on a BPF filesystem", pin_dir.display());
    }
    restrict(pin_dir)
}

/// The pins are the datapath's state and its controls: only their owner may reach them. bpffs is
/// often world-writable (sticky, like /tmp), so a directory someone else made beforehand is
/// refused rather than trusted.
fn restrict(pin_dir: &Path) -> anyhow::Result<()> {
    let owner = std::fs::metadata(pin_dir)
        .with_context(|| format!("cannot read {}", pin_dir.display()))?
        .uid();
    let me = nix::unistd::geteuid().as_raw();
    if owner != me {
        bail!(
            "{} belongs to uid {owner}, not to this agent (uid {me}); remove it or choose another --pin-dir",
            pin_dir.display()
        );
    }
    std::fs::set_permissions(pin_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {} to its owner", pin_dir.display()))
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}
