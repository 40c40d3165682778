//! The ingestion stage: reads the common image dataset formats into sela's canonical dataset
//! table (`sela_io::dataset`): IDX files as MNIST and Fashion-MNIST ship them, a folder of class
//! sub-folders (torchvision's ImageFolder convention), or an existing Hugging Face image Parquet.
//!
//! Every image is decoded once to validate it; a corrupt image, a truncated file or a count
//! mismatch is an error naming the file, and nothing is written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use sela_images::codec::{self, Pixels};
use sela_images::idx;
use sela_io::contract::{Column, ColumnType, Contract};
use sela_io::dataset::{self, DatasetWriter};
use sela_io::table::TableFile;
use sela_io::Provenance;
use serde::Serialize;

const STAGE: &str = "sela-ingest";

/// What an ingestion wrote.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IngestSummary {
    /// The dataset file written.
    pub output: PathBuf,
    /// Rows written.
    pub rows: u64,
    /// Rows with a label.
    pub labelled: u64,
    /// Class names recorded.
    pub classes: Vec<String>,
}

/// A target size for `--resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: usize,
    pub height: usize,
}

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (w, h) = s
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("expected WIDTHxHEIGHT, e.g. 32x32, got `{s}`"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("`{v}` is not a positive integer"))
        };
        Ok(Size {
            width: parse(w)?,
            height: parse(h)?,
        })
    }
}

/// Options for IDX ingestion.
#[derive(Debug, Clone, Default)]
pub struct IdxOptions {
    /// Keep only the first `n` images of each class (a class-balanced subset, in file order).
    pub per_class: Option<usize>,
    /// Keep only the first `n` images.
    pub limit: Option<usize>,
    /// Class names, index = label.
    pub class_names: Vec<String>,
    /// No progress display.
    pub quiet: bool,
}

