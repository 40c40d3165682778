//! The network: parameters, deterministic initialisation, batch-independent inference and the
//! training step (forward, backward, optimiser update) on preallocated buffers.

use rayon::prelude::*;
use sela_images::Rng;

use crate::batchnorm::{self, Saved};
use crate::conv::{self, ConvShape, Epilogue};
use crate::error::{NnError, Result};
use crate::gemm::{matmul, Mat};
use crate::optim::Optimizer;
use crate::spec::{ModelSpec, Readout};

/// Stream tag of the initialisation's random numbers.
const STREAM_INIT: u64 = 0x1417_0001;
/// Images per inference chunk; the heads' products always run on chunks of this many rows
/// (padding the last), so every image goes through products of the same shape.
const INFER_CHUNK: usize = 64;

/// A named tensor of the network (a weight or a BatchNorm running statistic).
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// PyTorch-style dotted name, e.g. `stages.1.blocks.0.conv1.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// What [`Network::infer`] returns for `n` images.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// n×D embeddings (the [`Readout`] asked for), row-major.
    pub embedding: Vec<f32>,
    /// Per head, n×K_h logits, row-major.
    pub logits: Vec<Vec<f32>>,
}

/// What [`Network::infer_readouts`] returns for `n` images.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadoutOutputs {
    /// Per readout asked for, n×D_r embeddings, row-major.
    pub embeddings: Vec<Vec<f32>>,
    /// Per head, n×K_h logits, row-major.
    pub logits: Vec<Vec<f32>>,
}

/// Result of one training step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Each head's mean cross-entropy over the batch.
    pub head_losses: Vec<f32>,
    /// The optimised loss: the mean of the heads' losses.
    pub loss: f32,
}

#[derive(Debug, Clone)]
struct ConvL {
    w: usize,
    s: ConvShape,
}

#[derive(Debug, Clone)]
struct BnL {
    gamma: usize,
    beta: usize,
    /// Buffer indices of the running mean and variance.
    mean: usize,
    var: usize,
    /// Slot of its saved batch statistics.
    slot: usize,
    c: usize,
    plane: usize,
}

/// Activation ids of a block (indices into the workspace's tensors).
#[derive(Debug, Clone)]
struct BlockL {
    conv1: ConvL,
    bn1: BnL,
    conv2: ConvL,
    bn2: BnL,
    short: Option<(ConvL, BnL)>,
    /// Activations: conv1 out, bn1 out, conv2 out, block out, shortcut conv out, shortcut bn out.
    c1: usize,
    h1: usize,
    c2: usize,
    out: usize,
    cs: usize,
    ss: usize,
}

#[derive(Debug, Clone)]
struct HeadL {
    w: usize,
    b: usize,
    k: usize,
    /// Size of its input.
    d: usize,
    /// Whether it reads the plan's `head_readout` rather than the pooled last stage.
    reads_embedding: bool,
}

#[derive(Debug, Clone)]
struct Plan {
    stem: ConvL,
    stem_bn: BnL,
    stem_c: usize,
    stem_a: usize,
    blocks: Vec<BlockL>,
    heads: Vec<HeadL>,
    d: usize,
    /// Per stage: the index of its last block and the shape of its output (pooled globally).
    stages: Vec<(usize, PoolShape)>,
    /// What the embedding-reading heads read: the block whose output is pooled, and how.
    head_readout: Option<(usize, PoolShape)>,
    /// Values per image of each activation id.
    act_len: Vec<usize>,
    bn_count: usize,
}

impl Plan {
    /// The last stage's output pooled globally: the heads' input.
    fn heads_pool(&self) -> PoolShape {
        self.stages.last().expect("a backbone has stages").1
    }
}

struct Builder {
    params: Vec<Param>,
    buffers: Vec<Param>,
    act_len: Vec<usize>,
    bn_count: usize,
}

impl Builder {
    fn param(&mut self, name: String, shape: Vec<usize>) -> usize {
        let len = shape.iter().product();
        self.params.push(Param {
            name,
            shape,
            data: vec![0.0; len],
        });
        self.params.len() - 1
    }

    fn conv(&mut self, name: &str, s: ConvShape) -> ConvL {
        let w = self.param(format!("{name}.weight"), vec![s.cout, s.cin, s.k, s.k]);
        ConvL { w, s }
    }

