//! The clients: threads in the client pods that connect and send without pause, to the IPv4 and
//! the IPv6 ClusterIP in turn, each request judged against what the churn did while it ran.
use std::{
    collections::HashMap,
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::sched::{CloneFlags, setns};

use crate::{
    diagnose::{self, Failure},
    lab::{Cluster, Occupancy},
    timeline::{Clock, Events},
    topology::{self, CLIENTS, Frontend, POOL, SERVICES},
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Between two requests of a client thread: steady load that leaves the 2 cores of a
/// development machine to the agent too (unpaced, the clients would fill the conntrack map).
const PACE: Duration = Duration::from_millis(4);
/// Failed requests kept, with their conntrack entries, for the report.
const SAMPLES: usize = 10;

/// What the churn tells the clients, and what the clients count.
pub struct Shared {
    pub stop: Arc<AtomicBool>,
    pub clock: Clock,
    /// What the churn did and when: the context of a failure.
    pub events: Events,
    /// The agent's pinned maps, read when a request fails.
    pins: PathBuf,
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
    samples: Mutex<Vec<Failure>>,
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
    pub fn new(pins: PathBuf) -> Self {
        let gone = (0..SERVICES.len())
            .flat_map(|service| (0..POOL).map(move |index| topology::pod(service, index).0))
            .map(|name| (name, Instant::now()))
            .collect();
        Self {
            stop: Arc::default(),
            clock: Clock::start(),
            events: Events::default(),
            pins,
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

    pub fn failure_samples(&self) -> Vec<Failure> {
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

    /// Counts a failure; the first [`SAMPLES`] are kept with the conntrack entries of their
    /// client's address and port as they are right now.
    fn fail(&self, counter: &AtomicU64, mut failure: Failure) {
        counter.fetch_add(1, Ordering::SeqCst);
        if self.samples.lock().unwrap().len() >= SAMPLES {
            return;
        }
        failure.flows = diagnose::flows_of(&self.pins, failure.client);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < SAMPLES {
            samples.push(failure);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Http,
    Dns,
    Alt,
}

impl Kind {
    fn frontend(self, service: usize, ipv6: bool) -> Frontend {
        let frontend = match self {
            Kind::Http => Frontend::http(service),
            Kind::Dns => Frontend::dns(service),
            Kind::Alt => Frontend::alt(service),
        };
        frontend.in_ipv6(ipv6)
    }
}

/// One thread per client pod, Service and kind of request (and the `alt` port from one client).
pub fn start(cluster: &Cluster, shared: &Arc<Shared>) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (number, &(client, client_ip)) in CLIENTS.iter().enumerate() {
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
                    let mut ipv6 = false;
                    while !shared.stop.load(Ordering::SeqCst) {
                        request(&shared, client_ip, service, kind.frontend(service, ipv6));
                        ipv6 = !ipv6;
                        std::thread::sleep(PACE);
                    }
                }));
            }
        }
    }
    Ok(threads)
}

fn request(shared: &Shared, client: Ipv4Addr, service: usize, frontend: Frontend) {
    let (name, _, letter) = SERVICES[service];
    let is_alt = frontend.port == topology::ALT;
    let alt_before = shared.alt[service].load(Ordering::SeqCst);
    if is_alt && alt_before.is_multiple_of(2) {
        // Not there: nothing to ask of it.
        std::thread::sleep(Duration::from_millis(20));
        return;
    }
    let stops_before = shared.stops[service].load(Ordering::SeqCst);
    let started = Instant::now();
    let mut local_port = 0;
    let is_tcp = frontend.proto == lb_common::IPPROTO_TCP;
    let answer = if is_tcp {
        http_get(frontend.socket(), &mut local_port)
    } else {
        udp_request(frontend.socket(), &mut local_port)
    };
    let elapsed = started.elapsed();
    let counter = if is_tcp { &shared.tcp } else { &shared.udp };
    counter.fetch_add(1, Ordering::SeqCst);
    let port_changed = shared.alt[service].load(Ordering::SeqCst) != alt_before;
    let server_stopped = shared.stops[service].load(Ordering::SeqCst) != stops_before;
    let client = if frontend.ipv6 {
        IpAddr::from(lb_userspace::lab::ipv6_of(client))
    } else {
        client.into()
    };
    let failure = |error: String| Failure {
        frontend,
        client: SocketAddr::new(client, local_port),
        started: shared.clock.at(started),
        elapsed,
        error,
        flows: Vec::new(),
    };
    match answer {
        Err(_) if server_stopped || (is_alt && port_changed) => {
            shared.excused.fetch_add(1, Ordering::SeqCst);
        }
        Err(error) => shared.fail(&shared.failures, failure(format!("{error:#}"))),
        Ok(pod) => {
            // The pod must have been one of the Service's endpoints at some time during the
            // request: programmed, or removed only after the request began.
            let gone_before = shared
                .gone
                .lock()
                .unwrap()
                .get(&pod)
                .is_some_and(|since| *since < started);
            if !pod.starts_with(letter) || gone_before {
                let error = format!("answered by {pod}, not an endpoint of {name} then");
                shared.fail(&shared.misrouted, failure(error));
            }
        }
    }
}

/// `GET /` over a new connection; the pod that answered. `local_port` is set as soon as the
/// kernel has chosen it, so a failed attempt can be found in conntrack.
fn http_get(target: SocketAddr, local_port: &mut u16) -> anyhow::Result<String> {
    let mut stream = connect(target, local_port).context("connect")?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        .context("send the request")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("read the response")?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    body.strip_prefix("{\"pod\":\"")
        .and_then(|rest| rest.strip_suffix("\"}"))
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("unexpected reply {response:?}"))
}

/// `TcpStream::connect_timeout`, but the local port is known before the handshake completes:
/// a non-blocking connect, then a wait for the socket to become writable.
fn connect(target: SocketAddr, local_port: &mut u16) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, connect, getsockname, getsockopt, socket, sockopt,
    };

    let family = if target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let socket = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(socket.as_raw_fd(), &SockaddrStorage::from(target)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(error) => return Err(error.into()),
    }
    let local = getsockname::<SockaddrStorage>(socket.as_raw_fd())?;
    *local_port = match (local.as_sockaddr_in(), local.as_sockaddr_in6()) {
        (Some(v4), _) => v4.port(),
        (_, Some(v6)) => v6.port(),
        _ => 0,
    };
    let mut writable = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd we own, naming a descriptor that stays open for the call.
    let ready = unsafe { libc::poll(&mut writable, 1, TIMEOUT.as_millis() as i32) };
    match ready {
        0 => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection timed out",
            ));
        }
        n if n < 0 => return Err(std::io::Error::last_os_error()),
        _ => {}
    }
    let error = getsockopt(&socket, sockopt::SocketError)?;
    if error != 0 {
        return Err(std::io::Error::from_raw_os_error(error));
    }
    let stream = TcpStream::from(socket);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// One datagram from a new socket (a new flow) and its answer: the pod's name.
fn udp_request(target: SocketAddr, local_port: &mut u16) -> anyhow::Result<String> {
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0))?;
    *local_port = socket.local_addr()?.port();
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(target)?;
    socket.send(b"who are you?").context("send")?;
    let mut buffer = [0u8; 256];
    let n = socket.recv(&mut buffer).context("receive")?;
    Ok(std::str::from_utf8(&buffer[..n])?.to_owned())
}
