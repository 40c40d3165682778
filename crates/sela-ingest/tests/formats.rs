//! Each ingest format, end to end through the library, and each bad-input case.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use sela_images::codec::{encode_png, Pixels};
use sela_images::idx::{encode_images, encode_labels, IdxImages};
use sela_images::ImageSet;
use sela_ingest::{ingest_hf_parquet, ingest_idx, ingest_image_folder, IdxOptions, Size};

fn idx_fixture(dir: &Path, count: usize) -> (PathBuf, PathBuf, IdxImages, Vec<u8>) {
    let images = IdxImages {
        count,
        rows: 9,
        cols: 8,
        pixels: (0..count * 72).map(|i| (i * 7 % 256) as u8).collect(),
    };
    let labels: Vec<u8> = (0..count).map(|i| (i % 3) as u8).collect();
    let img_path = dir.join("x-images-idx3-ubyte.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &encode_images(&images)).unwrap();
    std::fs::write(&img_path, gz.finish().unwrap()).unwrap();
    let lab_path = dir.join("x-labels-idx1-ubyte");
    std::fs::write(&lab_path, encode_labels(&labels)).unwrap();
    (img_path, lab_path, images, labels)
}

fn names() -> Vec<String> {
    ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
}

#[test]
fn idx_pixels_labels_and_origins_survive() {
    let dir = tempfile::tempdir().unwrap();
    let (img, lab, images, labels) = idx_fixture(dir.path(), 10);
    let out = dir.path().join("d.parquet");
    let opts = IdxOptions {
        class_names: names(),
        ..Default::default()
    };
    let s = ingest_idx(&img, Some(&lab), &out, &opts).unwrap();
    assert_eq!((s.rows, s.labelled), (10, 10));
    let set = ImageSet::load(&out, 1, 9, 8).unwrap();
    assert_eq!(set.ids, (0..10).collect::<Vec<u64>>());
    assert_eq!(set.pixels, images.pixels);
    assert_eq!(
        set.labels,
        labels.iter().map(|&l| Some(l as i64)).collect::<Vec<_>>()
    );
    assert_eq!(set.class_names, names());
}

#[test]
fn idx_per_class_subset_is_balanced_and_keeps_source_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (img, lab, images, _) = idx_fixture(dir.path(), 12);
    let out = dir.path().join("d.parquet");
    let opts = IdxOptions {
        per_class: Some(2),
        class_names: names(),
        ..Default::default()
    };
    ingest_idx(&img, Some(&lab), &out, &opts).unwrap();
    let set = ImageSet::load(&out, 1, 9, 8).unwrap();
    assert_eq!(set.ids, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(set.image(4), images.image(4));
}

#[test]
fn idx_bad_inputs_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (img, lab, _, _) = idx_fixture(dir.path(), 10);
    let out = dir.path().join("d.parquet");
    let opts = IdxOptions::default();

    let short_labels = dir.path().join("short-labels");
    std::fs::write(&short_labels, encode_labels(&[0, 1, 2])).unwrap();
    let msg = ingest_idx(&img, Some(&short_labels), &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("has 3 labels but") && msg.contains("10 images"),
        "{msg}"
    );

    let msg = ingest_idx(&lab, None, &out, &opts).unwrap_err().to_string();
    assert!(msg.contains("magic number"), "{msg}");

    let truncated = dir.path().join("trunc-images-idx3-ubyte");
    let mut bytes = encode_images(&IdxImages {
        count: 2,
        rows: 2,
        cols: 2,
        pixels: vec![1; 8],
    });
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&truncated, bytes).unwrap();
    let msg = ingest_idx(&truncated, None, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("truncated") && msg.contains("trunc-images"),
        "{msg}"
    );

    let msg = ingest_idx(
        &img,
        Some(&lab),
        &out,
        &IdxOptions {
            class_names: vec!["only".into()],
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("label 1") && msg.contains("1 class names"),
        "{msg}"
    );

    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains(".tmp-")),
        "{leftovers:?}"
    );
}

fn write_png(path: &Path, w: usize, h: usize, channels: usize, seed: u8) -> Vec<u8> {
    let bytes = encode_png(&Pixels {
        width: w,
        height: h,
        channels,
        data: (0..w * h * channels)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect(),
    })
    .unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn image_folder_labels_follow_sorted_class_folders() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for class in ["zebra", "ant"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
    }
    let ant = write_png(&root.join("ant/2.png"), 6, 5, 3, 3);
    write_png(&root.join("ant/1.png"), 6, 5, 3, 5);
    write_png(&root.join("zebra/a.png"), 6, 5, 1, 7);
    std::fs::write(root.join("zebra/notes.txt"), "ignored").unwrap();
    let jpg = image::RgbImage::from_fn(6, 5, |x, y| image::Rgb([x as u8 * 40, y as u8 * 40, 100]));
    jpg.save(root.join("zebra/b.jpg")).unwrap();

    let out = dir.path().join("d.parquet");
    let s = ingest_image_folder(&root, &out, None, true).unwrap();
    assert_eq!(s.classes, vec!["ant", "zebra"]);
    assert_eq!(s.rows, 4);
    let set = ImageSet::load(&out, 3, 5, 6).unwrap();
    assert_eq!(set.labels, vec![Some(0), Some(0), Some(1), Some(1)]);
    // Original bytes are stored untouched.
    let file = sela_io::dataset::DatasetFile::open(&out).unwrap();
    let batch = file.batches(16).unwrap().next().unwrap().unwrap();
    assert_eq!(batch.image_bytes(1), &ant[..]);
    assert_eq!(batch.image_path(1), Some("ant/2.png"));

    let resized = dir.path().join("r.parquet");
    ingest_image_folder(&root, &resized, Some("4x3".parse::<Size>().unwrap()), true).unwrap();
    assert_eq!(ImageSet::load(&resized, 1, 3, 4).unwrap().len(), 4);
}

