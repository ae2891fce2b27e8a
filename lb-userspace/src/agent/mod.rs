//! The agent: source changes → the Services they touch → model → reconciler → maps, with the
//! datapath's hooks, the conntrack collector, Events and health checks as parts it drives.
//!
//! Start-up overlaps the two slow things: the kernel verifies the programs on a thread of
//! their own while the source lists and the maps are programmed; the programs are attached
//! once both are done. A restarted agent finds its pinned maps and the previous agent's
//! programs still attached and serving from them: it brings the maps in sync first, then swaps
//! its programs in.
mod conntrack;
pub mod interfaces;
mod programming;
pub mod store;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_common::RejectLimit;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, mpsc},
};

use self::{
    interfaces::{Attached, Hooks, RESCAN_INTERVAL},
    programming::Programming,
    store::{Store, Touched},
};
use crate::{
    datapath::{Capacity, Datapath, conntrack_gc::Timeouts},
    model::{Context, EndpointsFrom},
    observe::{self, events::Events, health::Health, metrics::AgentMetrics, server::Observed},
    reconcile::{PlanOptions, Reconciler},
    source::{
        self, Change, Kind,
        kube::Connection,
        manifests::{self, ManifestDir},
    },
};

/// Where Services come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of manifests.
    Manifests(PathBuf),
    Kubernetes(Connection),
}

/// Everything the agent is told at start.
#[derive(Clone, Debug)]
pub struct Settings {
    pub source: Source,
    pub endpoints_from: EndpointsFrom,
    /// This node's name (traffic policies Local, and its Node's zone).
    pub node_name: Option<String>,
    /// This node's zone, overriding its Node's label.
    pub zone: Option<String>,
    pub hooks: Hooks,
    /// Leave the datapath attached on exit.
    pub keep_datapath: bool,
    pub metrics_address: SocketAddr,
    pub plan: PlanOptions,
    /// The datapath object to load instead of the built-in one.
    pub bpf_object: Option<PathBuf>,
    pub conntrack_gc_interval: Duration,
    pub timeouts: Timeouts,
    pub capacity: Capacity,
    pub reject_limit: RejectLimit,
    /// The reverse-path check of pods' packets (`--source-check`).
    pub source_check: bool,
    pub pin_dir: PathBuf,
}

