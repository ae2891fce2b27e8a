//! `cargo run --release --example maps_scale -- [--services N,N,…] [--changes N]` (root): the
//! reconciler's share of the control plane at scale. For each N it loads a fresh datapath with
//! the default capacities, builds N Services of 10 endpoints each as the model hands them over
//! (a ClusterIP frontend per Service, every tenth with a NodePort too while ports last; the agent's defaults:
//! Maglev scaled to the backends), and times:
//!
//! * `sync_all` of all of them into the pinned maps (model output → maps in sync: planning,
//!   tables, batched writes), and again on a reconciler restarted from the maps (nothing to
//!   write, what a restarted agent does);
//! * `sync_changed` of one Service whose endpoint changed, `--changes` times, on Services spread
//!   over the cluster (p50 and p99);
//!
//! and prints the kernel memory of every pinned map as the kernel accounts it. It does not
//! include the model or the sources (the agent's side), nor attaching programs.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb_common::{BackendId, ServiceInfo};
use lb_userspace::{
    datapath::{Datapath, memory},
    lab::PinDir,
    model::{Endpoint, Frontend, FrontendKind, Policy, Protocol, ServiceName},
    reconcile::{
        BackendEntry, BatchError, FrontendKey, IdKind, MapError, MapWriter, PlanOptions, Programmed,
        Reconciler, ServiceFrontends, SourceRange,
    },
};

const ENDPOINTS: u32 = 10;

#[derive(clap::Parser)]
struct Args {
    /// Measure the reconciler's own work only: maps that take every write and keep nothing
    /// (no root needed).
    #[arg(long)]
    null_maps: bool,
    /// Service counts to measure, each on a fresh datapath.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 50_000, 100_000])]
    services: Vec<u32>,
    /// Single-endpoint changes timed at each count.
    #[arg(long, default_value_t = 1000)]
    changes: u32,
}

fn endpoint(service: u32, index: u32, generation: u32) -> Endpoint {
    // 10.128.0.0/9 holds 8M addresses: a Service's endpoints are consecutive.
    let address = Ipv4Addr::from(u32::from_be_bytes([10, 128, 0, 0]) + service * ENDPOINTS + index);
    Endpoint {
        address: IpAddr::V4(address),
        port: 8080 + generation as u16,
        pod: format!("svc-{service}-{index}"),
        node_name: None,
        zone: None,
        terminating: false,
        zone_hints: Vec::new(),
        node_hints: Vec::new(),
    }
}

/// Service `index`'s frontends; `generation` moves one endpoint to another port (a change).
fn service(index: u32, generation: u32) -> (ServiceName, Vec<Frontend>) {
    let name = ServiceName {
        namespace: "scale".into(),
        name: format!("svc-{index}"),
    };
    let backends: Vec<Endpoint> = (0..ENDPOINTS)
        .map(|i| endpoint(index, i, if i == 0 { generation } else { 0 }))
        .collect();
    let frontend = |kind, address: IpAddr, port| Frontend {
        service: name.clone(),
        port_name: "http".into(),
        kind,
        address,
        port,
        protocol: Protocol::Tcp,
        backends: backends.clone(),
        draining: Vec::new(),
        in_cluster: None,
        policy: Policy::default(),
        algorithm: None,
    };
    let cluster_ip = Ipv4Addr::from(u32::from_be_bytes([10, 96, 0, 0]) + index);
    let mut frontends = vec![frontend(FrontendKind::ClusterIp, cluster_ip.into(), 80)];
    // NodePorts for the first 2768 tenths: 30000–32767.
    if index.is_multiple_of(10) && index / 10 < 2768 {
        let node_port = 30_000 + (index / 10) as u16;
        frontends.push(frontend(
            FrontendKind::NodePort,
            Ipv4Addr::UNSPECIFIED.into(),
            node_port,
        ));
    }
    (name, frontends)
}

/// CPU time the process used, the threads that build Maglev tables included (the machine may
/// be busy: wall time alone would hide it).
fn process_cpu() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the clock into `time`, which outlives the call.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    assert_eq!(result, 0, "the process clock");
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// The process's resident memory now and at its peak, in MiB.
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Maps that take every write and keep nothing.
struct NullMaps;

