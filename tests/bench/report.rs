//! results.json, REPORT.md and its plots. Every number in the report comes from `Results`; the
//! prose around them only says what was measured and how.
use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;

use crate::{
    Results,
    control_plane::{self, Loader},
    datapath::{self, PacketKind},
    e2e::{self, Setup},
    losses,
    plots::{self, Plot, Series},
    services::Family,
    stats::{self, short},
    traffic::Workload,
};

/// Within this much of 1, a ratio is a tie: the machines are noisy.
pub const TIE: f64 = 0.03;
/// The datapath's goal: at most 5 % slower with many services than with one.
pub const FLAT: f64 = 1.05;

pub fn write(out: &Path, results: &Results) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(results)?;
    std::fs::write(out.join("results.json"), json + "\n").context("cannot write results.json")?;
    let mut md = String::new();
    header(&mut md, results);
    if let Some(datapath) = &results.datapath {
        datapath_section(&mut md, out, datapath)?;
    }
    if let Some(e2e) = &results.e2e {
        e2e_section(&mut md, out, e2e)?;
    }
    if let Some(control_plane) = &results.control_plane {
        control_plane_section(&mut md, out, control_plane)?;
    }
    maglev_section(&mut md, &results.maglev);
    losses::section(&mut md, results);
    if !results.errors.is_empty() {
        md.push_str("\n## Sections that failed\n\n");
        for error in &results.errors {
            let _ = writeln!(md, "* {error}");
        }
    }
    std::fs::write(out.join("REPORT.md"), md).context("cannot write REPORT.md")
}

fn header(md: &mut String, results: &Results) {
    let meta = &results.meta;
    let machine = &meta.machine;
    let _ = write!(
        md,
        "# Switchboard benchmarks\n\n\
         Switchboard against kube-proxy's iptables and nftables modes and against the direct path \
         (no load balancer), measured in one invocation on one machine. The machines are shared and \
         noisy, so every comparison is a ratio between runs interleaved in this invocation (A B C, \
         B C A, …): the median over rounds of the per-round ratios. Absolute numbers are given but \
         only the ratios are claims.\n\n\
         | | |\n|---|---|\n\
         | date | {} |\n\
         | command | `{}` (run as root from the workspace) |\n\
         | mode | {:?}, {:.0} s |\n\
         | machine | {} cores, {}, {} GiB |\n\
         | kernel | {} |\n\
         | tools | {} |\n\n\
         The raw samples are in [results.json](results.json).\n",
        meta.date,
        meta.command,
        meta.mode,
        meta.duration_seconds,
        machine.cores,
        machine.cpu,
        machine.memory_gib,
        machine.kernel,
        meta.tools.join("; "),
    );
}

fn ratio(value: f64) -> String {
    if value.is_finite() {
        format!("×{value:.2}")
    } else {
        "–".into()
    }
}

