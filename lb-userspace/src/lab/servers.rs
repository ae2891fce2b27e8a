//! What runs in lab pods: a tiny HTTP server, a line server and a UDP responder that all answer
//! with the pod's name, and the client calls that talk to them. Servers listen on `[::]`, which
//! on Linux takes IPv4 too, so every pod serves both families.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::NetNs;

/// A server running in a pod; counts the requests it answered and remembers the client
/// addresses it saw. Stops when dropped: once the drop returns, its port is closed.
pub struct Server {
    pub pod: String,
    answered: Arc<AtomicUsize>,
    clients: Arc<Mutex<BTreeSet<IpAddr>>>,
    stop: Arc<AtomicBool>,
    /// The loop owning the socket.
    serving: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn new(pod: &str) -> Self {
        Self {
            pod: pod.to_owned(),
            answered: Arc::default(),
            clients: Arc::default(),
            stop: Arc::default(),
            serving: None,
        }
    }

    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// The source addresses of the connections and datagrams this server received, as the pod
    /// saw them (an IPv4 client on the dual-stack socket as IPv4): what address translation
    /// left of the client.
    pub fn clients(&self) -> BTreeSet<IpAddr> {
        self.clients.lock().expect("no holder panics").clone()
    }
}

fn remember(clients: &Mutex<BTreeSet<IpAddr>>, peer: SocketAddr) {
    let mut clients = clients.lock().expect("no holder panics");
    clients.insert(peer.ip().to_canonical());
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(serving) = self.serving.take() {
            let _ = serving.join();
        }
    }
}

/// How often a server loop checks whether it was stopped.
const POLL: Duration = Duration::from_millis(50);

/// Serves `{"pod":"<name>"}` over HTTP/1.1 on `port` in `ns`, one request per connection.
pub fn http_server(ns: &NetNs, pod: &str, port: u16) -> anyhow::Result<Server> {
    let body = format!("{{\"pod\":\"{pod}\"}}");
    tcp_server(ns, pod, port, move |stream, answered| {
        answer_http(stream, &body, answered)
    })
}

/// Keeps each TCP connection open and answers every line with the pod's name: one long-lived
/// flow, for tests that change things under an established connection.
pub fn line_server(ns: &NetNs, pod: &str, port: u16) -> anyhow::Result<Server> {
    let name = pod.to_owned();
    tcp_server(ns, pod, port, move |stream, answered| {
        answer_lines(stream, &name, answered)
    })
}

/// Listens on `port` in `ns` and hands each connection to `answer` on a thread of its own.
fn tcp_server(
    ns: &NetNs,
    pod: &str,
    port: u16,
    answer: impl Fn(TcpStream, &AtomicUsize) -> std::io::Result<()> + Send + Sync + 'static,
) -> anyhow::Result<Server> {
    let listener = ns.run(move || TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))??;
    listener.set_nonblocking(true)?;
    let mut server = Server::new(pod);
    let (answered, stop, answer) = (server.answered.clone(), server.stop.clone(), Arc::new(answer));
    let clients = server.clients.clone();
    server.serving = Some(std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    remember(&clients, peer);
                    let (answered, answer) = (answered.clone(), answer.clone());
                    std::thread::spawn(move || answer(stream, &answered));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }));
    Ok(server)
}

/// Reads one request and answers it; counted before the answer leaves, so a client that has
/// its answer always finds it counted.
fn answer_http(mut stream: TcpStream, body: &str, answered: &AtomicUsize) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        request.extend_from_slice(&buffer[..n]);
    }
    answered.fetch_add(1, Ordering::SeqCst);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// Answers every datagram on `port` in `ns` with the pod's name.
pub fn udp_server(ns: &NetNs, pod: &str, port: u16) -> anyhow::Result<Server> {
    udp_responder(ns, pod, port, |name, _| name.to_owned())
}

/// Answers every datagram on `port` in `ns` with `<pod name> <sender address>`: what the pod
/// sees of its client, for tests of source NAT and client address preservation.
pub fn udp_peer_server(ns: &NetNs, pod: &str, port: u16) -> anyhow::Result<Server> {
    udp_responder(ns, pod, port, |name, peer| {
        format!("{name} {}", peer.ip().to_canonical())
    })
}

