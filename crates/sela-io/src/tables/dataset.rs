//! The dataset table: one row per image, in the Hugging Face image-Parquet layout.
//!
//! | column | type | |
//! |---|---|---|
//! | `id` | UInt64, unique | stable row identity used by every later table |
//! | `image` | Struct{bytes: Binary, path: Utf8} | encoded PNG/JPEG bytes and the image's origin |
//! | `label` | Int64, nullable | ground-truth class index, when known |
//!
//! Metadata: `sela.class_names` (JSON list) and `huggingface` (the `datasets` features
//! description, so `datasets.load_dataset("parquet", ...)` decodes `image` as an Image).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, Int64Array, Int64Builder, RecordBatch,
    StringArray, StringBuilder, StructArray, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{Schema, SchemaRef, UInt64Type};

use crate::contract::{image_fields, Column, ColumnType, Contract};
use crate::error::Result;
use crate::meta::{FileMeta, Provenance};
use crate::table::{TableFile, TableWriter};

/// Table name.
pub const TABLE: &str = "dataset";
/// Schema version.
pub const VERSION: u32 = 1;
/// Metadata key: JSON list of class names, index = label.
pub const KEY_CLASS_NAMES: &str = "sela.class_names";
/// Metadata key read by Hugging Face `datasets`.
pub const KEY_HUGGINGFACE: &str = "huggingface";

/// The dataset contract.
pub fn contract() -> Contract {
    Contract {
        table: TABLE,
        version: VERSION,
        columns: vec![
            Column::required("id", ColumnType::UInt64),
            Column::required("image", ColumnType::Image),
            Column::nullable("label", ColumnType::Int64),
        ],
    }
}

/// The metadata of a dataset file.
pub fn file_meta(class_names: &[String], provenance: Provenance) -> FileMeta {
    let label = if class_names.is_empty() {
        serde_json::json!({"dtype": "int64", "_type": "Value"})
    } else {
        serde_json::json!({"names": class_names, "_type": "ClassLabel"})
    };
    let hf = serde_json::json!({"info": {"features": {
        "id": {"dtype": "uint64", "_type": "Value"},
        "image": {"_type": "Image"},
        "label": label,
    }}});
    FileMeta::new(TABLE, VERSION, provenance)
        .with_json(KEY_CLASS_NAMES, &class_names)
        .with(KEY_HUGGINGFACE, hf.to_string())
}

/// Class names recorded in a file's metadata: sela's own key, else a Hugging Face ClassLabel.
pub fn class_names(path: &Path, meta: &FileMeta) -> Result<Vec<String>> {
    if let Some(names) = meta.json::<Vec<String>>(path, KEY_CLASS_NAMES)? {
        return Ok(names);
    }
    let hf: Option<serde_json::Value> = meta.json(path, KEY_HUGGINGFACE)?;
    let names = hf
        .as_ref()
        .and_then(|v| v.pointer("/info/features/label/names"))
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(names)
}

/// Writes a dataset file row by row, atomically.
pub struct DatasetWriter {
    out: TableWriter,
    ids: UInt64Builder,
    bytes: BinaryBuilder,
    paths: StringBuilder,
    labels: Int64Builder,
    pending: usize,
}

const ROWS_PER_BATCH: usize = 4096;

impl DatasetWriter {
    /// Starts writing `target`.
    pub fn create(
        target: impl AsRef<Path>,
        class_names: &[String],
        provenance: Provenance,
    ) -> Result<Self> {
        let meta = file_meta(class_names, provenance);
        let out = TableWriter::create(target, schema(), &meta, 16 * 1024)?;
        Ok(DatasetWriter {
            out,
            ids: UInt64Builder::new(),
            bytes: BinaryBuilder::new(),
            paths: StringBuilder::new(),
            labels: Int64Builder::new(),
            pending: 0,
        })
    }

    /// Appends one image.
    pub fn push(
        &mut self,
        id: u64,
        encoded: &[u8],
        origin: Option<&str>,
        label: Option<i64>,
    ) -> Result<()> {
        self.ids.append_value(id);
        self.bytes.append_value(encoded);
        self.paths.append_option(origin);
        self.labels.append_option(label);
        self.pending += 1;
        if self.pending >= ROWS_PER_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        self.pending = 0;
        let image = StructArray::new(
            image_fields(),
            vec![
                Arc::new(self.bytes.finish()) as ArrayRef,
                Arc::new(self.paths.finish()) as ArrayRef,
            ],
            None,
        );
        let batch = RecordBatch::try_new(
            self.out.schema().clone(),
            vec![
                Arc::new(self.ids.finish()),
                Arc::new(image),
                Arc::new(self.labels.finish()),
            ],
        )
        .expect("dataset batch matches its schema");
        self.out.write(&batch)
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.out.rows() + self.pending as u64
    }

    /// Publishes the file.
    pub fn finish(mut self) -> Result<std::path::PathBuf> {
        self.flush()?;
        self.out.finish()
    }
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(contract().schema().fields().clone()))
}

/// A validated dataset file.
pub struct DatasetFile {
    /// The underlying table.
    pub table: TableFile,
    /// Class names, index = label (empty when unknown).
    pub class_names: Vec<String>,
}

impl DatasetFile {
    /// Opens and validates a dataset file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let table = TableFile::open(path.as_ref(), &contract())?;
        let class_names = class_names(table.path(), table.meta())?;
        Ok(DatasetFile { table, class_names })
    }

    /// Streams batches of rows.
    pub fn batches(self, batch_size: usize) -> Result<impl Iterator<Item = Result<DatasetBatch>>> {
        Ok(self.table.batches(batch_size)?.map(|b| b.map(DatasetBatch)))
    }

    /// Reads only the `id` and `label` columns.
    pub fn ids_and_labels(self) -> Result<(Vec<u64>, Vec<Option<i64>>)> {
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        for batch in self.table.batches_of(64 * 1024, Some(&["id", "label"]))? {
            let batch = batch?;
            ids.extend(batch.column(0).as_primitive::<UInt64Type>().values().iter());
            let l = batch
                .column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("canonical label");
            labels.extend(l.iter());
        }
        Ok((ids, labels))
    }
}

/// A batch of dataset rows with typed accessors.
pub struct DatasetBatch(pub RecordBatch);

impl DatasetBatch {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.0.num_rows()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.0.num_rows() == 0
    }

    /// The ids.
    pub fn ids(&self) -> &UInt64Array {
        self.0.column(0).as_primitive::<UInt64Type>()
    }

    fn image(&self) -> &StructArray {
        self.0.column(1).as_struct()
    }

    /// The encoded image bytes of row `i`.
    pub fn image_bytes(&self, i: usize) -> &[u8] {
        let bytes: &BinaryArray = self.image().column(0).as_binary();
        bytes.value(i)
    }

    /// Whether row `i` has no image bytes.
    pub fn image_missing(&self, i: usize) -> bool {
        self.image().is_null(i) || self.image().column(0).is_null(i)
    }

    /// The origin path of row `i`, when recorded.
    pub fn image_path(&self, i: usize) -> Option<&str> {
        let paths: &StringArray = self.image().column(1).as_string();
        (!paths.is_null(i)).then(|| paths.value(i))
    }

    /// The label of row `i`, when known.
    pub fn label(&self, i: usize) -> Option<i64> {
        let l = self
            .0
            .column(2)
            .as_primitive::<arrow::datatypes::Int64Type>();
        (!l.is_null(i)).then(|| l.value(i))
    }
}
