//! The socket programs on a cgroup (by default the root of the cgroup v2 hierarchy), so host
//! processes and hostNetwork pods reach ClusterIPs and NodePorts, including
//! `127.0.0.1:<nodePort>`. The programs act only on sockets in this agent's network namespace,
//! whose cookie they find in the config map.
use std::{
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::Array,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use lb_common::{config, map_names, program_names};

pub struct SocketHooks {
    cgroup: PathBuf,
    links: Vec<(PathBuf, FdLink)>,
}

impl SocketHooks {
    /// Loads and attaches the socket programs to `cgroup` (the cgroup v2 root when `None`). Links
    /// a previous agent pinned are replaced after the new ones are in place: in between both run,
    /// and the second finds a backend address where the first put it, which is no frontend.
    pub fn attach(ebpf: &mut Ebpf, cgroup: Option<&Path>, pin_dir: &Path) -> anyhow::Result<Self> {
        let cgroup = match cgroup {
            Some(path) => path.to_owned(),
            None => cgroup2_root()?,
        };
        let mut config: Array<_, u64> = ebpf
            .map_mut(map_names::CONFIG)
            .context("the datapath object has no config map")?
            .try_into()?;
        config.set(config::NETNS_COOKIE, netns_cookie()?, 0)?;
        let directory = std::fs::File::open(&cgroup)
            .with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir)?;
        let mut links = Vec::new();
        for name in program_names::SOCKET {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} is missing from the datapath object"))?
                .try_into()?;
            super::load_program(|| program.load())
                .with_context(|| format!("the kernel refused program {name}"))?;
            // A bpf_link takes no attach flags (the kernel refuses them) and is always one of
            // many: other programs on the cgroup keep running.
            let id = program
                .attach(&directory, CgroupAttachMode::Single)
                .with_context(|| format!("cannot attach {name} to cgroup {}", cgroup.display()))?;
            let link: FdLink = program.take_link(id)?.try_into()?;
            let path = links_dir.join(format!("cgroup-{name}"));
            // Unpinning the previous agent's link detaches it: this one already runs.
            let _ = std::fs::remove_file(&path);
            let pinned: FdLink = link
                .pin(&path)
                .with_context(|| format!("cannot pin {}", path.display()))?
                .into();
            links.push((path, pinned));
        }
        tracing::info!(cgroup = %cgroup.display(), "attached the socket programs: the node reaches services by connect()");
        Ok(Self { cgroup, links })
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Detaches: removes the pins; the links go with the last reference.
    pub fn detach(self) {
        for (path, _) in &self.links {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on most nodes, sometimes
/// `/sys/fs/cgroup/unified` beside v1 hierarchies).
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            let mount_point = fields.split(' ').nth(4)?;
            (fs.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 hierarchy is mounted; give --host-cgroup or mount one")
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE, Linux 5.14).
fn netns_cookie() -> anyhow::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("cannot open a socket")?;
    let mut cookie = 0u64;
    let mut length = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a u64 and `length` says so.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut length,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot read the network namespace cookie");
    }
    Ok(cookie)
}
