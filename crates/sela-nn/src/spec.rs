//! The architecture of sela's network, as read from the pipeline config's `[data]` and `[model]`.

use serde::{Deserialize, Serialize};

use crate::error::{NnError, Result};

/// What the network looks like: input shape, backbone and heads.
///
/// The backbone is a compact ResNet: a 3×3 stem convolution (no early down-sampling), then one
/// stage per entry of `widths`, each of `blocks[s]` basic residual blocks (two 3×3 convolutions
/// with BatchNorm and ReLU); every stage after the first halves the resolution in its first block.
/// Global average pooling of the last stage is the heads' input (D = the last width), and each
/// head is a linear layer from it to `heads[h]` logits; the `embedding_heads` read
/// `embedding_readout` instead. What inference reports as the embedding is a [`Readout`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Backbone family; only `resnet` exists.
    pub backbone: String,
    /// Input channels (1 or 3).
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Channels of each stage.
    pub widths: Vec<usize>,
    /// Residual blocks of each stage.
    pub blocks: Vec<usize>,
    /// K of each head.
    pub heads: Vec<usize>,
    /// Heads (indices into `heads`) that read `embedding_readout` instead of the last stage
    /// globally pooled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding_heads: Vec<usize>,
    /// What the `embedding_heads` read; set exactly when there are some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_readout: Option<Readout>,
}

impl ModelSpec {
    /// The spec a pipeline config describes for `round` (which heads read the embedding can
    /// change at `model.embedding_heads_from_round`).
    pub fn from_config(config: &sela_config::PipelineConfig, round: u32) -> ModelSpec {
        let mut spec = ModelSpec {
            backbone: config.model.backbone.clone(),
            channels: config.data.channels,
            height: config.data.height,
            width: config.data.width,
            widths: config.model.widths.clone(),
            blocks: config.model.blocks.clone(),
            heads: config.model.heads.clone(),
            embedding_heads: config.model.embedding_heads_at(round).to_vec(),
            embedding_readout: None,
        };
        if !spec.embedding_heads.is_empty() {
            spec.embedding_readout = Some(Readout::from_config(config, &spec));
        }
        spec
    }

    /// Size D of the pooled last stage, the input of every head not in `embedding_heads`.
    pub fn head_input_dim(&self) -> usize {
        self.widths.last().copied().unwrap_or(0)
    }

    /// The readout head `h` reads.
    pub fn head_readout(&self, h: usize) -> Readout {
        match self.embedding_readout {
            Some(r) if self.embedding_heads.contains(&h) => r,
            _ => Readout::heads_input(self),
        }
    }

    /// Height and width of each stage's output: the input's, then halved (rounding up) by every
    /// stage after the first.
    pub fn stage_sides(&self) -> Vec<(usize, usize)> {
        let (mut h, mut w) = (self.height, self.width);
        (0..self.widths.len())
            .map(|s| {
                if s > 0 {
                    (h, w) = (h.div_ceil(2), w.div_ceil(2));
                }
                (h, w)
            })
            .collect()
    }