    fn bn(&mut self, name: &str, c: usize, plane: usize) -> BnL {
        let gamma = self.param(format!("{name}.weight"), vec![c]);
        let beta = self.param(format!("{name}.bias"), vec![c]);
        self.buffers.push(Param {
            name: format!("{name}.running_mean"),
            shape: vec![c],
            data: vec![0.0; c],
        });
        self.buffers.push(Param {
            name: format!("{name}.running_var"),
            shape: vec![c],
            data: vec![1.0; c],
        });
        let slot = self.bn_count;
        self.bn_count += 1;
        BnL {
            gamma,
            beta,
            mean: self.buffers.len() - 2,
            var: self.buffers.len() - 1,
            slot,
            c,
            plane,
        }
    }

    fn act(&mut self, len: usize) -> usize {
        self.act_len.push(len);
        self.act_len.len() - 1
    }
}

fn build(spec: &ModelSpec) -> (Plan, Vec<Param>, Vec<Param>) {
    let mut b = Builder {
        params: Vec::new(),
        buffers: Vec::new(),
        act_len: Vec::new(),
        bn_count: 0,
    };
    let (mut h, mut w) = (spec.height, spec.width);
    let c0 = spec.widths[0];
    let stem = b.conv(
        "stem.conv",
        ConvShape {
            cin: spec.channels,
            cout: c0,
            k: 3,
            stride: 1,
            pad: 1,
            h,
            w,
        },
    );
    let stem_bn = b.bn("stem.bn", c0, h * w);
    let stem_c = b.act(c0 * h * w);
    let stem_a = b.act(c0 * h * w);
    let mut blocks = Vec::new();
    let mut stages = Vec::new();
    let mut cin = c0;
    for (s, (&width, &count)) in spec.widths.iter().zip(&spec.blocks).enumerate() {
        for i in 0..count {
            let stride = if s > 0 && i == 0 { 2 } else { 1 };
            let name = format!("stages.{s}.blocks.{i}");
            let s1 = ConvShape {
                cin,
                cout: width,
                k: 3,
                stride,
                pad: 1,
                h,
                w,
            };
            let (ho, wo) = (s1.ho(), s1.wo());
            let conv1 = b.conv(&format!("{name}.conv1"), s1);
            let bn1 = b.bn(&format!("{name}.bn1"), width, ho * wo);
            let conv2 = b.conv(
                &format!("{name}.conv2"),
                ConvShape {
                    cin: width,
                    cout: width,
                    k: 3,
                    stride: 1,
                    pad: 1,
                    h: ho,
                    w: wo,
                },
            );
            let bn2 = b.bn(&format!("{name}.bn2"), width, ho * wo);
            let short = (stride != 1 || cin != width).then(|| {
                let sc = b.conv(
                    &format!("{name}.shortcut.conv"),
                    ConvShape {
                        cin,
                        cout: width,
                        k: 1,
                        stride,
                        pad: 0,
                        h,
                        w,
                    },
                );
                let sb = b.bn(&format!("{name}.shortcut.bn"), width, ho * wo);
                (sc, sb)
            });
            let len = width * ho * wo;
            let (c1, h1, c2, out) = (b.act(len), b.act(len), b.act(len), b.act(len));
            let (cs, ss) = if short.is_some() {
                (b.act(len), b.act(len))
            } else {
                (usize::MAX, usize::MAX)
            };
            blocks.push(BlockL {
                conv1,
                bn1,
                conv2,
                bn2,
                short,
                c1,
                h1,
                c2,
                out,
                cs,
                ss,
            });
            cin = width;
            (h, w) = (ho, wo);
        }
        stages.push((
            blocks.len() - 1,
            PoolShape {
                c: width,
                h,
                w,
                grid: 1,
            },
        ));
    }
    let d = cin;
    let head_readout = spec.embedding_readout.map(|r| {
        let (block, shape) = stages[r.stage];
        (
            block,
            PoolShape {
                grid: r.grid,
                ..shape
            },
        )
    });
    let heads = spec
        .heads
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let reads_embedding = spec.embedding_heads.contains(&i);
            let d = match head_readout {
                Some((_, shape)) if reads_embedding => shape.dim(),
                _ => d,
            };
            HeadL {
                w: b.param(format!("heads.{i}.weight"), vec![k, d]),
                b: b.param(format!("heads.{i}.bias"), vec![k]),
                k,
                d,
                reads_embedding,
            }
        })
        .collect();
    let plan = Plan {
        stem,
        stem_bn,
        stem_c,
        stem_a,
        blocks,
        heads,
        d,
        stages,
        head_readout,
        act_len: b.act_len,
        bn_count: b.bn_count,
    };
    (plan, b.params, b.buffers)
}

