//! The load: servers in backend pods and a one-thread client in the client pod, for the two
//! workloads the issue names.
//!
//! * TCP connect/request/response/close, like netperf TCP_CRR: a connection per transaction,
//!   a 16-byte request, a 16-byte answer, then the client closes.
//! * UDP request/response, like netperf UDP_RR: one connected socket, a 16-byte datagram and its
//!   16-byte answer at a time.
//!
//! The lab servers in lb_userspace::lab poll with millisecond sleeps, which is fine for tests
//! and far too slow here, so these block in the kernel with short timeouts instead.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_userspace::lab::{NetNs, ipv6_of};
use nix::sys::{socket::setsockopt, socket::sockopt::ReceiveTimeout, time::TimeVal};
use serde::Serialize;

const MESSAGE_LEN: usize = 16;
/// How long a blocked server call waits before checking whether it should stop.
const SERVER_POLL: Duration = Duration::from_millis(100);
/// A transaction that takes longer than this failed (and is counted as such).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    TcpCrr,
    UdpRr,
}

impl Workload {
    pub const ALL: [Workload; 2] = [Self::TcpCrr, Self::UdpRr];

    pub fn label(self) -> &'static str {
        match self {
            Self::TcpCrr => "TCP connect/request/response/close",
            Self::UdpRr => "UDP request/response",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Self::TcpCrr => "connections/s",
            Self::UdpRr => "transactions/s",
        }
    }
}

/// What one timed run of a workload did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub completed: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

impl Sample {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

/// A TCP server and UDP servers in one pod, answering on each of `addresses` (the pod's) and
/// their IPv6 twins ([`ipv6_of`]). Stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &NetNs, addresses: &[Ipv4Addr], tcp_port: u16, udp_port: u16) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        // `[::]` takes IPv4 connections too (net.ipv6.bindv6only is 0 in a new namespace).
        let listener = ns.run(move || TcpListener::bind((Ipv6Addr::UNSPECIFIED, tcp_port)))??;
        // accept(2) honours SO_RCVTIMEO, so a blocked accept wakes up to check `stop`.
        let poll = TimeVal::new(0, SERVER_POLL.as_micros() as libc::suseconds_t);
        setsockopt(&listener, ReceiveTimeout, &poll).context("SO_RCVTIMEO on the listener")?;
        let tcp_stop = stop.clone();
        threads.push(std::thread::spawn(move || serve_tcp(&listener, &tcp_stop)));
        // One UDP socket per address: a reply from a wildcard socket would leave from the pod's
        // primary address, not the one the request was sent to, and match no NAT state.
        let twins = addresses.iter().map(|&address| IpAddr::from(ipv6_of(address)));
        for address in addresses
            .iter()
            .map(|&address| IpAddr::from(address))
            .chain(twins)
        {
            let socket = ns.run(move || UdpSocket::bind(SocketAddr::new(address, udp_port)))??;
            socket.set_read_timeout(Some(SERVER_POLL))?;
            let udp_stop = stop.clone();
            threads.push(std::thread::spawn(move || serve_udp(&socket, &udp_stop)));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_tcp(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = answer_one(stream);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => std::thread::sleep(SERVER_POLL),
        }
    }
}

/// Reads the request, answers, and waits for the client to close first (as in TCP_CRR, the
/// client ends the connection, so TIME_WAIT stays on the client's side).
fn answer_one(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TRANSACTION_TIMEOUT))?;
    let mut request = [0u8; MESSAGE_LEN];
    stream.read_exact(&mut request)?;
    stream.write_all(&[b'a'; MESSAGE_LEN])?;
    let mut rest = [0u8; MESSAGE_LEN];
    while stream.read(&mut rest)? > 0 {}
    Ok(())
}

fn serve_udp(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buffer = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = socket.recv_from(&mut buffer) {
            let _ = socket.send_to(&[b'a'; MESSAGE_LEN], peer);
        }
    }
}

/// Runs `workload` from one thread inside `client` for `duration`. TCP connections go to the
/// `targets` in turn; UDP uses the first target only (one socket, one flow).
pub fn run(
    client: &NetNs,
    workload: Workload,
    targets: &[SocketAddr],
    duration: Duration,
) -> anyhow::Result<Sample> {
    let targets = targets.to_vec();
    Ok(match workload {
        Workload::TcpCrr => client.run(move || tcp_crr(&targets, duration))?,
        Workload::UdpRr => client.run(move || udp_rr(targets[0], duration))??,
    })
}

fn tcp_crr(targets: &[SocketAddr], duration: Duration) -> Sample {
    let started = Instant::now();
    let mut sample = Sample::default();
    let mut next = 0;
    while started.elapsed() < duration {
        let target = targets[next % targets.len()];
        next += 1;
        match one_connection(target) {
            Ok(()) => sample.completed += 1,
            Err(_) => sample.failed += 1,
        }
    }
    sample.elapsed = started.elapsed();
    sample
}

fn one_connection(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, TRANSACTION_TIMEOUT)?;
    stream.set_read_timeout(Some(TRANSACTION_TIMEOUT))?;
    stream.write_all(&[b'q'; MESSAGE_LEN])?;
    let mut answer = [0u8; MESSAGE_LEN];
    stream.read_exact(&mut answer)
}

fn udp_rr(target: SocketAddr, duration: Duration) -> anyhow::Result<Sample> {
    let socket = match target {
        SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
        SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?,
    };
    // Connected: only answers from the address dialled are accepted, so a reply that was not
    // translated back to the ClusterIP counts as lost.
    socket.connect(target)?;
    socket.set_read_timeout(Some(TRANSACTION_TIMEOUT / 5))?;
    let started = Instant::now();
    let mut sample = Sample::default();
    let mut answer = [0u8; 1500];
    while started.elapsed() < duration {
        socket.send(&[b'q'; MESSAGE_LEN])?;
        match socket.recv(&mut answer) {
            Ok(_) => sample.completed += 1,
            Err(_) => sample.failed += 1,
        }
    }
    sample.elapsed = started.elapsed();
    Ok(sample)
}
