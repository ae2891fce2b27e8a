//! `switchboard status`: what the kernel is programmed with, read from the pinned maps.
use std::process::ExitCode;

use lb_common::{Stat, service_flags};

use super::PinDir;
use crate::datapath::maps::ServiceMaps;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pin_dir: PinDir,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let maps = ServiceMaps::open(&args.pin_dir.pin_dir)?;
    let programmed = maps.read_programmed()?;
    let flows = maps.flows_by_service();
    let traffic = maps.service_stats()?;
    // IPv6 frontends are wider than IPv4 ones: the column fits the widest.
    let width = programmed
        .services
        .keys()
        .map(|key| key.to_string().len())
        .chain([24])
        .max()
        .unwrap_or_default();
    println!(
        "{:<width$} {:>4} {:<16} {:>9} {:>6} {:>10} {:>12} {:>9}  BACKENDS",
        "FRONTEND", "ID", "ALGORITHM", "ENDPOINTS", "FLOWS", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for (key, info) in &programmed.services {
        let frontend = key.to_string();
        let listed = |set| -> Vec<String> {
            programmed
                .live_backends(set)
                .iter()
                .filter_map(|id| programmed.backends.get(id))
                .map(|b| b.addr.to_string())
                .collect()
        };
        let mut backends = match listed(&info.backends) {
            none if none.is_empty() => "NO ENDPOINTS (connections refused)".to_owned(),
            some => some.join(", "),
        };
        // externalTrafficPolicy Local: clients from outside have this node's endpoints only.
        if info.outside != info.backends {
            backends += &match listed(&info.outside) {
                none if none.is_empty() => "; from outside: NO LOCAL ENDPOINTS (dropped)".to_owned(),
                some => format!("; from outside: {}", some.join(", ")),
            };
        }
        let mut algorithm = match info.backends.maglev_size {
            0 => "random".to_owned(),
            size => format!("maglev/{size}"),
        };
        if info.flags & service_flags::AFFINITY != 0 {
            algorithm += &format!("+affinity/{}s", info.affinity_timeout_s);
        }
        // How outside clients are treated: source NAT to other nodes, or Local; source ranges.
        if info.flags & service_flags::EXTERNAL_SNAT != 0 {
            algorithm += "+snat";
        }
        if info.flags & service_flags::EXTERNAL_LOCAL != 0 {
            algorithm += "+local";
        }
        if info.flags & service_flags::SOURCE_RANGES != 0 {
            algorithm += "+ranges";
        }
        let counted = traffic.get(&info.id).copied().unwrap_or_default();
        println!(
            "{frontend:<width$} {:>4} {algorithm:<16} {:>9} {:>6} {:>10} {:>12} {:>9}  {backends}",
            info.id,
            info.backends.count,
            flows.get(&info.id).copied().unwrap_or(0),
            counted.packets,
            counted.bytes,
            counted.new_flows,
        );
    }
    println!();
    for stat in Stat::ALL {
        println!("{:<28} {}", stat.name(), maps.stat(stat)?);
    }
    Ok(ExitCode::SUCCESS)
}
