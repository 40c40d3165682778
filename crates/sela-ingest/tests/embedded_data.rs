//! The embedded default data (`data/fashion-mnist-mini/`) is exactly what its IDX source says:
//! every row's pixels and label equal the Fashion-MNIST record its origin names. Needs the raw
//! IDX files (`make data-raw` fetches them; `make test` does so itself).

use std::path::{Path, PathBuf};

use sela_images::idx;
use sela_images::ImageSet;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn raw_dir() -> PathBuf {
    std::env::var_os("SELA_FASHION_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo().join("data/raw/fashion-mnist-deb/usr/share/datasets/fashion-mnist")
        })
}

fn check(split_file: &str, images: &str, labels: &str, per_class: usize) {
    let raw = raw_dir();
    assert!(
        raw.join(images).exists(),
        "the Fashion-MNIST IDX files are not in {} — run `make data-raw` (or set SELA_FASHION_MNIST_DIR)",
        raw.display()
    );
    let source = idx::read_images(&raw.join(images)).unwrap();
    let source_labels = idx::read_labels(&raw.join(labels)).unwrap();
    let path = repo().join("data/fashion-mnist-mini").join(split_file);
    let set = ImageSet::load(&path, 1, 28, 28).unwrap();
    assert_eq!(set.len(), per_class * 10);

    let file = sela_io::dataset::DatasetFile::open(&path).unwrap();
    let mut origins = Vec::new();
    for batch in file.batches(4096).unwrap() {
        let batch = batch.unwrap();
        origins.extend((0..batch.len()).map(|i| batch.image_path(i).unwrap().to_string()));
    }
    let mut per_label = [0usize; 10];
    for (row, origin) in origins.iter().enumerate() {
        let (name, index) = origin.split_once('#').expect("origin is FILE#INDEX");
        assert_eq!(name, images);
        let index: usize = index.parse().unwrap();
        assert_eq!(set.ids[row], index as u64, "id is the IDX record index");
        assert_eq!(
            set.image(row),
            source.image(index),
            "pixels of record {index}"
        );
        assert_eq!(
            set.labels[row],
            Some(source_labels[index] as i64),
            "label of record {index}"
        );
        per_label[source_labels[index] as usize] += 1;
    }
    assert_eq!(per_label, [per_class; 10], "class-balanced subset");
}

#[test]
fn embedded_train_split_matches_idx_source() {
    check(
        "train.parquet",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        200,
    );
}

#[test]
fn embedded_test_split_matches_idx_source() {
    check(
        "test.parquet",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        100,
    );
}

#[test]
fn embedded_data_reads_in_polars_as_an_hf_image_table() {
    use polars::prelude::*;
    let path = repo().join("data/fashion-mnist-mini/train.parquet");
    let df = ParquetReader::new(std::fs::File::open(&path).unwrap())
        .finish()
        .unwrap();
    assert_eq!(df.height(), 2000);
    assert_eq!(df.column("id").unwrap().dtype(), &DataType::UInt64);
    assert_eq!(df.column("label").unwrap().dtype(), &DataType::Int64);
    match df.column("image").unwrap().dtype() {
        DataType::Struct(fields) => {
            let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
            assert_eq!(names, vec!["bytes", "path"]);
        }
        other => panic!("image column is {other:?}"),
    }
}
