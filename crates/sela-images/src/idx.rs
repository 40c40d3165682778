//! The IDX format of MNIST and Fashion-MNIST (`*-idx3-ubyte` images, `*-idx1-ubyte` labels),
//! plain or gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};

/// An error reading an IDX file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not an IDX {what} file: magic number {found:#010x}, expected {expected:#010x}", path.display())]
    Magic {
        path: PathBuf,
        what: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("{}: truncated: the header promises {expected} bytes of data, the file has {actual}", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: {actual} trailing bytes after the {expected} promised by the header", path.display())]
    Trailing {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
}

/// Images from an IDX file: `count` gray images of `rows`×`cols`, row-major, one byte a pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads a whole file, transparently gunzipping it when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, IdxError> {
    let raw = std::fs::read(path).map_err(|source| IdxError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|source| IdxError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    source.kind(),
                    format!("corrupt gzip stream: {source}"),
                ),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn header(
    path: &Path,
    bytes: &[u8],
    what: &'static str,
    magic: u32,
    dims: usize,
) -> Result<Vec<usize>, IdxError> {
    let need = 4 + 4 * dims;
    if bytes.len() < 4 {
        return Err(IdxError::Truncated {
            path: path.to_path_buf(),
            expected: need as u64,
            actual: bytes.len() as u64,
        });
    }
    let found = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if found != magic {
        return Err(IdxError::Magic {
            path: path.to_path_buf(),
            what,
            found,
            expected: magic,
        });
    }
    if bytes.len() < need {
        return Err(IdxError::Truncated {
            path: path.to_path_buf(),
            expected: need as u64,
            actual: bytes.len() as u64,
        });
    }
    Ok((0..dims)
        .map(|d| {
            u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().expect("4 bytes")) as usize
        })
        .collect())
}

fn check_len(path: &Path, have: usize, expected: usize) -> Result<(), IdxError> {
    match have.cmp(&expected) {
        std::cmp::Ordering::Less => Err(IdxError::Truncated {
            path: path.to_path_buf(),
            expected: expected as u64,
            actual: have as u64,
        }),
        std::cmp::Ordering::Greater => Err(IdxError::Trailing {
            path: path.to_path_buf(),
            expected: expected as u64,
            actual: (have - expected) as u64,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Reads an `idx3-ubyte` image file.
pub fn read_images(path: &Path) -> Result<IdxImages, IdxError> {
    let bytes = read_maybe_gz(path)?;
    let dims = header(path, &bytes, "image", IMAGES_MAGIC, 3)?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    let data = &bytes[16..];
    check_len(path, data.len(), count * rows * cols)?;
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: data.to_vec(),
    })
}

/// Reads an `idx1-ubyte` label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, IdxError> {
    let bytes = read_maybe_gz(path)?;
    let dims = header(path, &bytes, "label", LABELS_MAGIC, 1)?;
    let data = &bytes[8..];
    check_len(path, data.len(), dims[0])?;
    Ok(data.to_vec())
}

/// Encodes images as an IDX image file (uncompressed); used by tests and tools.
pub fn encode_images(images: &IdxImages) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + images.pixels.len());
    out.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
    for d in [images.count, images.rows, images.cols] {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(&images.pixels);
    out
}

/// Encodes labels as an IDX label file (uncompressed).
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IdxImages {
        IdxImages {
            count: 3,
            rows: 2,
            cols: 2,
            pixels: (0..12).collect(),
        }
    }

    #[test]
    fn round_trip_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("x-images-idx3-ubyte");
        std::fs::write(&plain, encode_images(&sample())).unwrap();
        assert_eq!(read_images(&plain).unwrap(), sample());

        let gz = dir.path().join("x-images-idx3-ubyte.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &encode_images(&sample())).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_images(&gz).unwrap(), sample());

        let labels = dir.path().join("y");
        std::fs::write(&labels, encode_labels(&[1, 2, 3])).unwrap();
        assert_eq!(read_labels(&labels).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn bad_magic_truncation_and_trailing_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, encode_labels(&[1, 2])).unwrap();
        let msg = read_images(&p).unwrap_err().to_string();
        assert!(msg.contains("magic number 0x00000801"), "{msg}");

        let mut bytes = encode_images(&sample());
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&p, &bytes).unwrap();
        let msg = read_images(&p).unwrap_err().to_string();
        assert!(
            msg.contains("truncated") && msg.contains("12 bytes"),
            "{msg}"
        );

        let mut bytes = encode_labels(&[1, 2]);
        bytes.push(9);
        std::fs::write(&p, &bytes).unwrap();
        assert!(read_labels(&p)
            .unwrap_err()
            .to_string()
            .contains("trailing"));

        std::fs::write(&p, [0u8, 0]).unwrap();
        assert!(read_labels(&p)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }
}
