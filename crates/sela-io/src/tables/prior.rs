//! A cluster-size prior for the Sinkhorn stage: the target share of each cluster.
//!
//! | column | type | |
//! |---|---|---|
//! | `cluster` | UInt32 | `0..K`, each once |
//! | `weight` | Float64 | non-negative; normalised to sum 1 when read |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{AsArray, Float64Array, RecordBatch, UInt32Array};
use arrow::datatypes::{Float64Type, UInt32Type};

use crate::contract::{Column, ColumnType, Contract};
use crate::error::{IoError, Result};
use crate::meta::FileMeta;
use crate::table::{TableFile, TableWriter, DEFAULT_ROWS_PER_GROUP};

/// Table name.
pub const TABLE: &str = "prior";
/// Schema version.
pub const VERSION: u32 = 1;

/// The prior contract.
pub fn contract() -> Contract {
    Contract {
        table: TABLE,
        version: VERSION,
        columns: vec![
            Column::required("cluster", ColumnType::UInt32),
            Column::required("weight", ColumnType::Float64),
        ],
    }
}

/// Writes a prior (weights indexed by cluster) atomically.
pub fn write(target: impl AsRef<Path>, weights: &[f64], meta: &FileMeta) -> Result<PathBuf> {
    let schema = Arc::new(contract().schema());
    let mut out = TableWriter::create(target, schema.clone(), meta, DEFAULT_ROWS_PER_GROUP)?;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(0..weights.len() as u32)),
            Arc::new(Float64Array::from(weights.to_vec())),
        ],
    )
    .expect("prior batch matches its schema");
    out.write(&batch)?;
    out.finish()
}

/// Reads a prior for `k` clusters: every cluster exactly once, weights finite, non-negative and
/// not all zero; returned normalised to sum 1.
pub fn read(path: &Path, k: usize) -> Result<Vec<f64>> {
    let table = TableFile::open(path, &contract())?;
    let mut weights = vec![f64::NAN; k];
    let mut row = 0u64;
    let bad = |row: u64, column: &str, message: String| IoError::Value {
        path: path.to_path_buf(),
        column: column.to_string(),
        row,
        message,
    };
    for batch in table.batches(64 * 1024)? {
        let b = batch?;
        let cluster = b.column(0).as_primitive::<UInt32Type>();
        let weight = b.column(1).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let c = cluster.value(i) as usize;
            let w = weight.value(i);
            if c >= k {
                return Err(bad(
                    row,
                    "cluster",
                    format!("cluster {c} out of range for K = {k}"),
                ));
            }
            if !weights[c].is_nan() {
                return Err(bad(row, "cluster", format!("cluster {c} appears twice")));
            }
            if !(w.is_finite() && w >= 0.0) {
                return Err(bad(
                    row,
                    "weight",
                    format!("weight {w} is not a finite non-negative number"),
                ));
            }
            weights[c] = w;
            row += 1;
        }
    }
    if let Some(c) = weights.iter().position(|w| w.is_nan()) {
        return Err(bad(
            row,
            "cluster",
            format!("cluster {c} of K = {k} has no weight"),
        ));
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(bad(0, "weight", "weights sum to zero".to_string()));
    }
    Ok(weights.into_iter().map(|w| w / total).collect())
}
