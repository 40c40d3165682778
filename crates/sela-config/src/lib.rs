//! The pipeline configuration: one TOML file per experiment (`pipelines/*.toml`), read by every
//! stage. Every hyperparameter lives here; stages may override single values from the command
//! line (`--set section.key=value`), and the hash of the resolved configuration is stamped into
//! every output so a file can be traced to the exact settings that produced it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An error loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: invalid pipeline config: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("--set {assignment}: {message}")]
    Override { assignment: String, message: String },
    #[error("{}: invalid pipeline config: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// A complete pipeline configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name and seed.
    pub pipeline: PipelineSection,
    /// Where the data is and what shape its images have. Paths are relative to the directory the
    /// stages run in (the repository root under `make round`).
    pub data: DataSection,
    /// The network.
    pub model: ModelSection,
    /// The label step.
    #[serde(default)]
    pub assign: AssignSection,
    /// The training step.
    #[serde(default)]
    pub train: TrainSection,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: AugmentSection,
    /// Evaluation.
    #[serde(default)]
    pub eval: EvalSection,
}

/// `[pipeline]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Experiment name; outputs go to `runs/<name>/`.
    pub name: String,
    /// Master seed: model initialisation, augmentation, shuffling and the initial labels derive from it.
    #[serde(default)]
    pub seed: u64,
    /// Rounds the learning-rate schedule is planned over.
    #[serde(default = "default_rounds")]
    pub rounds: u32,
}

fn default_rounds() -> u32 {
    10
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training dataset Parquet (clustered and trained on).
    pub train: PathBuf,
    /// Held-out dataset Parquet (evaluated only).
    #[serde(default)]
    pub test: Option<PathBuf>,
    /// Image channels (1 or 3).
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Per-channel mean for normalisation (pixel values in 0..1).
    #[serde(default)]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation for normalisation.
    #[serde(default)]
    pub std: Vec<f32>,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Backbone: `resnet` (sela's own compact ResNet).
    #[serde(default = "default_backbone")]
    pub backbone: String,
    /// Channels of each stage; each stage after the first halves the resolution.
    #[serde(default = "default_widths")]
    pub widths: Vec<usize>,
    /// Residual blocks per stage.
    #[serde(default = "default_blocks")]
    pub blocks: Vec<usize>,
    /// K of each head (SeLa's multi-head "K×H"): `[10, 10, 30]` is three heads.
    pub heads: Vec<usize>,
    /// The stage (0-based) whose output is the embedding `sela-extract` writes; unset, the last
    /// one (the heads' input). Left out of the config hash when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_stage: Option<usize>,
    /// Side of the grid that stage is average-pooled onto: 1 is global pooling (D = its width),
    /// 3 keeps a 3×3 layout (D = 9 × its width). Left out of the config hash when 1.
    #[serde(default = "global_pooling", skip_serializing_if = "is_global_pooling")]
    pub embedding_grid: usize,
    /// Heads (indices into `heads`) that read the embedding (`embedding_stage` pooled onto
    /// `embedding_grid`) instead of the last stage globally pooled. Left out of the config hash
    /// when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding_heads: Vec<usize>,
    /// The first round whose network has `embedding_heads`: before it they read the last stage
    /// like the others; at it they start afresh (seeded initialisation) on the embedding, while
    /// the backbone and the other heads carry over. Left out of the config hash when 0.
    #[serde(default, skip_serializing_if = "is_zero_round")]
    pub embedding_heads_from_round: u32,
}

fn is_zero_round(round: &u32) -> bool {
    *round == 0
}

impl ModelSection {
    /// The heads that read the embedding in `round`: `embedding_heads` from
    /// `embedding_heads_from_round` on, none before.
    pub fn embedding_heads_at(&self, round: u32) -> &[usize] {
        if round >= self.embedding_heads_from_round {
            &self.embedding_heads
        } else {
            &[]
        }
    }
}

fn default_backbone() -> String {
    "resnet".to_string()
}
fn default_widths() -> Vec<usize> {
    vec![32, 64, 128]
}
fn default_blocks() -> Vec<usize> {
    vec![1, 1, 1]
}
fn global_pooling() -> usize {
    1
}
fn is_global_pooling(grid: &usize) -> bool {
    *grid == 1
}

/// `[assign]`: the Sinkhorn label step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssignSection {
    /// Exponent λ of P^λ.
    pub lambda: f64,
    /// Largest relative marginal error at convergence.
    pub tol: f64,
    /// Iteration cap.
    pub max_iters: usize,
    /// Cluster-size prior: `uniform`, `power:<a>` or a Parquet file.
    pub prior: String,
    /// Round Q to exactly balanced hard labels.
    pub exact_balance: bool,
    /// Warm-start from the previous round's duals.
    pub warm_start: bool,
    /// Column updates between sweeps: `anderson` (Anderson acceleration, memory 5),
    /// `anderson:<memory>`, or `none` (plain Sinkhorn-Knopp).
    pub acceleration: String,
    /// Solve each head on its probabilities averaged over every training image's `neighbours`
    /// nearest training images in the embedding (cosine, itself included); 0 solves the head's
    /// own probabilities. Left out of the config hash when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub neighbours: usize,
    /// With `neighbours`: the last round whose labels are solved on neighbour-averaged
    /// probabilities (later rounds solve the heads' own); unset, every round. Left out of the
    /// config hash when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neighbours_until_round: Option<u32>,
    /// Read the labels off a spectral clustering of the embedding instead of solving the heads:
    /// the graph joins every training image to its `spectral` nearest images (cosine, itself
    /// included) and each head with K outputs gets the K-way clustering of that graph; 0 solves
    /// the heads. Left out of the config hash when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub spectral: usize,
    /// With `spectral`: the first round whose labels are read off the spectral clustering
    /// (earlier rounds solve the heads); unset, every round. Left out of the config hash when
    /// unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spectral_from_round: Option<u32>,
    /// With `spectral`: the heads (indices into `model.heads`) whose labels are read off the
    /// spectral clustering; the others are solved as usual. Unset, every head. Left out of the
    /// config hash when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spectral_heads: Option<Vec<u32>>,
    /// With `spectral`: cut the embedding into this many fragments (k-means on the rows of
    /// `spectral_eigenvectors` eigenvectors) and merge them into each head's K groups, pairs of
    /// highest normalised association first, no group past `spectral_size_cap` × N / K; 0 runs
    /// K-way k-means on K eigenvectors. Left out of the config hash when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub spectral_fragments: usize,
    /// With `spectral_fragments`: the leading eigenvectors the fragments are cut from; 0 (left
    /// out of the config hash): as many as the largest spectral head has outputs.
    #[serde(skip_serializing_if = "is_zero")]
    pub spectral_eigenvectors: usize,
    /// With `spectral_fragments`: the largest merged group, × N / K (relaxed by 5 % steps only
    /// when no pair fits); unset (left out of the config hash): 1.2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spectral_size_cap: Option<f64>,
    /// With `spectral_fragments`: cut the fragments this many times (one k-means run each, seeds
    /// `pipeline.seed`, `pipeline.seed + 1`, …) and keep one merged partition, as
    /// `spectral_keep` says; 0 or 1 (0 left out of the config hash): one cut.
    #[serde(skip_serializing_if = "is_zero")]
    pub spectral_cuts: usize,
    /// With `spectral_cuts`: which merged partition is kept: `modularity` (the highest on the
    /// graph; left out of the config hash) or `agreement` (the highest mean NMI with the heads'
    /// own clusterings, each head's argmax over its logits).
    #[serde(skip_serializing_if = "is_modularity")]
    pub spectral_keep: String,
    /// With `spectral_fragments`: steps of balanced label propagation after the merge, each
    /// re-labelling every image by a transport problem on its graph neighbours' labels (each
    /// cluster N / K images); 0 (left out of the config hash): none.
    #[serde(skip_serializing_if = "is_zero")]
    pub spectral_smoothing: usize,
    /// With `spectral_smoothing`: the exponent λ of its transport problems; unset (left out of
    /// the config hash): 10.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spectral_smoothing_lambda: Option<f64>,
    /// With `spectral_fragments`: refine the kept merged partition before propagation by moving
    /// whole fragments between groups while that raises its mean NMI with the heads' own
    /// clusterings (each head's argmax) plus this weight × its modularity on the graph, no group
    /// past the size cap; unset (left out of the config hash): no refinement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spectral_refine: Option<f64>,
    /// With `spectral_refine`: more fragment counts to try beside `spectral_fragments`, each
    /// cut, merged and refined the same way, keeping the refined partition of highest
    /// modularity on the graph; empty (left out of the config hash): `spectral_fragments` alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spectral_extra_fragments: Vec<usize>,
    /// With `spectral_refine`: more readouts of the embedding's stage, on these grids (G × G
    /// cells each), whose own graphs are cut, merged, refined and smoothed the same way; of every
    /// graph's labels, those of highest mean NMI with the heads' own clusterings plus
    /// `spectral_refine` × their mean modularity over all the graphs are kept. Extraction writes
    /// them (column `embedding_grid<G>`) for the rounds whose features a spectral round reads.
    /// Empty (left out of the config hash): the `embedding` column's graph alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spectral_extra_grids: Vec<usize>,
}

