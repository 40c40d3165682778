//! The features table: what the model outputs for each image.
//!
//! | column | type | |
//! |---|---|---|
//! | `id` | UInt64 | the dataset row |
//! | `embedding` | FixedSizeList<Float32, D> | the backbone's pooled embedding |
//! | `logits_<h>` | FixedSizeList<Float32, K_h> | head `h`'s logits, one column per head |
//! | `embedding_grid<G>` | FixedSizeList<Float32, D_G> | the embedding's stage read out on G × G cells; only where the layout lists G |
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
use crate::parts::{find_duplicate_id, missing_indices, resolve, Shard, KEY_SHARD};
use crate::table::{rows_per_group_for, TableFile, TableWriter};

/// Table name.
pub const TABLE: &str = "features";
/// Schema version.
pub const VERSION: u32 = 1;
/// Metadata key holding [`FeaturesInfo`].
pub const KEY_INFO: &str = "sela.features";
/// Name of the embedding column.
pub const EMBEDDING: &str = "embedding";

/// Name of the column holding the embedding's stage read out on `grid` × `grid` cells, beside
/// `embedding`.
pub fn grid_embedding_column(grid: usize) -> String {
    format!("embedding_grid{grid}")
}

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
    /// More readouts of the embedding's stage, each its own column (empty in files written
    /// before there were any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_embeddings: Vec<GridEmbedding>,
}

/// One more readout of the embedding's stage: column [`grid_embedding_column`]`(grid)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridEmbedding {
    /// Side of the grid the stage is average-pooled onto.
    pub grid: usize,
    /// Its size D.
    pub dim: usize,
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
    for extra in &layout.extra_embeddings {
        columns.push(Column::required(
            grid_embedding_column(extra.grid),
            ColumnType::F32Vector(Some(extra.dim)),
        ));
    }
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
        let extra_dims: usize = layout.extra_embeddings.iter().map(|e| e.dim).sum();
        let row_bytes =
            4 * (layout.embedding_dim + extra_dims + layout.head_sizes.iter().sum::<usize>()) + 8;
        let out = TableWriter::create(target, schema, &meta, rows_per_group_for(row_bytes))?;
        Ok(FeaturesWriter { out, layout })
    }

    /// Appends rows: `embedding` is row-major n×D, `logits[h]` row-major n×K_h. For a layout
    /// without extra embeddings.
    pub fn push(&mut self, ids: &[u64], embedding: &[f32], logits: &[&[f32]]) -> Result<()> {
        self.push_with_extra(ids, embedding, &[], logits)
    }

    /// Appends rows as [`push`](Self::push) does, with `extra[e]` the layout's extra embedding
    /// `e`, row-major n×D_e.
    pub fn push_with_extra(
        &mut self,
        ids: &[u64],
        embedding: &[f32],
        extra: &[&[f32]],
        logits: &[&[f32]],
    ) -> Result<()> {
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
        assert_eq!(
            extra.len(),
            self.layout.extra_embeddings.len(),
            "number of extra embeddings"
        );
        for (values, e) in extra.iter().zip(&self.layout.extra_embeddings) {
            assert_eq!(
                values.len(),
                n * e.dim,
                "shape of extra embedding {}",
                e.grid
            );
            columns.push(Arc::new(vector_array(values, e.dim)));
        }
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
    /// Row ids, ascending.
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
        if let Some(s) = shard {
            Shard::new(s.index, s.count).map_err(|message| IoError::Metadata {
                path: f.clone(),
                key: KEY_SHARD.to_string(),
                message,
            })?;
        }
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
            if let Some((f, s)) = shards.iter().find(|(_, s)| s.count != count) {
                return Err(IoError::Parts {
                    path: f.clone(),
                    message: format!("shard of {} parts among shards of {count}", s.count),
                });
            }
            let mut indices: Vec<usize> = shards.iter().map(|(_, s)| s.index).collect();
            indices.sort_unstable();
            // The smallest index that is missing or there more than once.
            let missing = missing_indices(&indices, count, 1).0.first().copied();
            let twice = indices.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]);
            if let Some(i) = missing.into_iter().chain(twice).min() {
                let times = indices.iter().filter(|&&j| j == i).count();
                return Err(IoError::Parts {
                    path: spec.to_path_buf(),
                    message: format!("shard {i} of {count} appears {times} times (expected once)"),
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
/// one matrix, streaming row groups straight into the destination; rows come out in ascending id
/// order. Rejects NaN/inf values
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
    // Room for the rows the footers claim, but never for more rows than the files have bytes:
    // a corrupt footer must not make a small file reserve terabytes. Only a hint; vectors grow.
    let claimed = tables
        .iter()
        .fold(0u64, |n, t| n.saturating_add(t.num_rows()));
    let on_disk = files.iter().fold(0u64, |n, f| {
        n.saturating_add(std::fs::metadata(f).map_or(0, |m| m.len()))
    });
    let rows_hint = usize::try_from(claimed.min(on_disk)).unwrap_or(usize::MAX);
    let mut cols: Option<usize> = None;
    let mut ids = Vec::new();
    let _ = ids.try_reserve_exact(rows_hint);
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
                    if let Some(n) = rows_hint.checked_mul(width) {
                        let _ = values.try_reserve_exact(n);
                    }
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
    let cols = cols.unwrap_or(0);
    sort_rows_by_id(&mut ids, &mut values, cols);
    Ok(Matrix {
        ids,
        values,
        cols,
        files,
    })
}

/// Puts the rows in ascending id order, in place (one row of scratch), so that whatever order
/// the files and shards held them in, consumers see one canonical order: computations over the
/// rows (the Sinkhorn stage's sums, say) then do not depend on how extraction was sharded.
pub fn sort_rows_by_id(ids: &mut [u64], values: &mut [f32], cols: usize) {
    if ids.windows(2).all(|w| w[0] < w[1]) {
        return;
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_unstable_by_key(|&r| ids[r]);
    // Row `dst` must receive row `order[dst]`: follow each permutation cycle once.
    let mut done = vec![false; ids.len()];
    let mut scratch = vec![0f32; cols];
    for start in 0..ids.len() {
        if done[start] || order[start] == start {
            continue;
        }
        scratch.copy_from_slice(&values[start * cols..(start + 1) * cols]);
        let first_id = ids[start];
        let mut dst = start;
        loop {
            done[dst] = true;
            let src = order[dst];
            if src == start {
                values[dst * cols..(dst + 1) * cols].copy_from_slice(&scratch);
                ids[dst] = first_id;
                break;
            }
            values.copy_within(src * cols..(src + 1) * cols, dst * cols);
            ids[dst] = ids[src];
            dst = src;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_sorted_by_id_in_place() {
        let mut ids = vec![5, 1, 4, 2, 3, 0];
        let mut values: Vec<f32> = ids
            .iter()
            .flat_map(|&id| [id as f32, -(id as f32)])
            .collect();
        sort_rows_by_id(&mut ids, &mut values, 2);
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5]);
        let expected: Vec<f32> = (0..6).flat_map(|id| [id as f32, -(id as f32)]).collect();
        assert_eq!(values, expected);
    }
}
