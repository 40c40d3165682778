//! One module per table.

pub mod cluster_stats;
pub mod dataset;
pub mod features;
pub mod labels;
pub mod metrics;
pub mod prior;
pub mod train_log;
