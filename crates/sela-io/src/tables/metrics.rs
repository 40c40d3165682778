//! The metrics table: the whole history of a run's evaluations in one long-format file.
//!
//! | column | type | |
//! |---|---|---|
//! | `round` | UInt32 | |
//! | `head` | UInt32, nullable | null for metrics of the embedding rather than a head |
//! | `split` | Utf8 | `train` or `test` |
//! | `metric` | Utf8 | e.g. `acc`, `nmi`, `ari`, `knn20_acc`, `linear_probe_acc` |
//! | `value` | Float64 | |
//! | `config_hash` | Utf8 | the pipeline config's hash |
//! | `time` | Timestamp(ms, UTC) | when the value was computed |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array,
};
use arrow::datatypes::{Float64Type, TimestampMillisecondType, UInt32Type};
use serde::{Deserialize, Serialize};

use crate::contract::{Column, ColumnType, Contract};
use crate::error::Result;
use crate::meta::FileMeta;
use crate::table::{TableFile, TableWriter, DEFAULT_ROWS_PER_GROUP};

/// Table name.
pub const TABLE: &str = "metrics";
/// Schema version.
pub const VERSION: u32 = 1;

/// The metrics contract.
pub fn contract() -> Contract {
    Contract {
        table: TABLE,
        version: VERSION,
        columns: vec![
            Column::required("round", ColumnType::UInt32),
            Column::nullable("head", ColumnType::UInt32),
            Column::required("split", ColumnType::Utf8),
            Column::required("metric", ColumnType::Utf8),
            Column::required("value", ColumnType::Float64),
            Column::required("config_hash", ColumnType::Utf8),
            Column::required("time", ColumnType::TimestampMs),
        ],
    }
}

/// One metric value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    pub round: u32,
    pub head: Option<u32>,
    pub split: String,
    pub metric: String,
    pub value: f64,
    pub config_hash: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
}

impl MetricRow {
    /// The identity of a measurement: re-evaluating a round replaces rows with the same key.
    pub fn key(&self) -> (u32, Option<u32>, &str, &str) {
        (self.round, self.head, &self.split, &self.metric)
    }
}

/// Writes `rows` as the whole file, atomically.
pub fn write(target: impl AsRef<Path>, rows: &[MetricRow], meta: &FileMeta) -> Result<PathBuf> {
    let schema = Arc::new(contract().schema());
    let mut out = TableWriter::create(target, schema.clone(), meta, DEFAULT_ROWS_PER_GROUP)?;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.round))),
            Arc::new(UInt32Array::from_iter(rows.iter().map(|r| r.head))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.split.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.metric.as_str()),
            )),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.value))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.config_hash.as_str()),
            )),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.time_ms))
                    .with_timezone("UTC"),
            ),
        ],
    )
    .expect("metrics batch matches its schema");
    out.write(&batch)?;
    out.finish()
}

/// Reads every row.
pub fn read(path: &Path) -> Result<Vec<MetricRow>> {
    let table = TableFile::open(path, &contract())?;
    let mut rows = Vec::new();
    for batch in table.batches(64 * 1024)? {
        let b = batch?;
        let round = b.column(0).as_primitive::<UInt32Type>();
        let head = b.column(1).as_primitive::<UInt32Type>();
        let split = b.column(2).as_string::<i32>();
        let metric = b.column(3).as_string::<i32>();
        let value = b.column(4).as_primitive::<Float64Type>();
        let hash = b.column(5).as_string::<i32>();
        let time = b.column(6).as_primitive::<TimestampMillisecondType>();
        for i in 0..b.num_rows() {
            rows.push(MetricRow {
                round: round.value(i),
                head: (!head.is_null(i)).then(|| head.value(i)),
                split: split.value(i).to_string(),
                metric: metric.value(i).to_string(),
                value: value.value(i),
                config_hash: hash.value(i).to_string(),
                time_ms: time.value(i),
            });
        }
    }
    Ok(rows)
}

/// Adds `new` to the history in `path` (created if absent). A row with the same round, head,
/// split and metric as a new one is replaced, so re-running an evaluation does not duplicate it.
/// The result is ordered by round, then as written.
pub fn append(path: &Path, new: &[MetricRow], meta: &FileMeta) -> Result<PathBuf> {
    let mut rows = if path.exists() {
        read(path)?
    } else {
        Vec::new()
    };
    rows.retain(|old| !new.iter().any(|n| n.key() == old.key()));
    rows.extend(new.iter().cloned());
    rows.sort_by_key(|r| r.round);
    write(path, &rows, meta)
}
