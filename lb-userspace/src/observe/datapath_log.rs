//! The datapath's aya-log messages, printed with the agent's own log. The programs only write
//! them while `SB_CONFIG[LOG_LEVEL]` allows (`switchboard log-level`); reading is always on so a
//! switch takes effect without telling the agent.
use anyhow::Context as _;
use aya::Ebpf;
use tokio::io::{Interest, unix::AsyncFd};

/// Target of the agent's default log filter that lets every datapath message through: the
/// switch in the map is what decides.
pub const TARGET: &str = "lb_ebpf";

/// Starts forwarding the messages of the programs in `ebpf` (within the running Tokio runtime).
pub fn forward(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("cannot read the datapath's log buffer")?;
    // SAFETY: the logger owns its ring buffer's fd, open and unchanged until the logger drops,
    // which only the AsyncFd owning it does.
    let mut readable = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .context("cannot poll the datapath's log buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = readable.readable_mut().await else {
                tracing::error!("the datapath's log buffer cannot be polled; its messages are lost");
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
