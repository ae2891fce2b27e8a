//! An in-process Kubernetes API server speaking the list/watch wire protocol over plain HTTP/1.1,
//! with real JSON objects: enough for kube-rs watchers, and controllable by the test (cut the
//! watches, expire resource versions, go down and come back). Lists are paged as the API server
//! pages them (`limit` and `continue`); objects are kept serialized, once, so a benchmark can
//! serve 100,000 Services and their EndpointSlices.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Collection paths the agent watches, and the kind of their list.
const COLLECTIONS: [(&str, &str); 3] = [
    ("/api/v1/services", "ServiceList"),
    ("/api/v1/pods", "PodList"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSliceList"),
];

#[derive(Default)]
struct State {
    resource_version: u64,
    /// (collection, namespace/name) → object, as JSON.
    objects: BTreeMap<(String, String), Arc<str>>,
    /// Watch events in resourceVersion order: (resourceVersion, collection, type, object).
    events: Vec<(u64, String, &'static str, Arc<str>)>,
    /// Bumped to make every open watch end (a cut connection).
    generation: u64,
    /// Watches started after this many events are answered with 410 Gone.
    expired_below: u64,
    /// Collections whose list requests are held until released.
    held: Vec<String>,
    down: bool,
    requests: Vec<String>,
    /// Events the agent published: (POST or PATCH, the Event as sent).
    events_received: Vec<(String, Value)>,
}

/// Where events.k8s.io/v1 Events are created (`<namespace>/events`) and patched.
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/";

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl FakeApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let shared = state.clone();
        std::thread::spawn(move || accept_loop(listener, shared));
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn change(&self, f: impl FnOnce(&mut State)) {
        let (lock, wake) = &*self.state;
        f(&mut lock.lock().unwrap());
        wake.notify_all();
    }

    /// Adds or replaces an object (by `metadata.namespace/name`) and emits the watch event.
    pub fn apply(&self, mut object: Value) {
        self.change(|state| {
            let collection = collection_of(&object);
            let key = (collection.clone(), object_key(&object));
            state.resource_version += 1;
            object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            let kind = if state.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let object: Arc<str> = object.to_string().into();
            state.objects.insert(key, object.clone());
            let rv = state.resource_version;
            state.events.push((rv, collection, kind, object));
        });
    }

    pub fn delete(&self, object: &Value) {
        self.change(|state| {
            let key = (collection_of(object), object_key(object));
            if let Some(old) = state.objects.remove(&key) {
                state.resource_version += 1;
                let mut old: Value = serde_json::from_str(&old).unwrap();
                old["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                let rv = state.resource_version;
                state.events.push((rv, key.0, "DELETED", old.to_string().into()));
            }
        });
    }

    /// Ends every open watch abruptly, as a dropped connection would.
    pub fn cut_watches(&self) {
        self.change(|state| state.generation += 1);
    }

    /// Changes `object` without any watch event (as if the events were compacted away) and makes
    /// every watch from an older resourceVersion fail with 410 Gone, so only a re-list sees it.
    pub fn apply_and_expire(&self, mut object: Value) {
        self.change(|state| {
            state.resource_version += 1;
            object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            state.objects.insert(
                (collection_of(&object), object_key(&object)),
                object.to_string().into(),
            );
            state.expired_below = state.resource_version;
            state.generation += 1;
        });
    }

    /// While down, every request fails at the connection and open watches are cut.
    pub fn set_down(&self, down: bool) {
        self.change(|state| {
            state.down = down;
            state.generation += 1;
        });
    }

    /// Holds list requests for `collection` until [`FakeApi::release`].
    pub fn hold_lists(&self, collection: &str) {
        self.change(|state| state.held.push(collection.to_owned()));
    }

    pub fn release(&self) {
        self.change(|state| state.held.clear());
    }

    /// The Events published so far: (POST or PATCH, the Event).
    pub fn events(&self) -> Vec<(String, Value)> {
        self.state.0.lock().unwrap().events_received.clone()
    }

    /// The request lines seen so far (e.g. to check that a re-list happened).
    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().unwrap().requests.clone()
    }
}

fn collection_of(object: &Value) -> String {
    let path = match object["kind"].as_str() {
        Some("Service") => "/api/v1/services",
        Some("Pod") => "/api/v1/pods",
        Some("EndpointSlice") => "/apis/discovery.k8s.io/v1/endpointslices",
        other => panic!("the fake API serves no {other:?}"),
    };
    path.to_owned()
}

fn object_key(object: &Value) -> String {
    let metadata = &object["metadata"];
    format!(
        "{}/{}",
        metadata["namespace"].as_str().unwrap_or("default"),
        metadata["name"].as_str().unwrap()
    )
}

fn accept_loop(listener: TcpListener, state: Arc<(Mutex<State>, Condvar)>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let state = state.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &state);
        });
    }
}

