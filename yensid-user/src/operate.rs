//! The operator's side: the CLI's verbs and nouns, the control socket and
//! who may use it, status and explain reports, Prometheus metrics.

pub mod access;
pub mod cli;
pub mod control;
pub mod fdstore;
pub mod machines;
pub mod metrics;
pub mod notify;
pub mod report;
pub mod status;