/// Buffers of a training step, sized for one batch size and reused across steps.
#[derive(Default)]
struct Workspace {
    n: usize,
    acts: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    saved: Vec<Saved>,
    emb: Vec<f32>,
    d_emb: Vec<f32>,
    /// The embedding-reading heads' input and its gradient.
    head_emb: Vec<f32>,
    d_head_emb: Vec<f32>,
    logits: Vec<Vec<f32>>,
    d_logits: Vec<Vec<f32>>,
}

/// The compact ResNet with H linear heads.
pub struct Network {
    spec: ModelSpec,
    plan: Plan,
    params: Vec<Param>,
    buffers: Vec<Param>,
    grads: Vec<Vec<f32>>,
    work: Workspace,
}

impl Clone for Network {
    fn clone(&self) -> Self {
        Network {
            spec: self.spec.clone(),
            plan: self.plan.clone(),
            params: self.params.clone(),
            buffers: self.buffers.clone(),
            grads: self.grads.clone(),
            work: Workspace::default(),
        }
    }
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("spec", &self.spec)
            .field("parameters", &self.parameter_count())
            .finish()
    }
}

/// Moves `v[i]` out (leaving an empty vector) so it can be written while others are read.
fn take(v: &mut [Vec<f32>], i: usize) -> Vec<f32> {
    std::mem::take(&mut v[i])
}

impl Network {
    /// A freshly initialised network, deterministic from `seed`: He-normal convolutions,
    /// BatchNorm γ = 1 and β = 0, heads uniform in ±1/√D with D the head's input size
    /// (PyTorch's linear default).
    pub fn init(spec: &ModelSpec, seed: u64) -> Result<Network> {
        spec.validate()?;
        let (plan, mut params, buffers) = build(spec);
        let head_dim = |i: usize| {
            plan.heads
                .iter()
                .find(|h| h.w == i || h.b == i)
                .map(|h| h.d)
        };
        for (i, p) in params.iter_mut().enumerate() {
            let mut rng = Rng::derive(&[seed, STREAM_INIT, i as u64]);
            let name = p.name.as_str();
            if let Some(d) = head_dim(i) {
                let bound = 1.0 / (d as f64).sqrt();
                p.data
                    .iter_mut()
                    .for_each(|v| *v = rng.range(-bound, bound) as f32);
            } else if p.shape.len() == 4 {
                let fan_in: usize = p.shape[1..].iter().product();
                let std = (2.0 / fan_in as f64).sqrt();
                p.data
                    .iter_mut()
                    .for_each(|v| *v = (rng.normal() * std) as f32);
            } else if name.ends_with(".weight") {
                p.data.fill(1.0);
            }
        }
        let grads = params.iter().map(|p| vec![0.0; p.data.len()]).collect();
        Ok(Network {
            spec: spec.clone(),
            plan,
            params,
            buffers,
            grads,
            work: Workspace::default(),
        })
    }

    /// The architecture.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Trainable tensors, in a fixed order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Trainable tensors, mutable (e.g. to load a checkpoint).
    pub fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    /// Non-trainable tensors: the BatchNorm running means and variances.
    pub fn buffers(&self) -> &[Param] {
        &self.buffers
    }

    /// Non-trainable tensors, mutable.
    pub fn buffers_mut(&mut self) -> &mut [Param] {
        &mut self.buffers
    }

    /// Gradients of the last [`Network::compute_gradients`], in the order of [`Network::params`].
    pub fn grads(&self) -> &[Vec<f32>] {
        &self.grads
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(|p| p.data.len()).sum()
    }

    fn check_images(&self, images: &[f32], n: usize) -> Result<()> {
        let len = self.spec.image_len();
        if images.len() != n * len {
            return Err(NnError::Input(format!(
                "expected {n} images of {}×{}×{} = {} values, got {} values",
                self.spec.channels,
                self.spec.height,
                self.spec.width,
                n * len,
                images.len()
            )));
        }
        Ok(())
    }

    /// Embeddings (as `readout` says) and every head's logits for `n` normalised N×C×H×W
    /// images, with BatchNorm in inference mode (folded into the convolutions). Each image's
    /// outputs are bit-identical whatever batch it is computed in.
    pub fn infer(&self, images: &[f32], n: usize, readout: Readout) -> Result<Outputs> {
        let ReadoutOutputs {
            mut embeddings,
            logits,
        } = self.infer_readouts(images, n, &[readout])?;
        Ok(Outputs {
            embedding: embeddings.swap_remove(0),
            logits,
        })
    }

