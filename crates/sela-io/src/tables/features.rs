//! The features table: what the model outputs for each image.
//!
//! | column | type | |
//! |---|---|---|
//! | `id` | UInt64 | the dataset row |
//! | `embedding` | FixedSizeList<Float32, D> | the backbone's pooled embedding |
//! | `logits_<h>` | FixedSizeList<Float32, K_h> | head `h`'s logits, one column per head |
//!
//! Metadata `sela.features`: the [`FeaturesInfo`] (layout, dataset, shard, checkpoint).
//! Stages that only need one vector column (the Sinkhorn stage) read it with [`read_matrix`],
//! which also accepts any Parquet file with an `id` and a fixed-size-list column.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, UInt64Type};
use serde::{Deserialize, Serialize};

use crate::contract::{Column, ColumnType, Contract};
use crate::error::{IoError, Result};
use crate::meta::{FileMeta, Provenance};
use crate::parts::{find_duplicate_id, resolve, Shard, KEY_SHARD};
use crate::table::{rows_per_group_for, TableFile, TableWriter};

/// Table name.
pub const TABLE: &str = "features";
/// Schema version.
pub const VERSION: u32 = 1;
/// Metadata key holding [`FeaturesInfo`].
pub const KEY_INFO: &str = "sela.features";
/// Name of the embedding column.
pub const EMBEDDING: &str = "embedding";

/// Name of head `h`'s logits column.
pub fn logits_column(head: usize) -> String {
    format!("logits_{head}")
}

/// Parses a `logits_<h>` column name.
pub fn parse_logits_column(name: &str) -> Option<usize> {
    name.strip_prefix("logits_")?.parse().ok()
}

/// The shape of a features table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeaturesLayout {
    /// Embedding size D.
    pub embedding_dim: usize,
    /// K of each head.
    pub head_sizes: Vec<usize>,
}

/// What a features file describes, stored in its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeaturesInfo {
    /// The table's shape.
    pub layout: FeaturesLayout,
    /// The dataset file the rows come from.
    pub dataset: String,
    /// Rows in the whole dataset (all shards together).
    pub dataset_rows: u64,
    /// The checkpoint the model was loaded from.
    pub checkpoint: Option<String>,
}

/// The features contract for `layout`.
pub fn contract(layout: &FeaturesLayout) -> Contract {
    let mut columns = vec![
        Column::required("id", ColumnType::UInt64),
        Column::required(EMBEDDING, ColumnType::F32Vector(Some(layout.embedding_dim))),
    ];
    for (h, &k) in layout.head_sizes.iter().enumerate() {
        columns.push(Column::required(
            logits_column(h),
            ColumnType::F32Vector(Some(k)),
        ));
    }
    Contract {
        table: TABLE,
        version: VERSION,
        columns,
    }
}

/// Writes a features file (or one part of a sharded set), atomically.
pub struct FeaturesWriter {
    out: TableWriter,
    layout: FeaturesLayout,
}

impl FeaturesWriter {
    /// Starts writing `target`.
    pub fn create(
        target: impl AsRef<Path>,
        info: &FeaturesInfo,
        shard: Shard,
        provenance: Provenance,
    ) -> Result<Self> {
        let layout = info.layout.clone();
        let schema: SchemaRef = Arc::new(contract(&layout).schema());
        let meta = FileMeta::new(TABLE, VERSION, provenance)
            .with_json(KEY_INFO, info)
            .with_json(KEY_SHARD, &shard);
        let row_bytes = 4 * (layout.embedding_dim + layout.head_sizes.iter().sum::<usize>()) + 8;
        let out = TableWriter::create(target, schema, &meta, rows_per_group_for(row_bytes))?;
        Ok(FeaturesWriter { out, layout })
    }

    /// Appends rows: `embedding` is row-major n×D, `logits[h]` row-major n×K_h.
    pub fn push(&mut self, ids: &[u64], embedding: &[f32], logits: &[&[f32]]) -> Result<()> {
        let n = ids.len();
        assert_eq!(
            embedding.len(),
            n * self.layout.embedding_dim,
            "embedding shape"
        );
        assert_eq!(
            logits.len(),
            self.layout.head_sizes.len(),
            "number of heads"
        );
        let mut columns: Vec<Arc<dyn Array>> = vec![
            Arc::new(UInt64Array::from(ids.to_vec())),
            Arc::new(vector_array(embedding, self.layout.embedding_dim)),
        ];
        for (h, &k) in self.layout.head_sizes.iter().enumerate() {
            assert_eq!(logits[h].len(), n * k, "logits shape of head {h}");
            columns.push(Arc::new(vector_array(logits[h], k)));
        }
        let batch = RecordBatch::try_new(self.out.schema().clone(), columns)
            .expect("features batch matches its schema");
        self.out.write(&batch)
    }

    /// Publishes the file.
    pub fn finish(self) -> Result<PathBuf> {
        self.out.finish()
    }
}

/// A FixedSizeList<Float32, width> array over row-major `values`.
pub fn vector_array(values: &[f32], width: usize) -> FixedSizeListArray {
    let field = Arc::new(Field::new_list_field(DataType::Float32, false));
    FixedSizeListArray::new(
        field,
        width as i32,
        Arc::new(Float32Array::from(values.to_vec())),
        None,
    )
}

/// One vector column of a (possibly sharded) table, read into a row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Row ids, in file order.
    pub ids: Vec<u64>,
    /// Row-major values, `ids.len() * cols`.
    pub values: Vec<f32>,
    /// Row length.
    pub cols: usize,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

