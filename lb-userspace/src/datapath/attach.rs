//! Keeps the pod programs attached to every interface whose name matches the pattern: at start,
//! and whenever netlink reports a link change, so pods created later are covered.
use std::{collections::HashMap, os::fd::AsRawFd as _, sync::Arc};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLink},
};
use lb_common::program_names;
use nix::{
    net::if_::if_nameindex,
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
    },
};
use tokio::sync::Notify;

/// One pod interface with both programs attached; dropping it detaches them.
struct Attached {
    name: String,
    _from_pod: SchedClassifierLink,
    _to_pod: SchedClassifierLink,
}

pub struct Attacher {
    pattern: glob::Pattern,
    attached: HashMap<u32, Attached>,
}

impl Attacher {
    /// Loads both programs into the kernel (not yet attached anywhere).
    pub fn new(ebpf: &mut Ebpf, pattern: &str) -> anyhow::Result<Self> {
        let pattern =
            glob::Pattern::new(pattern).with_context(|| format!("invalid interface pattern {pattern:?}"))?;
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            program(ebpf, name)?
                .load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        Ok(Self {
            pattern,
            attached: HashMap::new(),
        })
    }

    /// Names of the interfaces the programs are attached to.
    pub fn interfaces(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.attached.values().map(|a| a.name.as_str()).collect();
        names.sort();
        names
    }

    /// Attaches to matching interfaces that appeared and forgets those that went away (the kernel
    /// already detached their links). Interfaces are read in this process's network namespace.
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
            }
            keep
        });
        for (index, name) in present {
            if self.attached.contains_key(&index) {
                continue;
            }
            match attach(ebpf, &name) {
                Ok(attached) => {
                    tracing::info!(
                        interface = name,
                        "attached from_pod (tc ingress) and to_pod (tc egress)"
                    );
                    self.attached.insert(index, attached);
                }
                // The interface may have gone between listing and attaching.
                Err(error) => tracing::warn!(interface = name, "cannot attach: {error:#}"),
            }
        }
        Ok(())
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} is missing from the datapath object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a TC classifier"))
}

fn attach(ebpf: &mut Ebpf, interface: &str) -> anyhow::Result<Attached> {
    let mut link = |name: &str, attach_type| -> anyhow::Result<SchedClassifierLink> {
        let program = program(ebpf, name)?;
        // tcx on kernels >= 6.6 (aya picks it); no qdisc needed and other tcx programs coexist.
        let id = program.attach(interface, attach_type)?;
        Ok(program.take_link(id)?)
    };
    Ok(Attached {
        name: interface.to_owned(),
        _from_pod: link(program_names::FROM_POD, TcAttachType::Ingress)?,
        _to_pod: link(program_names::TO_POD, TcAttachType::Egress)?,
    })
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