fn udp_responder(
    ns: &NetNs,
    pod: &str,
    port: u16,
    answer: impl Fn(&str, SocketAddr) -> String + Send + 'static,
) -> anyhow::Result<Server> {
    let socket = ns.run(move || UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)))??;
    socket.set_read_timeout(Some(POLL))?;
    let mut server = Server::new(pod);
    let (answered, stop, name) = (server.answered.clone(), server.stop.clone(), pod.to_owned());
    let clients = server.clients.clone();
    server.serving = Some(std::thread::spawn(move || {
        let mut buffer = [0u8; 1500];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((_, peer)) = socket.recv_from(&mut buffer) {
                remember(&clients, peer);
                answered.fetch_add(1, Ordering::SeqCst);
                let _ = socket.send_to(answer(&name, peer).as_bytes(), peer);
            }
        }
    }));
    Ok(server)
}

fn answer_lines(stream: TcpStream, name: &str, answered: &AtomicUsize) -> std::io::Result<()> {
    use std::io::BufRead as _;
    stream.set_nonblocking(false)?;
    let mut writer = stream.try_clone()?;
    for line in std::io::BufReader::new(stream).lines() {
        line?;
        answered.fetch_add(1, Ordering::SeqCst);
        writeln!(writer, "{name}")?;
    }
    Ok(())
}

/// What a client saw of one exchange.
#[derive(Debug)]
pub struct Reply {
    /// The pod that answered.
    pub pod: String,
    /// The address the answer came from, as the client's socket saw it.
    pub from: SocketAddr,
}

/// `GET /` to `addr:port` from `ns`; the pod name from the JSON body.
pub fn http_get(ns: &NetNs, addr: impl Into<IpAddr>, port: u16, timeout: Duration) -> anyhow::Result<Reply> {
    let target = SocketAddr::new(addr.into(), port);
    let mut stream = ns
        .run(move || TcpStream::connect_timeout(&target, timeout))?
        .with_context(|| format!("connect to {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("read reply from {target}"))?;
    let from = stream.peer_addr()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let pod = body
        .strip_prefix("{\"pod\":\"")
        .and_then(|rest| rest.strip_suffix("\"}"))
        .with_context(|| format!("unexpected reply from {target}: {response:?}"))?;
    Ok(Reply {
        pod: pod.to_owned(),
        from,
    })
}

/// One datagram to `addr:port` from `ns`, and the answer.
pub fn udp_request(
    ns: &NetNs,
    addr: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let addr = addr.into();
    let socket = udp_socket(ns, addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"who are you?", (addr, port))?;
    let mut buffer = [0u8; 256];
    let (n, from) = socket
        .recv_from(&mut buffer)
        .with_context(|| format!("no UDP answer from {addr}:{port}"))?;
    let pod = std::str::from_utf8(&buffer[..n])?.to_owned();
    if pod.is_empty() {
        bail!("empty UDP answer from {from}");
    }
    Ok(Reply { pod, from })
}

/// A connected UDP socket in a pod: one flow, kept across requests as a DNS client keeps its
/// socket.
pub struct UdpFlow(UdpSocket);

impl UdpFlow {
    pub fn connect(ns: &NetNs, target: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let socket = udp_socket(ns, target.ip())?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(timeout))?;
        Ok(Self(socket))
    }

    /// One datagram and its answer (the pod's name), or the error the socket reports instead
    /// (`ConnectionRefused` once an ICMP port unreachable came back).
    pub fn ask(&self) -> std::io::Result<String> {
        self.0.send(b"who are you?")?;
        let mut answer = [0u8; 256];
        let n = self.0.recv(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer[..n]).into_owned())
    }

    /// [`ask`](Self::ask), asked again while nothing came back, up to `attempts` times, as a
    /// client retries a query: an ICMP error is best effort (rate-limited by its sender, never
    /// retransmitted), so one datagram may go unanswered by both the pod and its kernel.
    pub fn ask_retrying(&self, attempts: usize) -> std::io::Result<String> {
        let mut outcome = self.ask();
        for _ in 1..attempts {
            match &outcome {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    outcome = self.ask();
                }
                _ => break,
            }
        }
        outcome
    }
}

/// A UDP socket in `ns` on an ephemeral port, of the family of `peer`.
fn udp_socket(ns: &NetNs, peer: IpAddr) -> anyhow::Result<UdpSocket> {
    let any: IpAddr = if peer.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    Ok(ns.run(move || UdpSocket::bind((any, 0)))??)
}
