//! Running a tool (iptables-restore, nft, the agent is started by agent_run) inside a namespace, with its wall
//! time and peak memory, and a deadline after which it is killed.
use std::{
    fs::File,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_userspace::lab::NetNs;

/// How a finished tool ran.
#[derive(Debug)]
pub struct Finished {
    pub wall: Duration,
    /// Peak resident set size (`ru_maxrss` from wait4(2)), in KiB.
    pub max_rss_kib: u64,
}

/// How often the child is polled: the resolution of `wall`.
const POLL: Duration = Duration::from_millis(1);

/// Runs `command` (in `ns` when given) with `stdin` as its standard input. Fails if it exits
/// unsuccessfully or is still running at `timeout`, in which case it is killed.
pub fn run(
    ns: Option<&NetNs>,
    command: &mut Command,
    stdin: Option<&Path>,
    timeout: Duration,
) -> anyhow::Result<Finished> {
    let stderr = tempfile::tempfile()?;
    command
        .stdout(Stdio::null())
        .stderr(stderr.try_clone()?)
        .stdin(match stdin {
            Some(path) => {
                Stdio::from(File::open(path).with_context(|| format!("cannot open {}", path.display()))?)
            }
            None => Stdio::null(),
        });
    let started = Instant::now();
    let child = match ns {
        Some(ns) => ns.spawn(command)?,
        None => command
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?,
    };
    let pid = child.id() as libc::pid_t;
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: rusage is plain data the kernel fills in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own unreaped child; the out-pointers are valid for the call.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            break (status, usage);
        }
        if reaped < 0 {
            bail!("wait4 on {command:?}: {}", std::io::Error::last_os_error());
        }
        if started.elapsed() > timeout {
            // SAFETY: the child has not been reaped, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above; this reaps it.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            bail!("{command:?} was still running after {timeout:?} and was stopped");
        }
        std::thread::sleep(POLL);
    };
    let wall = started.elapsed();
    let read = |mut file: File| -> String {
        use std::io::{Read as _, Seek as _};
        let mut text = String::new();
        let _ = file.rewind().and_then(|()| file.read_to_string(&mut text));
        text
    };
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!(
            "{command:?} failed (wait status {status}): {}",
            read(stderr).trim()
        );
    }
    Ok(Finished {
        wall,
        max_rss_kib: usage.ru_maxrss as u64,
    })
}

/// Writes `text` to a new temporary file, e.g. a rule set for a tool's standard input.
pub fn temp_file_with(text: &str) -> anyhow::Result<tempfile::NamedTempFile> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), text)?;
    Ok(file)
}
