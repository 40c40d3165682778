//! The extraction stage: runs the model in inference mode (BatchNorm running statistics, the clean
//! view, no augmentation) over a dataset and writes each image's embedding and head logits as a
//! `features` table (`sela_io::features`).
//!
//! Rows stream through: the dataset is read batch by batch, decoded in parallel, run through the
//! network and written out, so memory stays bounded whatever the dataset's size. With
//! `--shard I --num-shards N` only the rows with `id % N == I` are processed and written to
//! `part-IIIII-of-NNNNN.parquet`; the parts of all shards together are exactly the rows of an
//! unsharded run, bit for bit (inference is row-independent).
//!
//! Round 0 has no trained checkpoint: `--init` writes the pipeline's seeded initial model to
//! `--checkpoint` first, so every later stage and rerun uses the very same weights.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sela_config::PipelineConfig;
use sela_images::augment::{clean_into, Normalize, Shape};
use sela_images::imageset::decode_rows;
use sela_io::dataset::DatasetFile;
use sela_io::features::{FeaturesInfo, FeaturesLayout, FeaturesWriter, GridEmbedding};
use sela_io::parts::Shard;
use sela_io::Provenance;
use sela_nn::checkpoint::{self, TrainState};
use sela_nn::{ModelSpec, Network, Readout};
use serde::Serialize;

pub mod pretrained;

pub use pretrained::{Pretrained, PretrainedKind};

const STAGE: &str = "sela-extract";

/// What to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// The round the outputs belong to.
    pub round: u32,
    /// The model checkpoint to run (written first when `init` is set); unused with `pretrained`.
    pub checkpoint: PathBuf,
    /// Run a frozen pretrained backbone instead of sela's network.
    pub pretrained: Option<PretrainedOptions>,
    /// Write the pipeline's seeded initial model to `checkpoint` before extracting.
    pub init: bool,
    /// The dataset to run over; with `output`. Neither: only `init`.
    pub dataset: Option<PathBuf>,
    /// A directory (receives `part-IIIII-of-NNNNN.parquet`) or, unsharded, a `.parquet` file.
    pub output: Option<PathBuf>,
    /// Which slice of the dataset to process.
    pub shard: Shard,
    /// Images per inference batch.
    pub batch_size: usize,
    /// No progress display.
    pub quiet: bool,
}

/// A frozen pretrained backbone to extract with.
#[derive(Debug, Clone)]
pub struct PretrainedOptions {
    /// The architecture.
    pub kind: PretrainedKind,
    /// Its safetensors weights.
    pub weights: PathBuf,
    /// The side images are resized to.
    pub image_size: usize,
}

/// What an extraction did.
#[derive(Debug, Clone, Serialize)]
pub struct ExtractSummary {
    /// The checkpoint used (or written).
    pub checkpoint: PathBuf,
    /// Whether the seeded initial model was written.
    pub initialised: bool,
    /// The features file written.
    pub output: Option<PathBuf>,
    /// Rows written.
    pub rows: u64,
    /// `index/count` of the shard.
    pub shard: String,
    /// Wall time of the extraction, seconds.
    pub seconds: f64,
    /// Throughput.
    pub images_per_sec: f64,
}

/// Where the features of `shard` go for an `--output` of `output` (nothing is created yet).
pub fn part_path(output: &Path, shard: Shard) -> Result<PathBuf> {
    if output.extension().is_some_and(|e| e == "parquet") {
        if shard.count != 1 {
            bail!(
                "--output {} names one file, but --num-shards {} writes parts: give a directory",
                output.display(),
                shard.count
            );
        }
        return Ok(output.to_path_buf());
    }
    Ok(output.join(shard.file_name()))
}

/// Writes the seeded initial model of `config` to `path`.
pub fn write_initial_model(config: &PipelineConfig, path: &Path) -> Result<Network> {
    let spec = ModelSpec::from_config(config, 0);
    let network = Network::init(&spec, config.pipeline.seed)?;
    let state = TrainState {
        round: 0,
        seed: config.pipeline.seed,
        config_hash: Some(config.hash()),
        ..TrainState::default()
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    }
    checkpoint::save(path, &network, None, &state)?;
    Ok(network)
}

/// Runs the stage.
pub fn run(config: &PipelineConfig, opts: &ExtractOptions) -> Result<ExtractSummary> {
    if opts.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let spec = ModelSpec::from_config(config, opts.round);
    let readout = Readout::from_config(config, &spec);
    let extra_grids = config.assign.extra_grids_extracted_at(opts.round);
    let model = match &opts.pretrained {
        Some(p) => {
            if !extra_grids.is_empty() {
                bail!(
                    "assign.spectral_extra_grids reads sela's own network out on more grids; a \
                     pretrained --backbone has one embedding"
                );
            }
            if opts.init {
                bail!("--init writes sela's initial model; it does not apply to a pretrained --backbone");
            }
            Model::Pretrained(Pretrained::load(
                p.kind,
                &p.weights,
                p.image_size,
                &spec.heads,
                config.pipeline.seed,
            )?)
        }
        None => {
            readout.validate(&spec)?;
            let extra: Vec<Readout> = extra_grids
                .iter()
                .map(|&grid| Readout { grid, ..readout })
                .collect();
            for r in &extra {
                r.validate(&spec)
                    .context("assign.spectral_extra_grids: a readout extraction writes")?;
            }
            let network = if opts.init {
                write_initial_model(config, &opts.checkpoint)?
            } else {
                checkpoint::load(&opts.checkpoint, &spec)?.network
            };
            Model::Sela(Box::new(network), readout, extra)
        }
    };
    let mut summary = ExtractSummary {
        checkpoint: opts.checkpoint.clone(),
        initialised: opts.init,
        output: None,
        rows: 0,
        shard: format!("{}/{}", opts.shard.index, opts.shard.count),
        seconds: 0.0,
        images_per_sec: 0.0,
    };
    let (dataset, output) = match (&opts.dataset, &opts.output) {
        (Some(d), Some(o)) => (d, o),
        (None, None) if opts.init => return Ok(summary),
        _ => bail!("--dataset and --output go together (only --init may run without them)"),
    };
    let started = Instant::now();
    let target = part_path(output, opts.shard)?;
    let rows = extract(config, &spec, &model, dataset, &target, opts)?;
    let seconds = started.elapsed().as_secs_f64();
    summary.output = Some(target);
    summary.rows = rows;
    summary.seconds = seconds;
    summary.images_per_sec = rows as f64 / seconds.max(1e-9);
    Ok(summary)
}

