//! What ferry tells the operator: the per-connection outcome, the access log, and the
//! counters that the metrics and status API read.

pub mod access_log;
pub mod counter;
pub mod outcome;
pub mod stats;

pub use access_log::{AccessLog, Logs, Record};
pub use counter::Counter;
pub use outcome::{Dropped, Outcome, Refusal, Stage};
pub use stats::{KernelCounts, ListenerStats, ServerStats};
