//! The one error type of the I/O layer. Every variant names the file it is about, and its message
//! carries the underlying cause itself (it is not also exposed as `source()`, so error chains
//! print it once).

use std::path::PathBuf;

/// An error reading or writing one of sela's files.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The file could not be opened, created, renamed or read at the OS level.
    #[error("{}: {cause}", path.display())]
    Os {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The file is not a readable Parquet file (wrong magic, truncated footer, corrupt page).
    #[error("{}: not a readable Parquet file: {cause}", path.display())]
    Parquet {
        path: PathBuf,
        cause: parquet::errors::ParquetError,
    },
    /// An Arrow-level failure while decoding or casting a batch.
    #[error("{}: {cause}", path.display())]
    Arrow {
        path: PathBuf,
        cause: arrow::error::ArrowError,
    },
    /// A required column is absent.
    #[error("{}: missing column `{column}` (expected {expected}); found columns: {found}", path.display())]
    MissingColumn {
        path: PathBuf,
        column: String,
        expected: String,
        found: String,
    },
    /// A column has a type that cannot be read as the contract's type.
    #[error("{}: column `{column}` has type {actual}, expected {expected}", path.display())]
    ColumnType {
        path: PathBuf,
        column: String,
        expected: String,
        actual: String,
    },
    /// The file was written for another table (its `sela.table` metadata says so).
    #[error("{}: this is a `{actual}` table, expected a `{expected}` table", path.display())]
    WrongTable {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// The file's schema version is newer or older than this build understands.
    #[error("{}: `{table}` schema version {actual}, this build reads version {expected}", path.display())]
    SchemaVersion {
        path: PathBuf,
        table: String,
        expected: u32,
        actual: String,
    },
    /// A key-value metadata entry is missing or malformed.
    #[error("{}: metadata `{key}`: {message}", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A value in the data breaks the contract (a null id, a NaN logit, a list of the wrong length).
    #[error("{}: column `{column}`, row {row}: {message}", path.display())]
    Value {
        path: PathBuf,
        column: String,
        row: u64,
        message: String,
    },
    /// A set of part files is incomplete or inconsistent.
    #[error("{}: {message}", path.display())]
    Parts { path: PathBuf, message: String },
}

impl IoError {
    pub(crate) fn os(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError::Os {
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        IoError::Parquet {
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn arrow(path: impl Into<PathBuf>, source: arrow::error::ArrowError) -> Self {
        IoError::Arrow {
            path: path.into(),
            cause: source,
        }
    }
}

/// Result alias for the I/O layer.
pub type Result<T, E = IoError> = std::result::Result<T, E>;
