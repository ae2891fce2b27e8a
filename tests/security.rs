//! What the agent needs and who can reach what it leaves behind: it serves with a reduced
//! capability set, and its pinned maps and links are out of reach of other users.
mod common;

use std::{
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Loaded, PinDir, require_root};
use lb_userspace::{
    datapath::Datapath,
    lab::{self, Lab, servers},
};

/// The capabilities the DaemonSet grants (deploy/switchboard.yaml).
const CAPABILITIES: &str = "-all,+bpf,+net_admin,+perfmon,+sys_resource";
const NOBODY: &str = "65534";

/// Runs `command` as user and group nobody, without supplementary groups.
fn as_nobody(command: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .args(command)
        .output()
        .expect("setpriv runs")
}

#[test]
fn pinned_maps_and_links_are_out_of_reach_of_other_users() {
    let loaded = Loaded::new("sec-pins");
    let dir = loaded.pins.path();
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} is its owner's alone", dir.display());
    let map = dir.join(lb_common::map_names::SERVICES);
    for command in [
        vec!["ls", dir.to_str().unwrap()],
        vec!["cat", map.to_str().unwrap()],
        vec!["bpftool", "map", "dump", "pinned", map.to_str().unwrap()],
    ] {
        let output = as_nobody(&command);
        assert!(
            !output.status.success(),
            "{command:?} as nobody must fail: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

#[test]
fn a_pin_dir_someone_else_made_is_refused() {
    require_root();
    let squatted = PinDir::new("sbtest", "sec-squat");
    std::fs::create_dir_all(squatted.path()).unwrap();
    nix::unistd::chown(squatted.path(), Some(65534.into()), Some(65534.into())).unwrap();
    let error = Datapath::load(squatted.path())
        .err()
        .expect("a pin dir owned by another user is not used");
    assert!(
        format!("{error:#}").contains("belongs to uid 65534"),
        "the error says why: {error:#}"
    );
}

#[test]
fn the_agent_serves_with_only_the_capabilities_the_daemonset_grants() {
    require_root();
    let prefix = format!("sc{}", std::process::id() % 100_000);
    let mut lab = Lab::new(&prefix).unwrap();
    let pod = ("web-0", Ipv4Addr::new(10, 244, 9, 10));
    let client = ("client", Ipv4Addr::new(10, 244, 9, 20));
    let ns = &lab.add_pod(pod.0, pod.1).unwrap().ns;
    let _server = servers::http_server(ns, pod.0, 3000).unwrap();
    lab.add_pod(client.0, client.1).unwrap();
    let cluster_ip = Ipv4Addr::new(10, 96, 9, 10);
    let manifests = tempfile::tempdir().unwrap();
    let yaml = [
        lab::service_manifest("web", cluster_ip, &[("app", "web")], &[("http", "TCP", 80, 3000)]),
        lab::pod_manifest(pod.0, pod.1, &[("app", "web")], 3000),
    ];
    std::fs::write(manifests.path().join("web.yaml"), yaml.join("---\n")).unwrap();
    let pins = PinDir::new("sbtest", "sec-caps");

    let mut command = Command::new("setpriv");
    command
        .args(["--bounding-set", CAPABILITIES, "--inh-caps", "-all", "--"])
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "--interfaces", &lab.interface_pattern(), "--manifests"])
        .arg(manifests.path())
        .arg("--pin-dir")
        .arg(pins.path())
        .stderr(Stdio::inherit());
    let mut agent = Agent(lab.node.spawn(&mut command).unwrap());

    let deadline = Instant::now() + Duration::from_secs(20);
    let reply = loop {
        match servers::http_get(&lab.pod(client.0).ns, cluster_ip, 80, Duration::from_millis(500)) {
            Ok(reply) => break reply,
            Err(error) => {
                if let Ok(Some(status)) = agent.0.try_wait() {
                    panic!("the agent exited with {status} under the reduced capability set");
                }
                assert!(
                    Instant::now() < deadline,
                    "no answer through the ClusterIP: {error:#}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(reply.pod, pod.0);
    // The running agent holds no capability beyond those: bits 12 (NET_ADMIN), 24
    // (SYS_RESOURCE, which it does not need on this kernel), 38 (PERFMON) and 39 (BPF); in
    // particular not SYS_ADMIN.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.0.id())).unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    let granted: u64 = 1 << 12 | 1 << 24 | 1 << 38 | 1 << 39;
    assert_eq!(
        effective & !granted,
        0,
        "CapEff {effective:#x} beyond {granted:#x}"
    );
    assert_ne!(
        effective & (1 << 39),
        0,
        "it ran with CAP_BPF: CapEff {effective:#x}"
    );
}

/// The agent process, killed when the test ends, pass or fail.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
