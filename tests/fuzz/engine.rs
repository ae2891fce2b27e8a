//! The loop: generate an input, run it through the loaded program with BPF_PROG_TEST_RUN, check
//! the verdict and the output against the oracle. The five programs share one set of maps, as on
//! a node.
use lb_userspace::datapath::load_program;
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use lb_common::{Address, CtEntry, CtKey, IPPROTO_SCTP, Ipv4, Ipv6, Stat, ct_direction, ct_flags};
use lb_userspace::{
    datapath::Capacity,
    reconcile::{DesiredService, External, FrontendKey, MaglevSize},
};

use crate::{
    common::Loaded,
    generate::{Generator, Program},
    oracle::{Direction, Model, Outcome, SctpCrc, Tuple, addr_from, family_of, fragment_of, sctp_of},
    topology::{Family, Kind, NODE_ADDRS, SERVICES, SNAT_ADDR, SNAT_IFINDEX, in_family},
};

/// Failures are counted past this many, but only this many are kept to print.
const FAILURES_KEPT: usize = 5;

pub struct Report {
    pub seed: u64,
    pub packets: u64,
    pub elapsed: Duration,
    /// Inputs the kernel refused before running the program (shorter than Ethernet and the
    /// network header its EtherType announces).
    pub refused: u64,
    /// Per program: verdict → how many.
    pub verdicts: BTreeMap<(Program, u32), u64>,
    /// Per family (`None`: neither IPv4 nor IPv6 by its EtherType): outcome → how many.
    pub outcomes: BTreeMap<(Option<Family>, Outcome), u64>,
    /// The SCTP packets among them, by how their CRC32c came in.
    pub sctp: BTreeMap<(Family, Outcome, SctpCrc), u64>,
    /// The TCP and UDP fragments among them, first ones (`true`) and later ones.
    pub fragments: BTreeMap<(Family, bool, Outcome), u64>,
    /// Fragmented datagrams whose first fragment went through.
    pub datagrams: usize,
    /// Flows the datapath created (each holds two conntrack entries).
    pub flows: u64,
    /// SCTP conntrack entries checked at the end, and how many of them were closing.
    pub associations: (usize, usize),
    pub failures: u64,
    pub examples: Vec<String>,
}

/// Fragmented datagrams the maps hold: far more than a run remembers, so that none is forgotten
/// (the model forgets none).
const DATAGRAMS: u32 = 1 << 17;

/// Runs `packets` fuzzed inputs from `seed` through a freshly loaded datapath.
pub fn run(packets: u64, seed: u64) -> Report {
    let capacity = Capacity {
        fragments: DATAGRAMS,
        ..Capacity::default()
    };
    let mut loaded = Loaded::with_capacity("fuzz", capacity);
    program_services(&mut loaded);
    for program in Program::ALL {
        load_program(|| {
            if program.is_xdp() {
                xdp(&mut loaded).load()
            } else {
                classifier(&mut loaded, program).load()
            }
        })
        .expect("the program loads");
    }
    let mut report = Report {
        seed,
        packets,
        elapsed: Duration::ZERO,
        refused: 0,
        verdicts: BTreeMap::new(),
        outcomes: BTreeMap::new(),
        sctp: BTreeMap::new(),
        fragments: BTreeMap::new(),
        datagrams: 0,
        flows: 0,
        associations: (0, 0),
        failures: 0,
        examples: Vec::new(),
    };
    let mut generator = Generator::new(seed);
    let mut model = Model::default();
    let mut input = Vec::with_capacity(4096);
    let mut output = vec![0u8; 4096];
    let started = Instant::now();
    for index in 0..packets {
        let program = generator.next(&mut input);
        let options = TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut output),
            ..Default::default()
        };
        let result = if program.is_xdp() {
            xdp(&mut loaded).test_run(options)
        } else {
            classifier(&mut loaded, program).test_run(options)
        };
        let checked = match result {
            Ok(result) => {
                *report.verdicts.entry((program, result.return_value)).or_default() += 1;
                let output = &output[..result.data_size_out as usize];
                model
                    .check(program, &input, result.return_value, output)
                    .map_err(|error| (error, output.to_vec()))
            }
            Err(_) if kernel_refuses(program, &input) => {
                report.refused += 1;
                continue;
            }
            Err(error) => Err((format!("BPF_PROG_TEST_RUN failed: {error}"), Vec::new())),
        };
        match checked {
            Ok(outcome) => {
                *report.outcomes.entry((family_of(&input), outcome)).or_default() += 1;
                if let Some((family, first)) = fragment_of(&input) {
                    *report.fragments.entry((family, first, outcome)).or_default() += 1;
                }
                if let Some((family, crc)) = sctp_of(&input) {
                    *report.sctp.entry((family, outcome, crc)).or_default() += 1;
                }
            }
            Err((error, output)) => report.fail(format!(
                "packet {index} through {}: {error}\n  input  {}\n  output {}",
                program.name(),
                hex(&input),
                hex(&output)
            )),
        }
    }
    report.elapsed = started.elapsed();
    report.flows = model.counts.new_flows;
    report.datagrams = model.datagrams();
    // Per CPU, the LRU map may evict before it is full; half of it is far from that.
    assert!(
        model.datagrams() < DATAGRAMS as usize / 2,
        "{} fragmented datagrams: more than the fragment maps hold for sure",
        model.datagrams()
    );
    check_counters(&loaded, &model, &mut report);
    check_associations(&loaded, &model, &mut report);
    report
}

