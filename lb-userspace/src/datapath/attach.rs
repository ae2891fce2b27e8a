//! Keeps programs attached to every interface whose name matches a pattern: the pod programs on
//! pods' host-side interfaces, the nodeport programs on the node's external interfaces. At start,
//! and whenever netlink reports a link change, so interfaces created later are covered.
//!
//! Links are tcx and XDP links pinned under `<pin dir>/links/`, so the datapath keeps serving
//! when the agent dies; the next agent finds the pins and swaps its programs in atomically.
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
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
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

/// Where a program goes on an interface.
#[derive(Clone, Copy, Debug)]
enum Hook {
    Tc(&'static str, TcAttachType),
    Xdp(&'static str, XdpChoice),
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::Tc(name, _) | Hook::Xdp(name, _) => name,
        }
    }
}

/// How the nodeport program is attached to external interfaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpChoice {
    /// Native (driver) XDP where the driver has it, else generic XDP, said per interface.
    #[default]
    Auto,
    /// Native XDP only: an interface without it is reported and left without XDP.
    Native,
    /// Generic XDP, run by the kernel after it built the skb.
    Generic,
    /// No XDP: the TC ingress program alone handles traffic from outside.
    Off,
}

/// One interface with its programs attached through pinned links.
struct Attached {
    name: String,
    links: Vec<(PathBuf, FdLink)>,
}

pub struct Attacher {
    pattern: glob::Pattern,
    hooks: Vec<Hook>,
    links_dir: PathBuf,
    attached: HashMap<u32, Attached>,
}

impl Attacher {
    /// The pod programs (not yet attached anywhere): `from_pod` on TC ingress and `to_pod` on
    /// TC egress of every interface matching `pattern`. Links are pinned under `pin_dir/links`.
    pub fn new(ebpf: &mut Ebpf, pattern: &str, pin_dir: &Path) -> anyhow::Result<Self> {
        let hooks = vec![
            Hook::Tc(program_names::FROM_POD, TcAttachType::Ingress),
            Hook::Tc(program_names::TO_POD, TcAttachType::Egress),
        ];
        Self::with_hooks(ebpf, pattern, pin_dir, hooks)
    }

    /// The nodeport programs for the node's external interfaces: XDP as `xdp` says, then TC
    /// ingress (what XDP passed on, or everything without XDP) and TC egress.
    pub fn external(ebpf: &mut Ebpf, pattern: &str, pin_dir: &Path, xdp: XdpChoice) -> anyhow::Result<Self> {
        let mut hooks = Vec::new();
        if xdp != XdpChoice::Off {
            hooks.push(Hook::Xdp(program_names::NODEPORT_XDP, xdp));
        }
        hooks.push(Hook::Tc(program_names::NODEPORT_TC, TcAttachType::Ingress));
        hooks.push(Hook::Tc(program_names::NODEPORT_EGRESS, TcAttachType::Egress));
        Self::with_hooks(ebpf, pattern, pin_dir, hooks)
    }