    /// Values per input image (C·H·W).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Checks that the spec describes a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NnError::Spec(m));
        if self.backbone != "resnet" {
            return bad(format!(
                "model.backbone `{}` is not known; the only backbone is `resnet`",
                self.backbone
            ));
        }
        if self.channels == 0 || self.height == 0 || self.width == 0 {
            return bad(format!(
                "input shape {}×{}×{} has a zero dimension",
                self.channels, self.height, self.width
            ));
        }
        if self.widths.is_empty() || self.widths.len() != self.blocks.len() {
            return bad(format!(
                "model.widths {:?} and model.blocks {:?} must be non-empty and of equal length",
                self.widths, self.blocks
            ));
        }
        if self.widths.contains(&0) || self.blocks.contains(&0) {
            return bad(format!(
                "every stage needs a positive width and at least one block, got widths {:?}, blocks {:?}",
                self.widths, self.blocks
            ));
        }
        if self.heads.is_empty() || self.heads.contains(&0) {
            return bad(format!(
                "model.heads {:?} must list at least one head, each with K ≥ 1",
                self.heads
            ));
        }
        let mut seen = vec![false; self.heads.len()];
        for &h in &self.embedding_heads {
            if h >= self.heads.len() || std::mem::replace(&mut seen[h], true) {
                return bad(format!(
                    "model.embedding_heads {:?}: each must be a distinct head index below {}",
                    self.embedding_heads,
                    self.heads.len()
                ));
            }
        }
        if self.embedding_heads.is_empty() != self.embedding_readout.is_none() {
            return bad(format!(
                "embedding heads {:?} with readout {:?}: the readout is set exactly when there are such heads",
                self.embedding_heads, self.embedding_readout
            ));
        }
        let sides = self.stage_sides();
        for (s, &(h, w)) in sides.iter().enumerate().skip(1) {
            let (ph, pw) = sides[s - 1];
            if ph < 2 || pw < 2 {
                return bad(format!(
                    "a {}×{} input is too small for {} stages (stage {s} would halve {ph}×{pw} to {h}×{w})",
                    self.height,
                    self.width,
                    self.widths.len()
                ));
            }
        }
        if let Some(r) = self.embedding_readout {
            r.validate(self)?;
        }
        Ok(())
    }

    /// Describes how `self` (what a checkpoint holds) differs from `wanted`, if it does.
    pub fn mismatch(&self, wanted: &ModelSpec) -> Option<String> {
        let mut parts = Vec::new();
        if self.heads != wanted.heads {
            parts.push(format!(
                "heads {:?}, the config asks for {:?}",
                self.heads, wanted.heads
            ));
        }
        if (self.channels, self.height, self.width)
            != (wanted.channels, wanted.height, wanted.width)
        {
            parts.push(format!(
                "input {}×{}×{}, the config asks for {}×{}×{}",
                self.channels,
                self.height,
                self.width,
                wanted.channels,
                wanted.height,
                wanted.width
            ));
        }
        if self.backbone != wanted.backbone
            || self.widths != wanted.widths
            || self.blocks != wanted.blocks
        {
            parts.push(format!(
                "backbone {} widths {:?} blocks {:?}, the config asks for {} widths {:?} blocks {:?}",
                self.backbone, self.widths, self.blocks, wanted.backbone, wanted.widths, wanted.blocks
            ));
        }
        if (&self.embedding_heads, self.embedding_readout)
            != (&wanted.embedding_heads, wanted.embedding_readout)
        {
            let says = |s: &ModelSpec| match s.embedding_readout {
                Some(r) => format!(
                    "heads {:?} on stage {} pooled onto {}×{}",
                    s.embedding_heads, r.stage, r.grid, r.grid
                ),
                None => "no heads".to_string(),
            };
            parts.push(format!(
                "{} reading the embedding, the config asks for {}",
                says(self),
                says(wanted)
            ));
        }
        if parts.is_empty() {
            None
        } else {
            Some(parts.join("; "))
        }
    }
}

/// What [`crate::Network::infer`] reports as each image's embedding: the output of one stage,
/// average-pooled onto a `grid`×`grid` lattice of cells and flattened channel by channel (D =
/// that stage's width × grid²). The cells are PyTorch's adaptive-pooling cells, which overlap
/// when the grid does not divide the side. It changes what is read out, not what is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readout {
    /// Stage index, 0-based.
    pub stage: usize,
    /// Cells per side; 1 is global average pooling.
    pub grid: usize,
}

impl Readout {
    /// The heads' input: the last stage, globally pooled.
    pub fn heads_input(spec: &ModelSpec) -> Readout {
        Readout {
            stage: spec.widths.len().saturating_sub(1),
            grid: 1,
        }
    }

    /// The readout `[model] embedding_stage` and `embedding_grid` ask for.
    pub fn from_config(config: &sela_config::PipelineConfig, spec: &ModelSpec) -> Readout {
        Readout {
            stage: config
                .model
                .embedding_stage
                .unwrap_or(Readout::heads_input(spec).stage),
            grid: config.model.embedding_grid,
        }
    }

    /// Size D of the embedding.
    pub fn dim(&self, spec: &ModelSpec) -> usize {
        spec.widths.get(self.stage).copied().unwrap_or(0) * self.grid * self.grid
    }