/// The SCTP entries of conntrack must be those the oracle made, closing where it says.
fn check_associations(loaded: &Loaded, model: &Model, report: &mut Report) {
    let mut entries = sctp_entries(loaded.maps.conntrack.iter());
    entries.extend(sctp_entries(loaded.maps.conntrack6.iter()));
    match model.associations.check(&entries) {
        Ok(checked) => report.associations = (checked, model.associations.closing()),
        Err(errors) => errors.into_iter().for_each(|error| report.fail(error)),
    }
}

/// The forward and reply entries of SCTP flows, as (direction, tuple, closing).
fn sctp_entries<A: Address>(
    entries: impl Iterator<Item = Result<(CtKey<A>, CtEntry<A>), aya::maps::MapError>>,
) -> Vec<(Direction, Tuple, bool)> {
    entries
        .map(|entry| entry.expect("the conntrack map reads"))
        .filter(|(key, _)| key.proto == IPPROTO_SCTP)
        .filter_map(|(key, entry)| {
            let direction = match key.direction {
                ct_direction::FORWARD => Direction::Forward,
                ct_direction::REPLY => Direction::Reply,
                _ => return None,
            };
            let src = (addr_from(key.src_addr.as_ref()), key.src_port);
            let dst = (addr_from(key.dst_addr.as_ref()), key.dst_port);
            Some((
                direction,
                (src, dst, key.proto),
                entry.flags & ct_flags::CLOSING != 0,
            ))
        })
        .collect()
}

/// BPF_PROG_TEST_RUN takes no frame shorter than Ethernet, and builds no skb from one shorter
/// than Ethernet and an IPv4 (IPv6) header when the EtherType says IPv4 (IPv6): EINVAL before
/// the program runs.
fn kernel_refuses(program: Program, frame: &[u8]) -> bool {
    if program.is_xdp() {
        return frame.len() < 14;
    }
    let network_header = match frame.get(12..14) {
        Some([0x08, 0x00]) => 20,
        Some([0x86, 0xdd]) => 40,
        Some(_) => 0,
        None => return true,
    };
    frame.len() < 14 + network_header
}

/// The datapath's own counters must agree with what the oracle saw it do.
fn check_counters(loaded: &Loaded, model: &Model, report: &mut Report) {
    let stat = |stat| loaded.maps.stat(stat).expect("the stats map reads");
    let counted = [
        (
            "service_packets",
            stat(Stat::ServicePackets),
            model.counts.service_packets,
        ),
        ("new_flows", stat(Stat::NewFlows), model.counts.new_flows),
        ("no_backend_drops", stat(Stat::NoBackend), model.counts.no_backend),
        (
            "undefined_port_drops",
            stat(Stat::UndefinedPort),
            model.counts.undefined_port,
        ),
        (
            "reply_packets",
            stat(Stat::ReplyPackets),
            model.counts.reply_packets,
        ),
        (
            "source_range_drops",
            stat(Stat::SourceRangeDrops),
            model.counts.source_range_drops,
        ),
        (
            "fragments_without_first",
            stat(Stat::FragmentWithoutFirst),
            model.counts.fragments_without_first,
        ),
        ("conntrack_insert_failures", stat(Stat::CtInsertFailed), 0),
        // The source check is off: no agent switched it on.
        ("spoofed_source_drops", stat(Stat::SpoofedSource), 0),
        // Backends never go away here, no port runs out, no refusal is rate-limited.
        ("rebalanced_flows", stat(Stat::Rebalanced), 0),
        ("snat_failures", stat(Stat::SnatFailed), 0),
        ("rate_limited_rejects", stat(Stat::RejectRateLimited), 0),
    ];
    for (name, datapath, oracle) in counted {
        if datapath != oracle {
            report.fail(format!(
                "counter {name}: the datapath counted {datapath}, the oracle {oracle}"
            ));
        }
    }
}

