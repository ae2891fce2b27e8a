//! `switchboard run`: the agent.
use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};

use super::{PinDir, source::SourceArgs};
use crate::{
    datapath::{
        maps::ServiceMaps,
        Datapath,
        attach::{self, Attacher},
    },
    model,
    reconcile::{self, Reconciler},
    source::{
        self, Snapshot,
        manifests::{self, ManifestDir},
    },
};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Glob matching the host-side interfaces of pods, e.g. 'veth*' or 'cali*'. Interfaces that
    /// appear later are attached too.
    #[arg(long, env = "SWITCHBOARD_INTERFACES", value_name = "PATTERN")]
    pub interfaces: String,
    /// On SIGTERM/SIGINT leave the programs attached (the links stay pinned), so traffic keeps
    /// flowing until the next agent takes over, as a DaemonSet rollout wants. Without it the
    /// agent detaches on exit. A killed agent always leaves them attached.
    #[arg(long, env = "SWITCHBOARD_KEEP_DATAPATH")]
    pub keep_datapath: bool,
    #[command(flatten)]
    pub pin_dir: PinDir,
}

/// Interfaces are re-listed this often even without a netlink event, as a safety net.
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))?;
    Ok(ExitCode::SUCCESS)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.source.manifests
        && !dir.is_dir()
    {
        anyhow::bail!("--manifests {}: not a directory", dir.display());
    }
    let endpoints_from = args.source.endpoints_from();
    // Connect before touching the kernel, so a bad configuration fails fast and changes nothing.
    let client = match &args.source.manifests {
        Some(_) => None,
        None => Some(args.source.connection.client().await?),
    };
    let mut datapath = Datapath::load(&args.pin_dir.pin_dir)?;
    let mut maps = datapath.maps()?;
    let mut reconciler = Reconciler::new(maps.read_programmed().context("cannot read the pinned maps")?);
    tracing::info!(
        services = reconciler.programmed().services.len(),
        "recovered the programmed state from the pinned maps"
    );
    let mut attacher = Attacher::new(&mut datapath.ebpf, &args.interfaces, &args.pin_dir.pin_dir)?;
    let links_changed = Arc::new(Notify::new());
    attach::watch_links(links_changed.clone())?;
    attacher.sync(&mut datapath.ebpf)?;

    let (snapshots_tx, mut snapshots) = watch::channel(Snapshot::default());
    let source = match (&args.source.manifests, client) {
        (Some(dir), _) => tokio::spawn(manifests::watch(ManifestDir::new(dir), snapshots_tx)),
        (None, Some(client)) => tokio::spawn(source::kube::watch(client, endpoints_from, snapshots_tx)),
        (None, None) => unreachable!("a client is made whenever there is no manifest directory"),
    };
    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    // The source ended; its error says why.
                    return source.await?.context("the manifest source stopped");
                }
                let snapshot = snapshots.borrow_and_update().clone();
                sync(&args.source.input(&snapshot), &mut reconciler, &mut maps);
            }
            () = links_changed.notified() => attacher.sync(&mut datapath.ebpf)?,
            _ = rescan.tick() => attacher.sync(&mut datapath.ebpf)?,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let interfaces = attacher.interfaces().len();
    if args.keep_datapath {
        tracing::info!(interfaces, "exiting; the datapath stays attached and keeps serving");
    } else {
        attacher.detach_all();
        tracing::info!(interfaces, "detached; maps stay pinned in {}", args.pin_dir.pin_dir.display());
    }
    Ok(())
}

/// One pass of source → model → plan → maps.
fn sync(input: &model::Input<'_>, reconciler: &mut Reconciler, maps: &mut ServiceMaps) {
    let model = model::compute(input);
    for warning in &model.warnings {
        tracing::warn!("{warning}");
    }
    for frontend in model.frontends.iter().filter(|f| f.backends.is_empty()) {
        tracing::warn!(
            "Service {} {}:{}/{} has no endpoints; connections to it are dropped",
            frontend.service,
            frontend.address,
            frontend.port,
            frontend.protocol.as_str()
        );
    }
    let desired = reconcile::plan(&model);
    let started = std::time::Instant::now();
    let report = reconciler.apply(&desired, maps);
    for (service, error) in &report.failed {
        tracing::error!("cannot program {service}: {error}; its previous state stays in effect");
    }
    tracing::info!(
        frontends = desired.len(),
        writes = report.writes,
        deletes = report.deletes,
        failed = report.failed.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "maps in sync"
    );
}
