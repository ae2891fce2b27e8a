//! From the Services a change touched to the maps: their model, the reconciler, and what is
//! said about them (a warning once per appearance, in the log and as an Event), the metrics and
//! the health check ports.
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Instant,
};

use k8s_openapi::api::core::v1::Service;

use super::store::{Store, Touched};
use crate::{
    datapath::maps::ServiceMaps,
    model::{self, Context, Frontend, Model, ServiceName},
    observe::{
        events::Events,
        health_check::HealthChecks,
        metrics::{AgentMetrics, ServiceLabel},
    },
    reconcile::{FrontendKey, PlanOptions, Reconciler, Report, ServiceFrontends},
};

/// What the gauges count of one Service.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    frontends: i64,
    without_endpoints: i64,
    warnings: i64,
}

pub struct Programming {
    reconciler: Reconciler,
    maps: ServiceMaps,
    options: PlanOptions,
    metrics: Arc<AgentMetrics>,
    events: Option<Events>,
    health_checks: HealthChecks,
    /// Whether every Service has been programmed once (after the first full lists).
    synced: bool,
    /// What was said about each Service, so each notice is said once while it stands.
    said: HashMap<ServiceName, BTreeSet<String>>,
    counts: HashMap<ServiceName, Counts>,
    totals: Counts,
    /// Each Service's frontends, for the names on the per-frontend metrics.
    keys: HashMap<ServiceName, Vec<FrontendKey>>,
}

impl Programming {
    pub fn new(
        reconciler: Reconciler,
        maps: ServiceMaps,
        options: PlanOptions,
        metrics: Arc<AgentMetrics>,
        events: Option<Events>,
    ) -> Self {
        Self {
            reconciler,
            maps,
            options,
            metrics,
            events,
            health_checks: HealthChecks::default(),
            synced: false,
            said: HashMap::new(),
            counts: HashMap::new(),
            totals: Counts::default(),
            keys: HashMap::new(),
        }
    }

    pub fn maps(&mut self) -> &mut ServiceMaps {
        &mut self.maps
    }

    /// Programs the Services `touched` names, or every Service on the first pass (and when
    /// something every Service reads changed). Returns whether anything was programmed.
    pub fn sync(&mut self, store: &Store, touched: Touched, context: &Context<'_>) -> bool {
        let everything = !self.synced || touched.all;
        if !everything && touched.is_empty() {
            return false;
        }
        let started = Instant::now();
        let names: Vec<ServiceName> = if everything {
            let mut names: BTreeSet<ServiceName> = store.service_names().cloned().collect();
            // Programmed before and gone since: their entry is empty, and removes them.
            names.extend(self.counts.keys().cloned());
            names.into_iter().collect()
        } else {
            touched.services.into_iter().collect()
        };
        let mut changed = ServiceFrontends::new();
        for name in names {
            let service = store.service(&name);
            let model = match &service {
                Some(service) => model::compute_service(service, store, context),
                None => Model::default(),
            };
            self.notice(service.as_ref(), &name, &model);
            self.count(&name, &model);
            changed.insert(name, model.frontends);
        }
        let modelled = started.elapsed();
        let report = if everything {
            self.reconciler.sync_all(&changed, &self.options, &mut self.maps)
        } else {
            self.reconciler
                .sync_changed(&changed, &self.options, &mut self.maps)
        };
        self.synced = true;
        self.health_checks.update(
            changed
                .iter()
                .map(|(name, frontends)| (name, frontends.as_slice())),
        );
        self.record(&report, changed.len(), modelled, started.elapsed());
        true
    }

    /// Says each notice about `name` that was not said while it stood: in the log, and the
    /// model's warnings as Events on the Service.
    fn notice(&mut self, service: Option<&Service>, name: &ServiceName, model: &Model) {
        let warnings = model.warnings.iter().map(ToString::to_string);
        let without_endpoints = model
            .frontends
            .iter()
            .filter(|f| f.backends.is_empty())
            .map(no_endpoints);
        let current: BTreeSet<String> = warnings.chain(without_endpoints).collect();
        let said = self.said.remove(name).unwrap_or_default();
        for notice in current.difference(&said) {
            tracing::warn!("{notice}");
        }
        if let (Some(events), Some(service)) = (&self.events, service) {
            for warning in model.warnings.iter().filter(|w| !said.contains(&w.to_string())) {
                events.warn(service, &warning.message);
            }
        }
        if !current.is_empty() {
            self.said.insert(name.clone(), current);
        }
    }

    fn count(&mut self, name: &ServiceName, model: &Model) {
        let counts = Counts {
            frontends: model.frontends.len() as i64,
            without_endpoints: model.frontends.iter().filter(|f| f.backends.is_empty()).count() as i64,
            warnings: model.warnings.len() as i64,
        };
        let before = if model.frontends.is_empty() && model.warnings.is_empty() {
            self.counts.remove(name)
        } else {
            self.counts.insert(name.clone(), counts)
        }
        .unwrap_or_default();
        self.totals.frontends += counts.frontends - before.frontends;
        self.totals.without_endpoints += counts.without_endpoints - before.without_endpoints;
        self.totals.warnings += counts.warnings - before.warnings;
        let mut names = self
            .metrics
            .service_names
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for key in self.keys.remove(name).unwrap_or_default() {
            names.remove(&key);
        }
        let keys: Vec<FrontendKey> = model.frontends.iter().map(FrontendKey::of).collect();
        if !keys.is_empty() {
            for key in &keys {
                names.insert(*key, name.to_string());
            }
            self.keys.insert(name.clone(), keys);
        }
    }

    fn record(
        &self,
        report: &Report,
        services: usize,
        modelled: std::time::Duration,
        elapsed: std::time::Duration,
    ) {
        for (service, error) in &report.failed {
            tracing::error!("cannot program {service}: {error}; its previous state stays in effect");
            self.metrics
                .programming_failures
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .inc();
        }
        let metrics = &self.metrics;
        metrics.syncs.inc();
        metrics.sync_duration.observe(elapsed.as_secs_f64());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        metrics.last_sync_timestamp.set(now.as_secs_f64());
        metrics.frontends.set(self.totals.frontends);
        metrics.model_warnings.set(self.totals.warnings);
        metrics
            .frontends_without_endpoints
            .set(self.totals.without_endpoints);
        tracing::info!(
            services,
            frontends = self.totals.frontends,
            writes = report.writes,
            deletes = report.deletes,
            failed = report.failed.len(),
            model_us = modelled.as_micros() as u64,
            elapsed_us = elapsed.as_micros() as u64,
            "maps in sync"
        );
    }
}

fn no_endpoints(frontend: &Frontend) -> String {
    let what = if frontend.kind.is_external() && frontend.policy.external_local {
        "has no endpoint on this node (externalTrafficPolicy Local); traffic to it is dropped"
    } else {
        "has no endpoints; connections to it are refused"
    };
    format!("Service {} {} {what}", frontend.service, frontend.dialled())
}