fn datapath_section(md: &mut String, out: &Path, results: &datapath::Results) -> anyhow::Result<()> {
    let counts = distinct(results.rows.iter().map(|r| r.services));
    let row_in = |family: Family, services: usize, kind: PacketKind| {
        results
            .rows
            .iter()
            .find(|r| r.family == family && r.services == services && r.packet == kind)
    };
    let row = |services: usize, kind: PacketKind| row_in(Family::Ipv4, services, kind);
    let _ = write!(
        md,
        "\n## 1. Datapath cost per packet\n\n\
         `from_pod` (TC) and `nodeport` (XDP) on crafted packets through BPF_PROG_TEST_RUN, \
         with N services programmed \
         (10 backends each). One loaded datapath per N, all with the same map capacities, visited \
         in rotating order for {} rounds. Established-flow and non-service packets: the kernel's \
         mean over `repeat` = {} runs. New flows: {} SYNs per round from sources never seen before, \
         one run each (a conntrack miss happens once per flow); the median is shown. A single run \
         carries about {} ns of timer overhead that a repeated one spreads out. `from_pod` runs on a \
         pod interface whose routes lead back to the clients, with the agent's default reverse-path \
         check on: a new flow's SYN includes its FIB lookup, established-flow and non-service \
         packets are not checked. The goal is flat: at \
         most ×{FLAT} of 1 service. These are IPv4 packets; IPv6 follows.\n\n\
         ![ns per packet](datapath.svg)\n\n",
        results.rounds,
        results.repeat,
        results.new_flows_per_round,
        short(results.single_run_overhead_ns),
    );
    md.push_str("| services |");
    for kind in PacketKind::ALL {
        let _ = write!(md, " {} |", kind.label());
    }
    md.push_str("\n|---:|");
    md.push_str(&"---:|".repeat(PacketKind::ALL.len()));
    md.push('\n');
    for &count in &counts {
        let _ = write!(md, "| {count} |");
        for kind in PacketKind::ALL {
            match row(count, kind) {
                Some(r) => {
                    let _ = write!(
                        md,
                        " {} ns ({}) |",
                        short(r.ns_per_packet),
                        ratio(r.ratio_to_one_service)
                    );
                }
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md.push_str("\nIn brackets: the ratio to the smallest count, measured in the same rounds.\n");
    xdp_against_tc(md, results, Family::Ipv4, &counts);
    datapath_ipv6(md, results, &counts);
    for (family, file) in [
        (Family::Ipv4, "datapath.svg"),
        (Family::Ipv6, "datapath-ipv6.svg"),
    ] {
        let series = PacketKind::ALL
            .iter()
            .map(|&kind| Series {
                name: kind.label().into(),
                points: counts
                    .iter()
                    .filter_map(|&c| row_in(family, c, kind).map(|r| (c as f64, r.ns_per_packet)))
                    .collect(),
            })
            .collect();
        let title = format!(
            "from_pod (TC) and nodeport (XDP), {} ns per packet (BPF_PROG_TEST_RUN)",
            family.label()
        );
        plots::draw(
            &out.join(file),
            &Plot {
                title: &title,
                y_label: "ns per packet",
                log_y: false,
                series,
            },
        )?;
    }
    Ok(())
}

/// The ratio of `nodeport` (XDP) to `from_pod` (TC) on the same packets of `family`, with the
/// smallest count programmed.
fn xdp_against_tc(md: &mut String, results: &datapath::Results, family: Family, counts: &[usize]) {
    let Some(&smallest) = counts.first() else {
        return;
    };
    let row = |kind: PacketKind| {
        results
            .rows
            .iter()
            .find(|r| r.family == family && r.services == smallest && r.packet == kind)
    };
    let _ = write!(
        md,
        "\nXDP against TC on the same {} packets and services (same rounds):",
        family.label()
    );
    for kind in PacketKind::ALL.into_iter().filter(|k| k.tc_twin() != *k) {
        if let (Some(xdp), Some(tc)) = (row(kind), row(kind.tc_twin())) {
            let _ = write!(
                md,
                " {} ×{:.2};",
                kind.tc_twin().label(),
                stats::paired_ratio(&xdp.samples_ns, &tc.samples_ns)
            );
        }
    }
    md.push('\n');
}

/// The IPv6 table: the same packets to the IPv6 twins of the same services, in the same rounds.
fn datapath_ipv6(md: &mut String, results: &datapath::Results, counts: &[usize]) {
    let rows: Vec<&datapath::Row> = results.rows.iter().filter(|r| r.family == Family::Ipv6).collect();
    if rows.is_empty() {
        return;
    }
    md.push_str(
        "\n### IPv6\n\n\
         The same packets over IPv6 (40-byte header, 16-byte addresses) to the IPv6 twins of the \
         same services: every datapath above holds its N services in both families, in the twin \
         maps the same programs dispatch to on the EtherType, and each round measures both \
         families back to back (alternating which goes first). In brackets: the ratio to the same \
         IPv4 packet in the same rounds. What serving IPv6 costs IPv4 packets (the EtherType \
         dispatch) is not measured: there is no IPv4-only build to compare to.\n\n\
         ![IPv6 ns per packet](datapath-ipv6.svg)\n\n| services |",
    );
    for kind in PacketKind::ALL {
        let _ = write!(md, " {} |", kind.label());
    }
    md.push_str("\n|---:|");
    md.push_str(&"---:|".repeat(PacketKind::ALL.len()));
    md.push('\n');
    for &count in counts {
        let _ = write!(md, "| {count} |");
        for kind in PacketKind::ALL {
            match rows.iter().find(|r| r.services == count && r.packet == kind) {
                Some(r) => {
                    let to_ipv4 = r.ratio_to_ipv4.unwrap_or(f64::NAN);
                    let _ = write!(md, " {} ns ({}) |", short(r.ns_per_packet), ratio(to_ipv4));
                }
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    xdp_against_tc(md, results, Family::Ipv6, counts);
    let worst = rows
        .iter()
        .map(|r| r.ratio_to_one_service)
        .fold(f64::NAN, f64::max);
    let _ = writeln!(
        md,
        "\nWith many services, the worst IPv6 row is ×{worst:.2} of the smallest count (same \
         rounds, same packet)."
    );
}

fn e2e_section(md: &mut String, out: &Path, results: &e2e::Results) -> anyhow::Result<()> {
    let counts = distinct(results.rows.iter().map(|r| r.services));
    let _ = write!(
        md,
        "\n## 2. End to end through network namespaces\n\n\
         A client pod dials a ClusterIP served by {} backend pods holding {} endpoint addresses, over \
         veths through a node namespace, with N services programmed (the measured one, with a TCP \
         and a UDP port, plus N − 1 fillers of 10 endpoints; in iptables the measured service's rule \
         sits in the middle of KUBE-SERVICES). Five labs are built side by side — direct (the client \
         dials the endpoints themselves: the limit), Switchboard (its programs on the pod veths, \
         driven in-process by the real reconciler), kube-proxy's iptables rules loaded with \
         `iptables-nft-restore` and with `iptables-legacy-restore`, and kube-proxy's nftables rules \
         loaded with `nft -f` — and sampled in rotating order, {} rounds of {} s each. The load is \
         {} client thread (2 cores: one for the client, one for the rest) and one server thread per \
         pod and protocol. TCP: a connection per transaction, 16 bytes each way, the client closes \
         (like netperf TCP_CRR; the client may reuse TIME_WAIT ports). UDP: one connected socket, \
         16 bytes each way, one datagram in flight (like netperf UDP_RR). Pods are dual-stack, \
         and Switchboard's services get the IPv6 twin of every ClusterIP once their IPv4 \
         programming has been timed: the direct and Switchboard labs are also sampled over IPv6, \
         in the same rounds, with ratios within the family and to the same lab's IPv4 rate (÷ \
         IPv4). kube-proxy's IPv6 rule sets (ip6tables, nft `ip6`) are not generated.\n",
        results.backend_pods,
        results.endpoints,
        results.rounds,
        results.sample_seconds,
        results.client_threads,
    );
    for workload in Workload::ALL {
        let rows: Vec<&e2e::Row> = results.rows.iter().filter(|r| r.workload == workload).collect();
        let file = match workload {
            Workload::TcpCrr => "e2e-tcp-crr.svg",
            Workload::UdpRr => "e2e-udp-rr.svg",
        };
        let _ = write!(
            md,
            "\n### {} ({})\n\n![{}]({file})\n\n| services | setup | {} | ÷ direct | ÷ Switchboard | ÷ IPv4 | failed |\n|---:|---|---:|---:|---:|---:|---:|\n",
            workload.label(),
            workload.unit(),
            workload.unit(),
            workload.unit(),
        );
        for &count in &counts {
            for row in rows.iter().filter(|r| r.services == count) {
                let _ = writeln!(
                    md,
                    "| {count} | {} | {:.0} | {} | {} | {} | {} |",
                    setup_label(row),
                    row.rate_per_s,
                    ratio(row.ratio_to_direct),
                    ratio(row.ratio_to_switchboard),
                    ratio(row.ratio_to_ipv4.unwrap_or(f64::NAN)),
                    row.failed_transactions
                );
            }
        }
        let mut series: Vec<Series> = Vec::new();
        for row in &rows {
            let name = setup_label(row);
            match series.iter_mut().find(|s| s.name == name) {
                Some(line) => line.points.push((row.services as f64, row.rate_per_s)),
                None => series.push(Series {
                    name,
                    points: vec![(row.services as f64, row.rate_per_s)],
                }),
            }
        }
        plots::draw(
            &out.join(file),
            &Plot {
                title: workload.label(),
                y_label: workload.unit(),
                log_y: false,
                series,
            },
        )?;
    }
    md.push_str(
        "\nTime each lab took to be programmed (rules loaded or maps written), in seconds:\n\n| setup |",
    );
    for &count in &counts {
        let _ = write!(md, " {} |", services(count));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(counts.len()));
    md.push('\n');
    for setup in Setup::ALL.iter().filter(|s| **s != Setup::Direct) {
        let _ = write!(md, "| {} |", setup.label());
        for &count in &counts {
            let seconds = results
                .programming_seconds
                .iter()
                .find(|(s, c, _)| s == setup && *c == count)
                .map_or(f64::NAN, |p| p.2);
            let _ = write!(md, " {} |", short(seconds));
        }
        md.push('\n');
    }
    Ok(())
}

fn control_plane_section(
    md: &mut String,
    out: &Path,
    results: &control_plane::Results,
) -> anyhow::Result<()> {
    let algorithm = match &results.lb_algorithm {
        None => "its default settings (Maglev)".to_owned(),
        Some(algorithm) => format!("`--lb-algorithm {algorithm}` (not the default)"),
    };
    let _ = write!(
        md,
        "\n## 3. Control plane\n\n\
         N Services × {} endpoints, each loader starting from nothing; {} round(s) in rotating order \
         (kube-proxy's tools once above 10,000 Services).\n\n\
         - **Switchboard agent**: `switchboard run` with {algorithm}, no interface to attach to, \
         fed by the tests' in-process Kubernetes API server with the Services and EndpointSlices \
         as the API sends them (managedFields, the last-applied annotation, owner references; \
         lists paged by 500). *Time to sync* runs from starting the process to its log saying \
         every Service is in the maps: connecting, listing, decoding, trimming, the model, the \
         plan and every map write. Its peak RSS is the agent's own.\n\
         - **iptables-nft-restore / iptables-legacy-restore / nft -f**: the tool loading the rule \
         set kube-proxy would write (already generated) into an emptied scratch namespace: the \
         time and peak RSS of the tool alone, not kube-proxy's list/watch, rule generation or \
         its own memory (a Go daemon that also holds the cluster state).\n\n\
         ![full sync](control-plane.svg)\n\n\
         | services | loader | time to sync | ÷ Switchboard | peak RSS |\n|---:|---|---:|---:|---:|\n",
        results.endpoints_per_service, results.rounds,
    );
    for row in &results.full_sync {
        let failed = if row.failures.is_empty() {
            String::new()
        } else {
            format!(" ({} run(s) failed: {})", row.failures.len(), row.failures[0])
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} s{failed} | {} | {} MiB |",
            row.services,
            row.loader.label(),
            short(row.seconds),
            ratio(row.ratio_to_switchboard),
            short(row.peak_rss_mib),
        );
    }
    md.push_str(
        "\nThe agent's own numbers (medians over rounds). *Serving*: from the start until its \
         programs are verified and attached as well (the kernel verifies them while the maps are \
         written). *Restart*: the agent killed with SIGKILL and started again on its pinned maps \
         (the old programs keep serving meanwhile): until the maps are in sync, and until its own \
         programs are swapped in. *One endpoint change*: a different Service each time loses an \
         endpoint or gets it back, timed from the API server's watch event to the kernel's \
         services map showing the new count (the watch, the agent, the map write, and a 0.1 ms \
         poll). *RSS*: the agent's resident memory once in sync, and its peak. *Kernel maps*: \
         the memory the kernel charges (memlock) for every BPF map the agent created, inner \
         Maglev tables included.\n\n\
         | services | time to sync | serving | restart: in sync | restart: serving | one change p50 | p99 | RSS | peak RSS | kernel maps |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &results.agent {
        let failed = match (row.failures.first(), row.failed_services) {
            (Some(failure), _) => format!(" (failed: {failure})"),
            (None, 0) => String::new(),
            (None, services) => format!(" ({services} Services not programmed: a map was full)"),
        };
        let _ = writeln!(
            md,
            "| {} | {} s{failed} | {} s | {} s | {} s | {} ms | {} ms | {} MiB | {} MiB | {} MiB |",
            row.services,
            short(row.sync_seconds),
            short(row.serving_seconds),
            short(row.restart_sync_seconds),
            short(row.restart_serving_seconds),
            short(row.change_p50_ms),
            short(row.change_p99_ms),
            short(row.rss_mib),
            short(row.peak_rss_mib),
            short(row.kernel_map_mib),
        );
    }
    let series = Loader::ALL
        .iter()
        .map(|&loader| Series {
            name: loader.label().into(),
            points: results
                .full_sync
                .iter()
                .filter(|r| r.loader == loader)
                .map(|r| (r.services as f64, r.seconds))
                .collect(),
        })
        .collect();
    plots::draw(
        &out.join("control-plane.svg"),
        &Plot {
            title: "Programming N services from nothing",
            y_label: "seconds",
            log_y: true,
            series,
        },
    )
}

/// "Switchboard", "Switchboard IPv6": a setup over IPv4 goes by its name alone.
fn setup_label(row: &e2e::Row) -> String {
    match row.family {
        Family::Ipv4 => row.setup.label().into(),
        family => format!("{} {}", row.setup.label(), family.label()),
    }
}

/// "1 service", "1000 services".
pub fn services(count: usize) -> String {
    if count == 1 {
        "1 service".into()
    } else {
        format!("{count} services")
    }
}

/// The distinct values of `values`, sorted.
fn distinct(values: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut all: Vec<usize> = values.collect();
    all.sort_unstable();
    all.dedup();
    all
}

fn maglev_section(md: &mut String, maglev: &crate::maglev::Results) {
    let _ = write!(
        md,
        "\n## 4. Maglev balance and disruption\n\n\
         The real table builder, table size {}: the worst deviation of a backend's share from M/N, \
         the positions (flows) that move when one of N backends is removed beyond the ones it owned \
         (the unit tests hold this to 1/N + 1 %), and the time to build one table.\n\n\
         | backends | worst share deviation | disruption | bound | build |\n|---:|---:|---:|---:|---:|\n",
        maglev.table_size
    );
    for row in &maglev.rows {
        let _ = writeln!(
            md,
            "| {} | {:.2} % | {:.2} % | {:.2} % | {:.2} ms |",
            row.backends,
            row.worst_share_deviation_pct,
            row.disruption_pct,
            row.disruption_bound_pct,
            row.build_ms
        );
    }
}
