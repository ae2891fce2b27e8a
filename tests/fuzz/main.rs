//! `cargo xtask fuzz`: the datapath fuzzer. Runs fuzzed frames through `from_pod`, `to_pod`,
//! `nodeport` (XDP), `nodeport_tc` and `nodeport_egress` with BPF_PROG_TEST_RUN and checks every verdict and output (see `oracle`); exits non-zero on
//! any violation, printing the seed and the offending input. Needs root.
#[path = "../common/mod.rs"]
mod common;

mod checksum;
mod engine;
mod generate;
mod oracle;
mod topology;

use clap::Parser;

#[derive(Parser)]
#[command(name = "fuzz", about = "Fuzz the datapath through BPF_PROG_TEST_RUN")]
struct Args {
    /// How many packets to run.
    #[arg(long, default_value_t = 1_000_000)]
    packets: u64,
    /// Seed of the inputs, to replay a run [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64)
    });
    println!(
        "fuzzing {} packets with seed {seed} (replay with --seed {seed})",
        args.packets
    );
    let report = engine::run(args.packets, seed);
    print!("{}", report.summary());
    if report.failures == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
