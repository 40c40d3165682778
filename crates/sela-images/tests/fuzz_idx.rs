//! Fuzzing the IDX readers: mutated, truncated, gzip-wrapped and absurd-header files must give
//! `Ok` or an `IdxError` naming the file, never a panic, a hang or an allocation out of
//! proportion to the file.
//!
//! Cases run from a fixed seed; `PROPTEST_RNG_SEED=<n>` and `PROPTEST_CASES=<n>` explore further.

use std::io::Write;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use sela_images::idx::{encode_images, encode_labels, read_images, read_labels, IdxImages};

#[global_allocator]
static ALLOC: sela_fuzz::PeakAlloc = sela_fuzz::PeakAlloc;

/// Largest allocation a reader may make for these (at most a few KiB) inputs.
const ALLOC_LIMIT: usize = 1 << 20;

fn guarded<T: Send + 'static>(
    what: &str,
    alloc_limit: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    sela_fuzz::guarded(what, alloc_limit, f)
}

fn config(cases: u32) -> ProptestConfig {
    sela_fuzz::config(cases, 0x005e_1a1d)
}

/// One edit of a file's bytes; positions wrap around the current length.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    /// Overwrites big-endian header word `word` (0 = magic, 1.. = dimensions).
    Word {
        word: usize,
        value: u32,
    },
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..8,
        any::<u32>(),
        Just(u32::MAX),
        Just(1 << 31),
        Just(1 << 16),
        Just(0x0000_0801),
        Just(0x0000_0803),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (0usize..4, interesting_u32()).prop_map(|(word, value)| Mutation::Word { word, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match m {
        Mutation::Flip { at, bit } if n > 0 => bytes[at % n] ^= 1 << bit,
        Mutation::Set { at, byte } if n > 0 => bytes[at % n] = *byte,
        Mutation::Truncate { at } => bytes.truncate(at % (n + 1)),
        Mutation::Insert { at, bytes: new } => {
            let at = at % (n + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Mutation::Remove { at, len } if n > 0 => {
            let at = at % n;
            bytes.drain(at..(at + len).min(n));
        }
        Mutation::Word { word, value } => {
            let at = 4 * word;
            if at + 4 <= n {
                bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
        }
        _ => {}
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn images() -> impl Strategy<Value = IdxImages> {
    (0usize..4, 0usize..5, 0usize..5).prop_flat_map(|(count, rows, cols)| {
        proptest::collection::vec(any::<u8>(), count * rows * cols).prop_map(move |pixels| {
            IdxImages {
                count,
                rows,
                cols,
                pixels,
            }
        })
    })
}

/// How the mutated bytes reach the reader.
#[derive(Debug, Clone, Copy)]
enum Wrap {
    /// As they are.
    Plain,
    /// Gzipped after mutating: a valid gzip stream of a broken IDX file.
    GzipOfMutated,
    /// Mutated after gzipping: a broken gzip stream.
    MutatedGzip,
}

fn wrap() -> impl Strategy<Value = Wrap> {
    prop_oneof![
        Just(Wrap::Plain),
        Just(Wrap::GzipOfMutated),
        Just(Wrap::MutatedGzip)
    ]
}

fn mutate(valid: Vec<u8>, mutations: &[Mutation], wrap: Wrap) -> Vec<u8> {
    let mut bytes = match wrap {
        Wrap::MutatedGzip => gzip(&valid),
        _ => valid,
    };
    for m in mutations {
        apply(&mut bytes, m);
    }
    match wrap {
        Wrap::GzipOfMutated => gzip(&bytes),
        _ => bytes,
    }
}

/// Reads `bytes` as an image file: an error must name the file; a success must be consistent.
fn check_images(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    let p = path.to_path_buf();
    let result = guarded("read_images", ALLOC_LIMIT, move || read_images(&p));
    match result {
        Ok(images) => assert_eq!(
            images.pixels.len(),
            images.count * images.rows * images.cols
        ),
        Err(e) => assert_names(path, &e.to_string()),
    }
}

fn check_labels(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    let p = path.to_path_buf();
    let result = guarded("read_labels", ALLOC_LIMIT, move || read_labels(&p));
    if let Err(e) = result {
        assert_names(path, &e.to_string());
    }
}

fn assert_names(path: &Path, msg: &str) {
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz-idx3-ubyte");
    (dir, path)
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn mutated_image_files_never_panic(
        base in images(),
        mutations in proptest::collection::vec(mutation(), 1..5),
        wrap in wrap(),
    ) {
        let (_dir, path) = scratch();
        check_images(&path, &mutate(encode_images(&base), &mutations, wrap));
    }

    #[test]
    fn mutated_label_files_never_panic(
        labels in proptest::collection::vec(any::<u8>(), 0..16),
        mutations in proptest::collection::vec(mutation(), 1..5),
        wrap in wrap(),
    ) {
        let (_dir, path) = scratch();
        check_labels(&path, &mutate(encode_labels(&labels), &mutations, wrap));
    }

    /// Any header dimensions, huge ones included, with a few bytes of data: an error unless the
    /// data is exactly as long as the dimensions say, and no buffer sized from the header.
    #[test]
    fn any_header_dimensions_are_checked_against_the_data(
        count in interesting_u32(),
        rows in interesting_u32(),
        cols in interesting_u32(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
        gz in any::<bool>(),
    ) {
        let (_dir, path) = scratch();
        let mut bytes = 0x0000_0803u32.to_be_bytes().to_vec();
        for d in [count, rows, cols] {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(&data);
        let bytes = if gz { gzip(&bytes) } else { bytes };
        std::fs::write(&path, &bytes).unwrap();
        let p = path.clone();
        let result = guarded("read_images", ALLOC_LIMIT, move || read_images(&p));
        let expected = count as u128 * rows as u128 * cols as u128;
        match result {
            Ok(images) => prop_assert_eq!(&images.pixels, &data),
            Err(e) => {
                prop_assert!(expected != data.len() as u128, "valid file refused: {}", e);
                assert_names(&path, &e.to_string());
            }
        }

        let mut labels = 0x0000_0801u32.to_be_bytes().to_vec();
        labels.extend_from_slice(&count.to_be_bytes());
        labels.extend_from_slice(&data);
        let labels = if gz { gzip(&labels) } else { labels };
        std::fs::write(&path, &labels).unwrap();
        let p = path.clone();
        let result = guarded("read_labels", ALLOC_LIMIT, move || read_labels(&p));
        prop_assert_eq!(result.is_ok(), count as usize == data.len());
    }

    /// Bytes that start like a gzip stream but are garbage.
    #[test]
    fn gzip_garbage_is_an_error(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
        let (_dir, path) = scratch();
        let mut bytes = vec![0x1f, 0x8b];
        bytes.extend_from_slice(&tail);
        check_images(&path, &bytes);
        check_labels(&path, &bytes);
    }
}

/// Every prefix of a valid file, plain and gzipped, is refused with an error naming the file.
#[test]
fn every_truncation_is_an_error() {
    let (_dir, path) = scratch();
    let images = IdxImages {
        count: 2,
        rows: 3,
        cols: 2,
        pixels: (0..12).collect(),
    };
    let files = [
        (encode_images(&images), true),
        (gzip(&encode_images(&images)), true),
        (encode_labels(&[3, 1, 4]), false),
        (gzip(&encode_labels(&[3, 1, 4])), false),
    ];
    for (bytes, is_images) in files {
        for len in 0..bytes.len() {
            std::fs::write(&path, &bytes[..len]).unwrap();
            let p = path.clone();
            let result = guarded("truncated file", ALLOC_LIMIT, move || {
                if is_images {
                    read_images(&p).map(|_| ())
                } else {
                    read_labels(&p).map(|_| ())
                }
            });
            let err = result.expect_err("a truncated file was accepted");
            assert_names(&path, &err.to_string());
        }
    }
}

/// A small gzip file that inflates to far more than its header promises is refused without
/// inflating it into memory.
#[test]
fn gzip_bomb_is_refused_without_inflating_it() {
    let (_dir, path) = scratch();
    let mut header = encode_images(&IdxImages {
        count: 1,
        rows: 1,
        cols: 1,
        pixels: vec![7],
    });
    header.extend_from_slice(&[0; 1 << 16]);
    let mut bytes = gzip(&header);
    // Concatenated gzip members are one stream: 64 members of 1 MiB of zeros each.
    let zeros = gzip(&vec![0; 1 << 20]);
    for _ in 0..64 {
        bytes.extend_from_slice(&zeros);
    }
    std::fs::write(&path, &bytes).unwrap();
    let p = path.clone();
    let err = guarded("gzip bomb", ALLOC_LIMIT, move || read_images(&p))
        .expect_err("trailing bytes accepted");
    let msg = err.to_string();
    assert!(msg.contains("trailing"), "{msg}");
}