/// The services of both families, the node's addresses and the address flows leaving for other
/// nodes take.
fn program_services(loaded: &mut Loaded) {
    let desired = SERVICES
        .iter()
        .map(|service| {
            let key = FrontendKey {
                addr: service.frontend.0,
                port: service.frontend.1,
                proto: service.proto,
            };
            let desired = DesiredService {
                name: format!("fuzz/{key}"),
                backends: service.backends.iter().map(|&b| b.into()).collect(),
                maglev: service.maglev.then_some(MaglevSize::Fixed(16_381)),
                affinity_timeout: service.affinity.then_some(10_800),
                cluster_ip: service.kind == Kind::ClusterIp,
                external: match &service.kind {
                    Kind::ClusterIp => None,
                    Kind::External { local, source_ranges } => Some(External {
                        local: *local,
                        source_ranges: source_ranges.clone(),
                        ..External::default()
                    }),
                },
                ..DesiredService::default()
            };
            (key, desired)
        })
        .collect();
    let applied = loaded.reconciler.apply(&desired, &mut loaded.maps);
    assert!(
        applied.failed.is_empty(),
        "programming failed: {:?}",
        applied.failed
    );
    let maps = &mut loaded.maps;
    maps.set_node_addrs::<Ipv4>(&NODE_ADDRS.into())
        .expect("the node addresses are set");
    maps.set_node_addrs::<Ipv6>(&in_family(Family::Ipv6, NODE_ADDRS).map(v6_octets).into())
        .expect("the node's IPv6 addresses are set");
    maps.set_snat_addrs::<Ipv4>(&BTreeMap::from([(SNAT_IFINDEX, SNAT_ADDR)]))
        .expect("the SNAT address is set");
    let snat6 = v6_octets(Family::Ipv6.addr(SNAT_ADDR));
    maps.set_snat_addrs::<Ipv6>(&BTreeMap::from([(SNAT_IFINDEX, snat6)]))
        .expect("the IPv6 SNAT address is set");
}

fn v6_octets(addr: IpAddr) -> Ipv6 {
    match addr {
        IpAddr::V6(addr) => addr.octets(),
        IpAddr::V4(_) => unreachable!("an IPv6 twin"),
    }
}

fn xdp(loaded: &mut Loaded) -> &mut Xdp {
    loaded
        .datapath
        .ebpf
        .program_mut(Program::Nodeport.name())
        .expect("the object has the program")
        .try_into()
        .expect("an XDP program")
}

