//! Switchboard's agent, as a library so the integration tests and the demo drive the same code.
//!
//! Data flows `source` → `model` → `reconcile` → `datapath`; `cli` wires them into commands and
//! `lab` builds network-namespace pods for the demo and the tests.
pub mod cli;
pub mod datapath;
pub mod lab;
pub mod model;
pub mod reconcile;
pub mod source;