/// Runs the agent until SIGTERM or SIGINT, or until its source fails.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    // First: a SIGTERM that comes while the datapath is loading (a rollout deleting a pod that is
    // still starting) waits for the main loop, which exits cleanly, instead of killing the agent
    // halfway.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    if let Source::Manifests(dir) = &settings.source
        && !dir.is_dir()
    {
        anyhow::bail!("--manifests {}: not a directory", dir.display());
    }
    // Connect and listen before touching the kernel, so a bad configuration fails fast and
    // changes nothing.
    let client = match &settings.source {
        Source::Manifests(_) => None,
        Source::Kubernetes(connection) => Some(connection.client().await?),
    };
    let events = client
        .as_ref()
        .map(|client| Events::start(client.clone(), event_instance(settings.node_name.as_deref())));
    let metrics = Arc::new(AgentMetrics::default());
    let health = Arc::new(Health::default());
    let registry = observe::metrics::registry(&metrics, settings.pin_dir.clone());
    observe::server::serve(
        settings.metrics_address,
        Observed {
            registry,
            health: health.clone(),
        },
    )
    .await?;

    let mut datapath = match &settings.bpf_object {
        Some(object) => Datapath::load_file(object, &settings.pin_dir, settings.capacity)?,
        None => Datapath::load_with_capacity(&settings.pin_dir, settings.capacity)?,
    };
    datapath.set_reject_limit(settings.reject_limit)?;
    observe::datapath_log::forward(&mut datapath.ebpf)?;
    let mut maps = datapath.maps()?;
    // Before the programs are attached, so that no pod's packet meets the datapath without it.
    maps.set_source_check(settings.source_check)?;
    let reconciler = Reconciler::new(maps.read_programmed().context("cannot read the pinned maps")?);
    tracing::info!(
        frontends = reconciler.frontends(),
        "recovered the programmed state from the pinned maps"
    );
    let programs = settings.hooks.programs();
    let mut verifying =
        tokio::task::spawn_blocking(move || datapath.load_programs(&programs).map(|()| datapath));
    tokio::spawn(conntrack::collect(
        settings.pin_dir.clone(),
        settings.conntrack_gc_interval,
        settings.timeouts,
        metrics.clone(),
    ));

    let (changes_tx, mut changes) = mpsc::unbounded_channel::<Change>();
    let (source, kinds) = start_source(&settings, client, changes_tx, &metrics);
    let mut store = Store::new(settings.endpoints_from, settings.node_name.clone());
    let mut programming = Programming::new(reconciler, maps, settings.plan, metrics.clone(), events);
    let mut attached: Option<Attached> = None;
    let mut in_sync = false;
    let links_changed = Arc::new(Notify::new());
    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    loop {
        tokio::select! {
            change = changes.recv() => {
                let Some(change) = change else {
                    // The source ended; its error says why. The datapath stays attached.
                    return source.await?.context("the source stopped");
                };
                health.update_received();
                // Everything that arrived meanwhile is one pass: a burst costs one sync.
                let mut touched = Touched::default();
                store.apply(change, &mut touched);
                while let Ok(change) = changes.try_recv() {
                    store.apply(change, &mut touched);
                }
                // Nothing is programmed before the first full list of every kind: a Service
                // listed before its EndpointSlices would be programmed without endpoints.
                if !store.has_listed(&kinds) {
                    continue;
                }
                let context = Context {
                    endpoints_from: settings.endpoints_from,
                    node_name: settings.node_name.as_deref(),
                    zone: settings.zone.as_deref().or_else(|| store.zone()),
                };
                programming.sync(&store, touched, &context);
                if !in_sync {
                    in_sync = true;
                    tracing::info!(since_start_ms = started.elapsed().as_millis() as u64, "every Service programmed");
                    say_serving(&attached, in_sync, started);
                }
                // Healthy once serving: programs attached and maps in sync.
                if attached.is_some() {
                    health.update_applied();
                }
            }
            verified = &mut verifying, if attached.is_none() => {
                let datapath = verified.context("loading the programs panicked")??;
                attached = Some(Attached::attach(datapath, &settings.hooks, links_changed.clone(), programming.maps())?);
                say_serving(&attached, in_sync, started);
                if in_sync {
                    health.update_applied();
                }
            }
            () = links_changed.notified(), if attached.is_some() => {
                if let Some(attached) = &mut attached {
                    attached.sync(programming.maps())?;
                }
            }
            _ = rescan.tick(), if attached.is_some() => {
                if let Some(attached) = &mut attached {
                    attached.sync(programming.maps())?;
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    if let Some(attached) = attached {
        attached.finish(settings.keep_datapath);
    }
    Ok(())
}

/// Starts the source's task; returns it and the kinds it lists.
fn start_source(
    settings: &Settings,
    client: Option<kube::Client>,
    changes: source::Changes,
    metrics: &Arc<AgentMetrics>,
) -> (tokio::task::JoinHandle<anyhow::Result<()>>, Vec<Kind>) {
    match (&settings.source, client) {
        (Source::Manifests(dir), _) => (
            tokio::spawn(manifests::watch(ManifestDir::new(dir), changes, metrics.clone())),
            Kind::ALL.to_vec(),
        ),
        (Source::Kubernetes(_), Some(client)) => (
            tokio::spawn(source::kube::watch(
                client,
                settings.endpoints_from,
                settings.node_name.clone(),
                changes,
                metrics.clone(),
            )),
            source::kube::kinds(settings.endpoints_from, settings.node_name.as_deref()),
        ),
        (Source::Kubernetes(_), None) => unreachable!("a client is made for the Kubernetes source"),
    }
}

/// Once the programs are attached and every Service is programmed.
fn say_serving(attached: &Option<Attached>, in_sync: bool, started: Instant) {
    if attached.is_some() && in_sync {
        tracing::info!(since_start_ms = started.elapsed().as_millis() as u64, "serving");
    }
}

/// Who publishes the Events: this node's name, else the host name.
fn event_instance(node_name: Option<&str>) -> String {
    node_name
        .map(str::to_owned)
        .or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
            Some(host.trim().to_owned())
        })
        .unwrap_or_else(|| "switchboard".into())
}
