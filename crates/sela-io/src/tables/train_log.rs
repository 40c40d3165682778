//! The training log: one row per optimisation step and head.
//!
//! | column | type |
//! |---|---|
//! | `round` | UInt32 |
//! | `epoch` | UInt32 (counted over the whole pipeline) |
//! | `step` | UInt64 (counted over the whole pipeline) |
//! | `head` | UInt32 |
//! | `loss` | Float32 (that head's mean cross-entropy over the batch) |
//! | `lr` | Float64 |
//! | `images_per_sec` | Float32 (the step's throughput) |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{AsArray, Float32Array, Float64Array, RecordBatch, UInt32Array, UInt64Array};
use arrow::datatypes::{Float32Type, Float64Type, UInt32Type, UInt64Type};
use serde::{Deserialize, Serialize};

use crate::contract::{Column, ColumnType, Contract};
use crate::error::Result;
use crate::meta::FileMeta;
use crate::table::{TableFile, TableWriter, DEFAULT_ROWS_PER_GROUP};

/// Table name.
pub const TABLE: &str = "train_log";
/// Schema version.
pub const VERSION: u32 = 1;

/// The training-log contract.
pub fn contract() -> Contract {
    Contract {
        table: TABLE,
        version: VERSION,
        columns: vec![
            Column::required("round", ColumnType::UInt32),
            Column::required("epoch", ColumnType::UInt32),
            Column::required("step", ColumnType::UInt64),
            Column::required("head", ColumnType::UInt32),
            Column::required("loss", ColumnType::Float32),
            Column::required("lr", ColumnType::Float64),
            Column::required("images_per_sec", ColumnType::Float32),
        ],
    }
}

/// One row of the training log.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainLogRow {
    pub round: u32,
    pub epoch: u32,
    pub step: u64,
    pub head: u32,
    pub loss: f32,
    pub lr: f64,
    pub images_per_sec: f32,
}

/// Writes the whole log atomically.
pub fn write(target: impl AsRef<Path>, rows: &[TrainLogRow], meta: &FileMeta) -> Result<PathBuf> {
    let schema = Arc::new(contract().schema());
    let mut out = TableWriter::create(target, schema.clone(), meta, DEFAULT_ROWS_PER_GROUP)?;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.round))),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.epoch))),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.step))),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.head))),
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.loss))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.lr))),
            Arc::new(Float32Array::from_iter_values(
                rows.iter().map(|r| r.images_per_sec),
            )),
        ],
    )
    .expect("train-log batch matches its schema");
    out.write(&batch)?;
    out.finish()
}

/// Reads a whole log.
pub fn read(path: &Path) -> Result<Vec<TrainLogRow>> {
    let table = TableFile::open(path, &contract())?;
    let mut rows = Vec::new();
    for batch in table.batches(64 * 1024)? {
        let b = batch?;
        for i in 0..b.num_rows() {
            rows.push(TrainLogRow {
                round: b.column(0).as_primitive::<UInt32Type>().value(i),
                epoch: b.column(1).as_primitive::<UInt32Type>().value(i),
                step: b.column(2).as_primitive::<UInt64Type>().value(i),
                head: b.column(3).as_primitive::<UInt32Type>().value(i),
                loss: b.column(4).as_primitive::<Float32Type>().value(i),
                lr: b.column(5).as_primitive::<Float64Type>().value(i),
                images_per_sec: b.column(6).as_primitive::<Float32Type>().value(i),
            });
        }
    }
    Ok(rows)
}
