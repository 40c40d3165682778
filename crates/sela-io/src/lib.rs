//! sela's data contracts.
//!
//! Every Parquet table that crosses a stage boundary is defined here, once: its columns
//! ([`contract::Contract`]), its key-value metadata ([`meta`]), how it is written (atomically,
//! [`atomic`]) and how it is read (validated and streamed, [`table`]). Stage binaries never build
//! Arrow schemas of their own.
//!
//! Tables: [`dataset`], [`features`], [`labels`], [`train_log`], [`metrics`], [`cluster_stats`],
//! [`prior`].

pub mod atomic;
pub mod contract;
pub mod error;
pub mod meta;
pub mod parts;
pub mod table;
mod tables;

pub use error::{IoError, Result};
pub use meta::{FileMeta, Provenance};
pub use tables::{cluster_stats, dataset, features, labels, metrics, prior, train_log};
