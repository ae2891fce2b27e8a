//! `switchboard uninstall`: detach the datapath and remove every pin, after the agent stopped
//! (for instance after `--keep-datapath` left it serving).
use std::process::ExitCode;

use anyhow::Context as _;

use super::PinDir;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pin_dir: PinDir,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let dir = &args.pin_dir.pin_dir;
    if !dir.exists() {
        println!("nothing to remove: {} does not exist", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    // Unpinning a link drops the last reference to it once no agent holds it: that detaches it.
    let links = std::fs::read_dir(dir.join("links"))
        .map(Iterator::count)
        .unwrap_or(0);
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    println!(
        "removed {} ({links} program links detached, maps unpinned)",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