    /// Checks that the stage exists and its output has at least `grid` rows and columns.
    pub fn validate(&self, spec: &ModelSpec) -> Result<()> {
        let sides = spec.stage_sides();
        let Some(&(h, w)) = sides.get(self.stage) else {
            return Err(NnError::Spec(format!(
                "model.embedding_stage {} is out of range: the backbone has {} stages",
                self.stage,
                sides.len()
            )));
        };
        if self.grid == 0 || self.grid > h.min(w) {
            return Err(NnError::Spec(format!(
                "model.embedding_grid {} must be between 1 and the side of stage {}'s {h}×{w} output",
                self.grid, self.stage
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny() -> ModelSpec {
        ModelSpec {
            backbone: "resnet".into(),
            channels: 1,
            height: 8,
            width: 8,
            widths: vec![4, 8],
            blocks: vec![1, 1],
            heads: vec![3, 5],
            embedding_heads: Vec::new(),
            embedding_readout: None,
        }
    }

    #[test]
    fn embedding_heads_validate_read_their_readout_and_show_in_mismatch() {
        let s = tiny();
        let mut e = s.clone();
        e.embedding_heads = vec![1];
        e.embedding_readout = Some(Readout { stage: 0, grid: 2 });
        e.validate().unwrap();
        assert_eq!(e.head_readout(0), Readout::heads_input(&e));
        assert_eq!(e.head_readout(1), Readout { stage: 0, grid: 2 });
        let m = s.mismatch(&e).unwrap();
        assert!(
            m.contains("no heads reading the embedding, the config asks for heads [1] on stage 0 pooled onto 2×2"),
            "{m}"
        );
        for (heads, readout, wanted) in [
            (
                vec![2],
                Some(Readout { stage: 0, grid: 2 }),
                "distinct head index below 2",
            ),
            (
                vec![0, 0],
                Some(Readout { stage: 0, grid: 2 }),
                "distinct head index below 2",
            ),
            (vec![0], None, "the readout is set exactly when"),
            (
                vec![],
                Some(Readout { stage: 0, grid: 2 }),
                "the readout is set exactly when",
            ),
            (
                vec![0],
                Some(Readout { stage: 1, grid: 5 }),
                "embedding_grid 5",
            ),
        ] {
            let mut t = s.clone();
            t.embedding_heads = heads;
            t.embedding_readout = readout;
            let msg = t.validate().unwrap_err().to_string();
            assert!(msg.contains(wanted), "{msg}");
        }
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("embedding"), "{json}");
        let back: ModelSpec = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn validation_and_mismatch() {
        let s = tiny();
        s.validate().unwrap();
        assert_eq!(s.head_input_dim(), 8);
        let mut t = s.clone();
        t.blocks = vec![1, 0];
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at least one block"));
        let mut t = s.clone();
        t.heads = vec![3];
        let m = s.mismatch(&t).unwrap();
        assert!(m.contains("heads [3, 5], the config asks for [3]"), "{m}");
        assert!(s.mismatch(&s.clone()).is_none());
        // An 8×8 input: stage 0 is 8×8, stage 1 4×4.
        assert_eq!(s.stage_sides(), vec![(8, 8), (4, 4)]);
        assert_eq!(Readout::heads_input(&s), Readout { stage: 1, grid: 1 });
        for (stage, grid, dim) in [(0, 1, 4), (0, 8, 256), (1, 1, 8), (1, 3, 72), (1, 4, 128)] {
            let r = Readout { stage, grid };
            r.validate(&s).unwrap();
            assert_eq!(r.dim(&s), dim);
        }
        for (stage, grid, wanted) in [
            (
                2,
                1,
                "embedding_stage 2 is out of range: the backbone has 2 stages",
            ),
            (
                1,
                5,
                "embedding_grid 5 must be between 1 and the side of stage 1's 4×4 output",
            ),
            (0, 0, "embedding_grid 0 must be between 1"),
        ] {
            let err = Readout { stage, grid }
                .validate(&s)
                .unwrap_err()
                .to_string();
            assert!(err.contains(wanted), "{err}");
        }
    }
}
