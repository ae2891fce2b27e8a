//! `KubeSource`: Services, EndpointSlices, (with `--endpoints-from pods`) Pods and (with
//! `--node-name`) this node's Node, watched from the Kubernetes API with kube-rs reflectors.
//!
//! A watcher re-lists by itself after a dropped watch or a 410 Gone, and retries with backoff
//! while the API server is away; the reflector stores keep the last known state meanwhile, so
//! the programmed maps keep serving. Nothing is published before every store has had its first
//! full list.
use std::{fmt::Debug, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use super::Snapshot;
use crate::model::{EndpointsFrom, HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::observe::metrics::AgentMetrics;

/// How the agent reaches the API server. The API server must not be addressed through a
/// ClusterIP: programming ClusterIPs is this agent's job.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Connection {
    /// Kubeconfig file to use (default: in-cluster service account, else $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// API server URL, overriding the one from the kubeconfig or the in-cluster environment,
    /// e.g. https://192.168.1.10:6443. Without other credentials it is used unauthenticated.
    #[arg(long, env = "SWITCHBOARD_API_SERVER", value_name = "URL")]
    pub api_server: Option<String>,
}

impl Connection {
    pub async fn client(&self) -> anyhow::Result<Client> {
        let mut config = match (&self.kubeconfig, &self.api_server) {
            (Some(path), _) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
            }
            (None, Some(url)) => match Config::incluster() {
                Ok(config) => config,
                Err(_) => Config::new(
                    url.parse()
                        .with_context(|| format!("invalid --api-server {url:?}"))?,
                ),
            },
            (None, None) => Config::infer().await.context(
                "no Kubernetes configuration found: give --kubeconfig or --api-server, run in a pod, \
                 or use --manifests DIR",
            )?,
        };
        if let Some(url) = &self.api_server {
            config.cluster_url = url
                .parse()
                .with_context(|| format!("invalid --api-server {url:?}"))?;
        }
        Ok(Client::try_from(config)?)
    }
}

/// How long to let a burst of events settle before publishing a snapshot.
const COALESCE: Duration = Duration::from_millis(50);

/// Watches the API and publishes a snapshot after the first full list of every kind, then after
/// every burst of changes. Returns only if the watches end, which they do not by themselves.
pub async fn watch(
    client: Client,
    endpoints_from: EndpointsFrom,
    node_name: Option<String>,
    snapshots: watch::Sender<Snapshot>,
    metrics: Arc<AgentMetrics>,
) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    // As kube-proxy does: objects for other proxies or headless Services are filtered by the API
    // server already (the model checks again).
    let services = reflect::<Service>(
        &client,
        watcher::Config::default().labels(&format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")),
        &changed,
        &metrics,
    );
    let slices = reflect::<EndpointSlice>(
        &client,
        watcher::Config::default().labels(&format!(
            "{SERVICE_NAME_LABEL},!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
        )),
        &changed,
        &metrics,
    );
    let pods = (endpoints_from == EndpointsFrom::Pods)
        .then(|| reflect::<Pod>(&client, watcher::Config::default(), &changed, &metrics));
    // Only this node's Node, for its zone label.
    let nodes = node_name.map(|name| {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        reflect::<Node>(&client, config, &changed, &metrics)
    });

    services.wait_until_ready().await?;
    slices.wait_until_ready().await?;
    if let Some(pods) = &pods {
        pods.wait_until_ready().await?;
    }
    if let Some(nodes) = &nodes {
        nodes.wait_until_ready().await?;
    }
    tracing::info!("first full list of every watched kind received");
    loop {
        let snapshot = Snapshot {
            services: owned(&services),
            endpoint_slices: owned(&slices),
            pods: pods.as_ref().map(owned).unwrap_or_default(),
            nodes: nodes.as_ref().map(owned).unwrap_or_default(),
        };
        snapshots.send_replace(snapshot);
        changed.notified().await;
        tokio::time::sleep(COALESCE).await;
    }
}

/// Starts a reflector for `K` and returns its store; every event wakes `changed`.
fn reflect<K>(
    client: &Client,
    config: watcher::Config,
    changed: &Arc<Notify>,
    metrics: &Arc<AgentMetrics>,
) -> reflector::Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), config).default_backoff(),
    );
    let (changed, metrics) = (changed.clone(), metrics.clone());
    let kind = K::kind(&());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                // The watcher retries with backoff (re-listing when its resourceVersion expired);
                // the store keeps serving the last state meanwhile.
                Err(error) => {
                    tracing::warn!(%kind, "watch failed, retrying: {error}");
                    metrics.source_error("kubernetes");
                }
            }
        }
    });
    store
}

fn owned<K>(store: &reflector::Store<K>) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.state().iter().map(|object| (**object).clone()).collect()
}
