//! Writing and reading whole tables: an atomic Parquet writer and a validating, streaming reader.

use std::fs::File;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::WriterProperties;

use crate::atomic::AtomicFile;
use crate::contract::{image_fields, ColumnType, Contract};
use crate::error::{IoError, Result};
use crate::meta::FileMeta;

/// Rows per Parquet row group for tables of small rows.
pub const DEFAULT_ROWS_PER_GROUP: usize = 64 * 1024;

/// Rows per row group so that a group holds about 64 MiB of `row_bytes`-sized rows.
pub fn rows_per_group_for(row_bytes: usize) -> usize {
    ((64 << 20) / row_bytes.max(1)).clamp(1024, DEFAULT_ROWS_PER_GROUP)
}

/// Writes one table to a Parquet file atomically: nothing appears at the target path until
/// [`TableWriter::finish`] succeeds.
pub struct TableWriter {
    out: AtomicFile,
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    rows: u64,
}

impl TableWriter {
    /// Starts writing `target` with `contract`'s canonical schema (or `schema`, for contracts with
    /// data-dependent columns) and `meta` in the footer.
    pub fn create(
        target: impl AsRef<Path>,
        schema: SchemaRef,
        meta: &FileMeta,
        rows_per_group: usize,
    ) -> Result<Self> {
        let mut out = AtomicFile::create(target)?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(rows_per_group.max(1)))
            .set_key_value_metadata(Some(meta.to_key_values()))
            .build();
        let file = out.take_file();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| IoError::parquet(out.target(), e))?;
        Ok(TableWriter {
            out,
            writer,
            schema,
            rows: 0,
        })
    }

    /// The schema batches must have.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Appends a batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.rows += batch.num_rows() as u64;
        self.writer
            .write(batch)
            .map_err(|e| IoError::parquet(self.out.target(), e))
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Closes the Parquet file and publishes it under its final name.
    pub fn finish(self) -> Result<PathBuf> {
        let TableWriter { out, writer, .. } = self;
        let file = writer
            .into_inner()
            .map_err(|e| IoError::parquet(out.target(), e))?;
        out.commit_with(file)
    }
}

/// A Parquet file opened against a contract: schema checked, metadata parsed, rows not yet read.
pub struct TableFile {
    path: PathBuf,
    contract: Contract,
    meta: FileMeta,
    schema: SchemaRef,
    rows: u64,
    builder: ParquetRecordBatchReaderBuilder<File>,
}

impl std::fmt::Debug for TableFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableFile")
            .field("path", &self.path)
            .field("table", &self.contract.table)
            .field("rows", &self.rows)
            .finish()
    }
}

