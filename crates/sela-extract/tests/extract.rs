//! Extraction: sharding, completeness, reproducible initialisation, schema, bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use sela_config::PipelineConfig;
use sela_extract::{run, ExtractOptions};
use sela_images::codec::{encode_png, Pixels};
use sela_io::dataset::DatasetWriter;
use sela_io::features;
use sela_io::parts::Shard;
use sela_io::Provenance;

const CONFIG: &str = r#"
[pipeline]
name = "tiny"
seed = 7
[data]
train = "train.parquet"
channels = 1
height = 12
width = 12
[model]
widths = [4, 8]
blocks = [1, 1]
heads = [3, 5]
"#;

fn setup(rows: u64) -> (tempfile::TempDir, PipelineConfig, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let config = PipelineConfig::load(&cfg).unwrap();
    let data = dir.path().join("train.parquet");
    let mut w = DatasetWriter::create(&data, &[], Provenance::new("test")).unwrap();
    for id in 0..rows {
        let png = encode_png(&Pixels {
            width: 12,
            height: 12,
            channels: 1,
            data: (0..144)
                .map(|i| ((i as u64 * 13 + id * 29) % 256) as u8)
                .collect(),
        })
        .unwrap();
        w.push(id * 3 + 1, &png, None, Some((id % 3) as i64))
            .unwrap();
    }
    w.finish().unwrap();
    (dir, config, data)
}

fn opts(dir: &Path, data: &Path, out: &str, shard: Shard, batch: usize) -> ExtractOptions {
    ExtractOptions {
        round: 0,
        checkpoint: dir.join("init.safetensors"),
        pretrained: None,
        init: false,
        dataset: Some(data.to_path_buf()),
        output: Some(dir.join(out)),
        shard,
        batch_size: batch,
        quiet: true,
    }
}

#[test]
fn initial_model_is_reproducible() {
    let (dir, config, _) = setup(1);
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    sela_extract::write_initial_model(&config, &a).unwrap();
    sela_extract::write_initial_model(&config, &b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn shards_together_equal_the_unsharded_run_bit_for_bit() {
    let (dir, config, data) = setup(37);
    sela_extract::write_initial_model(&config, &dir.path().join("init.safetensors")).unwrap();
    let whole = run(&config, &opts(dir.path(), &data, "whole", Shard::WHOLE, 8)).unwrap();
    assert_eq!(whole.rows, 37);
    let mut total = 0;
    for i in 0..3 {
        total += run(
            &config,
            &opts(dir.path(), &data, "sharded", Shard::new(i, 3).unwrap(), 5),
        )
        .unwrap()
        .rows;
    }
    assert_eq!(total, 37);
    for column in ["embedding", "logits_0", "logits_1"] {
        let a = features::read_matrix(&dir.path().join("whole"), column).unwrap();
        let b = features::read_matrix(&dir.path().join("sharded"), column).unwrap();
        let sorted = |m: &features::Matrix| {
            let mut rows: Vec<(u64, Vec<u32>)> = m
                .ids
                .iter()
                .enumerate()
                .map(|(r, &id)| {
                    (
                        id,
                        m.values[r * m.cols..(r + 1) * m.cols]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect(),
                    )
                })
                .collect();
            rows.sort();
            rows
        };
        assert_eq!(sorted(&a), sorted(&b), "column {column}");
    }

    // The completeness check: a missing part and a duplicated part are both refused.
    let sharded = dir.path().join("sharded");
    let p1 = sharded.join(Shard::new(1, 3).unwrap().file_name());
    let saved = std::fs::read(&p1).unwrap();
    std::fs::remove_file(&p1).unwrap();
    let msg = features::read_matrix(&sharded, "logits_0")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing part-00001-of-00003.parquet"), "{msg}");
    std::fs::copy(sharded.join(Shard::new(0, 3).unwrap().file_name()), &p1).unwrap();
    let msg = features::read_matrix(&sharded, "logits_0")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("shard 0 of 3 appears 2 times"), "{msg}");
    std::fs::write(&p1, saved).unwrap();
    features::read_matrix(&sharded, "logits_0").unwrap();
}

#[test]
fn output_reads_in_polars_with_the_documented_schema() {
    use polars::prelude::*;
    let (dir, config, data) = setup(10);
    sela_extract::write_initial_model(&config, &dir.path().join("init.safetensors")).unwrap();
    let s = run(
        &config,
        &opts(dir.path(), &data, "f.parquet", Shard::WHOLE, 4),
    )
    .unwrap();
    let df = ParquetReader::new(std::fs::File::open(s.output.unwrap()).unwrap())
        .finish()
        .unwrap();
    assert_eq!(df.height(), 10);
    assert_eq!(df.column("id").unwrap().dtype(), &DataType::UInt64);
    assert_eq!(
        df.column("embedding").unwrap().dtype(),
        &DataType::Array(Box::new(DataType::Float32), 8)
    );
    assert_eq!(
        df.column("logits_0").unwrap().dtype(),
        &DataType::Array(Box::new(DataType::Float32), 3)
    );
    assert_eq!(
        df.column("logits_1").unwrap().dtype(),
        &DataType::Array(Box::new(DataType::Float32), 5)
    );
}

#[test]
fn readout_sets_the_embedding_and_leaves_the_logits() {
    let (dir, config, data) = setup(9);
    sela_extract::write_initial_model(&config, &dir.path().join("init.safetensors")).unwrap();
    run(&config, &opts(dir.path(), &data, "last", Shard::WHOLE, 4)).unwrap();
    let cfg = dir.path().join("p.toml");
    let set = |stage: usize, grid: usize| {
        PipelineConfig::load_with(
            &cfg,
            &[
                format!("model.embedding_stage={stage}"),
                format!("model.embedding_grid={grid}"),
            ],
        )
        .unwrap()
    };
    // Stage 0 is 4 channels at 12×12: a 3×3 grid gives D = 36.
    run(
        &set(0, 3),
        &opts(dir.path(), &data, "grid", Shard::WHOLE, 4),
    )
    .unwrap();
    let read =
        |out: &str, column: &str| features::read_matrix(&dir.path().join(out), column).unwrap();
    assert_eq!(
        (
            read("last", "embedding").cols,
            read("grid", "embedding").cols
        ),
        (8, 36)
    );
    for column in ["logits_0", "logits_1"] {
        assert_eq!(read("last", column).values, read("grid", column).values);
    }
    // Stage 1 is 6×6: a grid of 7 passes the config's bound (the image side) but not the
    // network's, and nothing is written.
    let err = run(&set(1, 7), &opts(dir.path(), &data, "bad", Shard::WHOLE, 4))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("embedding_grid 7 must be between 1 and the side of stage 1's 6×6 output"),
        "{err}"
    );
    assert!(!dir.path().join("bad").exists());
}