    /// As [`infer`](Self::infer), with the embeddings of every one of `readouts` from the same
    /// pass: each equals what `infer` returns for that readout alone.
    pub fn infer_readouts(
        &self,
        images: &[f32],
        n: usize,
        readouts: &[Readout],
    ) -> Result<ReadoutOutputs> {
        self.check_images(images, n)?;
        let heads_input = Readout::heads_input(&self.spec);
        // Per readout: the block it pools after and its pooling, or None for the heads' input.
        let mut pools: Vec<Option<(usize, PoolShape)>> = Vec::with_capacity(readouts.len());
        for r in readouts {
            r.validate(&self.spec)?;
            let (block, stage_shape) = self.plan.stages[r.stage];
            pools.push((*r != heads_input).then_some((
                block,
                PoolShape {
                    grid: r.grid,
                    ..stage_shape
                },
            )));
        }
        let plan = &self.plan;
        let d = plan.d;
        let dims: Vec<usize> = pools
            .iter()
            .map(|p| p.map_or(d, |(_, shape)| shape.dim()))
            .collect();
        let fold = |c: &ConvL, bn: &BnL| -> (Vec<f32>, Vec<f32>) {
            let per = c.s.kdim();
            let w = &self.params[c.w].data;
            let (g, b) = (&self.params[bn.gamma].data, &self.params[bn.beta].data);
            let (rm, rv) = (&self.buffers[bn.mean].data, &self.buffers[bn.var].data);
            let mut fw = w.clone();
            let mut fb = vec![0.0; c.s.cout];
            for co in 0..c.s.cout {
                let scale = g[co] / (rv[co] + batchnorm::EPS).sqrt();
                fw[co * per..(co + 1) * per]
                    .iter_mut()
                    .for_each(|v| *v *= scale);
                fb[co] = b[co] - rm[co] * scale;
            }
            (fw, fb)
        };
        let stem = fold(&plan.stem, &plan.stem_bn);
        let blocks: Vec<_> = plan
            .blocks
            .iter()
            .map(|b| {
                (
                    fold(&b.conv1, &b.bn1),
                    fold(&b.conv2, &b.bn2),
                    b.short.as_ref().map(|(c, bn)| fold(c, bn)),
                )
            })
            .collect();
        let mut embeddings: Vec<Vec<f32>> = dims.iter().map(|&rd| vec![0.0f32; n * rd]).collect();
        let mut logits: Vec<Vec<f32>> = plan.heads.iter().map(|h| vec![0.0; n * h.k]).collect();
        let len = self.spec.image_len();
        let mut emb_chunk = vec![0.0f32; INFER_CHUNK * d];
        let head_dim = plan.head_readout.map_or(0, |(_, shape)| shape.dim());
        let mut head_emb_chunk = vec![0.0f32; INFER_CHUNK * head_dim];
        let mut a = Vec::new();
        let mut h1 = Vec::new();
        let mut sc = Vec::new();
        let mut out = Vec::new();
        let mut head_out = Vec::new();
        for start in (0..n).step_by(INFER_CHUNK) {
            let m = INFER_CHUNK.min(n - start);
            let x = &images[start * len..(start + m) * len];
            let s = &plan.stem.s;
            a.resize(m * s.out_len(), 0.0);
            let epi = Epilogue {
                bias: Some(&stem.1),
                residual: None,
                relu: true,
            };
            conv::forward(s, m, x, &stem.0, epi, &mut a);
            for (bi, (b, (f1, f2, fs))) in plan.blocks.iter().zip(&blocks).enumerate() {
                let ol = b.conv1.s.out_len();
                h1.resize(m * ol, 0.0);
                let epi = Epilogue {
                    bias: Some(&f1.1),
                    residual: None,
                    relu: true,
                };
                conv::forward(&b.conv1.s, m, &a, &f1.0, epi, &mut h1);
                if let (Some((c, _)), Some(fs)) = (&b.short, fs) {
                    sc.resize(m * ol, 0.0);
                    let epi = Epilogue {
                        bias: Some(&fs.1),
                        residual: None,
                        relu: false,
                    };
                    conv::forward(&c.s, m, &a, &fs.0, epi, &mut sc);
                }
                out.resize(m * ol, 0.0);
                let residual = if b.short.is_some() { &sc } else { &a };
                let epi = Epilogue {
                    bias: Some(&f2.1),
                    residual: Some(residual),
                    relu: true,
                };
                conv::forward(&b.conv2.s, m, &h1, &f2.0, epi, &mut out);
                std::mem::swap(&mut a, &mut out);
                for ((pool, emb), &rd) in pools.iter().zip(&mut embeddings).zip(&dims) {
                    if let Some((_, shape)) = pool.filter(|&(block, _)| block == bi) {
                        shape.pool(&a, m, &mut emb[start * rd..(start + m) * rd]);
                    }
                }
                if let Some((_, shape)) = plan.head_readout.filter(|&(block, _)| block == bi) {
                    head_emb_chunk.fill(0.0);
                    shape.pool(&a, m, &mut head_emb_chunk[..m * head_dim]);
                }
            }
            emb_chunk.fill(0.0);
            plan.heads_pool().pool(&a, m, &mut emb_chunk[..m * d]);
            for (pool, emb) in pools.iter().zip(&mut embeddings) {
                if pool.is_none() {
                    emb[start * d..(start + m) * d].copy_from_slice(&emb_chunk[..m * d]);
                }
            }
            for (hl, lg) in plan.heads.iter().zip(logits.iter_mut()) {
                head_out.resize(INFER_CHUNK * hl.k, 0.0);
                let input = if hl.reads_embedding {
                    &head_emb_chunk
                } else {
                    &emb_chunk
                };
                self.head_forward(hl, input, INFER_CHUNK, &mut head_out, false);
                lg[start * hl.k..(start + m) * hl.k].copy_from_slice(&head_out[..m * hl.k]);
            }
        }
        Ok(ReadoutOutputs { embeddings, logits })
    }

