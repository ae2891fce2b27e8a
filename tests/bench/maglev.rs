//! Maglev table quality, measured on the real table builder: how evenly backends share a table,
//! how many positions (flows) move when one backend goes, and what a table costs to build.
use std::time::Instant;

use lb_userspace::reconcile::maglev;
use serde::Serialize;

#[derive(Serialize)]
pub struct Results {
    pub table_size: u32,
    pub rows: Vec<Row>,
}

#[derive(Serialize)]
pub struct Row {
    pub backends: usize,
    /// Largest |share − M/N| / (M/N) over backends, in percent.
    pub worst_share_deviation_pct: f64,
    /// Positions that moved on removing one backend, beyond the ones it owned, in percent of M.
    pub disruption_pct: f64,
    /// The bound the tests hold the builder to: 1/N + 1 %.
    pub disruption_bound_pct: f64,
    pub build_ms: f64,
}

pub fn run(backend_counts: &[usize]) -> Results {
    let size = 16_381;
    let rows = backend_counts
        .iter()
        .map(|&n| {
            let identities: Vec<[u8; 6]> = (0..n)
                .map(|i| [10, 244, (i / 250) as u8, (i % 250) as u8 + 1, 0x1f, 0x90])
                .collect();
            let all: Vec<(&[u8], u32)> = identities.iter().map(|id| (id.as_slice(), 1)).collect();
            let started = Instant::now();
            let before = maglev::table(&all, size);
            let build_ms = started.elapsed().as_secs_f64() * 1e3;

            let mut owned = vec![0usize; n];
            for &owner in &before {
                owned[owner] += 1;
            }
            let fair = f64::from(size) / n as f64;
            let worst = owned
                .iter()
                .map(|&c| (c as f64 - fair).abs() / fair)
                .fold(0.0, f64::max);

            let removed = n / 2;
            let survivors: Vec<(&[u8], u32)> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, b)| *b)
                .collect();
            let after = maglev::table(&survivors, size);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(old, new)| **old != removed && all[**old].0 != survivors[**new].0)
                .count();
            Row {
                backends: n,
                worst_share_deviation_pct: worst * 100.0,
                disruption_pct: moved as f64 / f64::from(size) * 100.0,
                disruption_bound_pct: (1.0 / n as f64 + 0.01) * 100.0,
                build_ms,
            }
        })
        .collect();
    Results {
        table_size: size,
        rows,
    }
}