#[test]
fn extra_grids_are_written_beside_the_embedding_only_before_a_spectral_round() {
    let (dir, _, data) = setup(9);
    let cfg = dir.path().join("p.toml");
    let config = PipelineConfig::load_with(
        &cfg,
        &[
            "model.embedding_stage=0".into(),
            "model.embedding_grid=2".into(),
            "assign.spectral=3".into(),
            "assign.spectral_from_round=2".into(),
            "assign.spectral_fragments=8".into(),
            "assign.spectral_refine=3.0".into(),
            "assign.spectral_extra_grids=[3]".into(),
        ],
    )
    .unwrap();
    sela_extract::write_initial_model(&config, &dir.path().join("init.safetensors")).unwrap();
    let at = |round: u32, out: &str| {
        let o = ExtractOptions {
            round,
            ..opts(dir.path(), &data, out, Shard::WHOLE, 4)
        };
        run(&config, &o).unwrap();
        dir.path().join(out)
    };
    let (before, feeding) = (at(0, "r0"), at(1, "r1"));
    let extra = features::grid_embedding_column(3);
    assert_eq!(extra, "embedding_grid3");
    let (_, info) = features::open_parts(&feeding).unwrap();
    let layout = info.unwrap().layout;
    // Stage 0 is 4 channels: 2×2 cells give D = 16, 3×3 cells D = 36.
    assert_eq!(
        (layout.embedding_dim, layout.extra_embeddings),
        (16, vec![features::GridEmbedding { grid: 3, dim: 36 }])
    );
    let grid3 = features::read_matrix(&feeding, &extra).unwrap();
    assert_eq!((grid3.ids.len(), grid3.cols), (9, 36));
    // The same values as a run whose embedding itself is read out on 3×3 cells.
    let alone = PipelineConfig::load_with(
        &cfg,
        &[
            "model.embedding_stage=0".into(),
            "model.embedding_grid=3".into(),
        ],
    )
    .unwrap();
    run(&alone, &opts(dir.path(), &data, "alone", Shard::WHOLE, 4)).unwrap();
    let read = |dir: &Path, column: &str| features::read_matrix(dir, column).unwrap().values;
    assert_eq!(grid3.values, read(&dir.path().join("alone"), "embedding"));
    assert_eq!(read(&before, "embedding"), read(&feeding, "embedding"));
    // Round 0's features feed round 1, whose labels are solved: no extra column.
    let err = features::read_matrix(&before, &extra)
        .unwrap_err()
        .to_string();
    assert!(err.contains("embedding_grid3"), "{err}");
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sela-extract"))
}

