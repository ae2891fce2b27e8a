//! `healthCheckNodePort`: for each Service with `externalTrafficPolicy: Local`, an HTTP endpoint
//! on its health check port that tells an external load balancer whether this node has local
//! endpoints, as kube-proxy's does: 200 with a JSON body counting them, 503 when there are none.
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use crate::model::{Frontend, ServiceName};

struct Served {
    service: ServiceName,
    local_endpoints: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The health check servers, kept in step with the model. Must be used inside a tokio runtime.
#[derive(Default)]
pub struct HealthChecks {
    served: BTreeMap<u16, Served>,
    /// Each Service with a health check port: the port and its local endpoints.
    wanted: BTreeMap<ServiceName, (u16, usize)>,
}

impl HealthChecks {
    /// Takes the frontends of each Service that changed (none: it is gone). Serves each health
    /// check port (on every node address), counting the Service's local endpoints; stops
    /// serving ports no Service uses any more. Two Services claiming one port: the first by name.
    pub fn update<'a>(&mut self, changed: impl IntoIterator<Item = (&'a ServiceName, &'a [Frontend])>) {
        for (service, frontends) in changed {
            match health_check(frontends) {
                Some(wanted) => self.wanted.insert(service.clone(), wanted),
                None => self.wanted.remove(service),
            };
        }
        let mut wanted: BTreeMap<u16, (ServiceName, usize)> = BTreeMap::new();
        for (service, (port, count)) in &self.wanted {
            wanted.entry(*port).or_insert((service.clone(), *count));
        }
        self.served.retain(|port, served| {
            let keep = wanted
                .get(port)
                .is_some_and(|(service, _)| *service == served.service);
            if !keep {
                tracing::info!(port, service = %served.service, "health check port closed");
            }
            keep
        });
        for (port, (service, count)) in wanted {
            if let Some(served) = self.served.get(&port) {
                served.local_endpoints.store(count, Ordering::Relaxed);
                continue;
            }
            match serve(port, &service, count) {
                Ok(served) => {
                    tracing::info!(port, %service, local_endpoints = count, "serving the health check port");
                    self.served.insert(port, served);
                }
                // Tried again on the next update.
                Err(error) => tracing::warn!(port, %service, "cannot serve the health check port: {error}"),
            }
        }
    }

    /// The ports being served.
    pub fn ports(&self) -> Vec<u16> {
        self.served.keys().copied().collect()
    }
}

/// The health check port of a Service's frontends and its local endpoints, if it has one.
fn health_check(frontends: &[Frontend]) -> Option<(u16, usize)> {
    let mut wanted: Option<(u16, usize)> = None;
    for frontend in frontends.iter().filter(|f| f.kind.is_external()) {
        let Some(port) = frontend
            .policy
            .health_check_node_port
            .filter(|_| frontend.policy.external_local)
        else {
            continue;
        };
        let mut local: Vec<_> = frontend.backends.iter().map(|b| b.address).collect();
        local.sort();
        local.dedup();
        let entry = wanted.get_or_insert((port, 0));
        entry.1 = entry.1.max(local.len());
    }
    wanted
}

fn serve(port: u16, service: &ServiceName, count: usize) -> std::io::Result<Served> {
    let listener = std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local_endpoints = Arc::new(AtomicUsize::new(count));
    let (namespace, name) = (service.namespace.clone(), service.name.clone());
    let counter = local_endpoints.clone();
    let task = super::server::spawn(listener, move |_| {
        let count = counter.load(Ordering::Relaxed);
        let body = serde_json::json!({
            "service": {"namespace": namespace, "name": name},
            "localEndpoints": count,
            "serviceProxyHealthy": true,
        });
        let status = if count > 0 {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-content-type-options", "nosniff")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("static headers are valid")
    });
    Ok(Served {
        service: service.clone(),
        local_endpoints,
        task,
    })
}
