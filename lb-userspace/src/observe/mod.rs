//! What an operator sees of a running agent: Prometheus metrics and health, served over HTTP,
//! the datapath's own log messages, and Kubernetes Events about Services.
pub mod datapath_log;
pub mod events;
pub mod health;
pub mod health_check;
pub mod metrics;
pub mod server;
