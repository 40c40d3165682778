//! A dataset decoded once into memory: 8-bit pixels of one fixed shape, with ids and labels.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sela_io::dataset::{DatasetBatch, DatasetFile};

use crate::codec;

/// An error loading images from a dataset file.
#[derive(Debug, thiserror::Error)]
pub enum ImageSetError {
    #[error(transparent)]
    Io(#[from] sela_io::IoError),
    #[error("{}: row {row} (id {id}): {message}", path.display())]
    Image {
        path: PathBuf,
        row: u64,
        id: u64,
        message: String,
    },
    #[error("{}: the dataset has no rows", path.display())]
    Empty { path: PathBuf },
}

/// Decoded images, all `channels`×`height`×`width`, stored HWC per image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// Dataset ids, in file order.
    pub ids: Vec<u64>,
    /// Ground-truth labels, when known.
    pub labels: Vec<Option<i64>>,
    /// Class names from the dataset's metadata.
    pub class_names: Vec<String>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `len() * height * width * channels` bytes.
    pub pixels: Vec<u8>,
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The HWC pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Decodes every image of a dataset file in parallel. Every image must decode and have the
    /// expected size; colour images are converted to `channels`.
    pub fn load(
        path: &Path,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<Self, ImageSetError> {
        Self::load_where(path, channels, height, width, |_| true)
    }

    /// Like [`ImageSet::load`], keeping only rows whose id satisfies `keep` (e.g. one shard).
    pub fn load_where(
        path: &Path,
        channels: usize,
        height: usize,
        width: usize,
        keep: impl Fn(u64) -> bool + Sync,
    ) -> Result<Self, ImageSetError> {
        let file = DatasetFile::open(path)?;
        let class_names = file.class_names.clone();
        let mut set = ImageSet {
            ids: Vec::new(),
            labels: Vec::new(),
            class_names,
            channels,
            height,
            width,
            pixels: Vec::new(),
        };
        let mut row0 = 0u64;
        for batch in file.batches(8192)? {
            let batch = batch?;
            let rows: Vec<usize> = (0..batch.len())
                .filter(|&i| keep(batch.ids().value(i)))
                .collect();
            let pixels = decode_rows(path, &batch, row0, &rows, channels, height, width)?;
            set.pixels.extend_from_slice(&pixels);
            for &i in &rows {
                set.ids.push(batch.ids().value(i));
                set.labels.push(batch.label(i));
            }
            row0 += batch.len() as u64;
        }
        if set.ids.is_empty() && row0 == 0 {
            return Err(ImageSetError::Empty {
                path: path.to_path_buf(),
            });
        }
        if let Some(dup) = sela_io::parts::find_duplicate_id(&set.ids) {
            return Err(ImageSetError::Image {
                path: path.to_path_buf(),
                row: 0,
                id: dup,
                message: "id occurs more than once".to_string(),
            });
        }
        Ok(set)
    }
}

/// Decodes rows `rows` of a dataset batch (whose first row is row `row0` of `path`) in parallel
/// into concatenated HWC pixels, checking every image decodes to `width`×`height`.
pub fn decode_rows(
    path: &Path,
    batch: &DatasetBatch,
    row0: u64,
    rows: &[usize],
    channels: usize,
    height: usize,
    width: usize,
) -> Result<Vec<u8>, ImageSetError> {
    let decoded: Vec<Result<Vec<u8>, ImageSetError>> = rows
        .par_iter()
        .map(|&i| {
            let bad = |message: String| ImageSetError::Image {
                path: path.to_path_buf(),
                row: row0 + i as u64,
                id: batch.ids().value(i),
                message,
            };
            if batch.image_missing(i) {
                return Err(bad("no image bytes".to_string()));
            }
            let p = codec::decode(batch.image_bytes(i), channels)
                .map_err(|e| bad(format!("cannot decode image: {e}")))?;
            if p.width != width || p.height != height {
                return Err(bad(format!(
                    "image is {}×{}, the pipeline expects {}×{} (data.width × data.height); \
                     re-ingest with --resize {}x{}",
                    p.width, p.height, width, height, width, height
                )));
            }
            Ok(p.data)
        })
        .collect();
    let mut out = Vec::with_capacity(rows.len() * channels * height * width);
    for pixels in decoded {
        out.extend_from_slice(&pixels?);
    }
    Ok(out)
}
