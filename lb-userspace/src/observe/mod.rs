//! What an operator sees of a running agent: Prometheus metrics and health, served over HTTP.
pub mod health;
pub mod health_check;
pub mod metrics;
pub mod server;