    /// `out[n×K] = emb · Wᵀ + b`.
    fn head_forward(&self, hl: &HeadL, emb: &[f32], n: usize, out: &mut [f32], parallel: bool) {
        let d = hl.d;
        let w = &self.params[hl.w].data;
        let b = &self.params[hl.b].data;
        if parallel {
            out.par_chunks_mut(hl.k * 16)
                .zip(emb.par_chunks(d * 16))
                .for_each(|(o, e)| {
                    let rows = e.len() / d;
                    matmul(rows, hl.k, d, o, false, Mat::rows(e, d), Mat::rows_t(w, d));
                });
        } else {
            matmul(n, hl.k, d, out, false, Mat::rows(emb, d), Mat::rows_t(w, d));
        }
        for row in out.chunks_mut(hl.k) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }

    fn ensure_workspace(&mut self, n: usize) {
        let w = &mut self.work;
        if w.n == n && !w.acts.is_empty() {
            return;
        }
        w.n = n;
        w.acts = self.plan.act_len.iter().map(|l| vec![0.0; n * l]).collect();
        w.grads = self.plan.act_len.iter().map(|l| vec![0.0; n * l]).collect();
        w.saved = vec![Saved::default(); self.plan.bn_count];
        w.emb = vec![0.0; n * self.plan.d];
        w.d_emb = vec![0.0; n * self.plan.d];
        let head_dim = self.plan.head_readout.map_or(0, |(_, shape)| shape.dim());
        w.head_emb = vec![0.0; n * head_dim];
        w.d_head_emb = vec![0.0; n * head_dim];
        w.logits = self.plan.heads.iter().map(|h| vec![0.0; n * h.k]).collect();
        w.d_logits = w.logits.clone();
    }

    fn bn_forward(
        &mut self,
        bn: &BnL,
        x_id: usize,
        res_id: Option<usize>,
        relu: bool,
        y_id: usize,
    ) {
        let n = self.work.n;
        let mut y = take(&mut self.work.acts, y_id);
        let mut saved = std::mem::take(&mut self.work.saved[bn.slot]);
        let acts = &self.work.acts;
        batchnorm::train_forward(
            &acts[x_id],
            n,
            bn.c,
            bn.plane,
            &self.params[bn.gamma].data,
            &self.params[bn.beta].data,
            res_id.map(|r| acts[r].as_slice()),
            relu,
            &mut y,
            &mut saved,
        );
        let (rm, rv) = two_mut(&mut self.buffers, bn.mean, bn.var);
        batchnorm::update_running(&mut rm.data, &mut rv.data, &saved);
        self.work.acts[y_id] = y;
        self.work.saved[bn.slot] = saved;
    }

    fn conv_forward(&mut self, c: &ConvL, x: Option<usize>, images: &[f32], y_id: usize) {
        let n = self.work.n;
        let mut y = take(&mut self.work.acts, y_id);
        let x = x.map_or(images, |i| self.work.acts[i].as_slice());
        conv::forward(
            &c.s,
            n,
            x,
            &self.params[c.w].data,
            Epilogue::default(),
            &mut y,
        );
        self.work.acts[y_id] = y;
    }

