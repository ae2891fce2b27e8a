//! The datapath fuzzer in the ordinary test suite: a short run, so `cargo test` alone covers it
//! (`cargo xtask test` also runs a million packets through `cargo xtask fuzz`).
#[path = "../common/mod.rs"]
mod common;

mod checksum;
mod engine;
mod generate;
mod oracle;
mod topology;

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
    assert_eq!(
        report.outcomes.len(),
        11,
        "every outcome (untouched, DNAT, reverse NAT, SNAT, SNAT reply, RST, port unreachable, \
         dropped, source-range drop, eTP Local drop, left to TC) was seen: {:?}",
        report.outcomes
    );
}