impl TableFile {
    /// Opens `path` and validates it against `contract`: the table name and version in its
    /// metadata (when it was written by sela) and every contract column's presence and type.
    pub fn open(path: impl AsRef<Path>, contract: &Contract) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| IoError::os(&path, e))?;
        let file_len = file.metadata().map_err(|e| IoError::os(&path, e))?.len();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| IoError::parquet(&path, e))?;
        check_chunks(&path, builder.metadata(), file_len)?;
        let file_meta = builder.metadata().file_metadata();
        let mut meta = FileMeta::from_key_values(&path, file_meta.key_value_metadata())?;
        // Writers that keep metadata only in the embedded Arrow schema (arrow-rs does) still
        // count: the footer's own entries win.
        for (k, v) in builder.schema().metadata() {
            meta.extra.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let rows = file_meta.num_rows().max(0) as u64;
        if let Some(table) = &meta.table {
            if table != contract.table {
                return Err(IoError::WrongTable {
                    path,
                    expected: contract.table.to_string(),
                    actual: table.clone(),
                });
            }
            let version = meta.schema_version.clone().unwrap_or_default();
            if version != contract.version.to_string() {
                return Err(IoError::SchemaVersion {
                    path,
                    table: table.clone(),
                    expected: contract.version,
                    actual: version,
                });
            }
        }
        let schema = builder.schema().clone();
        contract.validate(&path, &schema)?;
        Ok(TableFile {
            path,
            contract: contract.clone(),
            meta,
            schema,
            rows,
            builder,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's key-value metadata.
    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    /// The file's Arrow schema as stored.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Number of rows, from the footer.
    pub fn num_rows(&self) -> u64 {
        self.rows
    }

    /// Number of row groups.
    pub fn num_row_groups(&self) -> usize {
        self.builder.metadata().num_row_groups()
    }

    /// The stored length of fixed-size-list column `name`, if it is one.
    pub fn vector_len(&self, name: &str) -> Option<usize> {
        match self.schema.field_with_name(name).ok()?.data_type() {
            DataType::FixedSizeList(_, n) => Some(*n as usize),
            _ => None,
        }
    }

    /// Streams the contract's columns in batches of at most `batch_size` rows, cast to their
    /// canonical types and checked for nulls in non-nullable columns.
    pub fn batches(self, batch_size: usize) -> Result<TableBatches> {
        self.batches_of(batch_size, None)
    }

    /// Like [`TableFile::batches`] restricted to the named contract columns.
    pub fn batches_of(self, batch_size: usize, columns: Option<&[&str]>) -> Result<TableBatches> {
        let wanted: Vec<String> = match columns {
            Some(cols) => cols.iter().map(|c| c.to_string()).collect(),
            None => self
                .contract
                .columns
                .iter()
                .map(|c| c.name.clone())
                .collect(),
        };
        let indices: Vec<usize> = wanted
            .iter()
            .map(|name| {
                self.schema
                    .index_of(name)
                    .expect("validated columns are present")
            })
            .collect();
        let mask = ProjectionMask::roots(self.builder.parquet_schema(), indices);
        let reader = self
            .builder
            .with_batch_size(batch_size.max(1))
            .with_projection(mask)
            .build()
            .map_err(|e| IoError::parquet(&self.path, e))?;
        Ok(TableBatches {
            path: self.path,
            contract: self.contract,
            wanted,
            reader,
            rows: self.rows,
            row: 0,
            failed: false,
        })
    }

    /// Reads every row of the contract's columns into one batch.
    pub fn read_all(self) -> Result<RecordBatch> {
        let path = self.path.clone();
        let batches: Vec<RecordBatch> = self.batches(64 * 1024)?.collect::<Result<_>>()?;
        concat(&path, batches)
    }
}

/// Checks that every column chunk the footer lists lies inside the file. A corrupt footer can
/// say otherwise, and the Parquet reader panics on a negative offset instead of failing.
fn check_chunks(path: &Path, metadata: &ParquetMetaData, file_len: u64) -> Result<()> {
    for (g, group) in metadata.row_groups().iter().enumerate() {
        for chunk in group.columns() {
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or(chunk.data_page_offset());
            let len = chunk.compressed_size();
            let inside = start >= 0
                && len >= 0
                && (start as u64)
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= file_len);
            if !inside {
                let message = format!(
                    "row group {g}, column `{}`: the footer places its {len} bytes at offset \
                     {start}, outside the file's {file_len} bytes",
                    chunk.column_path().string()
                );
                return Err(IoError::parquet(path, ParquetError::General(message)));
            }
        }
    }
    Ok(())
}

/// Concatenates batches of one schema (an empty list gives no batch: callers use a typed empty).
fn concat(path: &Path, batches: Vec<RecordBatch>) -> Result<RecordBatch> {
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => Arc::new(Schema::empty()),
    };
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| IoError::arrow(path, e))
}

/// An iterator over canonical batches of a [`TableFile`].
pub struct TableBatches {
    path: PathBuf,
    contract: Contract,
    wanted: Vec<String>,
    reader: ParquetRecordBatchReader,
    /// Rows the footer promises.
    rows: u64,
    row: u64,
    /// Set once the decoder has panicked or the rows did not add up.
    failed: bool,
}

impl TableBatches {
    /// The row index (in the file) of the first row of the next batch.
    pub fn next_row(&self) -> u64 {
        self.row
    }

    fn canonical(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let mut fields = Vec::with_capacity(self.wanted.len());
        let mut columns = Vec::with_capacity(self.wanted.len());
        for name in &self.wanted {
            let col = self
                .contract
                .columns
                .iter()
                .find(|c| &c.name == name)
                .expect("wanted columns come from the contract");
            let array = batch
                .column_by_name(name)
                .expect("projected column present")
                .clone();
            let array = canonical_array(&self.path, name, col.ty, array, self.row)?;
            if !col.nullable && array.null_count() > 0 {
                let offset = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0);
                return Err(IoError::Value {
                    path: self.path.clone(),
                    column: name.clone(),
                    row: self.row + offset as u64,
                    message: "null in a column that must not have nulls".to_string(),
                });
            }
            fields.push(Field::new(name, array.data_type().clone(), col.nullable));
            columns.push(array);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|e| IoError::arrow(&self.path, e))
    }
}