    /// BatchNorm backward from the gradient of `y_id` into that of `dx_id`. The masked output
    /// gradient, which is also the residual's, moves to `dres` when given.
    fn bn_backward(
        &mut self,
        bn: &BnL,
        x_id: usize,
        y_id: usize,
        relu: bool,
        dx_id: usize,
        dres: Option<usize>,
    ) {
        let n = self.work.n;
        let mut dx = take(&mut self.work.grads, dx_id);
        let mut dy = take(&mut self.work.grads, y_id);
        let (mut dg, mut db) = (
            take(&mut self.grads, bn.gamma),
            take(&mut self.grads, bn.beta),
        );
        let w = &self.work;
        batchnorm::backward(
            &w.acts[x_id],
            &w.acts[y_id],
            &mut dy,
            n,
            bn.c,
            bn.plane,
            &self.params[bn.gamma].data,
            &w.saved[bn.slot],
            relu,
            &mut dx,
            &mut dg,
            &mut db,
        );
        self.work.grads[dx_id] = dx;
        self.work.grads[y_id] = dy;
        if let Some(r) = dres {
            // The output gradient is not needed again: its buffer becomes the residual's.
            self.work.grads.swap(y_id, r);
        }
        self.grads[bn.gamma] = dg;
        self.grads[bn.beta] = db;
    }

    /// Weight gradient, and the input gradient into `dx` = (id, accumulate) when given.
    fn conv_backward(
        &mut self,
        c: &ConvL,
        x: Option<usize>,
        images: &[f32],
        dy_id: usize,
        dx: Option<(usize, bool)>,
    ) {
        let n = self.work.n;
        let mut dw = take(&mut self.grads, c.w);
        let mut dxv = dx.map(|(i, _)| take(&mut self.work.grads, i));
        let xs = x.map_or(images, |i| self.work.acts[i].as_slice());
        conv::backward(
            &c.s,
            n,
            xs,
            &self.params[c.w].data,
            &self.work.grads[dy_id],
            dxv.as_deref_mut().map(|d| (d, dx.is_some_and(|(_, a)| a))),
            &mut dw,
        );
        self.grads[c.w] = dw;
        if let (Some((i, _)), Some(d)) = (dx, dxv) {
            self.work.grads[i] = d;
        }
    }