fn classifier(loaded: &mut Loaded, program: Program) -> &mut SchedClassifier {
    loaded
        .datapath
        .ebpf
        .program_mut(program.name())
        .expect("the object has the program")
        .try_into()
        .expect("a TC classifier")
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

impl Report {
    fn fail(&mut self, description: String) {
        self.failures += 1;
        if self.examples.len() < FAILURES_KEPT {
            self.examples.push(description);
        }
    }

    /// The summary: packets, verdicts, what was checked, failures with their inputs.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let rate = self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(
            out,
            "fuzz seed {}: {} packets in {:.1} s ({:.0} k/s)",
            self.seed,
            self.packets,
            self.elapsed.as_secs_f64(),
            rate / 1000.0
        );
        for program in Program::ALL {
            let verdicts: Vec<String> = self
                .verdicts
                .range((program, 0)..=(program, u32::MAX))
                .map(|((_, verdict), n)| format!("{} {n}", verdict_name(program, *verdict)))
                .collect();
            let _ = writeln!(out, "  {}: {}", program.name(), verdicts.join(", "));
        }
        let _ = writeln!(out, "  refused by the kernel: {}", self.refused);
        for family in [Some(Family::Ipv4), Some(Family::Ipv6), None] {
            self.summarize_outcomes(&mut out, family);
        }
        let _ = writeln!(out, "  flows created: {}", self.flows);
        let _ = writeln!(out, "  fragmented datagrams remembered: {}", self.datagrams);
        let _ = writeln!(
            out,
            "  SCTP conntrack entries checked: {} ({} closing)",
            self.associations.0, self.associations.1
        );
        let _ = writeln!(out, "  failures: {}", self.failures);
        for example in &self.examples {
            let _ = writeln!(out, "  FAILED (seed {}) {example}", self.seed);
        }
        out
    }

    /// How many inputs of `family` had `outcome`.
    pub fn count(&self, family: Option<Family>, outcome: Outcome) -> u64 {
        self.outcomes.get(&(family, outcome)).copied().unwrap_or(0)
    }

    /// How many TCP or UDP fragments of `family`, first ones or later ones, had `outcome`.
    pub fn fragment_count(&self, family: Family, first: bool, outcome: Outcome) -> u64 {
        self.fragments
            .get(&(family, first, outcome))
            .copied()
            .unwrap_or(0)
    }

    /// How many SCTP packets of `family` had one of `outcomes`, their CRC32c one of `crcs`.
    pub fn sctp_count(&self, family: Family, outcomes: &[Outcome], crcs: &[SctpCrc]) -> u64 {
        self.sctp
            .iter()
            .filter(|((f, outcome, crc), _)| *f == family && outcomes.contains(outcome) && crcs.contains(crc))
            .map(|(_, n)| n)
            .sum()
    }

    fn summarize_outcomes(&self, out: &mut String, family: Option<Family>) {
        let count = |outcome| self.count(family, outcome);
        let name = family.map_or("other", Family::name);
        if family.is_none() {
            let _ = writeln!(out, "  {name}: untouched {}", count(Outcome::Untouched));
            return;
        }
        let rewrites = Outcome::REWRITES;
        let _ = writeln!(
            out,
            "  {name}: rewrites checked: {} (DNAT {}, reverse NAT {}, SNAT {}, SNAT reply {}, hairpin {})",
            rewrites.iter().map(|&outcome| count(outcome)).sum::<u64>(),
            count(Outcome::Dnat),
            count(Outcome::ReverseNat),
            count(Outcome::Snat),
            count(Outcome::SnatReply),
            count(Outcome::Hairpin),
        );
        let _ = writeln!(
            out,
            "    rejects checked: RST {}, port unreachable {}, dropped {}, left to TC by XDP {}",
            count(Outcome::Reset),
            count(Outcome::PortUnreachable),
            count(Outcome::Dropped),
            count(Outcome::LeftToTc),
        );
        let _ = writeln!(
            out,
            "    drops checked: outside source ranges {}, eTP Local without endpoints {}; untouched {}",
            count(Outcome::SourceRangeDropped),
            count(Outcome::LocalDropped),
            count(Outcome::Untouched),
        );
        let _ = writeln!(
            out,
            "    ICMP errors translated back to their client: {}",
            count(Outcome::IcmpErrorTranslated),
        );
        let family = family.expect("an IP family");
        let fragments = |first| {
            let translated = Outcome::REWRITES
                .iter()
                .map(|&outcome| self.fragment_count(family, first, outcome))
                .sum::<u64>();
            let untouched = self.fragment_count(family, first, Outcome::Untouched);
            format!("{translated} translated, {untouched} untouched")
        };
        let _ = writeln!(
            out,
            "    fragments: first {}; later {}",
            fragments(true),
            fragments(false)
        );
        self.summarize_sctp(out, family);
        let unseen: Vec<String> = Outcome::ALL
            .iter()
            .filter(|&&outcome| count(outcome) == 0)
            .map(|outcome| format!("{outcome:?}"))
            .collect();
        if !unseen.is_empty() {
            let _ = writeln!(out, "    never seen: {}", unseen.join(", "));
        }
    }

    fn summarize_sctp(&self, out: &mut String, family: Family) {
        let count = |outcome| self.sctp_count(family, &[outcome], &SctpCrc::ALL);
        let translated = |crc| self.sctp_count(family, &Outcome::REWRITES, &[crc]);
        let _ = writeln!(
            out,
            "    SCTP: translated {} (DNAT {}, reverse NAT {}, SNAT {}, SNAT reply {}, hairpin {}; CRC32c right {}, wrong {}, zero {})",
            self.sctp_count(family, &Outcome::REWRITES, &SctpCrc::ALL),
            count(Outcome::Dnat),
            count(Outcome::ReverseNat),
            count(Outcome::Snat),
            count(Outcome::SnatReply),
            count(Outcome::Hairpin),
            translated(SctpCrc::Right),
            translated(SctpCrc::Wrong),
            translated(SctpCrc::Zero),
        );
        let _ = writeln!(
            out,
            "      port unreachable {}, dropped {}, left to TC by XDP {}, untouched {}",
            count(Outcome::PortUnreachable),
            count(Outcome::Dropped),
            count(Outcome::LeftToTc),
            count(Outcome::Untouched),
        );
    }
}

fn verdict_name(program: Program, verdict: u32) -> String {
    match (program.is_xdp(), verdict) {
        (true, 1) => "XDP_DROP".into(),
        (true, 2) => "XDP_PASS".into(),
        (false, 0) => "TC_ACT_OK".into(),
        (false, 2) => "TC_ACT_SHOT".into(),
        (false, 7) => "TC_ACT_REDIRECT".into(),
        (_, other) => format!("verdict {other}"),
    }
}
