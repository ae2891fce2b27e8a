//! kube-proxy's meaning of healthy: the agent has programmed the datapath, and no update it
//! received has been waiting longer than a threshold.
use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

/// An update pending longer than this makes `/healthz` (and `/livez`) answer 503.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the oldest update not yet applied arrived.
    pending_since: Option<Instant>,
    last_applied: Option<SystemTime>,
}

/// What `/healthz` and `/livez` answer.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The datapath has been programmed at least once.
    pub synced: bool,
    /// Seconds the oldest unapplied update has waited.
    pub pending_seconds: Option<f64>,
    /// Unix time of the last applied update.
    pub last_applied: Option<f64>,
}

impl Health {
    pub fn update_received(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.pending_since.get_or_insert_with(Instant::now);
    }

    pub fn update_applied(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.pending_since = None;
        state.last_applied = Some(SystemTime::now());
    }

    pub fn report(&self) -> Report {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Report {
            synced: state.last_applied.is_some(),
            pending_seconds: state.pending_since.map(|t| t.elapsed().as_secs_f64()),
            last_applied: state
                .last_applied
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
        }
    }
}

impl Report {
    /// Alive: not stuck on an update for longer than [`STALE_AFTER`].
    pub fn live(&self) -> bool {
        self.pending_seconds.is_none_or(|s| s < STALE_AFTER.as_secs_f64())
    }

    /// Healthy: alive, and the datapath has been programmed.
    pub fn healthy(&self) -> bool {
        self.synced && self.live()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_after_the_first_sync_and_while_nothing_is_stuck() {
        let health = Health::default();
        assert!(!health.report().healthy(), "not programmed yet");
        assert!(health.report().live());
        health.update_received();
        health.update_applied();
        assert!(health.report().healthy());
        health.update_received();
        assert!(health.report().healthy(), "a fresh pending update is fine");
        health.state.lock().unwrap().pending_since =
            Some(Instant::now() - STALE_AFTER - Duration::from_secs(1));
        let report = health.report();
        assert!(
            !report.healthy() && !report.live(),
            "an update stuck for longer than the threshold"
        );
    }
}
