//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` and `/livez` (200 or 503
//! with a JSON body, as kube-proxy answers).
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;

use super::health::Health;

pub struct Observed {
    pub registry: Registry,
    pub health: Arc<Health>,
}

/// Binds `address` now (so a taken port fails the agent's start) and serves it in the background.
pub async fn serve(address: SocketAddr, observed: Observed) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on --metrics-address {address}"))?;
    let address = listener.local_addr().unwrap_or(address);
    tracing::info!(%address, "serving /metrics, /healthz and /livez");
    let observed = Arc::new(observed);
    spawn(listener, move |request| answer(request, &observed));
    Ok(())
}

/// Serves HTTP/1.1 on `listener` in the background, each request answered by `answer`, until the
/// returned task is aborted.
pub fn spawn(
    listener: tokio::net::TcpListener,
    answer: impl Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(&request)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn answer(request: &Request<Incoming>, observed: &Observed) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &observed.registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        path @ ("/healthz" | "/livez") => {
            let report = observed.health.report();
            let ok = if path == "/healthz" {
                report.healthy()
            } else {
                report.live()
            };
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                status,
                "application/json",
                serde_json::to_string(&report).unwrap_or_default(),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /livez\n".into(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}