    /// Forward and backward pass in training mode on `n` images with one label slice per head:
    /// fills [`Network::grads`], updates the BatchNorm running statistics, returns the losses.
    pub fn compute_gradients(
        &mut self,
        images: &[f32],
        n: usize,
        labels: &[&[u32]],
    ) -> Result<StepStats> {
        self.check_images(images, n)?;
        if n == 0 {
            return Err(NnError::Input(
                "a training batch needs at least one image".into(),
            ));
        }
        if labels.len() != self.plan.heads.len() {
            return Err(NnError::Input(format!(
                "got labels for {} heads, the network has {}",
                labels.len(),
                self.plan.heads.len()
            )));
        }
        for (h, (l, hl)) in labels.iter().zip(&self.plan.heads).enumerate() {
            if l.len() != n {
                return Err(NnError::Input(format!(
                    "head {h}: {} labels for {n} images",
                    l.len()
                )));
            }
            if let Some(&bad) = l.iter().find(|&&v| v as usize >= hl.k) {
                return Err(NnError::Input(format!(
                    "head {h}: label {bad} is out of range for K = {}",
                    hl.k
                )));
            }
        }
        self.ensure_workspace(n);
        let plan = self.plan.clone();
        // Forward.
        self.conv_forward(&plan.stem, None, images, plan.stem_c);
        self.bn_forward(&plan.stem_bn, plan.stem_c, None, true, plan.stem_a);
        let mut a_in = plan.stem_a;
        let mut head_emb = std::mem::take(&mut self.work.head_emb);
        for (bi, b) in plan.blocks.iter().enumerate() {
            self.conv_forward(&b.conv1, Some(a_in), images, b.c1);
            self.bn_forward(&b.bn1, b.c1, None, true, b.h1);
            self.conv_forward(&b.conv2, Some(b.h1), images, b.c2);
            let res = match &b.short {
                Some((sc, sb)) => {
                    self.conv_forward(sc, Some(a_in), images, b.cs);
                    self.bn_forward(sb, b.cs, None, false, b.ss);
                    b.ss
                }
                None => a_in,
            };
            self.bn_forward(&b.bn2, b.c2, Some(res), true, b.out);
            if let Some((_, shape)) = plan.head_readout.filter(|&(block, _)| block == bi) {
                shape.pool(&self.work.acts[b.out], n, &mut head_emb);
            }
            a_in = b.out;
        }
        let d = plan.d;
        let mut emb = std::mem::take(&mut self.work.emb);
        plan.heads_pool().pool(&self.work.acts[a_in], n, &mut emb);
        let heads = plan.heads.len();
        let mut head_losses = Vec::with_capacity(heads);
        for (h, hl) in plan.heads.iter().enumerate() {
            let mut lg = std::mem::take(&mut self.work.logits[h]);
            let input = if hl.reads_embedding { &head_emb } else { &emb };
            self.head_forward(hl, input, n, &mut lg, true);
            let mut dl = std::mem::take(&mut self.work.d_logits[h]);
            head_losses.push(cross_entropy(
                &lg,
                labels[h],
                hl.k,
                (n * heads) as f32,
                &mut dl,
            ));
            self.work.logits[h] = lg;
            self.work.d_logits[h] = dl;
        }
        // Backward: heads.
        let mut d_emb = std::mem::take(&mut self.work.d_emb);
        let mut d_head_emb = std::mem::take(&mut self.work.d_head_emb);
        let (mut d_emb_set, mut d_head_emb_set) = (false, false);
        for (h, hl) in plan.heads.iter().enumerate() {
            let dl = &self.work.d_logits[h];
            let (input, d_input, set) = if hl.reads_embedding {
                (&head_emb, &mut d_head_emb, &mut d_head_emb_set)
            } else {
                (&emb, &mut d_emb, &mut d_emb_set)
            };
            matmul(
                hl.k,
                hl.d,
                n,
                &mut self.grads[hl.w],
                false,
                Mat::rows_t(dl, hl.k),
                Mat::rows(input, hl.d),
            );
            let db = &mut self.grads[hl.b];
            db.fill(0.0);
            for row in dl.chunks(hl.k) {
                db.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            matmul(
                n,
                hl.d,
                hl.k,
                d_input,
                *set,
                Mat::rows(dl, hl.k),
                Mat::rows(&self.params[hl.w].data, hl.d),
            );
            *set = true;
        }
        if !d_emb_set {
            d_emb.fill(0.0);
        }
        let last = plan.heads_pool();
        let p = last.h * last.w;
        let scale = 1.0 / p as f32;
        self.work.grads[a_in]
            .par_chunks_mut(d * p)
            .zip(d_emb.par_chunks(d))
            .for_each(|(g, de)| {
                for (c, &v) in de.iter().enumerate() {
                    g[c * p..(c + 1) * p].fill(v * scale);
                }
            });
        self.work.emb = emb;
        self.work.d_emb = d_emb;
        self.work.head_emb = head_emb;
        // Backward: blocks.
        for (bi, b) in plan.blocks.iter().enumerate().rev() {
            if let Some((_, shape)) = plan.head_readout.filter(|&(block, _)| block == bi) {
                shape.pool_backward(&d_head_emb, n, &mut self.work.grads[b.out]);
            }
            let a_in = if bi == 0 {
                plan.stem_a
            } else {
                plan.blocks[bi - 1].out
            };
            let res_grad = if b.short.is_some() { b.ss } else { a_in };
            self.bn_backward(&b.bn2, b.c2, b.out, true, b.c2, Some(res_grad));
            self.conv_backward(&b.conv2, Some(b.h1), images, b.c2, Some((b.h1, false)));
            self.bn_backward(&b.bn1, b.c1, b.h1, true, b.c1, None);
            self.conv_backward(
                &b.conv1,
                Some(a_in),
                images,
                b.c1,
                Some((a_in, b.short.is_none())),
            );
            if let Some((sc, sb)) = &b.short {
                self.bn_backward(sb, b.cs, b.ss, false, b.cs, None);
                self.conv_backward(sc, Some(a_in), images, b.cs, Some((a_in, true)));
            }
        }
        self.bn_backward(
            &plan.stem_bn,
            plan.stem_c,
            plan.stem_a,
            true,
            plan.stem_c,
            None,
        );
        self.conv_backward(&plan.stem, None, images, plan.stem_c, None);
        self.work.d_head_emb = d_head_emb;
        let loss = (head_losses.iter().map(|&l| l as f64).sum::<f64>() / heads as f64) as f32;
        Ok(StepStats { head_losses, loss })
    }

    /// One optimisation step: [`Network::compute_gradients`], then `optimizer` at rate `lr`.
    pub fn train_step(
        &mut self,
        images: &[f32],
        n: usize,
        labels: &[&[u32]],
        optimizer: &mut Optimizer,
        lr: f64,
    ) -> Result<StepStats> {
        let stats = self.compute_gradients(images, n, labels)?;
        optimizer.step(&mut self.params, &self.grads, lr)?;
        Ok(stats)
    }
}

fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert!(a < b);
    let (lo, hi) = v.split_at_mut(b);
    (&mut lo[a], &mut hi[0])
}

