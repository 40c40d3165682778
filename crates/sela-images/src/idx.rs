//! The IDX format of MNIST and Fashion-MNIST (`*-idx3-ubyte` images, `*-idx1-ubyte` labels),
//! plain or gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};

/// An error reading an IDX file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("{}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
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
    #[error("{}: header dimensions {dims:?} describe more bytes than this machine can address", path.display())]
    Dimensions { path: PathBuf, dims: Vec<usize> },
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

fn read_error(path: &Path, source: std::io::Error) -> IdxError {
    IdxError::Read {
        path: path.to_path_buf(),
        cause: source,
    }
}

fn gzip_error(path: &Path, source: std::io::Error) -> IdxError {
    read_error(
        path,
        std::io::Error::new(source.kind(), format!("corrupt gzip stream: {source}")),
    )
}

/// Reads an IDX file of `dims` dimensions, plain or gzip-compressed: its dimensions and its
/// data, which must be exactly as long as the dimensions say. Nothing is sized from the header
/// before it is checked, and a gzip stream is inflated no further than the header promises.
fn read_idx(
    path: &Path,
    what: &'static str,
    magic: u32,
    dims: usize,
) -> Result<(Vec<usize>, Vec<u8>), IdxError> {
    let mut raw = std::fs::read(path).map_err(|e| read_error(path, e))?;
    let head_len = 4 + 4 * dims;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        let shape = header(path, &raw, what, magic, dims)?;
        check_len(path, raw.len() - head_len, data_len(path, &shape)?)?;
        raw.drain(..head_len);
        return Ok((shape, raw));
    }
    let mut gz = flate2::read::MultiGzDecoder::new(&raw[..]);
    let mut head = Vec::with_capacity(head_len);
    (&mut gz)
        .take(head_len as u64)
        .read_to_end(&mut head)
        .map_err(|e| gzip_error(path, e))?;
    let shape = header(path, &head, what, magic, dims)?;
    let expected = data_len(path, &shape)?;
    let mut data = Vec::new();
    (&mut gz)
        .take((expected as u64).saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| gzip_error(path, e))?;
    if data.len() > expected {
        let rest = std::io::copy(&mut gz, &mut std::io::sink()).map_err(|e| gzip_error(path, e))?;
        return Err(IdxError::Trailing {
            path: path.to_path_buf(),
            expected: expected as u64,
            actual: rest + 1,
        });
    }
    check_len(path, data.len(), expected)?;
    Ok((shape, data))
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

/// The data bytes the header's dimensions describe, refusing a product that overflows.
fn data_len(path: &Path, dims: &[usize]) -> Result<usize, IdxError> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| IdxError::Dimensions {
            path: path.to_path_buf(),
            dims: dims.to_vec(),
        })
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
    let (dims, pixels) = read_idx(path, "image", IMAGES_MAGIC, 3)?;
    Ok(IdxImages {
        count: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Reads an `idx1-ubyte` label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, IdxError> {
    Ok(read_idx(path, "label", LABELS_MAGIC, 1)?.1)
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

    /// Found by fuzzing: `count * rows * cols` overflowed (a panic in debug builds; in release
    /// 2^31 × 2^31 × 4 wrapped to 0 and an empty file was accepted as 2^31 images).
    #[test]
    fn overflowing_dimensions_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let max = u32::MAX as usize;
        // The last product is exactly 2^64 - 1 = (2^32 - 1) × 641 × 6700417.
        for (count, rows, cols) in [(1 << 31, 1 << 31, 4), (max, max, max), (max, 641, 6700417)] {
            let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
            for d in [count, rows, cols] {
                bytes.extend_from_slice(&(d as u32).to_be_bytes());
            }
            std::fs::write(&p, &bytes).unwrap();
            let msg = read_images(&p).unwrap_err().to_string();
            let want = if usize::BITS == 64 && count == max && rows == 641 {
                "truncated"
            } else {
                "header dimensions"
            };
            assert!(msg.contains(want) && msg.contains("/f"), "{msg}");
            let gz = dir.path().join("f.gz");
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut enc, &bytes).unwrap();
            std::fs::write(&gz, enc.finish().unwrap()).unwrap();
            let msg = read_images(&gz).unwrap_err().to_string();
            assert!(msg.contains(want), "{msg}");
        }
    }
}