#[test]
fn image_folder_bad_inputs_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("c")).unwrap();
    let out = dir.path().join("d.parquet");
    let msg = ingest_image_folder(&root, &out, None, true)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no .png"), "{msg}");

    write_png(&root.join("c/ok.png"), 4, 4, 1, 3);
    std::fs::write(root.join("c/broken.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let msg = format!(
        "{:#}",
        ingest_image_folder(&root, &out, None, true).unwrap_err()
    );
    assert!(
        msg.contains("broken.png") && msg.contains("not a decodable"),
        "{msg}"
    );

    let msg = ingest_image_folder(&dir.path().join("absent"), &out, None, true)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent"), "{msg}");
    assert!(!out.exists());
}

fn hf_parquet(path: &Path, images: Vec<Vec<u8>>, labels: Option<Vec<i64>>, with_meta: bool) {
    let n = images.len();
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let image = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(BinaryArray::from_iter_values(images.iter())) as ArrayRef,
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("img{i}.png")),
            )),
        ],
        None,
    );
    let mut cols: Vec<(Field, ArrayRef)> = vec![(
        Field::new("image", DataType::Struct(fields), true),
        Arc::new(image),
    )];
    if let Some(l) = labels {
        cols.push((
            Field::new("label", DataType::Int64, true),
            Arc::new(Int64Array::from(l)),
        ));
    }
    let mut meta = std::collections::HashMap::new();
    if with_meta {
        meta.insert(
            "huggingface".to_string(),
            r#"{"info":{"features":{"image":{"_type":"Image"},"label":{"names":["cat","dog"],"_type":"ClassLabel"}}}}"#
                .to_string(),
        );
    }
    let schema = Arc::new(
        Schema::new(cols.iter().map(|c| c.0.clone()).collect::<Vec<_>>()).with_metadata(meta),
    );
    let batch =
        RecordBatch::try_new(schema.clone(), cols.into_iter().map(|c| c.1).collect()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn hf_parquet_passes_through_with_ids_and_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let pngs: Vec<Vec<u8>> = (0..5)
        .map(|i| write_png(&dir.path().join(format!("{i}.png")), 4, 4, 1, i + 1))
        .collect();
    let input = dir.path().join("hf.parquet");
    hf_parquet(&input, pngs.clone(), Some(vec![0, 1, 1, 0, 1]), true);
    let out = dir.path().join("d.parquet");
    let s = ingest_hf_parquet(&input, &out, "image", "label", true).unwrap();
    assert_eq!(s.classes, vec!["cat", "dog"]);
    assert_eq!((s.rows, s.labelled), (5, 5));
    let set = ImageSet::load(&out, 1, 4, 4).unwrap();
    assert_eq!(set.ids, vec![0, 1, 2, 3, 4]);
    assert_eq!(set.labels[1], Some(1));

    // Without labels.
    let unlabelled = dir.path().join("u.parquet");
    hf_parquet(&unlabelled, pngs, None, false);
    let s = ingest_hf_parquet(&unlabelled, &out, "image", "label", true).unwrap();
    assert_eq!((s.rows, s.labelled), (5, 0));
}

#[test]
fn hf_parquet_bad_inputs_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_png(&dir.path().join("g.png"), 4, 4, 1, 3);
    let input = dir.path().join("hf.parquet");
    hf_parquet(
        &input,
        vec![good.clone(), b"not an image".to_vec()],
        Some(vec![0, 1]),
        true,
    );
    let out = dir.path().join("d.parquet");
    let msg = ingest_hf_parquet(&input, &out, "image", "label", true)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("row 1") && msg.contains("not a decodable"),
        "{msg}"
    );

    let msg = ingest_hf_parquet(&input, &out, "picture", "label", true)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing column `picture`"), "{msg}");

    hf_parquet(&input, vec![good], Some(vec![7]), true);
    let msg = ingest_hf_parquet(&input, &out, "image", "label", true)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("label 7") && msg.contains("2 class names"),
        "{msg}"
    );

    let not_parquet = dir.path().join("x.parquet");
    std::fs::write(&not_parquet, b"PAR1 this is not parquet").unwrap();
    let msg = ingest_hf_parquet(&not_parquet, &out, "image", "label", true)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("x.parquet") && msg.contains("not a readable Parquet file"),
        "{msg}"
    );
    assert!(!out.exists());
}