/// Average pooling of a c×h×w activation onto a grid×grid lattice of cells, PyTorch's
/// `AdaptiveAvgPool2d` cells: cell i of a side of length L spans ⌊i·L/grid⌋ .. ⌈(i+1)·L/grid⌉, so
/// cells overlap where grid does not divide L. grid = 1 is global average pooling.
#[derive(Debug, Clone, Copy)]
struct PoolShape {
    c: usize,
    h: usize,
    w: usize,
    grid: usize,
}

impl PoolShape {
    /// Values per image of the pooled output.
    fn dim(&self) -> usize {
        self.c * self.grid * self.grid
    }

    /// The rows (or columns) of cell `i` along a side of length `side`.
    fn span(&self, i: usize, side: usize) -> std::ops::Range<usize> {
        i * side / self.grid..((i + 1) * side).div_ceil(self.grid)
    }

    /// `out[i, (ch·grid + gy)·grid + gx]` = mean of image i's channel ch over cell (gy, gx), for
    /// the `n` images of `x`.
    fn pool(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let plane = self.h * self.w;
        assert_eq!(x.len(), n * self.c * plane);
        assert_eq!(out.len(), n * self.dim());
        let g = self.grid;
        let cells = self.cells();
        for (row, src) in out.chunks_mut(g * g).zip(x.chunks(plane)) {
            for (v, cell) in row.iter_mut().zip(&cells) {
                *v = cell.iter().map(|&p| src[p]).sum::<f32>() / cell.len() as f32;
            }
        }
    }

    /// The cell lists of [`PoolShape::pool`]: the plane positions of each cell, row by row.
    fn cells(&self) -> Vec<Vec<usize>> {
        let g = self.grid;
        (0..g * g)
            .map(|cell| {
                let xs = self.span(cell % g, self.w);
                self.span(cell / g, self.h)
                    .flat_map(|y| xs.clone().map(move |x| y * self.w + x))
                    .collect()
            })
            .collect()
    }

    /// Adds to `d_x` (the `n` pooled activations' gradient) what [`PoolShape::pool`]'s output
    /// gradient `d_out` sends back: each cell's gradient spread evenly over its positions.
    fn pool_backward(&self, d_out: &[f32], n: usize, d_x: &mut [f32]) {
        let plane = self.h * self.w;
        let (c, g) = (self.c, self.grid);
        assert_eq!(d_x.len(), n * c * plane);
        assert_eq!(d_out.len(), n * self.dim());
        let cells = self.cells();
        d_x.par_chunks_mut(c * plane)
            .zip(d_out.par_chunks(c * g * g))
            .for_each(|(dx, dout)| {
                for (plane_grad, cell_grads) in dx.chunks_mut(plane).zip(dout.chunks(g * g)) {
                    for (&v, cell) in cell_grads.iter().zip(&cells) {
                        let share = v / cell.len() as f32;
                        cell.iter().for_each(|&p| plane_grad[p] += share);
                    }
                }
            });
    }
}

/// Mean cross-entropy of `logits` (n×k) against `labels`; writes d(loss)/d(logits) divided by
/// `denom` (n·H, as the optimised loss is the mean over heads of the per-head means).
fn cross_entropy(logits: &[f32], labels: &[u32], k: usize, denom: f32, dl: &mut [f32]) -> f32 {
    let per_row: Vec<f64> = logits
        .par_chunks(k)
        .zip(dl.par_chunks_mut(k))
        .zip(labels.par_iter())
        .map(|((z, d), &y)| {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (di, &zi) in d.iter_mut().zip(z) {
                *di = (zi - max).exp();
                sum += *di;
            }
            let inv = 1.0 / sum;
            for di in d.iter_mut() {
                *di *= inv / denom;
            }
            d[y as usize] -= 1.0 / denom;
            (sum.ln() + max - z[y as usize]) as f64
        })
        .collect();
    (per_row.iter().sum::<f64>() / per_row.len() as f64) as f32
}