/// One connection: requests are answered in turn until a watch ends it or the client closes.
fn serve(stream: TcpStream, state: &Arc<(Mutex<State>, Condvar)>) -> std::io::Result<()> {
    // As Go's net package does for the real API server: a watch event goes out at once, not
    // after Nagle's algorithm waited for the previous one's ACK.
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            if header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; content_length];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        let method = request_line.split_whitespace().next().unwrap_or("GET").to_owned();
        let target = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        {
            let mut guard = state.0.lock().unwrap();
            guard.requests.push(request_line.trim().to_owned());
            if guard.down {
                // An API server that is away: the connection just ends.
                return Ok(());
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        if path.starts_with(EVENTS) && matches!(method.as_str(), "POST" | "PATCH") {
            // events.k8s.io/v1 Events, created and patched (a repeat's series): kept as sent,
            // and echoed back as the API server answers.
            let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            state
                .0
                .lock()
                .unwrap()
                .events_received
                .push((method.clone(), event.clone()));
            respond(&mut stream, if method == "POST" { 201 } else { 200 }, &event)?;
            continue;
        }
        let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
        let Some((collection, list_kind)) = COLLECTIONS.iter().find(|(c, _)| *c == path) else {
            respond(&mut stream, 404, &json!({"kind": "Status", "code": 404}))?;
            continue;
        };
        if params.get("watch") == Some(&"true") {
            let since = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return watch(stream, state, collection, since);
        }
        wait_while_held(state, collection);
        let list = list_page(&state.0.lock().unwrap(), collection, list_kind, &params);
        respond_text(&mut stream, 200, &list)?;
    }
}

/// One page of `collection`: `limit` objects (all without it) after the `continue` token's key.
/// The token carries the first page's resourceVersion, and the last key sent, in hex.
fn list_page(state: &State, collection: &str, list_kind: &str, params: &BTreeMap<&str, &str>) -> String {
    let limit = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let (resource_version, after) = match params.get("continue").and_then(|t| t.split_once('-')) {
        Some((rv, key)) => (rv.parse().unwrap_or(state.resource_version), unhex(key)),
        None => (state.resource_version, String::new()),
    };
    let start = (collection.to_owned(), after.clone());
    let mut items = state
        .objects
        .range(start..)
        .take_while(|((c, _), _)| c == collection)
        .filter(|((_, key), _)| after.is_empty() || *key != after)
        .peekable();
    let mut page = Vec::new();
    let mut last = None;
    while page.len() < limit {
        let Some(((_, key), object)) = items.next() else {
            break;
        };
        page.push(object.as_ref());
        last = Some(key);
    }
    let more = items.peek().is_some();
    let token = match (more, last) {
        (true, Some(key)) => format!(",\"continue\":\"{resource_version}-{}\"", hex(key)),
        _ => String::new(),
    };
    format!(
        "{{\"kind\":\"{list_kind}\",\"apiVersion\":\"v1\",\"metadata\":{{\"resourceVersion\":\"{resource_version}\"{token}}},\"items\":[{}]}}",
        page.join(",")
    )
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> String {
    let bytes: Vec<u8> = (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
        .collect();
    String::from_utf8(bytes).unwrap_or_default()
}

fn wait_while_held(state: &Arc<(Mutex<State>, Condvar)>, collection: &str) {
    let (lock, wake) = &**state;
    let mut guard = lock.lock().unwrap();
    while guard.held.iter().any(|c| c == collection) {
        guard = wake.wait(guard).unwrap();
    }
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    respond_text(stream, code, &body.to_string())
}

fn respond_text(stream: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {code} OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Streams the collection's events after `since` as chunked JSON lines until the test cuts the
/// watch; a watch from an expired resourceVersion gets 410 Gone in-stream, as the API does.
fn watch(
    mut stream: TcpStream,
    state: &Arc<(Mutex<State>, Condvar)>,
    collection: &str,
    since: u64,
) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let (lock, wake) = &**state;
    let mut guard = lock.lock().unwrap();
    let generation = guard.generation;
    if since < guard.expired_below {
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        drop(guard);
        chunk(&mut stream, &gone)?;
        return stream.write_all(b"0\r\n\r\n");
    }
    let mut sent = since;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let first = guard.events.partition_point(|(rv, ..)| *rv <= sent);
        let pending: Vec<(u64, String)> = guard.events[first..]
            .iter()
            .filter(|(_, c, _, _)| c == collection)
            .map(|(rv, _, kind, object)| (*rv, format!("{{\"type\":\"{kind}\",\"object\":{object}}}")))
            .collect();
        let last = guard.events.last().map_or(sent, |(rv, ..)| *rv);
        drop(guard);
        for (_, event) in pending {
            chunk_text(&mut stream, &event)?;
        }
        sent = sent.max(last);
        guard = lock.lock().unwrap();
        if guard.generation != generation || guard.down || Instant::now() > deadline {
            // Cut: the connection ends without the terminating chunk.
            return Ok(());
        }
        guard = wake.wait_timeout(guard, Duration::from_millis(200)).unwrap().0;
    }
}

fn chunk(stream: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    chunk_text(stream, &event.to_string())
}

fn chunk_text(stream: &mut TcpStream, event: &str) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(stream, "{:x}\r\n{line}\r\n", line.len())
}
