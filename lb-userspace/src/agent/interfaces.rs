//! The datapath's hooks: the pod programs on pods' interfaces and the nodeport programs on the
//! node's external ones (followed as interfaces come and go), the socket programs on a cgroup,
//! and the node's addresses written for NodePorts.
use std::{path::Path, sync::Arc, time::Duration};

use lb_common::program_names;
use tokio::sync::Notify;

use crate::datapath::{
    Datapath, addresses,
    attach::{self, Attacher, XdpChoice},
    maps::ServiceMaps,
    socket::SocketHooks,
};

/// Interfaces are re-listed this often even without a netlink event, as a safety net.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Where the programs go.
#[derive(Clone, Debug)]
pub struct Hooks {
    /// Glob of pods' host-side interfaces.
    pub pods: String,
    /// Glob of the node's external interfaces, if any.
    pub external: Option<String>,
    pub xdp_mode: XdpChoice,
    /// The cgroup for the socket programs: `None` the cgroup v2 root, `Some("off")` none.
    pub host_cgroup: Option<String>,
}

impl Hooks {
    /// The programs these hooks attach, which [`Datapath::load_programs`] loads up front.
    pub fn programs(&self) -> Vec<&'static str> {
        let mut programs = vec![program_names::FROM_POD, program_names::TO_POD];
        if self.external.is_some() {
            if self.xdp_mode != XdpChoice::Off {
                programs.push(program_names::NODEPORT_XDP);
            }
            programs.extend([program_names::NODEPORT_TC, program_names::NODEPORT_EGRESS]);
        }
        if self.host_cgroup.as_deref() != Some("off") {
            programs.extend(program_names::SOCKET);
        }
        programs
    }
}

/// The attached datapath.
pub struct Attached {
    pub datapath: Datapath,
    pods: Attacher,
    external: Option<Attacher>,
    sockets: Option<SocketHooks>,
}

impl Attached {
    /// Attaches every hook (the loaded programs replace a previous agent's atomically) and
    /// wakes `links_changed` on every netlink link or address change from now on.
    pub fn attach(
        mut datapath: Datapath,
        hooks: &Hooks,
        links_changed: Arc<Notify>,
        maps: &mut ServiceMaps,
    ) -> anyhow::Result<Self> {
        let pin_dir = datapath.pin_dir.clone();
        let pods = Attacher::new(&mut datapath.ebpf, &hooks.pods, &pin_dir)?;
        let external = match &hooks.external {
            Some(pattern) => Some(Attacher::external(
                &mut datapath.ebpf,
                pattern,
                &pin_dir,
                hooks.xdp_mode,
            )?),
            None => None,
        };
        let sockets = socket_hooks(&mut datapath, hooks.host_cgroup.as_deref(), &pin_dir)?;
        attach::watch_links(links_changed)?;
        let mut attached = Self {
            datapath,
            pods,
            external,
            sockets,
        };
        attached.sync(maps)?;
        attached.datapath.finish_migrations()?;
        Ok(attached)
    }

    /// Writes the node's addresses (which NodePorts answer on, and which external flows leaving
    /// for other nodes take as source), then attaches to interfaces that appeared: a program
    /// never runs before the addresses it checks are there.
    pub fn sync(&mut self, maps: &mut ServiceMaps) -> anyhow::Result<()> {
        let external_indexes = match &self.external {
            Some(external) => external.matching()?.into_keys().collect(),
            None => Vec::new(),
        };
        if let Err(error) = addresses::program(maps, external_indexes) {
            tracing::error!("{error:#}");
        }
        let ebpf = &mut self.datapath.ebpf;
        self.pods.sync(ebpf)?;
        if let Some(external) = &mut self.external {
            external.sync(ebpf)?;
        }
        Ok(())
    }

    /// Detaches every hook (`keep` false), or leaves them serving for the next agent.
    pub fn finish(mut self, keep: bool) {
        let interfaces =
            self.pods.interfaces().len() + self.external.as_ref().map_or(0, |e| e.interfaces().len());
        if keep {
            tracing::info!(
                interfaces,
                "exiting; the datapath stays attached and keeps serving"
            );
            return;
        }
        self.pods.detach_all();
        if let Some(external) = &mut self.external {
            external.detach_all();
        }
        if let Some(sockets) = self.sockets.take() {
            sockets.detach();
        }
        tracing::info!(
            interfaces,
            "detached; maps stay pinned in {}",
            self.datapath.pin_dir.display()
        );
    }
}

fn socket_hooks(
    datapath: &mut Datapath,
    cgroup: Option<&str>,
    pin_dir: &Path,
) -> anyhow::Result<Option<SocketHooks>> {
    Ok(match cgroup {
        Some("off") => None,
        Some(path) => Some(SocketHooks::attach(
            &mut datapath.ebpf,
            Some(Path::new(path)),
            pin_dir,
        )?),
        None => match SocketHooks::attach(&mut datapath.ebpf, None, pin_dir) {
            Ok(hooks) => Some(hooks),
            Err(error) => {
                tracing::warn!("{error:#}; processes of the node itself will not reach services");
                None
            }
        },
    })
}