/// [`AssignSection::spectral_size_cap`] when unset.
pub const DEFAULT_SPECTRAL_SIZE_CAP: f64 = 1.2;
/// [`AssignSection::spectral_smoothing_lambda`] when unset.
pub const DEFAULT_SPECTRAL_SMOOTHING_LAMBDA: f64 = 10.0;

impl AssignSection {
    /// The extra readout grids extraction writes in `round`: `spectral_extra_grids` when the
    /// next round's labels are spectral (its label step reads this round's features), none
    /// otherwise.
    pub fn extra_grids_extracted_at(&self, round: u32) -> &[usize] {
        let next_is_spectral = self.spectral > 0
            && self
                .spectral_from_round
                .is_none_or(|from| round + 1 >= from);
        if next_is_spectral {
            &self.spectral_extra_grids
        } else {
            &[]
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
fn is_modularity(keep: &str) -> bool {
    keep == "modularity"
}

impl Default for AssignSection {
    fn default() -> Self {
        AssignSection {
            lambda: 25.0,
            tol: 1e-3,
            max_iters: 1000,
            prior: "uniform".to_string(),
            exact_balance: false,
            warm_start: true,
            acceleration: "anderson".to_string(),
            neighbours: 0,
            neighbours_until_round: None,
            spectral: 0,
            spectral_from_round: None,
            spectral_heads: None,
            spectral_fragments: 0,
            spectral_eigenvectors: 0,
            spectral_size_cap: None,
            spectral_cuts: 0,
            spectral_keep: "modularity".to_string(),
            spectral_smoothing: 0,
            spectral_smoothing_lambda: None,
            spectral_refine: None,
            spectral_extra_fragments: Vec::new(),
            spectral_extra_grids: Vec::new(),
        }
    }
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Epochs of training per round: one count for every round, or one per round.
    pub epochs_per_round: RoundEpochs,
    /// Mini-batch size.
    pub batch_size: usize,
    /// `sgd` (with momentum) or `adamw`.
    pub optimizer: String,
    /// Peak learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// `cosine`, `step` or `constant`, over all rounds' epochs.
    pub schedule: String,
    /// Linear warm-up, in epochs, at the start of the whole run.
    pub warmup_epochs: f64,
    /// For `step`: multiply the rate by `step_gamma` at these fractions of the run.
    pub step_milestones: Vec<f64>,
    /// For `step`: the decay factor.
    pub step_gamma: f64,
    /// Threads for training (0 = all cores).
    pub threads: usize,
}

/// How many epochs each round trains. Label updates happen between rounds, so a per-round list
/// spaces them: `[1, 1, 1, 1, 2, 4]` re-solves the labels every epoch early and rarely late (the
/// official code spaces its label updates quadratically for the same reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "an epoch count, or a list with one epoch count per round"
)]
pub enum RoundEpochs {
    /// Every round trains this many epochs.
    Every(u32),
    /// Round r (1-based) trains entry r − 1; one entry per round of `pipeline.rounds`.
    PerRound(Vec<u32>),
}

impl RoundEpochs {
    /// The epochs round `round` (≥ 1) trains; `None` past the end of a per-round list.
    pub fn of_round(&self, round: u32) -> Option<u32> {
        match self {
            RoundEpochs::Every(e) => Some(*e),
            RoundEpochs::PerRound(list) => list.get(round.checked_sub(1)? as usize).copied(),
        }
    }

