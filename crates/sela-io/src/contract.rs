//! Column types and table contracts: what a table must contain, and how a file is checked
//! against it before any row is used.

use std::path::Path;

use arrow::datatypes::{DataType, Field, Fields, Schema};

use crate::error::{IoError, Result};

/// The logical type of a contract column. Readers accept a few physical variants of each (the
/// ones other tools commonly write) and cast them to the canonical Arrow type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// Unsigned 64-bit integer; any integer type is accepted (negative values are rejected when read).
    UInt64,
    /// Unsigned 32-bit integer; any integer type is accepted.
    UInt32,
    /// Signed 64-bit integer; any integer type is accepted.
    Int64,
    /// 32-bit float; Float16/32/64 accepted.
    Float32,
    /// 64-bit float; Float16/32/64 accepted.
    Float64,
    /// UTF-8 string (Utf8, LargeUtf8 or Utf8View).
    Utf8,
    /// Timestamp in milliseconds, UTC.
    TimestampMs,
    /// A fixed-length vector of f32: canonical FixedSizeList<Float32, len>; List and LargeList of
    /// Float32/Float64 are accepted when every row has the same length.
    F32Vector(Option<usize>),
    /// The Hugging Face image struct `{bytes: binary, path: string}`.
    Image,
}

impl ColumnType {
    /// The canonical Arrow type written by sela.
    pub fn arrow_type(self) -> DataType {
        match self {
            ColumnType::UInt64 => DataType::UInt64,
            ColumnType::UInt32 => DataType::UInt32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float32 => DataType::Float32,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::TimestampMs => {
                DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()))
            }
            ColumnType::F32Vector(len) => DataType::FixedSizeList(
                std::sync::Arc::new(Field::new_list_field(DataType::Float32, false)),
                len.unwrap_or(0) as i32,
            ),
            ColumnType::Image => DataType::Struct(image_fields()),
        }
    }

    /// Human-readable description used in error messages.
    pub fn describe(self) -> String {
        match self {
            ColumnType::F32Vector(Some(n)) => format!("FixedSizeList<Float32, {n}>"),
            ColumnType::F32Vector(None) => "FixedSizeList<Float32, K>".to_string(),
            ColumnType::Image => "Struct{bytes: Binary, path: Utf8}".to_string(),
            other => format!("{:?}", other.arrow_type()),
        }
    }

    /// Whether a column of type `actual` can be read as this type.
    pub fn accepts(self, actual: &DataType) -> bool {
        match self {
            ColumnType::UInt64 | ColumnType::UInt32 | ColumnType::Int64 => actual.is_integer(),
            ColumnType::Float32 | ColumnType::Float64 => actual.is_floating(),
            ColumnType::Utf8 => matches!(
                actual,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ),
            ColumnType::TimestampMs => matches!(actual, DataType::Timestamp(_, _)),
            ColumnType::F32Vector(len) => match actual {
                DataType::FixedSizeList(f, n) => {
                    f.data_type().is_floating() && len.is_none_or(|l| l == *n as usize)
                }
                DataType::List(f) | DataType::LargeList(f) => f.data_type().is_floating(),
                _ => false,
            },
            ColumnType::Image => match actual {
                DataType::Struct(fields) => {
                    let bytes = fields.iter().find(|f| f.name() == "bytes");
                    bytes.is_some_and(|f| {
                        matches!(
                            f.data_type(),
                            DataType::Binary | DataType::LargeBinary | DataType::BinaryView
                        )
                    })
                }
                _ => false,
            },
        }
    }
}

/// The child fields of the Hugging Face image struct.
pub fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// One column of a contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    pub nullable: bool,
}

impl Column {
    /// A non-nullable column.
    pub fn required(name: impl Into<String>, ty: ColumnType) -> Self {
        Column {
            name: name.into(),
            ty,
            nullable: false,
        }
    }

    /// A nullable column.
    pub fn nullable(name: impl Into<String>, ty: ColumnType) -> Self {
        Column {
            name: name.into(),
            ty,
            nullable: true,
        }
    }

    /// The canonical Arrow field.
    pub fn field(&self) -> Field {
        Field::new(&self.name, self.ty.arrow_type(), self.nullable)
    }
}

/// A table contract: its name (stored in the file's `sela.table` metadata), its schema version and
/// its columns. Files may carry extra columns; they are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contract {
    pub table: &'static str,
    pub version: u32,
    pub columns: Vec<Column>,
}

impl Contract {
    /// The canonical Arrow schema (without metadata).
    pub fn schema(&self) -> Schema {
        Schema::new(self.columns.iter().map(Column::field).collect::<Vec<_>>())
    }

    /// Checks that `schema` (read from `path`) has every contract column with an acceptable type.
    pub fn validate(&self, path: &Path, schema: &Schema) -> Result<()> {
        for col in &self.columns {
            let Ok(field) = schema.field_with_name(&col.name) else {
                let found = schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(IoError::MissingColumn {
                    path: path.to_path_buf(),
                    column: col.name.clone(),
                    expected: col.ty.describe(),
                    found,
                });
            };
            if !col.ty.accepts(field.data_type()) {
                return Err(IoError::ColumnType {
                    path: path.to_path_buf(),
                    column: col.name.clone(),
                    expected: col.ty.describe(),
                    actual: format!("{}", field.data_type()),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_column_expected_and_actual() {
        let contract = Contract {
            table: "t",
            version: 1,
            columns: vec![
                Column::required("id", ColumnType::UInt64),
                Column::required("x", ColumnType::F32Vector(Some(3))),
            ],
        };
        let ok = contract.schema();
        contract.validate(Path::new("f.parquet"), &ok).unwrap();

        let wrong = Schema::new(vec![
            Field::new("id", DataType::UInt64, false),
            Field::new("x", DataType::Utf8, false),
        ]);
        let msg = contract
            .validate(Path::new("f.parquet"), &wrong)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("f.parquet") && msg.contains("`x`"), "{msg}");
        assert!(
            msg.contains("FixedSizeList<Float32, 3>") && msg.contains("Utf8"),
            "{msg}"
        );

        let missing = Schema::new(vec![Field::new("x", DataType::Utf8, false)]);
        let msg = contract
            .validate(Path::new("f.parquet"), &missing)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing column `id`"), "{msg}");
    }

    #[test]
    fn vector_length_is_checked_and_lists_are_accepted() {
        let t = ColumnType::F32Vector(Some(4));
        assert!(!t.accepts(&ColumnType::F32Vector(Some(5)).arrow_type()));
        assert!(t.accepts(&ColumnType::F32Vector(Some(4)).arrow_type()));
        let list = DataType::List(std::sync::Arc::new(Field::new_list_field(
            DataType::Float64,
            true,
        )));
        assert!(t.accepts(&list));
        assert!(!t.accepts(&DataType::Float32));
    }
}
