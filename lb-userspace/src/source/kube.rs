//! `KubeSource`: Services, EndpointSlices, (with `--endpoints-from pods`) Pods and (with
//! `--node-name`) this node's Node, watched from the Kubernetes API with kube-rs reflectors.
//!
//! A watcher re-lists by itself after a dropped watch or a 410 Gone, and retries with backoff
//! while the API server is away; the agent keeps the last known state meanwhile, so the
//! programmed maps keep serving. A list reaches the agent object by object, then as the names
//! it held ([`Change::Listed`]); every event after it as the one object it changed. Objects are trimmed to what the model
//! reads as they arrive (managedFields, other annotations, a Pod's containers); managedFields and
//! the metadata trim drops are not even decoded ([`super::lean`]).
use std::{fmt::Debug, sync::Arc};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;

use super::{Change, Changes, Kind, Object, ObjectName, lean::Lean};
use crate::model::{EndpointsFrom, HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, trim};
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

/// Objects per list request, as kubectl and kube-proxy's informers page: the API server never
/// sends a 100,000-object list as one body.
const PAGE_SIZE: u32 = 500;

/// The kinds [`watch`] lists: Services and EndpointSlices, Pods when endpoints come from them,
/// this node's Node when its name is known.
pub fn kinds(endpoints_from: EndpointsFrom, node_name: Option<&str>) -> Vec<Kind> {
    let mut kinds = vec![Kind::Service, Kind::EndpointSlice];
    if endpoints_from == EndpointsFrom::Pods {
        kinds.push(Kind::Pod);
    }
    if node_name.is_some() {
        kinds.push(Kind::Node);
    }
    kinds
}

/// Watches the API and sends each kind's full list (the first, and any re-list), then every
/// object applied or deleted, trimmed to what the model reads. Returns only if the watches
/// end, which they do not by themselves, or when the agent stops listening.
pub async fn watch(
    client: Client,
    endpoints_from: EndpointsFrom,
    node_name: Option<String>,
    changes: Changes,
    metrics: Arc<AgentMetrics>,
) -> anyhow::Result<()> {
    // As kube-proxy does: objects for other proxies or headless Services are filtered by the API
    // server already (the model checks again).
    let mut watches = vec![
        forward::<Lean<Service>>(
            &client,
            watcher::Config::default().labels(&format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")),
            Kind::Service,
            |Lean(mut service)| {
                trim::service(&mut service);
                Object::Service(service)
            },
            &changes,
            &metrics,
        ),
        forward::<Lean<EndpointSlice>>(
            &client,
            watcher::Config::default().labels(&format!(
                "{SERVICE_NAME_LABEL},!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
            )),
            Kind::EndpointSlice,
            |Lean(mut slice)| {
                trim::endpoint_slice(&mut slice);
                Object::EndpointSlice(slice)
            },
            &changes,
            &metrics,
        ),
    ];
    if endpoints_from == EndpointsFrom::Pods {
        watches.push(forward::<Lean<Pod>>(
            &client,
            watcher::Config::default(),
            Kind::Pod,
            |Lean(mut pod)| {
                trim::pod(&mut pod);
                Object::Pod(pod)
            },
            &changes,
            &metrics,
        ));
    }
    // Only this node's Node, for its zone label.
    if let Some(name) = node_name {
        watches.push(forward::<Lean<Node>>(
            &client,
            watcher::Config::default().fields(&format!("metadata.name={name}")),
            Kind::Node,
            |Lean(mut node)| {
                trim::node(&mut node);
                Object::Node(node)
            },
            &changes,
            &metrics,
        ));
    }
    let (first, ..) = futures::future::select_all(watches).await;
    first.context("a watch task failed")
}

/// Watches `K` and forwards its events as [`Change`]s until the agent stops listening.
fn forward<K>(
    client: &Client,
    config: watcher::Config,
    listed: Kind,
    object: fn(K) -> Object,
    changes: &Changes,
    metrics: &Arc<AgentMetrics>,
) -> tokio::task::JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let stream = watcher(Api::<K>::all(client.clone()), config.page_size(PAGE_SIZE)).default_backoff();
    let (changes, metrics) = (changes.clone(), metrics.clone());
    let kind = K::kind(&());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // A (re)list in progress: the names of its objects, each sent as it arrives.
        let mut listing: Option<Vec<ObjectName>> = None;
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(watcher::Event::Apply(o)) => Change::Applied(object(o)),
                Ok(watcher::Event::Delete(o)) => Change::Deleted(object(o)),
                Ok(watcher::Event::Init) => {
                    listing = Some(Vec::new());
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    let o = object(o);
                    listing.get_or_insert_default().push(o.name());
                    Change::Applied(o)
                }
                Ok(watcher::Event::InitDone) => {
                    let names = listing.take().unwrap_or_default();
                    tracing::info!(%kind, objects = names.len(), "listed");
                    Change::Listed(listed, names)
                }
                // The watcher retries with backoff (re-listing when its resourceVersion expired);
                // the agent keeps the last state meanwhile.
                Err(error) => {
                    tracing::warn!(%kind, "watch failed, retrying: {error}");
                    metrics.source_error("kubernetes");
                    continue;
                }
            };
            if changes.send(change).is_err() {
                return;
            }
        }
    })
}
