//! `cargo xtask soak`: the churn soak. The real agent (`switchboard run --manifests DIR`) in a
//! netns lab serves three dual-stack ClusterIP Services (TCP and UDP, IPv4 and IPv6) to clients that connect without
//! pause, while a churn loop edits the manifests: pods added, marked terminating and removed,
//! Services' ports, session affinity and algorithm changed. Every request whose backend was
//! live for the whole request must succeed and be answered by a pod the Service had then; after
//! the load, conntrack and affinity occupancy must return to where they started. Prints a
//! summary, each failed request with what explains it (`diagnose`), and exits non-zero on any
//! failure. Needs root.
mod churn;
mod diagnose;
mod lab;
mod load;
mod monitor;
mod starve;
mod timeline;
mod topology;

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use clap::Parser;

#[derive(Parser)]
#[command(name = "soak", about = "Churn soak of the real agent on a netns lab")]
struct Args {
    /// How long to keep the load and the churn going.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The switchboard binary [default: the one built beside this example].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Seed of the churn's choices [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// Starve the agent of CPU (nice 19 beside a busy loop per CPU) while the load runs: no
    /// request may fail for it.
    #[arg(long)]
    starve: bool,
}

/// How long occupancy may take to return to its baseline once the load stops: the agent's
/// collection interval and timeouts given in `lab::AGENT_ARGS` (1 s, at most 5 s), with room.
const SETTLE: Duration = Duration::from_secs(20);

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("soak: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    let agent = match args.agent {
        Some(agent) => agent,
        // target/<profile>/examples/soak → target/<profile>/switchboard
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .map(|profile| profile.join("switchboard"))
            .ok_or_else(|| anyhow::anyhow!("cannot find the switchboard binary; pass --agent"))?,
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64)
    });
    println!(
        "soak: {} s with seed {seed} (replay its churn with --seed {seed})",
        args.seconds
    );
    let cluster = lab::Cluster::start(&agent)?;
    let shared = Arc::new(load::Shared::new(cluster.pins().to_owned()));
    let mut churn = churn::Churn::start(&cluster, shared.clone(), seed)?;
    let monitor = Arc::new(monitor::Monitor::default());
    let sampler = monitor.start(cluster.pins().to_owned(), cluster.agent_pid(), shared.clone())?;
    let before = cluster.occupancy()?;
    let starved = args
        .starve
        .then(|| starve::Starvation::start(cluster.agent_pid()))
        .transpose()?;
    let clients = load::start(&cluster, &shared)?;
    let started = Instant::now();
    let load_start = shared.clock.now();
    let churned = churn.run_until(started + Duration::from_secs(args.seconds));
    shared.stop.store(true, Ordering::SeqCst);
    for client in clients {
        let _ = client.join();
    }
    drop(starved);
    let _ = sampler.join();
    let duration = started.elapsed();
    let load_end = shared.clock.now();
    churned?;

    // Occupancy back to its baseline: every flow closed or idle, every affinity timed out.
    let deadline = Instant::now() + SETTLE;
    let mut after = cluster.occupancy()?;
    while !after.within(&before) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        after = cluster.occupancy()?;
    }
    println!(
        "soak: {:.1} s, {} Services, seed {seed}",
        duration.as_secs_f64(),
        topology::SERVICES.len()
    );
    println!("  churn: {}", churn.summary());
    let counts = shared.counts();
    println!(
        "  TCP connections: {}, UDP requests: {}, requests in all: {}",
        counts.tcp,
        counts.udp,
        counts.tcp + counts.udp
    );
    println!(
        "  failures: {} (of requests whose backend was live throughout), answered by a pod the Service no longer had: {}",
        counts.failures, counts.misrouted
    );
    println!(
        "  not counted: {} (a backend of their Service stopped, or their port came or went, during them)",
        counts.excused
    );
    let peak = shared.peak_occupancy();
    println!(
        "  occupancy: conntrack {} entries before, {} at most under load, {} after; affinity {} before, {} under load, {} after",
        before.conntrack, peak.conntrack, after.conntrack, before.affinity, peak.affinity, after.affinity
    );
    println!("  machine: {}", monitor.starvation(load_start, load_end));
    let context = diagnose::Context {
        cluster: &cluster,
        shared: &shared,
        monitor: &monitor,
    };
    for failure in shared.failure_samples() {
        let mut lines = diagnose::explain(&failure, &context).into_iter();
        println!("  failed: {}", lines.next().unwrap_or_default());
        for line in lines {
            println!("  {line}");
        }
    }
    let settled = after.within(&before);
    if !settled {
        println!("  occupancy did not return to its baseline within {SETTLE:?}");
        cluster.print_agent_log_tail(30);
    }
    let passed = counts.failures == 0 && counts.misrouted == 0 && settled && counts.tcp > 0 && counts.udp > 0;
    println!("soak: {}", if passed { "passed" } else { "FAILED" });
    Ok(passed)
}