#[test]
fn bad_inputs_fail_cleanly_and_write_nothing() {
    let (dir, config, data) = setup(5);
    let ck = dir.path().join("init.safetensors");
    sela_extract::write_initial_model(&config, &ck).unwrap();
    let cfg = dir.path().join("p.toml");
    let out = dir.path().join("out");

    // A truncated dataset.
    let bytes = std::fs::read(&data).unwrap();
    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() - 20]).unwrap();
    // A Parquet file of another table.
    let wrong = dir.path().join("wrong.parquet");
    sela_io::prior::write(
        &wrong,
        &[1.0],
        &sela_io::FileMeta::new("prior", 1, Provenance::new("t")),
    )
    .unwrap();

    for (input, expect) in [
        (&truncated, "not a readable Parquet file"),
        (&wrong, "`prior` table, expected a `dataset` table"),
        (&dir.path().join("absent.parquet"), "absent.parquet"),
    ] {
        let o = bin()
            .arg("--config")
            .arg(&cfg)
            .arg("--checkpoint")
            .arg(&ck)
            .arg("--dataset")
            .arg(input)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(expect), "{stderr}");
        let written = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
        assert_eq!(written, 0, "nothing written for {}", input.display());
    }

    // A checkpoint of another architecture.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, CONFIG.replace("heads = [3, 5]", "heads = [4]")).unwrap();
    let o = bin()
        .arg("--config")
        .arg(&other)
        .arg("--checkpoint")
        .arg(&ck)
        .arg("--dataset")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("init.safetensors") && stderr.contains("heads"),
        "{stderr}"
    );

    // Usage errors exit 2.
    let o = bin()
        .arg("--config")
        .arg(&cfg)
        .arg("--checkpoint")
        .arg(&ck)
        .args(["--shard", "3", "--num-shards", "2"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(config.model.heads, vec![3, 5]);
}

#[test]
fn pretrained_resnet_loads_from_safetensors_the_test_writes() {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use sela_extract::{PretrainedKind, PretrainedOptions};

    let (dir, config, data) = setup(6);
    // Weights in torchvision's layout, made and saved here (no download is possible).
    let weights = dir.path().join("resnet18.safetensors");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    candle_transformers::models::resnet::resnet18_no_final_layer(vb).unwrap();
    varmap.save(&weights).unwrap();

    let pretrained = |weights: &Path| ExtractOptions {
        pretrained: Some(PretrainedOptions {
            kind: PretrainedKind::ResNet18,
            weights: weights.to_path_buf(),
            image_size: 32,
        }),
        ..opts(dir.path(), &data, "frozen.parquet", Shard::WHOLE, 4)
    };
    let s = run(&config, &pretrained(&weights)).unwrap();
    assert_eq!(s.rows, 6);
    let emb = features::read_matrix(&dir.path().join("frozen.parquet"), "embedding").unwrap();
    assert_eq!(emb.cols, 512);
    assert!(emb.values.iter().all(|v| v.is_finite()));
    let logits = features::read_matrix(&dir.path().join("frozen.parquet"), "logits_1").unwrap();
    assert_eq!(logits.cols, 5);
    assert!(
        logits.values.iter().all(|v| v.abs() <= 10.0 + 1e-4),
        "cosine logits are bounded by 10"
    );

    // sela's own checkpoint is not a ResNet-18 weights file.
    sela_extract::write_initial_model(&config, &dir.path().join("init.safetensors")).unwrap();
    let err = run(&config, &pretrained(&dir.path().join("init.safetensors"))).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("init.safetensors") && msg.contains("not a torchvision-layout"),
        "{msg}"
    );
}
