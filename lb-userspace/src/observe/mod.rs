//! What an operator sees of a running agent: Prometheus metrics and health, served over HTTP,
//! and the datapath's own log messages.
pub mod datapath_log;
pub mod health;
pub mod metrics;
pub mod server;
