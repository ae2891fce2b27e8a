//! Switchboard's agent, as a library so the integration tests and the demo drive the same code.
//!
//! Data flows `source` → `model` → `reconcile` → `datapath`; `observe` serves metrics and health;
//! `cli` wires them into commands and `lab` builds network-namespace pods for the demo and tests.
pub mod agent;
pub mod cli;
pub mod datapath;
pub mod lab;
pub mod model;
pub mod observe;
pub mod reconcile;
pub mod source;
