//! The real `switchboard` agent in a lab's node namespace, fed from a manifest directory.
use std::{
    collections::BTreeMap,
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

/// Waits until the agent serves: its programs attached to every pod interface of the lab (and
/// to the `external` interface, if given). The agent programs the maps while the kernel verifies
/// its programs, so maps in sync do not mean that yet.
pub fn wait_until_attached(lab: &Lab, pins: &Path, external: Option<&str>) {
    let pattern = glob::Pattern::new(&lab.interface_pattern()).unwrap();
    let external = external.map(str::to_owned);
    let wanted = move || {
        let interfaces = nix::net::if_::if_nameindex().unwrap();
        interfaces
            .iter()
            .filter_map(|i| {
                let name = i.name().to_str().ok()?;
                if pattern.matches(name) {
                    Some(format!("{}-{}", i.index(), lb_common::program_names::FROM_POD))
                } else if external.as_deref() == Some(name) {
                    Some(format!("{}-{}", i.index(), lb_common::program_names::NODEPORT_TC))
                } else {
                    None
                }
            })
            .collect::<Vec<String>>()
    };
    let links = pins.join("links");
    wait_until("the programs attached to every interface", || {
        let wanted = lab.node.run(wanted.clone()).unwrap();
        !wanted.is_empty() && wanted.iter().all(|pin| links.join(pin).exists())
    });
}

/// Writes `contents` to `dir/name` through a rename, as kubectl-style tools do, so the agent
/// never reads half a file.
pub fn write_manifest(dir: &Path, name: &str, contents: &str) {
    let staging = dir.join(format!(".{name}.tmp"));
    std::fs::write(&staging, contents).unwrap();
    std::fs::rename(staging, dir.join(name)).unwrap();
}

/// Waits up to 40 s for `done`, polling; panics naming `what` if it never is.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The program behind each link pinned under `pins/links`, by pin name.
pub fn linked_programs(pins: &Path) -> BTreeMap<String, u32> {
    use aya::programs::links::{FdLink, PinnedLink};
    std::fs::read_dir(pins.join("links"))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let link = FdLink::from(PinnedLink::from_pin(entry.path()).unwrap());
            let name = entry.file_name().into_string().unwrap();
            (name, link.info().unwrap().program_id())
        })
        .collect()
}

/// Waits until every link pinned under `pins` runs another program than in `before`: a new
/// agent has swapped its programs in.
pub fn wait_for_new_programs(pins: &Path, before: &BTreeMap<String, u32>) {
    wait_until("the new agent's programs in every pinned link", || {
        before
            .iter()
            .all(|(link, program)| linked_programs(pins).get(link).is_some_and(|now| now != program))
    });
}
