//! The clients: threads in the client pods that connect and send without pause, each request
//! judged against what the churn did while it ran.
use std::{
    collections::HashMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

use crate::lab::{self, ALT, CLIENTS, Cluster, DNS, HTTP, Occupancy, POOL, SERVICES};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Between two requests of a client thread: steady load that leaves the 2 cores of a
/// development machine to the agent too (unpaced, the clients would fill the conntrack map).
const PACE: Duration = Duration::from_millis(4);
/// Failed requests kept for the summary.
const SAMPLES: usize = 10;

/// What the churn tells the clients, and what the clients count.
pub struct Shared {
    pub stop: AtomicBool,
    /// Per Service: servers stopped so far. A request during which one of its Service's servers
    /// stopped may have been that server's, so its failure is not counted.
    pub stops: Vec<AtomicU64>,
    /// Per Service: the `alt` port's state, twice its number of changes plus one while it is
    /// programmed. Requests to it count when it was there, unchanged, for their whole duration.
    pub alt: Vec<AtomicU64>,
    /// Per pod: since when the maps no longer have it (None while it is an endpoint).
    pub gone: Mutex<HashMap<String, Instant>>,
    peak: Mutex<Occupancy>,
    tcp: AtomicU64,
    udp: AtomicU64,
    failures: AtomicU64,
    misrouted: AtomicU64,
    excused: AtomicU64,
    samples: Mutex<Vec<String>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Counts {
    pub tcp: u64,
    pub udp: u64,
    pub failures: u64,
    pub misrouted: u64,
    pub excused: u64,
}

impl Shared {
    pub fn new() -> Self {
        let gone = (0..SERVICES.len())
            .flat_map(|service| (0..POOL).map(move |index| lab::pod(service, index).0))
            .map(|name| (name, Instant::now()))
            .collect();
        Self {
            stop: AtomicBool::new(false),
            stops: SERVICES.iter().map(|_| AtomicU64::new(0)).collect(),
            alt: SERVICES.iter().map(|_| AtomicU64::new(0)).collect(),
            gone: Mutex::new(gone),
            peak: Mutex::default(),
            tcp: AtomicU64::new(0),
            udp: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            excused: AtomicU64::new(0),
            samples: Mutex::default(),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            tcp: self.tcp.load(Ordering::SeqCst),
            udp: self.udp.load(Ordering::SeqCst),
            failures: self.failures.load(Ordering::SeqCst),
            misrouted: self.misrouted.load(Ordering::SeqCst),
            excused: self.excused.load(Ordering::SeqCst),
        }
    }

    pub fn failure_samples(&self) -> Vec<String> {
        self.samples.lock().unwrap().clone()
    }

    pub fn record_occupancy(&self, now: Occupancy) {
        let mut peak = self.peak.lock().unwrap();
        peak.conntrack = peak.conntrack.max(now.conntrack);
        peak.affinity = peak.affinity.max(now.affinity);
    }

    pub fn peak_occupancy(&self) -> Occupancy {
        *self.peak.lock().unwrap()
    }

    fn fail(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < SAMPLES {
            samples.push(what);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Http,
    Dns,
    Alt,
}

/// One thread per client pod, Service and kind of request (and the `alt` port from one client).
pub fn start(cluster: &Cluster, shared: &Arc<Shared>) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (number, (client, _)) in CLIENTS.iter().enumerate() {
        let netns = cluster.lab.pod(client).ns.path();
        for service in 0..SERVICES.len() {
            let kinds: &[Kind] = if number == 0 {
                &[Kind::Http, Kind::Dns, Kind::Alt]
            } else {
                &[Kind::Http, Kind::Dns]
            };
            for &kind in kinds {
                let (netns, shared) = (File::open(&netns)?, shared.clone());
                threads.push(std::thread::spawn(move || {
                    setns(&netns, CloneFlags::CLONE_NEWNET).expect("cannot enter the client pod");
                    while !shared.stop.load(Ordering::SeqCst) {
                        request(&shared, service, kind);
                        std::thread::sleep(PACE);
                    }
                }));
            }
        }
    }
    Ok(threads)
}

fn request(shared: &Shared, service: usize, kind: Kind) {
    let (name, cluster_ip, _) = SERVICES[service];
    let alt_before = shared.alt[service].load(Ordering::SeqCst);
    if matches!(kind, Kind::Alt) && alt_before.is_multiple_of(2) {
        // Not there: nothing to ask of it.
        std::thread::sleep(Duration::from_millis(20));
        return;
    }
    let stops_before = shared.stops[service].load(Ordering::SeqCst);
    let started = Instant::now();
    let answer = match kind {
        Kind::Http => http_get(cluster_ip, HTTP.0),
        Kind::Alt => http_get(cluster_ip, ALT),
        Kind::Dns => udp_request(cluster_ip, DNS.0),
    };
    match kind {
        Kind::Dns => shared.udp.fetch_add(1, Ordering::SeqCst),
        Kind::Http | Kind::Alt => shared.tcp.fetch_add(1, Ordering::SeqCst),
    };
    let port_changed = shared.alt[service].load(Ordering::SeqCst) != alt_before;
    let server_stopped = shared.stops[service].load(Ordering::SeqCst) != stops_before;
    match answer {
        Err(_) if server_stopped || (matches!(kind, Kind::Alt) && port_changed) => {
            shared.excused.fetch_add(1, Ordering::SeqCst);
        }
        Err(error) => shared.fail(
            &shared.failures,
            format!("{name} {kind:?} after {:?}: {error:#}", started.elapsed()),
        ),
        Ok(pod) => {
            // The pod must have been one of the Service's endpoints at some time during the
            // request: programmed, or removed only after the request began.
            let mine = pod.starts_with(SERVICES[service].2);
            let gone_before = shared
                .gone
                .lock()
                .unwrap()
                .get(&pod)
                .is_some_and(|since| *since < started);
            if !mine || gone_before {
                shared.fail(
                    &shared.misrouted,
                    format!("{name} {kind:?} answered by {pod}, not an endpoint of {name} then"),
                );
            }
        }
    }
}

/// `GET /` over a new connection; the pod that answered.
fn http_get(addr: Ipv4Addr, port: u16) -> anyhow::Result<String> {
    let target = SocketAddr::from((addr, port));
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    body.strip_prefix("{\"pod\":\"")
        .and_then(|rest| rest.strip_suffix("\"}"))
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("unexpected reply {response:?}"))
}

/// One datagram from a new socket (a new flow) and its answer: the pod's name.
fn udp_request(addr: Ipv4Addr, port: u16) -> anyhow::Result<String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect((addr, port))?;
    socket.send(b"who are you?")?;
    let mut buffer = [0u8; 256];
    let n = socket.recv(&mut buffer)?;
    Ok(std::str::from_utf8(&buffer[..n])?.to_owned())
}
