//! The kernel side, seen from userspace: loading the embedded object with its maps pinned, the
//! typed map handles the reconciler writes through, and attaching programs to interfaces.
pub mod addresses;
pub mod attach;
pub mod bpffs;
pub mod conntrack_gc;
pub mod maps;
pub mod memory;
pub mod migrate;
mod raw;
pub mod socket;
mod tables;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{Program, ProgramError},
};
use lb_common::{RejectLimit, capacity, map_names};

/// The datapath object, built from `lb-ebpf` by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The loaded programs, with every map pinned under `pin_dir` (reused when already pinned, so a
/// restarted agent finds the state the datapath kept serving with).
pub struct Datapath {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
}

/// How many entries each map holds, and its IPv6 twin alike. A pinned map of another capacity
/// is replaced by one of this capacity, its entries carried over (see [`migrate`]). The backend
/// tables have no capacity: their space grows with the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Frontends, and ClusterIPs.
    pub services: u32,
    /// Backend entries: an endpoint in each backend set it belongs to.
    pub backends: u32,
    pub conntrack: u32,
    /// Fragmented datagrams in flight whose later fragments are still to come.
    pub fragments: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            conntrack: capacity::CONNTRACK,
            fragments: capacity::FRAGMENTS,
        }
    }
}

impl Datapath {
    pub fn load(pin_dir: &Path) -> anyhow::Result<Self> {
        Self::load_with_capacity(pin_dir, Capacity::default())
    }

    pub fn load_with_capacity(pin_dir: &Path, capacity: Capacity) -> anyhow::Result<Self> {
        Self::load_object(OBJECT, pin_dir, capacity)
    }

    /// Loads the datapath from an object file instead of the embedded one: a datapath rebuilt
    /// from these sources (same maps and programs), rolled out without a new agent binary.
    pub fn load_file(object: &Path, pin_dir: &Path, capacity: Capacity) -> anyhow::Result<Self> {
        let bytes = std::fs::read(object)
            .with_context(|| format!("cannot read the eBPF object {}", object.display()))?;
        let datapath = Self::load_object(&bytes, pin_dir, capacity)
            .with_context(|| format!("cannot load the eBPF object {}", object.display()))?;
        tracing::info!(object = %object.display(), "the datapath comes from this object file, not the built-in one");
        Ok(datapath)
    }

    fn load_object(object: &[u8], pin_dir: &Path, capacity: Capacity) -> anyhow::Result<Self> {
        bpffs::prepare_pin_dir(pin_dir)?;
        migrate::set_aside(pin_dir, capacity)?;
        let pins: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(map_names::SERVICES, capacity.services)
            .map_max_entries(map_names::SERVICES6, capacity.services)
            .map_max_entries(map_names::BACKENDS, capacity.backends)
            .map_max_entries(map_names::BACKENDS6, capacity.backends)
            .map_max_entries(map_names::CLUSTER_IPS, capacity.services)
            .map_max_entries(map_names::CLUSTER_IPS6, capacity.services)
            .map_max_entries(map_names::CONNTRACK, capacity.conntrack)
            .map_max_entries(map_names::CONNTRACK6, capacity.conntrack)
            .map_max_entries(map_names::FRAGMENTS, capacity.fragments)
            .map_max_entries(map_names::FRAGMENTS6, capacity.fragments)
            .map_max_entries(map_names::SERVICE_STATS, capacity.services);
        let ebpf = loader.load(object).map_err(|error| {
            anyhow::Error::new(error).context(
                "cannot load the eBPF datapath: switchboard needs root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)",
            )
        })?;
        migrate::carry_over(pin_dir, migrate::Finish::No)?;
        tracing::info!(pin_dir = %pin_dir.display(), "datapath loaded, maps pinned");
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Once the programs are attached (the old ones no longer write to maps set aside by a
    /// migration): carries over what they wrote since loading, and unpins the old maps.
    pub fn finish_migrations(&self) -> anyhow::Result<()> {
        migrate::carry_over(&self.pin_dir, migrate::Finish::Yes)
    }

    /// Sets how many RST / ICMP unreachable replies each CPU may generate; before attaching, so
    /// that no packet meets the datapath without its limit.
    pub fn set_reject_limit(&mut self, limit: RejectLimit) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::REJECT_LIMIT)
            .context("the datapath has no reject limit map")?;
        let mut limits: Array<&mut MapData, RejectLimit> = Array::try_from(map)?;
        limits.set(0, limit, 0)?;
        Ok(())
    }

