//! Cluster statistics: one row per round, head and cluster.
//!
//! | column | type | |
//! |---|---|---|
//! | `round` | UInt32 | |
//! | `head` | UInt32 | |
//! | `cluster` | UInt32 | |
//! | `size` | UInt64 | images assigned to the cluster |
//! | `purity` | Float64, nullable | share of the majority class (null without ground truth) |
//! | `majority_class` | Int64, nullable | the most frequent ground-truth class |
//! | `mean_confidence` | Float64 | mean assignment confidence |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Float64Array, Int64Array, RecordBatch, UInt32Array, UInt64Array,
};
use arrow::datatypes::{Float64Type, Int64Type, UInt32Type, UInt64Type};
use serde::{Deserialize, Serialize};

use crate::contract::{Column, ColumnType, Contract};
use crate::error::Result;
use crate::meta::FileMeta;
use crate::table::{TableFile, TableWriter, DEFAULT_ROWS_PER_GROUP};

/// Table name.
pub const TABLE: &str = "cluster_stats";
/// Schema version.
pub const VERSION: u32 = 1;

/// The cluster-statistics contract.
pub fn contract() -> Contract {
    Contract {
        table: TABLE,
        version: VERSION,
        columns: vec![
            Column::required("round", ColumnType::UInt32),
            Column::required("head", ColumnType::UInt32),
            Column::required("cluster", ColumnType::UInt32),
            Column::required("size", ColumnType::UInt64),
            Column::nullable("purity", ColumnType::Float64),
            Column::nullable("majority_class", ColumnType::Int64),
            Column::required("mean_confidence", ColumnType::Float64),
        ],
    }
}

/// One cluster's statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatRow {
    pub round: u32,
    pub head: u32,
    pub cluster: u32,
    pub size: u64,
    pub purity: Option<f64>,
    pub majority_class: Option<i64>,
    pub mean_confidence: f64,
}

/// Writes the table atomically.
pub fn write(
    target: impl AsRef<Path>,
    rows: &[ClusterStatRow],
    meta: &FileMeta,
) -> Result<PathBuf> {
    let schema = Arc::new(contract().schema());
    let mut out = TableWriter::create(target, schema.clone(), meta, DEFAULT_ROWS_PER_GROUP)?;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.round))),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.head))),
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|r| r.cluster),
            )),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.size))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.purity))),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.majority_class))),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.mean_confidence),
            )),
        ],
    )
    .expect("cluster-stats batch matches its schema");
    out.write(&batch)?;
    out.finish()
}

/// Reads every row.
pub fn read(path: &Path) -> Result<Vec<ClusterStatRow>> {
    let table = TableFile::open(path, &contract())?;
    let mut rows = Vec::new();
    for batch in table.batches(64 * 1024)? {
        let b = batch?;
        let purity = b.column(4).as_primitive::<Float64Type>();
        let majority = b.column(5).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            rows.push(ClusterStatRow {
                round: b.column(0).as_primitive::<UInt32Type>().value(i),
                head: b.column(1).as_primitive::<UInt32Type>().value(i),
                cluster: b.column(2).as_primitive::<UInt32Type>().value(i),
                size: b.column(3).as_primitive::<UInt64Type>().value(i),
                purity: (!purity.is_null(i)).then(|| purity.value(i)),
                majority_class: (!majority.is_null(i)).then(|| majority.value(i)),
                mean_confidence: b.column(6).as_primitive::<Float64Type>().value(i),
            });
        }
    }
    Ok(rows)
}
