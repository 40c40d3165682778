//! The architecture of sela's network, as read from the pipeline config's `[data]` and `[model]`.

use serde::{Deserialize, Serialize};

use crate::error::{NnError, Result};

/// What the network looks like: input shape, backbone and heads.
///
/// The backbone is a compact ResNet: a 3×3 stem convolution (no early down-sampling), then one
/// stage per entry of `widths`, each of `blocks[s]` basic residual blocks (two 3×3 convolutions
/// with BatchNorm and ReLU); every stage after the first halves the resolution in its first block.
/// Global average pooling gives the embedding (D = the last width), and each head is a linear
/// layer from the embedding to `heads[h]` logits.
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
}

impl ModelSpec {
    /// The spec a pipeline config describes.
    pub fn from_config(config: &sela_config::PipelineConfig) -> ModelSpec {
        ModelSpec {
            backbone: config.model.backbone.clone(),
            channels: config.data.channels,
            height: config.data.height,
            width: config.data.width,
            widths: config.model.widths.clone(),
            blocks: config.model.blocks.clone(),
            heads: config.model.heads.clone(),
        }
    }

    /// Size D of the embedding (the last stage's width).
    pub fn embedding_dim(&self) -> usize {
        self.widths.last().copied().unwrap_or(0)
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
        let (mut h, mut w) = (self.height, self.width);
        for s in 1..self.widths.len() {
            if h < 2 || w < 2 {
                return bad(format!(
                    "a {}×{} input is too small for {} stages (stage {s} would halve {h}×{w})",
                    self.height,
                    self.width,
                    self.widths.len()
                ));
            }
            h = h.div_ceil(2);
            w = w.div_ceil(2);
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
        if parts.is_empty() {
            None
        } else {
            Some(parts.join("; "))
        }
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
        }
    }

    #[test]
    fn validation_and_mismatch() {
        let s = tiny();
        s.validate().unwrap();
        assert_eq!(s.embedding_dim(), 8);
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
    }
}