    /// The epochs trained before round `round` (≥ 1) starts; `None` past a per-round list.
    pub fn before_round(&self, round: u32) -> Option<u64> {
        let done = round.checked_sub(1)?;
        match self {
            RoundEpochs::Every(e) => Some(done as u64 * *e as u64),
            RoundEpochs::PerRound(list) if (done as usize) < list.len() => {
                Some(list[..done as usize].iter().map(|&e| e as u64).sum())
            }
            RoundEpochs::PerRound(_) => None,
        }
    }

    /// The epochs of a whole run of `rounds` rounds (a per-round list: the sum of its entries).
    pub fn total(&self, rounds: u32) -> u64 {
        match self {
            RoundEpochs::Every(e) => rounds as u64 * *e as u64,
            RoundEpochs::PerRound(list) => list.iter().map(|&e| e as u64).sum(),
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs_per_round: RoundEpochs::Every(1),
            batch_size: 256,
            optimizer: "sgd".to_string(),
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-5,
            schedule: "cosine".to_string(),
            warmup_epochs: 0.0,
            step_milestones: vec![0.5, 0.75],
            step_gamma: 0.1,
            threads: 0,
        }
    }
}

/// `[augment]`: applied on the fly during training, never at extraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentSection {
    /// Random resized crop: the crop's area as a share of the image, `[min, max]`.
    pub crop_scale: [f32; 2],
    /// Random resized crop: aspect ratio range.
    pub crop_ratio: [f32; 2],
    /// Random rotation, ± degrees.
    pub rotation_deg: f32,
    /// Random translation, ± share of the side.
    pub translate: f32,
    /// Horizontal flip with probability 0.5 (off for digits and text).
    pub hflip: bool,
    /// Brightness jitter strength.
    pub brightness: f32,
    /// Contrast jitter strength.
    pub contrast: f32,
    /// Probability of converting an RGB image to grayscale.
    pub grayscale_p: f32,
    /// The first round whose training sees the images as they are, with no augmentation (the
    /// views `sela-extract` reads); unset, every round is augmented. Left out of the config hash
    /// when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_from_round: Option<u32>,
}

impl AugmentSection {
    /// Whether training in `round` augments its images.
    pub fn applies_at(&self, round: u32) -> bool {
        self.off_from_round.is_none_or(|first| round < first)
    }
}

impl Default for AugmentSection {
    fn default() -> Self {
        AugmentSection {
            crop_scale: [0.5, 1.0],
            crop_ratio: [0.75, 1.333],
            rotation_deg: 10.0,
            translate: 0.1,
            hflip: false,
            brightness: 0.4,
            contrast: 0.4,
            grayscale_p: 0.0,
            off_from_round: None,
        }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Neighbour counts of the weighted kNN classifier.
    pub knn_k: Vec<usize>,
    /// Temperature of the kNN vote weights exp(sim / T).
    pub knn_temperature: f32,
    /// Epochs of the linear probe's optimiser.
    pub probe_epochs: usize,
    /// L2 penalty of the linear probe.
    pub probe_l2: f64,
    /// Images per cluster in the report's galleries.
    pub gallery_size: usize,
    /// Reference values the report draws beside a metric, e.g. `{ knn20_acc = 0.842 }`: what a
    /// method on raw pixels reaches on this data (see `floor_label`).
    pub floors: std::collections::BTreeMap<String, f64>,
    /// What the `floors` are.
    pub floor_label: String,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            knn_k: vec![20, 200],
            knn_temperature: 0.07,
            probe_epochs: 100,
            probe_l2: 1e-4,
            gallery_size: 8,
            floors: std::collections::BTreeMap::new(),
            floor_label: "pixel-space floor".to_string(),
        }
    }
}