/// Ingests an IDX image file (and optionally its label file). Row `i` of the IDX file gets id `i`
/// and the origin `<file name>#<i>`, so every row can be traced back to its source record.
pub fn ingest_idx(
    images: &Path,
    labels: Option<&Path>,
    output: &Path,
    opts: &IdxOptions,
) -> Result<IngestSummary> {
    let imgs = idx::read_images(images)?;
    let labs = labels.map(idx::read_labels).transpose()?;
    if let (Some(l), Some(path)) = (&labs, labels) {
        if l.len() != imgs.count {
            bail!(
                "{} has {} labels but {} has {} images",
                path.display(),
                l.len(),
                images.display(),
                imgs.count
            );
        }
    }
    if opts.per_class.is_some() && labs.is_none() {
        bail!("--per-class needs --labels");
    }
    if let (Some(l), false) = (&labs, opts.class_names.is_empty()) {
        if let Some((i, &c)) = l
            .iter()
            .enumerate()
            .find(|(_, &c)| c as usize >= opts.class_names.len())
        {
            bail!(
                "{}: record {i} has label {c}, but only {} class names were given",
                labels.expect("labels given").display(),
                opts.class_names.len()
            );
        }
    }
    let mut keep: Vec<usize> = (0..imgs.count).collect();
    if let (Some(n), Some(l)) = (opts.per_class, &labs) {
        let mut taken = [0usize; 256];
        keep.retain(|&i| {
            let c = l[i] as usize;
            taken[c] += 1;
            taken[c] <= n
        });
    }
    if let Some(n) = opts.limit {
        keep.truncate(n);
    }
    let source = images
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let provenance = Provenance::new(STAGE).input(images);
    let provenance = match labels {
        Some(l) => provenance.input(l),
        None => provenance,
    };
    let mut writer = DatasetWriter::create(output, &opts.class_names, provenance)?;
    let mut progress =
        sela_cli::Progress::new("ingest", Some(keep.len() as u64), "images", opts.quiet);
    let mut labelled = 0;
    for chunk in keep.chunks(4096) {
        let encoded: Vec<Vec<u8>> = chunk
            .par_iter()
            .map(|&i| {
                codec::encode_png(&Pixels {
                    width: imgs.cols,
                    height: imgs.rows,
                    channels: 1,
                    data: imgs.image(i).to_vec(),
                })
                .expect("PNG encoding of in-memory pixels cannot fail")
            })
            .collect();
        for (&i, png) in chunk.iter().zip(&encoded) {
            let label = labs.as_ref().map(|l| l[i] as i64);
            labelled += u64::from(label.is_some());
            writer.push(i as u64, png, Some(&format!("{source}#{i}")), label)?;
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    let rows = writer.rows();
    let output = writer.finish()?;
    Ok(IngestSummary {
        output,
        rows,
        labelled,
        classes: opts.class_names.clone(),
    })
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Ingests a folder of class sub-folders: `ROOT/<class>/<image>.{png,jpg,jpeg}`. Classes are the
/// sub-folder names in sorted order (label = position), images are taken in sorted order; ids
/// count up from 0 in that order. Images are stored as they are (their original bytes) unless
/// `resize` is given, in which case they are decoded, resized and stored as PNG.
pub fn ingest_image_folder(
    root: &Path,
    output: &Path,
    resize: Option<Size>,
    quiet: bool,
) -> Result<IngestSummary> {
    let mut classes: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(root)
        .with_context(|| format!("{}: cannot read the folder", root.display()))?
    {
        let entry = entry.with_context(|| format!("{}: cannot read the folder", root.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && !name.starts_with('.') {
            classes.push(name);
        }
    }
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{}: no class sub-folders found (expected ROOT/<class>/<image>.png)",
            root.display()
        );
    }
    let mut files: Vec<(PathBuf, i64)> = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let mut in_class: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("{}: cannot read the folder", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image_file(p))
            .collect();
        in_class.sort();
        files.extend(in_class.into_iter().map(|p| (p, label as i64)));
    }
    if files.is_empty() {
        bail!(
            "{}: the class folders hold no .png/.jpg/.jpeg files",
            root.display()
        );
    }
    let mut writer = DatasetWriter::create(output, &classes, Provenance::new(STAGE).input(root))?;
    let mut progress = sela_cli::Progress::new("ingest", Some(files.len() as u64), "images", quiet);
    for (chunk_index, chunk) in files.chunks(1024).enumerate() {
        let encoded: Vec<Result<Vec<u8>>> = chunk
            .par_iter()
            .map(|(path, _)| {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("{}: cannot read", path.display()))?;
                let native = codec::native_channels(&bytes).with_context(|| {
                    format!("{}: not a decodable PNG/JPEG image", path.display())
                })?;
                match resize {
                    None => Ok(bytes),
                    Some(size) => {
                        let p = codec::decode(&bytes, native).with_context(|| {
                            format!("{}: not a decodable PNG/JPEG image", path.display())
                        })?;
                        Ok(codec::encode_png(&codec::resize(
                            &p,
                            size.width,
                            size.height,
                        ))?)
                    }
                }
            })
            .collect();
        for (i, ((path, label), bytes)) in chunk.iter().zip(encoded).enumerate() {
            let id = (chunk_index * 1024 + i) as u64;
            let rel = path
                .strip_prefix(root)
                .unwrap_or(path)
                .to_string_lossy()
                .into_owned();
            writer.push(id, &bytes?, Some(&rel), Some(*label))?;
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    let rows = writer.rows();
    let output = writer.finish()?;
    Ok(IngestSummary {
        output,
        rows,
        labelled: rows,
        classes,
    })
}

/// Ingests a Hugging Face image Parquet file (an `image` struct column of `bytes`/`path`, and
/// optionally an integer `label` and a `id` column). Existing ids are kept (and must be unique and
/// non-negative); otherwise ids are the row numbers. Class names come from the file's Hugging
/// Face metadata when it has a ClassLabel. Every image is decoded to validate it.
pub fn ingest_hf_parquet(
    input: &Path,
    output: &Path,
    image_column: &str,
    label_column: &str,
    quiet: bool,
) -> Result<IngestSummary> {
    let probe = TableFile::open(
        input,
        &Contract {
            table: dataset::TABLE,
            version: dataset::VERSION,
            columns: vec![Column::required(image_column, ColumnType::Image)],
        },
    )?;
    let class_names = dataset::class_names(input, probe.meta())?;
    let has_label = probe.schema().field_with_name(label_column).is_ok();
    let has_id = probe.schema().field_with_name("id").is_ok();
    let mut columns = vec![Column::required(image_column, ColumnType::Image)];
    if has_label {
        columns.push(Column::nullable(label_column, ColumnType::Int64));
    }
    if has_id {
        columns.push(Column::required("id", ColumnType::UInt64));
    }
    let table = TableFile::open(
        input,
        &Contract {
            table: dataset::TABLE,
            version: dataset::VERSION,
            columns,
        },
    )?;
    let mut writer =
        DatasetWriter::create(output, &class_names, Provenance::new(STAGE).input(input))?;
    let mut progress = sela_cli::Progress::new("ingest", Some(table.num_rows()), "images", quiet);
    let mut labelled = 0;
    let mut ids_seen = Vec::new();
    let mut row = 0u64;
    for batch in table.batches(4096)? {
        let batch = dataset::DatasetBatch(reorder(
            batch?,
            image_column,
            has_label.then_some(label_column),
            has_id,
        )?);
        let problems: Vec<Option<String>> = (0..batch.len())
            .into_par_iter()
            .map(|i| {
                if batch.image_missing(i) {
                    return Some("no image bytes".to_string());
                }
                codec::native_channels(batch.image_bytes(i))
                    .err()
                    .map(|e| format!("not a decodable PNG/JPEG image: {e}"))
            })
            .collect();
        for (i, problem) in problems.iter().enumerate() {
            let id = if has_id {
                batch.ids().value(i)
            } else {
                row + i as u64
            };
            if let Some(p) = problem {
                bail!(
                    "{}: row {} (column `{image_column}`): {p}",
                    input.display(),
                    row + i as u64
                );
            }
            let label = batch.label(i);
            if let (Some(l), false) = (label, class_names.is_empty()) {
                if l < 0 || l as usize >= class_names.len() {
                    bail!(
                        "{}: row {}: label {l} is outside the {} class names of the file's metadata",
                        input.display(),
                        row + i as u64,
                        class_names.len()
                    );
                }
            }
            labelled += u64::from(label.is_some());
            ids_seen.push(id);
            writer.push(id, batch.image_bytes(i), batch.image_path(i), label)?;
        }
        row += batch.len() as u64;
        progress.inc(batch.len() as u64);
    }
    progress.finish();
    if let Some(dup) = sela_io::parts::find_duplicate_id(&ids_seen) {
        bail!(
            "{}: column `id`: id {dup} occurs more than once",
            input.display()
        );
    }
    let rows = writer.rows();
    let output = writer.finish()?;
    Ok(IngestSummary {
        output,
        rows,
        labelled,
        classes: class_names,
    })
}

/// Arranges an input batch as the dataset table's (id, image, label) columns.
fn reorder(
    batch: arrow::array::RecordBatch,
    image_column: &str,
    label_column: Option<&str>,
    has_id: bool,
) -> Result<arrow::array::RecordBatch> {
    use arrow::array::{new_null_array, ArrayRef, UInt64Array};
    use std::sync::Arc;
    let n = batch.num_rows();
    let id: ArrayRef = if has_id {
        batch.column_by_name("id").expect("validated").clone()
    } else {
        Arc::new(UInt64Array::from(vec![0u64; n]))
    };
    let image = batch
        .column_by_name(image_column)
        .expect("validated")
        .clone();
    let label = match label_column {
        Some(c) => batch.column_by_name(c).expect("validated").clone(),
        None => new_null_array(&arrow::datatypes::DataType::Int64, n),
    };
    let schema = Arc::new(dataset::contract().schema());
    Ok(arrow::array::RecordBatch::try_new(
        schema,
        vec![id, image, label],
    )?)
}