/// The features layout and info of a set of part files, checked for consistency and completeness:
/// one layout, one dataset, each shard once, and rows adding up to the dataset's size.
pub fn open_parts(spec: &Path) -> Result<(Vec<PathBuf>, Option<FeaturesInfo>)> {
    let files = resolve(spec)?;
    let mut info: Option<FeaturesInfo> = None;
    let mut shards = Vec::new();
    let mut rows = 0u64;
    for f in &files {
        let table = TableFile::open(f, &id_contract())?;
        let this: Option<FeaturesInfo> = table.meta().json(f, KEY_INFO)?;
        let shard: Option<Shard> = table.meta().json(f, KEY_SHARD)?;
        rows += table.num_rows();
        if let Some(s) = shard {
            shards.push((f.clone(), s));
        }
        match (&info, this) {
            (None, Some(t)) => info = Some(t),
            (Some(a), Some(b)) if a.layout != b.layout || a.dataset_rows != b.dataset_rows => {
                return Err(IoError::Parts {
                    path: f.clone(),
                    message: format!(
                        "part disagrees with {}: layout {:?} over {} rows vs {:?} over {} rows",
                        files[0].display(),
                        b.layout,
                        b.dataset_rows,
                        a.layout,
                        a.dataset_rows
                    ),
                })
            }
            _ => {}
        }
    }
    if let Some(info) = &info {
        if let Some((_, s0)) = shards.first() {
            let count = s0.count;
            let mut seen = vec![0usize; count];
            for (f, s) in &shards {
                if s.count != count {
                    return Err(IoError::Parts {
                        path: f.clone(),
                        message: format!("shard of {} parts among shards of {count}", s.count),
                    });
                }
                seen[s.index] += 1;
            }
            if let Some(i) = seen.iter().position(|&c| c != 1) {
                return Err(IoError::Parts {
                    path: spec.to_path_buf(),
                    message: format!(
                        "shard {i} of {count} appears {} times (expected once)",
                        seen[i]
                    ),
                });
            }
        }
        if rows != info.dataset_rows {
            return Err(IoError::Parts {
                path: spec.to_path_buf(),
                message: format!(
                    "parts hold {rows} rows but the dataset has {} rows",
                    info.dataset_rows
                ),
            });
        }
    }
    Ok((files, info))
}

fn id_contract() -> Contract {
    Contract {
        table: TABLE,
        version: VERSION,
        columns: vec![Column::required("id", ColumnType::UInt64)],
    }
}

/// Reads column `column` (a vector column) and `id` from a file, directory of parts or glob into
/// one matrix, streaming row groups straight into the destination. Rejects NaN/inf values
/// (naming file, row and column) and duplicate ids.
pub fn read_matrix(spec: &Path, column: &str) -> Result<Matrix> {
    let (files, _) = open_parts(spec)?;
    let contract = Contract {
        table: TABLE,
        version: VERSION,
        columns: vec![
            Column::required("id", ColumnType::UInt64),
            Column::required(column, ColumnType::F32Vector(None)),
        ],
    };
    let tables = files
        .iter()
        .map(|f| TableFile::open(f, &contract))
        .collect::<Result<Vec<_>>>()?;
    let total: u64 = tables.iter().map(TableFile::num_rows).sum();
    let mut cols: Option<usize> = None;
    let mut ids = Vec::with_capacity(total as usize);
    let mut values: Vec<f32> = Vec::new();
    for table in tables {
        let path = table.path().to_path_buf();
        let mut batches = table.batches(16 * 1024)?;
        loop {
            let first_row = batches.next_row();
            let Some(batch) = batches.next() else { break };
            let batch = batch?;
            let list = batch.column(1).as_fixed_size_list();
            let width = list.value_length() as usize;
            match cols {
                None => {
                    cols = Some(width);
                    values.reserve_exact(total as usize * width);
                }
                Some(c) if c != width => {
                    return Err(IoError::ColumnType {
                        path,
                        column: column.to_string(),
                        expected: ColumnType::F32Vector(Some(c)).describe(),
                        actual: ColumnType::F32Vector(Some(width)).describe(),
                    })
                }
                _ => {}
            }
            let flat = list.values().as_primitive::<Float32Type>();
            let start = list.value_offset_at(0);
            let slice = &flat.values()[start..start + batch.num_rows() * width];
            if let Some(i) = slice.iter().position(|v| !v.is_finite()) {
                return Err(IoError::Value {
                    path,
                    column: column.to_string(),
                    row: first_row + (i / width) as u64,
                    message: format!("non-finite value {} at position {}", slice[i], i % width),
                });
            }
            values.extend_from_slice(slice);
            ids.extend(batch.column(0).as_primitive::<UInt64Type>().values().iter());
        }
    }
    if let Some(dup) = find_duplicate_id(&ids) {
        return Err(IoError::Parts {
            path: spec.to_path_buf(),
            message: format!("id {dup} occurs more than once"),
        });
    }
    Ok(Matrix {
        ids,
        values,
        cols: cols.unwrap_or(0),
        files,
    })
}

/// The names of the `logits_<h>` columns of a file, in head order.
pub fn logits_columns(schema: &Schema) -> Vec<String> {
    let mut heads: Vec<(usize, String)> = schema
        .fields()
        .iter()
        .filter_map(|f| parse_logits_column(f.name()).map(|h| (h, f.name().clone())))
        .collect();
    heads.sort();
    heads.into_iter().map(|(_, n)| n).collect()
}