/// The model an extraction runs.
enum Model {
    /// sela's network, which of its activations is written as the embedding, and which more
    /// readouts beside it.
    Sela(Box<Network>, Readout, Vec<Readout>),
    Pretrained(Pretrained),
}

impl Model {
    fn layout(&self, spec: &ModelSpec) -> FeaturesLayout {
        FeaturesLayout {
            embedding_dim: match self {
                Model::Sela(_, readout, _) => readout.dim(spec),
                Model::Pretrained(p) => p.dim,
            },
            head_sizes: spec.heads.clone(),
            extra_embeddings: match self {
                Model::Sela(_, _, extra) => extra
                    .iter()
                    .map(|r| GridEmbedding {
                        grid: r.grid,
                        dim: r.dim(spec),
                    })
                    .collect(),
                Model::Pretrained(_) => Vec::new(),
            },
        }
    }

    /// Embeddings, the extra readouts' embeddings and per-head logits of `n` HWC u8 images.
    fn infer(
        &self,
        pixels: &[u8],
        n: usize,
        shape: Shape,
        norm: &Normalize,
        scratch: &mut Vec<f32>,
    ) -> Result<Inferred> {
        match self {
            Model::Sela(net, readout, extra) => {
                scratch.resize(n * shape.len(), 0.0);
                for (src, dst) in pixels
                    .chunks(shape.len())
                    .zip(scratch.chunks_mut(shape.len()))
                {
                    clean_into(src, shape, norm, dst);
                }
                let readouts: Vec<Readout> = std::iter::once(*readout)
                    .chain(extra.iter().copied())
                    .collect();
                let mut out = net.infer_readouts(scratch, n, &readouts)?;
                let embedding = out.embeddings.remove(0);
                Ok((embedding, out.embeddings, out.logits))
            }
            Model::Pretrained(p) => {
                let (embedding, logits) =
                    p.infer(pixels, n, shape.channels, shape.height, shape.width)?;
                Ok((embedding, Vec::new(), logits))
            }
        }
    }
}

/// A batch's embeddings, its extra readouts' embeddings and its per-head logits.
type Inferred = (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>);

fn extract(
    config: &PipelineConfig,
    spec: &ModelSpec,
    model: &Model,
    dataset: &Path,
    target: &Path,
    opts: &ExtractOptions,
) -> Result<u64> {
    let shape = Shape {
        channels: spec.channels,
        height: spec.height,
        width: spec.width,
    };
    let norm = Normalize {
        mean: config.mean(),
        std: config.std(),
    };
    let file = DatasetFile::open(dataset)?;
    let dataset_rows = file.table.num_rows();
    if dataset_rows == 0 {
        bail!("{}: the dataset has no rows", dataset.display());
    }
    let weights = match &opts.pretrained {
        Some(p) => &p.weights,
        None => &opts.checkpoint,
    };
    let info = FeaturesInfo {
        layout: model.layout(spec),
        dataset: dataset.display().to_string(),
        dataset_rows,
        checkpoint: Some(weights.display().to_string()),
    };
    let provenance = Provenance::new(STAGE)
        .round(Some(opts.round))
        .config_hash(Some(config.hash()))
        .input(dataset)
        .input(weights);
    // Only now that the inputs have been checked: a bad input leaves no new directory behind.
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the output directory", dir.display()))?;
    }
    let mut writer = FeaturesWriter::create(target, &info, opts.shard, provenance)?;
    let expected = dataset_rows.div_ceil(opts.shard.count as u64);
    let mut progress = sela_cli::Progress::new("extract", Some(expected), "images", opts.quiet);
    let mut scratch = Vec::new();
    let mut row0 = 0u64;
    let mut written = 0u64;
    for batch in file.batches(opts.batch_size.max(256))? {
        let batch = batch?;
        let rows: Vec<usize> = (0..batch.len())
            .filter(|&i| opts.shard.contains(batch.ids().value(i)))
            .collect();
        let pixels = decode_rows(
            dataset,
            &batch,
            row0,
            &rows,
            shape.channels,
            shape.height,
            shape.width,
        )?;
        row0 += batch.len() as u64;
        for (chunk, chunk_pixels) in rows
            .chunks(opts.batch_size)
            .zip(pixels.chunks(opts.batch_size * shape.len()))
        {
            let (embedding, extra, logits) =
                model.infer(chunk_pixels, chunk.len(), shape, &norm, &mut scratch)?;
            let ids: Vec<u64> = chunk.iter().map(|&i| batch.ids().value(i)).collect();
            let extra: Vec<&[f32]> = extra.iter().map(Vec::as_slice).collect();
            let logits: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
            writer.push_with_extra(&ids, &embedding, &extra, &logits)?;
            written += chunk.len() as u64;
            progress.inc(chunk.len() as u64);
        }
    }
    progress.finish();
    writer.finish()?;
    Ok(written)
}