impl MapWriter for NullMaps {
    fn put_backends(&mut self, _: &[(BackendId, BackendEntry)]) -> Result<(), BatchError> {
        Ok(())
    }
    fn delete_backends(&mut self, _: &[(BackendId, BackendEntry)]) -> Result<(), BatchError> {
        Ok(())
    }
    fn put_services(&mut self, _: &[(FrontendKey, ServiceInfo)]) -> Result<(), BatchError> {
        Ok(())
    }
    fn delete_services(&mut self, _: &[FrontendKey]) -> Result<(), BatchError> {
        Ok(())
    }
    fn put_tables(
        &mut self,
        blocks: &[(u32, u32)],
        fill: &(dyn Fn(usize, &mut [BackendId]) + Sync),
    ) -> Result<(), MapError> {
        let mut table = Vec::new();
        for (index, &(_, len)) in blocks.iter().enumerate() {
            table.resize(len as usize, 0);
            fill(index, &mut table);
        }
        Ok(())
    }
    fn grow_tables(&mut self, _: u32) -> Result<(), MapError> {
        Ok(())
    }
    fn put_cluster_ips(&mut self, _: &[(IpAddr, u32)]) -> Result<(), BatchError> {
        Ok(())
    }
    fn delete_cluster_ips(&mut self, _: &[IpAddr]) -> Result<(), BatchError> {
        Ok(())
    }
    fn put_source_range(&mut self, _: SourceRange) -> Result<(), MapError> {
        Ok(())
    }
    fn delete_source_range(&mut self, _: SourceRange) -> Result<(), MapError> {
        Ok(())
    }
    fn put_next_id(&mut self, _: IdKind, _: u32) -> Result<(), MapError> {
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args: Args = clap::Parser::parse();
    let options = PlanOptions::default();
    if args.null_maps {
        for &count in &args.services {
            let services: ServiceFrontends = (0..count).map(|i| service(i, 0)).collect();
            let mut reconciler = Reconciler::new(Programmed::default());
            let (started, cpu) = (Instant::now(), process_cpu());
            let report = reconciler.sync_all(&services, &options, &mut NullMaps);
            println!(
                "{count} Services, no kernel: sync_all {:.3} s ({:.3} s CPU, {} writes)",
                started.elapsed().as_secs_f64(),
                (process_cpu() - cpu).as_secs_f64(),
                report.writes
            );
        }
        return Ok(());
    }
    for &count in &args.services {
        let pins = PinDir::new("sbscale", &format!("maps{count}"));
        let datapath = Datapath::load(pins.path())?;
        let mut maps = datapath.maps()?;
        let services: ServiceFrontends = (0..count).map(|i| service(i, 0)).collect();
        let frontends: usize = services.values().map(Vec::len).sum();

        let mut reconciler = Reconciler::new(maps.read_programmed()?);
        let (started, cpu) = (Instant::now(), process_cpu());
        let report = reconciler.sync_all(&services, &options, &mut maps);
        let (full, full_cpu) = (started.elapsed(), process_cpu() - cpu);
        anyhow::ensure!(
            report.failed.is_empty(),
            "{:?}",
            &report.failed[..report.failed.len().min(3)]
        );

        let started = Instant::now();
        let programmed = maps.read_programmed()?;
        let read = started.elapsed();
        let mut restarted = Reconciler::new(programmed);
        let (started, cpu) = (Instant::now(), process_cpu());
        let again = restarted.sync_all(&services, &options, &mut maps);
        let (resync, resync_cpu) = (started.elapsed(), process_cpu() - cpu);
        anyhow::ensure!(again.writes + again.deletes == 0, "a restart rewrote {again:?}");

        let mut latencies = Vec::with_capacity(args.changes as usize);
        let mut cpu_times = Vec::with_capacity(args.changes as usize);
        for change in 0..args.changes {
            // Spread over the cluster; each change moves one endpoint to another port.
            let index = (change * 7919) % count;
            let changed = ServiceFrontends::from([service(index, change + 1)]);
            let (started, cpu) = (Instant::now(), process_cpu());
            let report = restarted.sync_changed(&changed, &options, &mut maps);
            latencies.push(started.elapsed());
            cpu_times.push(process_cpu() - cpu);
            anyhow::ensure!(report.failed.is_empty(), "{:?}", report.failed);
        }
        latencies.sort_unstable();
        cpu_times.sort_unstable();

        let usage = memory::usage(pins.path())?;
        let total: u64 = usage.iter().map(|m| m.bytes).sum();
        let (rss_now, rss_peak) = rss();
        println!(
            "{count} Services ({frontends} frontends, {} endpoints): sync_all {:.3} s ({:.3} s CPU, {} writes); \
             restart: read back {:.3} s, sync_all {:.3} s ({:.3} s CPU, 0 writes); one endpoint change p50 {:.0} µs, \
             p99 {:.0} µs (CPU: p50 {:.0} µs, p99 {:.0} µs; {} changes); kernel map memory {:.1} MiB; this process {rss_now:.0} MiB (peak {rss_peak:.0})",
            count * ENDPOINTS,
            full.as_secs_f64(),
            full_cpu.as_secs_f64(),
            report.writes,
            read.as_secs_f64(),
            resync.as_secs_f64(),
            resync_cpu.as_secs_f64(),
            percentile(&latencies, 0.5).as_secs_f64() * 1e6,
            percentile(&latencies, 0.99).as_secs_f64() * 1e6,
            percentile(&cpu_times, 0.5).as_secs_f64() * 1e6,
            percentile(&cpu_times, 0.99).as_secs_f64() * 1e6,
            args.changes,
            total as f64 / f64::from(1 << 20),
        );
        for map in usage.iter().filter(|m| m.bytes >= 1 << 20) {
            println!(
                "    {:<20} {:>8.1} MiB",
                map.map,
                map.bytes as f64 / f64::from(1 << 20)
            );
        }
    }
    Ok(())
}