    /// Has the kernel verify and load the programs `names`, all at once, one thread each: the
    /// verifier takes seconds per program and runs on as many cores as it is given. Loading is
    /// independent of the maps' contents, so the agent programs the maps meanwhile; attaching a
    /// program loaded here does not load it again.
    pub fn load_programs(&mut self, names: &[&str]) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let programs: Vec<(&str, &mut Program)> = self
            .ebpf
            .programs_mut()
            .filter(|(name, _)| names.contains(name))
            .collect();
        anyhow::ensure!(
            programs.len() == names.len(),
            "the datapath object lacks one of the programs {names:?}"
        );
        std::thread::scope(|scope| {
            let loads: Vec<_> = programs
                .into_iter()
                .map(|(name, program)| {
                    let load = scope.spawn(move || load_any(program));
                    (name, load)
                })
                .collect();
            for (name, load) in loads {
                load.join()
                    .map_err(|_| anyhow::anyhow!("loading program {name} panicked"))?
                    .with_context(|| format!("the kernel refused program {name}"))?;
            }
            anyhow::Ok(())
        })?;
        tracing::info!(
            programs = names.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "programs verified and loaded"
        );
        Ok(())
    }

    pub fn maps(&self) -> anyhow::Result<maps::ServiceMaps> {
        maps::ServiceMaps::open(&self.pin_dir).context("cannot open the pinned maps")
    }
}

/// Loads a program of any kind the datapath has.
fn load_any(program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::SchedClassifier(program) => load_program(|| program.load()),
        Program::Xdp(program) => load_program(|| program.load()),
        Program::CgroupSockAddr(program) => load_program(|| program.load()),
        _ => Err(ProgramError::UnexpectedProgramType),
    }
}

/// Runs `load` (a program's `load()`) again while the kernel answers EAGAIN: the verifier gives
/// up when a signal arrives for the thread (a child process exiting, a timer), and a program
/// that takes a second to verify meets one now and then. libbpf retries the same way.
/// A program already loaded (by [`Datapath::load_programs`]) is not loaded again.
pub fn load_program(load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    let loaded = retry_interrupted(
        load,
        |error| matches!(error, ProgramError::LoadError { io_error, .. } if io_error.raw_os_error() == Some(libc::EAGAIN)),
    );
    match loaded {
        Err(ProgramError::AlreadyLoaded) => Ok(()),
        other => other,
    }
}

/// `op`, tried up to 5 times while it fails with an error `interrupted` says is worth another try.
fn retry_interrupted<E>(
    mut op: impl FnMut() -> Result<(), E>,
    interrupted: impl Fn(&E) -> bool,
) -> Result<(), E> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match op() {
            Err(error) if interrupted(&error) && attempt < ATTEMPTS => {
                tracing::debug!(attempt, "the verifier was interrupted; loading again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::retry_interrupted;

    fn eagain(error: &io::Error) -> bool {
        error.raw_os_error() == Some(libc::EAGAIN)
    }

    #[test]
    fn an_interrupted_load_is_tried_again_and_other_errors_are_not() {
        let mut calls = 0;
        let result = retry_interrupted(
            || {
                calls += 1;
                if calls < 3 {
                    Err(io::Error::from_raw_os_error(libc::EAGAIN))
                } else {
                    Ok(())
                }
            },
            eagain,
        );
        assert!(result.is_ok());
        assert_eq!(calls, 3, "two interruptions, then the load");

        let mut calls = 0;
        let result = retry_interrupted(
            || {
                calls += 1;
                Err(io::Error::from_raw_os_error(libc::EACCES))
            },
            eagain,
        );
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EACCES));
        assert_eq!(calls, 1, "a refusal is final");

        let mut calls = 0;
        let _ = retry_interrupted(
            || {
                calls += 1;
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            },
            eagain,
        );
        assert_eq!(calls, 5, "at most five attempts");
    }
}
