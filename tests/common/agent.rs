//! The real `switchboard` agent in a lab's node namespace, fed from a manifest directory.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::lab::Lab;

/// Starts `switchboard run` in the lab's node namespace on the lab's pod interfaces, with
/// `manifests` as its source, its maps pinned under `pins`, JSON logs to `logs`, and `extra`
/// arguments.
pub fn spawn(lab: &Lab, manifests: &Path, pins: &Path, logs: Stdio, extra: &[&str]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args([
            "--log-format",
            "json",
            "run",
            "--interfaces",
            &lab.interface_pattern(),
            "--manifests",
        ])
        .arg(manifests)
        .arg("--pin-dir")
        .arg(pins)
        .args(extra)
        .stderr(logs);
    lab.node.spawn(&mut command).unwrap()
}

/// Writes `contents` to `dir/name` through a rename, as kubectl-style tools do, so the agent
/// never reads half a file.
pub fn write_manifest(dir: &Path, name: &str, contents: &str) {
    let staging = dir.join(format!(".{name}.tmp"));
    std::fs::write(&staging, contents).unwrap();
    std::fs::rename(staging, dir.join(name)).unwrap();
}

/// Waits up to 20 s for `done`, polling; panics naming `what` if it never is.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
