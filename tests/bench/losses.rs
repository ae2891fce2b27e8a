//! REPORT.md's "Where Switchboard loses": every comparison of the run that Switchboard did not win
//! (ties left out), stated from the numbers, so the list stays honest as results change.
use std::fmt::Write as _;

use crate::{
    Results,
    control_plane::Loader,
    e2e::{self, Setup},
    report::{FLAT, TIE, services},
    stats::short,
};

/// Every comparison Switchboard did not win, stated from the numbers.
pub fn section(md: &mut String, results: &Results) {
    let mut losses = Vec::new();
    if let Some(datapath) = &results.datapath {
        for row in &datapath.rows {
            if row.ratio_to_one_service > FLAT {
                losses.push(format!(
                    "Datapath, {} {}: {} ns per packet with {} services, ×{:.2} of the smallest count \
                     (the goal is at most ×{FLAT}).",
                    row.family.label(),
                    row.packet.label(),
                    short(row.ns_per_packet),
                    row.services,
                    row.ratio_to_one_service
                ));
            }
        }
    }
    if let Some(e2e) = &results.e2e {
        let direct_rate = |row: &e2e::Row| {
            e2e.rows
                .iter()
                .find(|r| {
                    r.services == row.services
                        && r.workload == row.workload
                        && r.family == row.family
                        && r.setup == Setup::Direct
                })
                .map_or(f64::NAN, |r| r.rate_per_s)
        };
        for row in &e2e.rows {
            let what = format!(
                "{} over {} with {}",
                row.workload.label(),
                row.family.label(),
                services(row.services)
            );
            match row.setup {
                Setup::Switchboard => {
                    if row.ratio_to_direct < 1.0 - TIE {
                        losses.push(format!(
                            "End to end, {what}: Switchboard reaches ×{:.2} of the direct path \
                             (medians {:.0} vs {:.0} {}).",
                            row.ratio_to_direct,
                            row.rate_per_s,
                            direct_rate(row),
                            row.workload.unit()
                        ));
                    }
                    if row.failed_transactions > 0 {
                        losses.push(format!(
                            "End to end, {what}: {} transactions through Switchboard failed.",
                            row.failed_transactions
                        ));
                    }
                }
                Setup::Direct => {}
                _ => {
                    if row.ratio_to_switchboard > 1.0 + TIE {
                        losses.push(format!(
                            "End to end, {what}: {} is faster than Switchboard, ×{:.2} ({:.0} {}).",
                            row.setup.label(),
                            row.ratio_to_switchboard,
                            row.rate_per_s,
                            row.workload.unit()
                        ));
                    }
                }
            }
        }
    }
    if let Some(control_plane) = &results.control_plane {
        let switchboard = |services: usize| {
            control_plane
                .full_sync
                .iter()
                .find(|r| r.services == services && r.loader == Loader::Switchboard)
        };
        for row in control_plane
            .full_sync
            .iter()
            .filter(|r| r.loader != Loader::Switchboard)
        {
            let Some(ours) = switchboard(row.services) else {
                continue;
            };
            if row.ratio_to_switchboard < 1.0 - TIE {
                losses.push(format!(
                    "Control plane, {} services from nothing: {} takes {} s, Switchboard {} s \
                     (×{:.2} of Switchboard's time).",
                    row.services,
                    row.loader.label(),
                    short(row.seconds),
                    short(ours.seconds),
                    row.ratio_to_switchboard
                ));
            }
            if row.peak_rss_mib < ours.peak_rss_mib * (1.0 - TIE) {
                losses.push(format!(
                    "Memory, {} services: Switchboard's process peaks at {} MiB, {} at {} MiB (the \
                     tool only, not kube-proxy).",
                    row.services,
                    short(ours.peak_rss_mib),
                    row.loader.label(),
                    short(row.peak_rss_mib)
                ));
            }
        }
        let changes = &control_plane.agent;
        if let (Some(first), Some(last)) = (changes.first(), changes.last())
            && last.services > first.services
            && last.change_p50_ms > first.change_p50_ms * 2.0
        {
            losses.push(format!(
                "Endpoint changes: one change takes {} ms (p50) with {} services but {} ms with {} \
                 (×{:.1}): the agent's cost per change grows with the number of services \
                 instead of with the size of the change.",
                short(first.change_p50_ms),
                first.services,
                short(last.change_p50_ms),
                last.services,
                last.change_p50_ms / first.change_p50_ms
            ));
        }
    }
    md.push_str("\n## Where Switchboard loses\n\n");
    let _ = writeln!(
        md,
        "Every comparison in this run that Switchboard did not win, ties (within {:.0} %) left out:\n",
        TIE * 100.0
    );
    if losses.is_empty() {
        md.push_str("* Nothing: in this run Switchboard won or tied every comparison.\n");
    }
    for loss in losses {
        let _ = writeln!(md, "* {loss}");
    }
}