impl Iterator for TableBatches {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        // The Parquet decoder panics on some corrupt pages (a dictionary-encoded page without a
        // dictionary, say) instead of failing: turn that into an error naming the file, and never
        // touch the reader again.
        let next = std::panic::catch_unwind(AssertUnwindSafe(|| self.reader.next()));
        let batch = match next {
            Ok(None) if self.row == self.rows => return None,
            Ok(None) => {
                self.failed = true;
                let message = format!(
                    "the footer promises {} rows, the pages hold {}",
                    self.rows, self.row
                );
                return Some(Err(IoError::parquet(
                    &self.path,
                    ParquetError::General(message),
                )));
            }
            Ok(Some(Ok(b))) => b,
            Ok(Some(Err(e))) => return Some(Err(IoError::arrow(&self.path, e))),
            Err(panic) => {
                self.failed = true;
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let message = format!("the decoder failed on corrupt data: {what}");
                return Some(Err(IoError::parquet(
                    &self.path,
                    ParquetError::General(message),
                )));
            }
        };
        let n = batch.num_rows() as u64;
        let out = self.canonical(batch);
        self.row += n;
        Some(out)
    }
}

/// Casts one column to its contract type, reporting the first offending row on failure.
fn canonical_array(
    path: &Path,
    name: &str,
    ty: ColumnType,
    array: ArrayRef,
    first_row: u64,
) -> Result<ArrayRef> {
    let target = match ty {
        ColumnType::F32Vector(_) => {
            let len = vector_length(path, name, &array, first_row)?;
            ColumnType::F32Vector(Some(len)).arrow_type()
        }
        ColumnType::Image => return canonical_image(path, name, array),
        other => other.arrow_type(),
    };
    if array.data_type() == &target {
        return Ok(array);
    }
    let cast_array = cast(&array, &target).map_err(|e| IoError::ColumnType {
        path: path.to_path_buf(),
        column: name.to_string(),
        expected: ty.describe(),
        actual: format!("{} ({e})", array.data_type()),
    })?;
    // A safe cast turns out-of-range values (negative ids, say) into nulls: report them.
    if cast_array.null_count() > array.null_count() {
        let offset = (0..array.len())
            .find(|&i| cast_array.is_null(i) && !array.is_null(i))
            .unwrap_or(0);
        return Err(IoError::Value {
            path: path.to_path_buf(),
            column: name.to_string(),
            row: first_row + offset as u64,
            message: format!("value does not fit {}", ty.describe()),
        });
    }
    Ok(cast_array)
}

/// The common length of a vector column's rows (fixed-size lists have it in their type).
fn vector_length(path: &Path, name: &str, array: &ArrayRef, first_row: u64) -> Result<usize> {
    let lengths: Vec<usize> = match array.data_type() {
        DataType::FixedSizeList(_, n) => return Ok(*n as usize),
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            (0..l.len()).map(|i| l.value_length(i) as usize).collect()
        }
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            (0..l.len()).map(|i| l.value_length(i) as usize).collect()
        }
        other => {
            return Err(IoError::ColumnType {
                path: path.to_path_buf(),
                column: name.to_string(),
                expected: ColumnType::F32Vector(None).describe(),
                actual: other.to_string(),
            })
        }
    };
    let first = lengths.first().copied().unwrap_or(0);
    if let Some(i) = lengths.iter().position(|&l| l != first) {
        return Err(IoError::Value {
            path: path.to_path_buf(),
            column: name.to_string(),
            row: first_row + i as u64,
            message: format!("list of length {}, earlier rows have {first}", lengths[i]),
        });
    }
    Ok(first)
}

/// Normalises an image struct column to `{bytes: Binary, path: Utf8}`.
fn canonical_image(path: &Path, name: &str, array: ArrayRef) -> Result<ArrayRef> {
    let s = array.as_struct();
    let len = s.len();
    let bytes = s
        .column_by_name("bytes")
        .expect("validated image struct has bytes")
        .clone();
    let bytes = cast(&bytes, &DataType::Binary).map_err(|e| IoError::arrow(path, e))?;
    let paths = match s.column_by_name("path") {
        Some(p) => cast(p, &DataType::Utf8).map_err(|e| IoError::arrow(path, e))?,
        None => arrow::array::new_null_array(&DataType::Utf8, len),
    };
    let out =
        arrow::array::StructArray::try_new(image_fields(), vec![bytes, paths], s.nulls().cloned())
            .map_err(|e| IoError::ColumnType {
                path: path.to_path_buf(),
                column: name.to_string(),
                expected: ColumnType::Image.describe(),
                actual: format!("{} ({e})", array.data_type()),
            })?;
    Ok(Arc::new(out))
}