impl PipelineConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, &[])
    }

    /// Reads a config file, applies `section.key=value` overrides, and validates the result.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            cause: source,
        })?;
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for assignment in overrides {
            apply_override(&mut value, assignment)?;
        }
        let config: PipelineConfig =
            PipelineConfig::deserialize(value).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), String> {
        // TOML has `inf` and `nan`, and an f32 setting turns a large f64 into infinity.
        if let Some((name, v)) = self
            .float_settings()
            .into_iter()
            .find(|(_, v)| !v.is_finite())
        {
            return Err(format!("{name} must be a finite number, got {v}"));
        }
        let d = &self.data;
        if !(d.channels == 1 || d.channels == 3) {
            return Err(format!("data.channels must be 1 or 3, got {}", d.channels));
        }
        if d.height < 8 || d.width < 8 {
            return Err(format!(
                "data.height and data.width must be at least 8, got {}×{}",
                d.height, d.width
            ));
        }
        for (name, v) in [("mean", &d.mean), ("std", &d.std)] {
            if !v.is_empty() && v.len() != d.channels {
                return Err(format!(
                    "data.{name} has {} values for {} channels",
                    v.len(),
                    d.channels
                ));
            }
        }
        if d.std.iter().any(|&s| s <= 0.0) {
            return Err("data.std values must be positive".to_string());
        }
        let m = &self.model;
        if m.heads.is_empty() || m.heads.iter().any(|&k| k < 1) {
            return Err("model.heads must list at least one head, each with K ≥ 1".to_string());
        }
        if let Some(h) = self
            .assign
            .spectral_heads
            .iter()
            .flatten()
            .find(|&&h| h as usize >= m.heads.len())
        {
            return Err(format!(
                "assign.spectral_heads names head {h}, but model.heads has {} (0..{})",
                m.heads.len(),
                m.heads.len() - 1
            ));
        }
        let a = &self.assign;
        if a.spectral_fragments > 0 {
            let largest = m
                .heads
                .iter()
                .enumerate()
                .filter(|(h, _)| {
                    a.spectral_heads
                        .as_ref()
                        .is_none_or(|list| list.contains(&(*h as u32)))
                })
                .map(|(_, &k)| k)
                .max()
                .unwrap_or(0);
            if a.spectral_fragments <= largest {
                return Err(format!(
                    "assign.spectral_fragments = {} must exceed the largest spectral head's K \
                     ({largest}): the fragments are merged into K groups",
                    a.spectral_fragments
                ));
            }
            if let Some(&f) = a.spectral_extra_fragments.iter().find(|&&f| f <= largest) {
                return Err(format!(
                    "assign.spectral_extra_fragments holds {f}, which must exceed the largest \
                     spectral head's K ({largest})"
                ));
            }
        }
        if !a.spectral_extra_fragments.is_empty()
            && (a.spectral_fragments == 0 || a.spectral_refine.is_none())
        {
            return Err(
                "assign.spectral_extra_fragments needs assign.spectral_fragments and \
                 assign.spectral_refine: the refined partitions are what is compared"
                    .to_string(),
            );
        }
        if !a.spectral_extra_grids.is_empty()
            && (a.spectral_fragments == 0 || a.spectral_refine.is_none())
        {
            return Err(
                "assign.spectral_extra_grids needs assign.spectral_fragments and \
                 assign.spectral_refine: the graphs' refined labels are what is compared"
                    .to_string(),
            );
        }
        for (i, &g) in a.spectral_extra_grids.iter().enumerate() {
            if g == m.embedding_grid || a.spectral_extra_grids[..i].contains(&g) {
                return Err(format!(
                    "assign.spectral_extra_grids holds grid {g} twice (with model.embedding_grid \
                     = {}): each readout makes one graph",
                    m.embedding_grid
                ));
            }
            if g == 0 {
                return Err(
                    "assign.spectral_extra_grids holds 0: a grid has at least 1 cell \
                            a side"
                        .to_string(),
                );
            }
        }
        if let Some(cap) = a
            .spectral_size_cap
            .filter(|c| !(c.is_finite() && *c >= 1.0))
        {
            return Err(format!(
                "assign.spectral_size_cap = {cap}: a group of at most that × N / K images must \
                 be at least 1"
            ));
        }
        if !matches!(a.spectral_keep.as_str(), "modularity" | "agreement") {
            return Err(format!(
                "assign.spectral_keep = `{}`: `modularity` or `agreement`",
                a.spectral_keep
            ));
        }
        if let Some(l) = a
            .spectral_smoothing_lambda
            .filter(|l| !(l.is_finite() && *l > 0.0))
        {
            return Err(format!(
                "assign.spectral_smoothing_lambda = {l} must be a positive finite number"
            ));
        }
        if let Some(w) = a.spectral_refine.filter(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(format!(
                "assign.spectral_refine = {w}: the weight on modularity must be a finite number \
                 ≥ 0"
            ));
        }
        if m.widths.is_empty() || m.widths.len() != m.blocks.len() || m.widths.contains(&0) {
            return Err(format!(
                "model.widths ({:?}) and model.blocks ({:?}) must be non-empty, of equal length, widths > 0",
                m.widths, m.blocks
            ));
        }
        if let Some(stage) = m.embedding_stage.filter(|&s| s >= m.widths.len()) {
            return Err(format!(
                "model.embedding_stage {stage} is out of range: the backbone has {} stages (0 to {})",
                m.widths.len(),
                m.widths.len() - 1
            ));
        }
        if m.embedding_grid == 0 || m.embedding_grid > d.height.min(d.width) {
            return Err(format!(
                "model.embedding_grid must be between 1 (global pooling) and the image side {}, got {}",
                d.height.min(d.width),
                m.embedding_grid
            ));
        }
        let mut seen = vec![false; m.heads.len()];
        for &h in &m.embedding_heads {
            if h >= m.heads.len() || std::mem::replace(&mut seen[h], true) {
                return Err(format!(
                    "model.embedding_heads {:?}: each must be a distinct head index below {} \
                     (model.heads has {} heads)",
                    m.embedding_heads,
                    m.heads.len(),
                    m.heads.len()
                ));
            }
        }
        let a = &self.assign;
        if !(a.lambda > 0.0 && a.lambda.is_finite()) {
            return Err(format!("assign.lambda must be positive, got {}", a.lambda));
        }
        if a.tol.is_nan() || a.tol <= 0.0 {
            return Err(format!("assign.tol must be positive, got {}", a.tol));
        }
        if let Err(e) = a.acceleration.parse::<sela_sinkhorn::Acceleration>() {
            return Err(format!("assign.acceleration: {e}"));
        }
        let t = &self.train;
        match &t.epochs_per_round {
            RoundEpochs::Every(0) => {
                return Err("train.epochs_per_round must be at least 1".to_string());
            }
            RoundEpochs::PerRound(list) if list.len() != self.pipeline.rounds as usize => {
                return Err(format!(
                    "train.epochs_per_round lists {} rounds, pipeline.rounds is {}: give one entry per round",
                    list.len(),
                    self.pipeline.rounds
                ));
            }
            RoundEpochs::PerRound(list) if list.contains(&0) => {
                return Err(format!(
                    "train.epochs_per_round entries must be at least 1, got {list:?}"
                ));
            }
            _ => {}
        }
        if t.batch_size == 0 {
            return Err("train.batch_size must be positive".to_string());
        }
        if !["sgd", "adamw"].contains(&t.optimizer.as_str()) {
            return Err(format!(
                "train.optimizer must be `sgd` or `adamw`, got `{}`",
                t.optimizer
            ));
        }
        if !["cosine", "step", "constant"].contains(&t.schedule.as_str()) {
            return Err(format!(
                "train.schedule must be `cosine`, `step` or `constant`, got `{}`",
                t.schedule
            ));
        }
        if t.lr.is_nan() || t.lr <= 0.0 {
            return Err(format!("train.lr must be positive, got {}", t.lr));
        }
        let g = &self.augment;
        if !(0.0 < g.crop_scale[0] && g.crop_scale[0] <= g.crop_scale[1] && g.crop_scale[1] <= 1.0)
        {
            return Err(format!(
                "augment.crop_scale must satisfy 0 < min ≤ max ≤ 1, got {:?}",
                g.crop_scale
            ));
        }
        if let Some((k, v)) = self.eval.floors.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("eval.floors.{k} must be a finite number, got {v}"));
        }
        if self.eval.knn_k.contains(&0) {
            return Err("eval.knn_k values must be positive".to_string());
        }
        Ok(())
    }

    /// Every floating-point setting, by name.
    fn float_settings(&self) -> Vec<(&'static str, f64)> {
        let (d, a, t, g, e) = (
            &self.data,
            &self.assign,
            &self.train,
            &self.augment,
            &self.eval,
        );
        let mut out = vec![
            ("assign.lambda", a.lambda),
            ("assign.tol", a.tol),
            ("train.lr", t.lr),
            ("train.momentum", t.momentum),
            ("train.weight_decay", t.weight_decay),
            ("train.warmup_epochs", t.warmup_epochs),
            ("train.step_gamma", t.step_gamma),
            ("augment.rotation_deg", g.rotation_deg.into()),
            ("augment.translate", g.translate.into()),
            ("augment.brightness", g.brightness.into()),
            ("augment.contrast", g.contrast.into()),
            ("augment.grayscale_p", g.grayscale_p.into()),
            ("eval.knn_temperature", e.knn_temperature.into()),
            ("eval.probe_l2", e.probe_l2),
        ];
        let lists: [(&'static str, Vec<f64>); 5] = [
            ("data.mean", d.mean.iter().map(|&v| v.into()).collect()),
            ("data.std", d.std.iter().map(|&v| v.into()).collect()),
            ("train.step_milestones", t.step_milestones.clone()),
            ("augment.crop_scale", g.crop_scale.map(f64::from).to_vec()),
            ("augment.crop_ratio", g.crop_ratio.map(f64::from).to_vec()),
        ];
        for (name, values) in lists {
            out.extend(values.into_iter().map(|v| (name, v)));
        }
        out
    }

    /// The first 16 hex digits of the SHA-256 of the canonical JSON of the resolved config.
    pub fn hash(&self) -> String {
        let json = serde_json::to_string(self).expect("config serializes");
        let digest = Sha256::digest(json.as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// Per-channel mean, defaulting to 0.5.
    pub fn mean(&self) -> Vec<f32> {
        if self.data.mean.is_empty() {
            vec![0.5; self.data.channels]
        } else {
            self.data.mean.clone()
        }
    }

    /// Per-channel std, defaulting to 0.25.
    pub fn std(&self) -> Vec<f32> {
        if self.data.std.is_empty() {
            vec![0.25; self.data.channels]
        } else {
            self.data.std.clone()
        }
    }
}

/// Applies one `section.key=value` override; the value is parsed as TOML (falling back to a string).
fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let err = |message: &str| ConfigError::Override {
        assignment: assignment.to_string(),
        message: message.to_string(),
    };
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| err("expected section.key=value"))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(err("the key must be section.key, e.g. assign.lambda"));
    }
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {}", raw.trim()))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let section = root
        .entry(parts[0].to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let table = section
        .as_table_mut()
        .ok_or_else(|| err("that section is not a table"))?;
    table.insert(parts[1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[pipeline]
name = "t"
[data]
train = "train.parquet"
channels = 1
height = 28
width = 28
[model]
heads = [10]
"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_and_overrides() {
        let (_d, path) = write(MINIMAL);
        let c = PipelineConfig::load(&path).unwrap();
        assert_eq!(c.assign.lambda, 25.0);
        let o = PipelineConfig::load_with(
            &path,
            &["assign.lambda=50".into(), "train.optimizer=adamw".into()],
        )
        .unwrap();
        assert_eq!(o.assign.lambda, 50.0);
        assert_eq!(o.train.optimizer, "adamw");
        assert_ne!(c.hash(), o.hash());
        assert_eq!(c.hash(), PipelineConfig::load(&path).unwrap().hash());
        assert_eq!(c.hash().len(), 16);
    }

    #[test]
    fn unknown_key_and_wrong_type_are_named() {
        let (_d, path) = write(&format!("{MINIMAL}\n[assign]\nlamda = 3\n"));
        let msg = PipelineConfig::load(&path).unwrap_err().to_string();
        assert!(msg.contains("p.toml") && msg.contains("lamda"), "{msg}");

        let (_d, path) = write(&MINIMAL.replace("channels = 1", "channels = \"one\""));
        let msg = PipelineConfig::load(&path).unwrap_err().to_string();
        assert!(msg.contains("channels"), "{msg}");
    }

    #[test]
    fn semantic_checks() {
        let (_d, path) = write(MINIMAL);
        let msg = PipelineConfig::load_with(&path, &["assign.lambda=-1".into()])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("assign.lambda must be positive"), "{msg}");
        let msg = PipelineConfig::load_with(&path, &["assign.acceleration=\"fast\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("assign.acceleration") && msg.contains("fast"),
            "{msg}"
        );
        let ok = PipelineConfig::load_with(&path, &["assign.acceleration=\"anderson:3\"".into()]);
        assert_eq!(ok.unwrap().assign.acceleration, "anderson:3");
        let msg = PipelineConfig::load_with(&path, &["lambda".into()])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("section.key=value"), "{msg}");
    }

    #[test]
    fn embedding_readout_defaults_and_keeps_old_hashes() {
        let (_d, path) = write(MINIMAL);
        let plain = PipelineConfig::load(&path).unwrap();
        assert_eq!(
            (plain.model.embedding_stage, plain.model.embedding_grid),
            (None, 1)
        );
        let one = PipelineConfig::load_with(&path, &["model.embedding_grid=1".into()]).unwrap();
        assert_eq!(plain.hash(), one.hash());
        let set = [
            "model.embedding_stage=1".into(),
            "model.embedding_grid=3".into(),
        ];
        let grid = PipelineConfig::load_with(&path, &set).unwrap();
        assert_eq!(
            (grid.model.embedding_stage, grid.model.embedding_grid),
            (Some(1), 3)
        );
        assert_ne!(plain.hash(), grid.hash());
        for (set, wanted) in [
            (
                "model.embedding_grid=0",
                "model.embedding_grid must be between 1",
            ),
            ("model.embedding_grid=100000", "got 100000"),
            (
                "model.embedding_stage=3",
                "embedding_stage 3 is out of range: the backbone has 3",
            ),
        ] {
            let msg = PipelineConfig::load_with(&path, &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(msg.contains(wanted), "{set}: {msg}");
        }
    }

    #[test]
    fn embedding_heads_default_off_keep_old_hashes_and_switch_at_their_round() {
        let (_d, path) = write(MINIMAL);
        let plain = PipelineConfig::load(&path).unwrap();
        assert!(plain.model.embedding_heads.is_empty());
        let off = PipelineConfig::load_with(
            &path,
            &[
                "model.embedding_heads=[]".into(),
                "model.embedding_heads_from_round=0".into(),
            ],
        )
        .unwrap();
        assert_eq!(plain.hash(), off.hash());
        let set = [
            "model.heads=[10, 10, 20]".into(),
            "model.embedding_heads=[2, 0]".into(),
            "model.embedding_heads_from_round=3".into(),
        ];
        let on = PipelineConfig::load_with(&path, &set).unwrap();
        assert!(on.model.embedding_heads_at(2).is_empty());
        assert_eq!(on.model.embedding_heads_at(3), &[2, 0]);
        assert_eq!(on.model.embedding_heads_at(9), &[2, 0]);
        let fewer = PipelineConfig::load_with(&path, &set[..2]).unwrap();
        assert_ne!(on.hash(), fewer.hash());
        assert_eq!(fewer.model.embedding_heads_at(0), &[2, 0]);
        for bad in ["model.embedding_heads=[1]", "model.embedding_heads=[0, 0]"] {
            let msg = PipelineConfig::load_with(&path, &[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("model.embedding_heads")
                    && msg.contains("distinct head index below 1"),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn neighbour_averaging_defaults_off_and_keeps_old_hashes() {
        let (_d, path) = write(MINIMAL);
        let plain = PipelineConfig::load(&path).unwrap();
        assert_eq!(
            (plain.assign.neighbours, plain.assign.neighbours_until_round),
            (0, None)
        );
        let off = PipelineConfig::load_with(&path, &["assign.neighbours=0".into()]).unwrap();
        assert_eq!(plain.hash(), off.hash());
        let set = [
            "assign.neighbours=50".into(),
            "assign.neighbours_until_round=4".into(),
        ];
        let on = PipelineConfig::load_with(&path, &set).unwrap();
        assert_eq!(
            (on.assign.neighbours, on.assign.neighbours_until_round),
            (50, Some(4))
        );
        assert_ne!(plain.hash(), on.hash());
    }

    #[test]
    fn augmentation_off_from_round_defaults_off_and_keeps_old_hashes() {
        let (_d, path) = write(MINIMAL);
        let plain = PipelineConfig::load(&path).unwrap();
        assert!(plain.augment.off_from_round.is_none());
        assert!(plain.augment.applies_at(0) && plain.augment.applies_at(99));
        let on = PipelineConfig::load_with(&path, &["augment.off_from_round=3".into()]).unwrap();
        assert!(on.augment.applies_at(2));
        assert!(!on.augment.applies_at(3) && !on.augment.applies_at(9));
        assert_ne!(plain.hash(), on.hash());
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("off_from_round"), "{json}");
    }

    #[test]
    fn spectral_labels_default_off_and_keep_old_hashes() {
        let (_d, path) = write(MINIMAL);
        let plain = PipelineConfig::load(&path).unwrap();
        assert_eq!(
            (plain.assign.spectral, plain.assign.spectral_from_round),
            (0, None)
        );
        let off = PipelineConfig::load_with(&path, &["assign.spectral=0".into()]).unwrap();
        assert_eq!(plain.hash(), off.hash());
        let set = [
            "assign.spectral=10".into(),
            "assign.spectral_from_round=13".into(),
            "assign.spectral_heads=[0]".into(),
        ];
        let on = PipelineConfig::load_with(&path, &set).unwrap();
        assert_eq!(
            (
                on.assign.spectral,
                on.assign.spectral_from_round,
                on.assign.spectral_heads.clone()
            ),
            (10, Some(13), Some(vec![0]))
        );
        assert_ne!(plain.hash(), on.hash());
        let err = PipelineConfig::load_with(&path, &["assign.spectral_heads=[0, 7]".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("assign.spectral_heads names head 7"), "{err}");
    }

    #[test]
    fn merged_spectral_labels_default_off_and_are_checked() {
        let (_d, path) = write(MINIMAL);
        let plain = PipelineConfig::load(&path).unwrap();
        let off = PipelineConfig::load_with(
            &path,
            &[
                "assign.spectral_fragments=0".into(),
                "assign.spectral_eigenvectors=0".into(),
                "assign.spectral_cuts=0".into(),
                "assign.spectral_keep=\"modularity\"".into(),
                "assign.spectral_smoothing=0".into(),
                "assign.spectral_extra_fragments=[]".into(),
            ],
        )
        .unwrap();
        assert_eq!(plain.hash(), off.hash());
        let agreement =
            PipelineConfig::load_with(&path, &["assign.spectral_keep=\"agreement\"".into()])
                .unwrap();
        assert_ne!(plain.hash(), agreement.hash());
        let keep = PipelineConfig::load_with(&path, &["assign.spectral_keep=\"central\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            keep.contains("assign.spectral_keep = `central`: `modularity` or `agreement`"),
            "{keep}"
        );
        let k = plain.model.heads.iter().copied().max().unwrap();
        let on = PipelineConfig::load_with(
            &path,
            &[
                "assign.spectral=10".into(),
                format!("assign.spectral_fragments={}", 5 * k),
                "assign.spectral_eigenvectors=30".into(),
                "assign.spectral_size_cap=1.3".into(),
                "assign.spectral_cuts=5".into(),
                "assign.spectral_smoothing=10".into(),
                "assign.spectral_smoothing_lambda=8.0".into(),
            ],
        )
        .unwrap();
        assert_eq!(on.assign.spectral_size_cap, Some(1.3));
        assert_ne!(plain.hash(), on.hash());
        let too_few = PipelineConfig::load_with(&path, &[format!("assign.spectral_fragments={k}")])
            .unwrap_err()
            .to_string();
        assert!(
            too_few.contains("must exceed the largest spectral head's K"),
            "{too_few}"
        );
        let cap = PipelineConfig::load_with(&path, &["assign.spectral_size_cap=0.5".into()])
            .unwrap_err()
            .to_string();
        assert!(cap.contains("assign.spectral_size_cap = 0.5"), "{cap}");
        let lambda =
            PipelineConfig::load_with(&path, &["assign.spectral_smoothing_lambda=-1.0".into()])
                .unwrap_err()
                .to_string();
        assert!(
            lambda.contains("spectral_smoothing_lambda = -1"),
            "{lambda}"
        );
        let refine =
            PipelineConfig::load_with(&path, &["assign.spectral_refine=3.0".into()]).unwrap();
        assert_eq!(refine.assign.spectral_refine, Some(3.0));
        assert_ne!(plain.hash(), refine.hash());
        let negative = PipelineConfig::load_with(&path, &["assign.spectral_refine=-1.0".into()])
            .unwrap_err()
            .to_string();
        assert!(
            negative.contains("assign.spectral_refine = -1"),
            "{negative}"
        );
        let fragments = format!("assign.spectral_fragments={}", 5 * k);
        let refined = |extra: &str| {
            PipelineConfig::load_with(
                &path,
                &[
                    fragments.clone(),
                    "assign.spectral_refine=3.0".into(),
                    format!("assign.spectral_extra_fragments={extra}"),
                ],
            )
        };
        let empty = refined("[]").unwrap();
        let extra = refined(&format!("[{}]", 7 * k)).unwrap();
        assert_eq!(extra.assign.spectral_extra_fragments, [7 * k]);
        assert_ne!(empty.hash(), extra.hash());
        let small = refined(&format!("[{k}]")).unwrap_err().to_string();
        assert!(small.contains("must exceed the largest"), "{small}");
        let unrefined = PipelineConfig::load_with(
            &path,
            &[fragments, "assign.spectral_extra_fragments=[100]".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            unrefined.contains("needs assign.spectral_fragments and"),
            "{unrefined}"
        );
    }

    #[test]
    fn extra_grids_need_refinement_differ_from_the_embedding_and_are_extracted_before_spectral_rounds(
    ) {
        let (_d, path) = write(MINIMAL);
        let plain = PipelineConfig::load(&path).unwrap();
        let k = plain.model.heads.iter().copied().max().unwrap();
        let grid = plain.model.embedding_grid;
        let with = |extra: &[String]| {
            let mut o = vec![
                "assign.spectral=10".to_string(),
                "assign.spectral_from_round=3".into(),
                format!("assign.spectral_fragments={}", 5 * k),
                "assign.spectral_refine=3.0".into(),
            ];
            o.extend_from_slice(extra);
            PipelineConfig::load_with(&path, &o)
        };
        let on = with(&[format!("assign.spectral_extra_grids=[{}]", grid + 1)]).unwrap();
        assert_eq!(on.assign.spectral_extra_grids, [grid + 1]);
        assert_ne!(with(&[]).unwrap().hash(), on.hash());
        // Round 2's features feed round 3's spectral label step; round 1's feed a solved one.
        let a = &on.assign;
        assert_eq!(
            (
                a.extra_grids_extracted_at(1),
                a.extra_grids_extracted_at(2),
                a.extra_grids_extracted_at(5)
            ),
            (&[][..], &[grid + 1][..], &[grid + 1][..])
        );
        assert!(plain.assign.extra_grids_extracted_at(5).is_empty());
        for (bad, expected) in [
            (format!("[{grid}]"), "holds grid"),
            (format!("[{0}, {0}]", grid + 1), "holds grid"),
            ("[0]".to_string(), "holds 0"),
        ] {
            let err = with(&[format!("assign.spectral_extra_grids={bad}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{bad}: {err}");
        }
        let unrefined = PipelineConfig::load_with(
            &path,
            &[
                "assign.spectral=10".into(),
                format!("assign.spectral_fragments={}", 5 * k),
                format!("assign.spectral_extra_grids=[{}]", grid + 1),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            unrefined.contains("assign.spectral_extra_grids needs assign.spectral_fragments"),
            "{unrefined}"
        );
    }

    #[test]
    fn epochs_per_round_is_a_count_or_one_entry_per_round() {
        let (_d, path) = write(MINIMAL);
        let every = PipelineConfig::load_with(&path, &["train.epochs_per_round=2".into()]).unwrap();
        let e = &every.train.epochs_per_round;
        assert_eq!(e, &RoundEpochs::Every(2));
        assert_eq!(
            (e.of_round(7), e.before_round(4), e.total(5)),
            (Some(2), Some(6), 10)
        );
        // The integer form serialises as before, so existing runs keep their config hash.
        let json = serde_json::to_value(&every.train).unwrap();
        assert_eq!(json["epochs_per_round"], serde_json::json!(2));

        let sets = [
            "pipeline.rounds=3".into(),
            "train.epochs_per_round=[1, 2, 5]".into(),
        ];
        let listed = PipelineConfig::load_with(&path, &sets).unwrap();
        let l = &listed.train.epochs_per_round;
        assert_eq!(
            (1..=4).map(|r| l.of_round(r)).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(5), None]
        );
        assert_eq!(
            (1..=4).map(|r| l.before_round(r)).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(3), None]
        );
        assert_eq!(
            (l.total(3), l.of_round(0), l.before_round(0)),
            (8, None, None)
        );
        assert_ne!(listed.hash(), every.hash());

        for (sets, expected) in [
            (
                vec!["train.epochs_per_round=[1, 2]"],
                "train.epochs_per_round lists 2 rounds, pipeline.rounds is 10",
            ),
            (
                vec!["pipeline.rounds=2", "train.epochs_per_round=[1, 0]"],
                "entries must be at least 1",
            ),
            (vec!["train.epochs_per_round=0"], "must be at least 1"),
            (
                vec!["train.epochs_per_round=\"two\""],
                "an epoch count, or a list with one epoch count per round",
            ),
        ] {
            let sets: Vec<String> = sets.into_iter().map(String::from).collect();
            let msg = PipelineConfig::load_with(&path, &sets)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("p.toml") && msg.contains(expected),
                "{sets:?}: {msg}"
            );
        }
    }

    /// Found by fuzzing: `inf`, `nan` and f64 values too large for an f32 setting (which become
    /// infinite) were accepted.
    #[test]
    fn non_finite_numbers_are_refused() {
        let (_d, path) = write(MINIMAL);
        for (set, name) in [
            ("augment.rotation_deg=-6.15e109", "augment.rotation_deg"),
            ("train.lr=inf", "train.lr"),
            ("train.momentum=nan", "train.momentum"),
            ("data.std=[nan]", "data.std"),
            ("augment.crop_ratio=[0.5, 1e39]", "augment.crop_ratio"),
            ("eval.knn_temperature=-inf", "eval.knn_temperature"),
        ] {
            let msg = PipelineConfig::load_with(&path, &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("p.toml") && msg.contains(&format!("{name} must be a finite number")),
                "{set}: {msg}"
            );
        }
    }
}
