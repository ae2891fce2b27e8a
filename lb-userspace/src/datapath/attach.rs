//! Keeps the pod programs attached to every interface whose name matches the pattern: at start,
//! and whenever netlink reports a link change, so pods created later are covered.
//!
//! Links are tcx links pinned under `<pin dir>/links/`, so the datapath keeps serving when the
//! agent dies; the next agent finds the pins and swaps its programs in atomically.
use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use lb_common::program_names;
use nix::{
    net::if_::if_nameindex,
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
    },
};
use tokio::sync::Notify;

/// The two hooks on a pod interface: (program, attach point).
const HOOKS: [(&str, TcAttachType); 2] = [
    (program_names::FROM_POD, TcAttachType::Ingress),
    (program_names::TO_POD, TcAttachType::Egress),
];

/// One pod interface with both programs attached through pinned links.
struct Attached {
    name: String,
    links: Vec<(PathBuf, FdLink)>,
}

pub struct Attacher {
    pattern: glob::Pattern,
    links_dir: PathBuf,
    attached: HashMap<u32, Attached>,
}

impl Attacher {
    /// Loads both programs into the kernel (not yet attached anywhere); links are pinned under
    /// `pin_dir/links`.
    pub fn new(ebpf: &mut Ebpf, pattern: &str, pin_dir: &Path) -> anyhow::Result<Self> {
        let pattern =
            glob::Pattern::new(pattern).with_context(|| format!("invalid interface pattern {pattern:?}"))?;
        for (name, _) in HOOKS {
            program(ebpf, name)?
                .load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir)
            .with_context(|| format!("cannot create {}", links_dir.display()))?;
        Ok(Self {
            pattern,
            links_dir,
            attached: HashMap::new(),
        })
    }

    /// Names of the interfaces the programs are attached to.
    pub fn interfaces(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.attached.values().map(|a| a.name.as_str()).collect();
        names.sort();
        names
    }

    /// Attaches to matching interfaces that appeared (taking over links a previous agent pinned)
    /// and forgets those that went away. Interfaces are read in this process's network namespace.
    pub fn sync(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        let present: HashMap<u32, String> = if_nameindex()
            .context("cannot list network interfaces")?
            .iter()
            .filter_map(|i| Some((i.index(), i.name().to_str().ok()?.to_owned())))
            .filter(|(_, name)| self.pattern.matches(name))
            .collect();
        self.attached.retain(|index, attached| {
            let keep = present.get(index) == Some(&attached.name);
            if !keep {
                tracing::info!(interface = attached.name, "interface gone");
                remove_pins(&attached.links);
            }
            keep
        });
        self.remove_stale_pins(&present);
        for (index, name) in present {
            if self.attached.contains_key(&index) {
                continue;
            }
            match self.attach(ebpf, &name, index) {
                Ok(attached) => {
                    self.attached.insert(index, attached);
                }
                // The interface may have gone between listing and attaching.
                Err(error) => tracing::warn!(interface = name, "cannot attach: {error:#}"),
            }
        }
        Ok(())
    }

    /// Detaches from every interface and removes the link pins.
    pub fn detach_all(&mut self) {
        for attached in self.attached.values() {
            remove_pins(&attached.links);
        }
        // Dropping the last reference to an unpinned link detaches it.
        self.attached.clear();
    }

    /// `<ifindex>-<program>`: bpffs refuses dots in names, which interface names may have.
    fn pin_path(&self, index: u32, program: &str) -> PathBuf {
        self.links_dir.join(format!("{index}-{program}"))
    }

    /// Pins of interfaces that no longer exist (or no longer match) are dead links.
    fn remove_stale_pins(&self, present: &HashMap<u32, String>) {
        let Ok(entries) = std::fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let index = file
                .to_str()
                .and_then(|f| f.split_once('-'))
                .map(|(index, _)| index);
            let live = index
                .and_then(|i| i.parse::<u32>().ok())
                .is_some_and(|i| present.contains_key(&i));
            if !live {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn attach(&self, ebpf: &mut Ebpf, interface: &str, index: u32) -> anyhow::Result<Attached> {
        let mut links = Vec::new();
        let mut replaced = false;
        for (name, attach_type) in HOOKS {
            let path = self.pin_path(index, name);
            let program = program(ebpf, name)?;
            let link = match take_over(program, &path) {
                Some(link) => {
                    replaced = true;
                    link
                }
                None => {
                    // tcx on kernels >= 6.6 (aya picks it): no qdisc, and other tcx programs
                    // on the interface keep running.
                    let id = program.attach(interface, attach_type)?;
                    let link: FdLink = program.take_link(id)?.try_into()?;
                    link.pin(&path)
                        .with_context(|| format!("cannot pin {}", path.display()))?
                        .into()
                }
            };
            links.push((path, link));
        }
        let how = if replaced {
            "took over the pinned links"
        } else {
            "attached"
        };
        tracing::info!(interface, "{how}: from_pod (tc ingress), to_pod (tc egress)");
        Ok(Attached {
            name: interface.to_owned(),
            links,
        })
    }
}

/// Swaps `program` into the link a previous agent pinned at `path`, atomically: packets see the
/// old program or the new one, never neither. `None` when there is no usable pin.
fn take_over(program: &mut SchedClassifier, path: &Path) -> Option<FdLink> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    let replaced = SchedClassifierLink::try_from(FdLink::from(pinned))
        .map_err(anyhow::Error::from)
        .and_then(|link| Ok(program.attach_to_link(link)?))
        .and_then(|id| Ok(FdLink::try_from(program.take_link(id)?)?));
    match replaced {
        Ok(link) => Some(link),
        Err(error) => {
            // A link whose interface was deleted, its index since given to another one.
            tracing::debug!(pin = %path.display(), "pinned link not reusable ({error:#}); attaching anew");
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

fn remove_pins(links: &[(PathBuf, FdLink)]) {
    for (path, _) in links {
        let _ = std::fs::remove_file(path);
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} is missing from the datapath object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a TC classifier"))
}

/// `RTMGRP_LINK`: the rtnetlink multicast group announcing link changes.
const RTMGRP_LINK: u32 = 1;

/// Wakes `changed` whenever the kernel announces a link change in this network namespace. The
/// messages themselves are not parsed: [`Attacher::sync`] re-lists the interfaces.
pub fn watch_links(changed: Arc<Notify>) -> anyhow::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .context("cannot open a netlink socket")?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK)).context("cannot subscribe to link changes")?;
    std::thread::Builder::new()
        .name("link-watch".into())
        .spawn(move || {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                match recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
                    Ok(_) => changed.notify_one(),
                    // ENOBUFS: events were lost; a re-list catches up all the same.
                    Err(nix::errno::Errno::ENOBUFS | nix::errno::Errno::EINTR) => changed.notify_one(),
                    Err(error) => {
                        tracing::error!("netlink link watch stopped: {error}; relying on periodic rescans");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}
