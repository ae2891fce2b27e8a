//! `--starve`: the agent left without CPU, as on a machine busy compiling, but on purpose and
//! harder: its threads at nice 19 beside a busy loop per CPU. Its changes then reach the maps
//! seconds late, which the churn must wait for rather than take an old state for a new one.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::Context as _;

/// Keeps the CPUs busy until dropped.
pub struct Starvation {
    stop: Arc<AtomicBool>,
    hogs: Vec<JoinHandle<()>>,
}

impl Starvation {
    /// Lowers every thread of process `agent` to nice 19 (threads it starts later inherit it)
    /// and starts a busy loop per CPU.
    pub fn start(agent: u32) -> anyhow::Result<Self> {
        let tasks = std::fs::read_dir(format!("/proc/{agent}/task")).context("the agent's threads")?;
        for task in tasks {
            let tid: libc::id_t = task?.file_name().to_string_lossy().parse()?;
            // SAFETY: setpriority has no memory effects; a thread id names one thread.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
                return Err(std::io::Error::last_os_error()).context("cannot renice the agent");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        let hogs = (0..cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Ok(Self { stop, hogs })
    }
}

impl Drop for Starvation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for hog in self.hogs.drain(..) {
            let _ = hog.join();
        }
    }
}