    fn with_hooks(ebpf: &mut Ebpf, pattern: &str, pin_dir: &Path, hooks: Vec<Hook>) -> anyhow::Result<Self> {
        let pattern =
            glob::Pattern::new(pattern).with_context(|| format!("invalid interface pattern {pattern:?}"))?;
        for hook in &hooks {
            let name = hook.program();
            let loaded = match hook {
                Hook::Tc(..) => {
                    let program = tc_program(ebpf, name)?;
                    super::load_program(|| program.load())
                }
                Hook::Xdp(..) => {
                    let program = xdp_program(ebpf, name)?;
                    super::load_program(|| program.load())
                }
            };
            loaded.with_context(|| format!("the kernel refused program {name}"))?;
        }
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir)
            .with_context(|| format!("cannot create {}", links_dir.display()))?;
        Ok(Self {
            pattern,
            hooks,
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

    /// Index → name of every interface of this network namespace that the pattern matches,
    /// attached or not.
    pub fn matching(&self) -> anyhow::Result<HashMap<u32, String>> {
        Ok(if_nameindex()
            .context("cannot list network interfaces")?
            .iter()
            .filter_map(|i| Some((i.index(), i.name().to_str().ok()?.to_owned())))
            .filter(|(_, name)| self.pattern.matches(name))
            .collect())
    }

    /// Attaches to matching interfaces that appeared (taking over links a previous agent pinned)
    /// and forgets those that went away. Interfaces are read in this process's network namespace.
    pub fn sync(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<()> {
        let present = self.matching()?;
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

    /// Pins of this attacher's programs on interfaces that no longer exist (or no longer match)
    /// are dead links.
    fn remove_stale_pins(&self, present: &HashMap<u32, String>) {
        let Ok(entries) = std::fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some((index, program)) = file.to_str().and_then(|f| f.split_once('-')) else {
                continue;
            };
            if !self.hooks.iter().any(|h| h.program() == program) {
                continue;
            }
            let live = index.parse::<u32>().is_ok_and(|i| present.contains_key(&i));
            if !live {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn attach(&self, ebpf: &mut Ebpf, interface: &str, index: u32) -> anyhow::Result<Attached> {
        let mut links = Vec::new();
        let mut done = Vec::new();
        for &hook in &self.hooks {
            let name = hook.program();
            let path = self.pin_path(index, name);
            let taken_over = match hook {
                Hook::Tc(..) => take_over_tc(tc_program(ebpf, name)?, &path),
                Hook::Xdp(..) => take_over_xdp(xdp_program(ebpf, name)?, &path),
            };
            if let Some(link) = taken_over {
                links.push((path, link));
                done.push(format!("{name} (taken over)"));
                continue;
            }
            let (link, how) = match hook {
                Hook::Tc(_, attach_type) => {
                    // tcx on kernels >= 6.6 (aya picks it): no qdisc, and other tcx programs
                    // on the interface keep running.
                    let program = tc_program(ebpf, name)?;
                    let id = program.attach(interface, attach_type)?;
                    let how = match attach_type {
                        TcAttachType::Ingress => "tc ingress",
                        _ => "tc egress",
                    };
                    (FdLink::try_from(program.take_link(id)?)?, how.to_owned())
                }
                Hook::Xdp(_, choice) => {
                    match attach_xdp(xdp_program(ebpf, name)?, interface, index, choice) {
                        Ok(attached) => attached,
                        Err(error) => {
                            tracing::warn!(
                                interface,
                                "{error:#}; continuing without XDP there (TC ingress handles its traffic)"
                            );
                            continue;
                        }
                    }
                }
            };
            let pinned = link
                .pin(&path)
                .with_context(|| format!("cannot pin {}", path.display()))?;
            links.push((path, pinned.into()));
            done.push(format!("{name} ({how})"));
        }
        tracing::info!(interface, "attached: {}", done.join(", "));
        Ok(Attached {
            name: interface.to_owned(),
            links,
        })
    }
}

/// Attaches the XDP program as `choice` says: native where the driver has it, generic otherwise.
fn attach_xdp(
    program: &mut Xdp,
    interface: &str,
    index: u32,
    choice: XdpChoice,
) -> anyhow::Result<(FdLink, String)> {
    let modes: &[(XdpMode, &str)] = match choice {
        XdpChoice::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        XdpChoice::Native => &[(XdpMode::Driver, "native")],
        XdpChoice::Generic | XdpChoice::Off => &[(XdpMode::Skb, "generic")],
    };
    let mut refused = Vec::new();
    for &(mode, label) in modes {
        match program.attach_to_if_index(index, mode) {
            Ok(id) => {
                if !refused.is_empty() {
                    tracing::warn!(interface, "{}; fell back to {label} XDP", refused.join("; "));
                }
                let link = FdLink::try_from(program.take_link(id)?)
                    .context("the kernel attached XDP without a link (too old for bpf_link)")?;
                return Ok((link, format!("XDP {label}")));
            }
            Err(error) => refused.push(format!("{label} XDP refused ({error})")),
        }
    }
    anyhow::bail!("cannot attach XDP: {}", refused.join("; "))
}

/// Swaps `program` into the link a previous agent pinned at `path`, atomically: packets see the
/// old program or the new one, never neither. `None` when there is no usable pin.
fn take_over_tc(program: &mut SchedClassifier, path: &Path) -> Option<FdLink> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    let replaced = SchedClassifierLink::try_from(FdLink::from(pinned))
        .map_err(anyhow::Error::from)
        .and_then(|link| Ok(program.attach_to_link(link)?))
        .and_then(|id| Ok(FdLink::try_from(program.take_link(id)?)?));
    reusable(replaced, path)
}

/// [`take_over_tc`] for an XDP link.
fn take_over_xdp(program: &mut Xdp, path: &Path) -> Option<FdLink> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    let replaced = XdpLink::try_from(FdLink::from(pinned))
        .map_err(anyhow::Error::from)
        .and_then(|link| Ok(program.attach_to_link(link)?))
        .and_then(|id| Ok(FdLink::try_from(program.take_link(id)?)?));
    reusable(replaced, path)
}

fn reusable(replaced: anyhow::Result<FdLink>, path: &Path) -> Option<FdLink> {
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

fn tc_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} is missing from the datapath object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a TC classifier"))
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} is missing from the datapath object"))?
        .try_into()
        .with_context(|| format!("program {name} is not an XDP program"))
}

/// The rtnetlink multicast groups announcing link changes and address changes of each family.
const RTMGRP_LINK: u32 = 1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// Wakes `changed` whenever the kernel announces a link or address change in this network
/// namespace. The messages themselves are not parsed: [`Attacher::sync`] re-lists the
/// interfaces, and the node's addresses are read again.
pub fn watch_links(changed: Arc<Notify>) -> anyhow::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .context("cannot open a netlink socket")?;
    bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR),
    )
    .context("cannot subscribe to link changes")?;
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
