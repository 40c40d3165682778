//! Frozen pretrained backbones from candle-transformers, loaded from a local safetensors file, so
//! the features of a model trained elsewhere can be clustered by the same Sinkhorn stage and
//! scored by the same evaluation (kNN, linear probe).
//!
//! Supported: torchvision-layout ResNet-18/34/50 (`conv1.weight`, `bn1.running_mean`,
//! `layer1.0.conv1.weight`, ...; the final `fc` layer is not used). Images are resized to
//! `image_size`, replicated to RGB when gray, and normalised with the ImageNet statistics. The
//! embedding is the globally pooled last feature map (`[model] embedding_stage` and
//! `embedding_grid` choose sela's own network's readout only). A frozen backbone has no trained heads, so
//! each head's logits are cosine similarities of the embedding to K seeded random directions,
//! scaled by 10: a deterministic starting point for the label step, not a trained classifier.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Func, VarBuilder};
use candle_transformers::models::resnet;
use sela_images::codec::{resize, Pixels};
use sela_images::Rng;

/// A pretrained backbone family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PretrainedKind {
    ResNet18,
    ResNet34,
    ResNet50,
}

impl PretrainedKind {
    /// Parses a `--backbone` value; `None` for sela's own network.
    pub fn parse(name: &str) -> std::result::Result<Option<Self>, String> {
        match name {
            "sela" => Ok(None),
            "resnet18" => Ok(Some(PretrainedKind::ResNet18)),
            "resnet34" => Ok(Some(PretrainedKind::ResNet34)),
            "resnet50" => Ok(Some(PretrainedKind::ResNet50)),
            other => Err(format!(
                "unknown backbone `{other}`: expected sela, resnet18, resnet34 or resnet50"
            )),
        }
    }

    /// Size of the pooled embedding.
    pub fn embedding_dim(self) -> usize {
        match self {
            PretrainedKind::ResNet18 | PretrainedKind::ResNet34 => 512,
            PretrainedKind::ResNet50 => 2048,
        }
    }

    fn build<'a>(self, vb: VarBuilder<'a>) -> candle_core::Result<Func<'a>> {
        match self {
            PretrainedKind::ResNet18 => resnet::resnet18_no_final_layer(vb),
            PretrainedKind::ResNet34 => resnet::resnet34_no_final_layer(vb),
            PretrainedKind::ResNet50 => resnet::resnet50_no_final_layer(vb),
        }
    }
}

/// A loaded frozen backbone with seeded random heads.
pub struct Pretrained {
    model: Func<'static>,
    /// Embedding size.
    pub dim: usize,
    image_size: usize,
    /// Per head, K unit-norm directions, row-major K×D.
    heads: Vec<Vec<f32>>,
}

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
const STREAM_HEADS: u64 = 0x7072_6574;

impl Pretrained {
    /// Loads `kind` from `weights`; heads of sizes `heads` are drawn from `seed`.
    pub fn load(
        kind: PretrainedKind,
        weights: &Path,
        image_size: usize,
        heads: &[usize],
        seed: u64,
    ) -> Result<Self> {
        // SAFETY: the file is memory-mapped read-only for the life of the model; sela never
        // writes to a weights file it is reading.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
                .with_context(|| format!("{}: cannot open as safetensors", weights.display()))?;
        let model = kind.build(vb).with_context(|| {
            format!(
                "{}: not a torchvision-layout {kind:?} weights file",
                weights.display()
            )
        })?;
        let dim = kind.embedding_dim();
        let heads = heads
            .iter()
            .enumerate()
            .map(|(h, &k)| {
                let mut rng = Rng::derive(&[seed, STREAM_HEADS, h as u64]);
                let mut w: Vec<f32> = (0..k * dim).map(|_| rng.normal() as f32).collect();
                for row in w.chunks_mut(dim) {
                    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                    row.iter_mut().for_each(|v| *v /= norm);
                }
                w
            })
            .collect();
        Ok(Pretrained {
            model,
            dim,
            image_size,
            heads,
        })
    }

    /// Embeddings (n×D) and head logits of `n` HWC u8 images of `channels`×`height`×`width`.
    pub fn infer(
        &self,
        pixels: &[u8],
        n: usize,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let s = self.image_size;
        let plane = s * s;
        let mut input = vec![0f32; n * 3 * plane];
        let per = channels * height * width;
        for (i, dst) in input.chunks_mut(3 * plane).enumerate() {
            let p = resize(
                &Pixels {
                    width,
                    height,
                    channels,
                    data: pixels[i * per..(i + 1) * per].to_vec(),
                },
                s,
                s,
            );
            for c in 0..3 {
                let src_c = if channels == 1 { 0 } else { c };
                for j in 0..plane {
                    dst[c * plane + j] =
                        (p.data[j * channels + src_c] as f32 / 255.0 - MEAN[c]) / STD[c];
                }
            }
        }
        let x = Tensor::from_vec(input, (n, 3, s, s), &Device::Cpu)?;
        let embedding: Vec<f32> = self.model.forward(&x)?.flatten_all()?.to_vec1()?;
        let logits = self
            .heads
            .iter()
            .map(|w| {
                let k = w.len() / self.dim;
                let mut out = vec![0f32; n * k];
                for (e, o) in embedding.chunks(self.dim).zip(out.chunks_mut(k)) {
                    let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                    for (j, dir) in w.chunks(self.dim).enumerate() {
                        o[j] = 10.0 * e.iter().zip(dir).map(|(a, b)| a * b).sum::<f32>() / norm;
                    }
                }
                out
            })
            .collect();
        Ok((embedding, logits))
    }
}
