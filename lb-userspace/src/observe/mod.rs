//! What an operator sees of a running agent: Prometheus metrics and health, served over HTTP.
pub mod health;
pub mod metrics;
pub mod server;
