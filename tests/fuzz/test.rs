//! The datapath fuzzer in the ordinary test suite: a short run, so `cargo test` alone covers it
//! (`cargo xtask test` also runs a million packets through `cargo xtask fuzz`).
#[path = "../common/mod.rs"]
mod common;

mod checksum;
mod engine;
mod generate;
mod oracle;
mod topology;

use oracle::{Outcome, SctpCrc};
use topology::Family;

#[test]
fn twenty_thousand_fuzzed_packets_break_no_datapath_invariant() {
    common::require_root();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let report = engine::run(20_000, seed);
    println!("{}", report.summary());
    assert_eq!(report.failures, 0, "{}", report.summary());
    // Every outcome (untouched, DNAT, reverse NAT, hairpin, SNAT, SNAT reply, RST, port
    // unreachable, dropped, source-range drop, eTP Local drop, left to TC, ICMP error
    // translated) in each family.
    let unseen: Vec<(&str, Outcome)> = Family::ALL
        .iter()
        .flat_map(|&family| Outcome::ALL.iter().map(move |&outcome| (family, outcome)))
        .filter(|&(family, outcome)| report.count(Some(family), outcome) == 0)
        .map(|(family, outcome)| (family.name(), outcome))
        .collect();
    assert!(unseen.is_empty(), "never seen: {unseen:?}\n{}", report.summary());
    // SCTP in each family: every translation, refusals, and translations of packets whose
    // CRC32c was right, wrong and zero.
    let mut unseen_sctp = Vec::new();
    for family in Family::ALL {
        let outcomes = Outcome::REWRITES
            .into_iter()
            .chain([Outcome::PortUnreachable, Outcome::Dropped]);
        for outcome in outcomes {
            if report.sctp_count(family, &[outcome], &SctpCrc::ALL) == 0 {
                unseen_sctp.push(format!("{} {outcome:?}", family.name()));
            }
        }
        for crc in SctpCrc::ALL {
            if report.sctp_count(family, &Outcome::REWRITES, &[crc]) == 0 {
                unseen_sctp.push(format!("{} translated with CRC32c {crc:?}", family.name()));
            }
        }
    }
    assert!(
        unseen_sctp.is_empty(),
        "SCTP never seen: {unseen_sctp:?}\n{}",
        report.summary()
    );
    // In each family, first and later fragments were translated.
    let untranslated: Vec<String> = Family::ALL
        .iter()
        .flat_map(|&family| [(family, true), (family, false)])
        .filter(|&(family, first)| {
            Outcome::REWRITES
                .iter()
                .all(|&outcome| report.fragment_count(family, first, outcome) == 0)
        })
        .map(|(family, first)| format!("{} {}", family.name(), if first { "first" } else { "later" }))
        .collect();
    assert!(
        untranslated.is_empty(),
        "fragments never translated: {untranslated:?}\n{}",
        report.summary()
    );
    // Conntrack was compared with associations both open and closing.
    let (checked, closing) = report.associations;
    assert!(
        closing > 0 && checked > closing,
        "SCTP conntrack entries checked: {checked}, {closing} closing"
    );
}
