//! Key-value metadata carried by every file sela writes: which table it is, the schema version,
//! and where it came from (provenance). Readable with `pyarrow.parquet.read_metadata(f).metadata`,
//! polars' `read_parquet_metadata` or DuckDB's `parquet_kv_metadata`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{IoError, Result};

/// Metadata key holding the table name (`dataset`, `features`, `labels`, ...).
pub const KEY_TABLE: &str = "sela.table";
/// Metadata key holding the table's schema version.
pub const KEY_SCHEMA_VERSION: &str = "sela.schema_version";
/// Metadata key holding the JSON-encoded [`Provenance`].
pub const KEY_PROVENANCE: &str = "sela.provenance";

/// Where a file came from: the stage that wrote it, the round, the pipeline config's hash and the
/// files it was computed from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The stage binary that wrote the file, e.g. `sela-assign`.
    pub stage: String,
    /// The version of sela that wrote it.
    pub sela_version: String,
    /// The self-labeling round, when the file belongs to one.
    pub round: Option<u32>,
    /// The pipeline config's hash, when a pipeline config was used.
    pub config_hash: Option<String>,
    /// The input files, as given on the command line.
    pub inputs: Vec<String>,
}

impl Provenance {
    /// Provenance for `stage` with this build's version.
    pub fn new(stage: impl Into<String>) -> Self {
        Provenance {
            stage: stage.into(),
            sela_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }
    }

    /// Sets the round.
    pub fn round(mut self, round: Option<u32>) -> Self {
        self.round = round;
        self
    }

    /// Sets the config hash.
    pub fn config_hash(mut self, hash: Option<String>) -> Self {
        self.config_hash = hash;
        self
    }

    /// Adds an input path.
    pub fn input(mut self, path: impl AsRef<Path>) -> Self {
        self.inputs.push(path.as_ref().display().to_string());
        self
    }
}

/// The full key-value metadata of a sela file: the standard keys plus table-specific entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileMeta {
    /// Table name, when the file was written by sela.
    pub table: Option<String>,
    /// Schema version, when the file was written by sela.
    pub schema_version: Option<String>,
    /// Provenance, when the file was written by sela.
    pub provenance: Option<Provenance>,
    /// Every other key-value pair (table-specific keys, other tools' keys).
    pub extra: BTreeMap<String, String>,
}

impl FileMeta {
    /// Metadata for a new file of `table` at `version`.
    pub fn new(table: &str, version: u32, provenance: Provenance) -> Self {
        FileMeta {
            table: Some(table.to_string()),
            schema_version: Some(version.to_string()),
            provenance: Some(provenance),
            extra: BTreeMap::new(),
        }
    }

    /// Adds a table-specific entry whose value is JSON-encoded.
    pub fn with_json<T: Serialize>(mut self, key: &str, value: &T) -> Self {
        self.extra.insert(
            key.to_string(),
            serde_json::to_string(value).expect("metadata values serialize"),
        );
        self
    }

    /// Adds a raw string entry.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    /// Decodes the JSON entry `key`, if present.
    pub fn json<T: for<'de> Deserialize<'de>>(&self, path: &Path, key: &str) -> Result<Option<T>> {
        match self.extra.get(key) {
            None => Ok(None),
            Some(raw) => serde_json::from_str(raw)
                .map(Some)
                .map_err(|e| IoError::Metadata {
                    path: path.to_path_buf(),
                    key: key.to_string(),
                    message: format!("not valid JSON for this key: {e}"),
                }),
        }
    }

    /// Decodes the JSON entry `key`, failing when absent.
    pub fn require_json<T: for<'de> Deserialize<'de>>(&self, path: &Path, key: &str) -> Result<T> {
        self.json(path, key)?.ok_or_else(|| IoError::Metadata {
            path: path.to_path_buf(),
            key: key.to_string(),
            message: "missing".to_string(),
        })
    }

    /// As Parquet key-value pairs, in a stable order.
    pub fn to_key_values(&self) -> Vec<parquet::file::metadata::KeyValue> {
        let mut kv = Vec::new();
        if let Some(t) = &self.table {
            kv.push(parquet::file::metadata::KeyValue::new(
                KEY_TABLE.to_string(),
                t.clone(),
            ));
        }
        if let Some(v) = &self.schema_version {
            kv.push(parquet::file::metadata::KeyValue::new(
                KEY_SCHEMA_VERSION.to_string(),
                v.clone(),
            ));
        }
        if let Some(p) = &self.provenance {
            kv.push(parquet::file::metadata::KeyValue::new(
                KEY_PROVENANCE.to_string(),
                serde_json::to_string(p).expect("provenance serializes"),
            ));
        }
        for (k, v) in &self.extra {
            kv.push(parquet::file::metadata::KeyValue::new(k.clone(), v.clone()));
        }
        kv
    }

    /// Parses the key-value pairs of a Parquet footer.
    pub fn from_key_values(
        path: &Path,
        kv: Option<&Vec<parquet::file::metadata::KeyValue>>,
    ) -> Result<Self> {
        let mut meta = FileMeta::default();
        for entry in kv.into_iter().flatten() {
            let value = entry.value.clone().unwrap_or_default();
            match entry.key.as_str() {
                KEY_TABLE => meta.table = Some(value),
                KEY_SCHEMA_VERSION => meta.schema_version = Some(value),
                KEY_PROVENANCE => {
                    meta.provenance =
                        Some(serde_json::from_str(&value).map_err(|e| IoError::Metadata {
                            path: path.to_path_buf(),
                            key: KEY_PROVENANCE.to_string(),
                            message: format!("not valid provenance JSON: {e}"),
                        })?)
                }
                // Arrow's own schema copy is an implementation detail of the writer.
                "ARROW:schema" => {}
                key => {
                    meta.extra.insert(key.to_string(), value);
                }
            }
        }
        Ok(meta)
    }
}
