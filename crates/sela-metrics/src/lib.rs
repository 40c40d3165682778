//! sela-metrics
