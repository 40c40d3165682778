//! The same network as a plain candle autograd graph: the yardstick the fused training engine is
//! tested against (gradients) and measured against (speed). The convolution is either candle's
//! own `conv2d` or this crate's [`crate::conv::Conv2dGemm`] custom op; BatchNorm, ReLU, pooling,
//! heads and the loss are stock candle operations.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::batchnorm::EPS;
use crate::error::Result;
use crate::network::Network;
use crate::optim::Optimizer;
use crate::spec::{ModelSpec, Readout};

/// Which convolution the graph uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvImpl {
    /// candle's `Tensor::conv2d` (backward through `conv_transpose2d`).
    Candle,
    /// [`crate::conv::conv2d`]: im2col + gemm with its own backward.
    Gemm,
}

/// A candle-graph copy of a [`Network`]'s parameters.
pub struct Reference {
    spec: ModelSpec,
    names: Vec<String>,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
    buffers: HashMap<String, Tensor>,
    conv: ConvImpl,
}

impl Reference {
    /// Copies `network`'s parameters and running statistics into candle variables.
    pub fn new(network: &Network, conv: ConvImpl) -> Result<Reference> {
        let dev = Device::Cpu;
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for p in network.params() {
            names.push(p.name.clone());
            vars.push(Var::from_tensor(&Tensor::from_vec(
                p.data.clone(),
                p.shape.as_slice(),
                &dev,
            )?)?);
        }
        let mut buffers = HashMap::new();
        for b in network.buffers() {
            buffers.insert(
                b.name.clone(),
                Tensor::from_vec(b.data.clone(), b.shape.as_slice(), &dev)?,
            );
        }
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Ok(Reference {
            spec: network.spec().clone(),
            names,
            vars,
            index,
            buffers,
            conv,
        })
    }

    fn var(&self, name: &str) -> &Tensor {
        self.vars[self.index[name]].as_tensor()
    }

    fn conv(
        &self,
        x: &Tensor,
        name: &str,
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Tensor> {
        let w = self.var(&format!("{name}.weight"));
        match self.conv {
            ConvImpl::Candle => x.conv2d(w, pad, stride, 1, 1),
            ConvImpl::Gemm => crate::conv::conv2d(x, w, stride, pad),
        }
    }

    fn bn(&self, x: &Tensor, name: &str, train: bool) -> candle_core::Result<Tensor> {
        let c = x.dim(1)?;
        let g = self.var(&format!("{name}.weight")).reshape((1, c, 1, 1))?;
        let b = self.var(&format!("{name}.bias")).reshape((1, c, 1, 1))?;
        let (mean, var) = if train {
            let mean = x.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
            let centred = x.broadcast_sub(&mean)?;
            let var = centred
                .sqr()?
                .mean_keepdim(3)?
                .mean_keepdim(2)?
                .mean_keepdim(0)?;
            (mean, var)
        } else {
            (
                self.buffers[&format!("{name}.running_mean")].reshape((1, c, 1, 1))?,
                self.buffers[&format!("{name}.running_var")].reshape((1, c, 1, 1))?,
            )
        };
        let xhat = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + EPS as f64)?.sqrt()?)?;
        xhat.broadcast_mul(&g)?.broadcast_add(&b)
    }

    /// Embedding (as `readout` says) and logits of a batch (N×C×H×W), BatchNorm in training or
    /// inference mode.
    pub fn forward(
        &self,
        x: &Tensor,
        train: bool,
        readout: Readout,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut embedding = None;
        let mut head_embedding = None;
        let mut a = self
            .bn(&self.conv(x, "stem.conv", 1, 1)?, "stem.bn", train)?
            .relu()?;
        let mut cin = self.spec.widths[0];
        for (s, (&width, &count)) in self.spec.widths.iter().zip(&self.spec.blocks).enumerate() {
            for i in 0..count {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let name = format!("stages.{s}.blocks.{i}");
                let h = self.conv(&a, &format!("{name}.conv1"), stride, 1)?;
                let h = self.bn(&h, &format!("{name}.bn1"), train)?.relu()?;
                let h = self.conv(&h, &format!("{name}.conv2"), 1, 1)?;
                let h = self.bn(&h, &format!("{name}.bn2"), train)?;
                let short = if stride != 1 || cin != width {
                    let sc = self.conv(&a, &format!("{name}.shortcut.conv"), stride, 0)?;
                    self.bn(&sc, &format!("{name}.shortcut.bn"), train)?
                } else {
                    a.clone()
                };
                a = (h + short)?.relu()?;
                cin = width;
            }
            if s == readout.stage {
                embedding = Some(Self::pool(&a, readout.grid)?);
            }
            if let Some(r) = self.spec.embedding_readout.filter(|r| r.stage == s) {
                head_embedding = Some(Self::pool(&a, r.grid)?);
            }
        }
        let emb = a.flatten_from(2)?.mean(D::Minus1)?;
        let logits = (0..self.spec.heads.len())
            .map(|h| {
                let w = self.var(&format!("heads.{h}.weight"));
                let b = self.var(&format!("heads.{h}.bias"));
                let input = match &head_embedding {
                    Some(e) if self.spec.embedding_heads.contains(&h) => e,
                    _ => &emb,
                };
                input.matmul(&w.t()?)?.broadcast_add(b)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let embedding = embedding
            .ok_or_else(|| candle_core::Error::Msg(format!("no stage {}", readout.stage)))?;
        Ok((embedding, logits))
    }

    /// Average pooling onto grid×grid adaptive cells, one `mean` of a narrowed view per cell,
    /// flattened channel by channel.
    fn pool(a: &Tensor, grid: usize) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = a.dims4()?;
        let span = |i: usize, side: usize| (i * side / grid, ((i + 1) * side).div_ceil(grid));
        let mut cells = Vec::with_capacity(grid * grid);
        for gy in 0..grid {
            for gx in 0..grid {
                let ((y0, y1), (x0, x1)) = (span(gy, h), span(gx, w));
                let cell = a.narrow(2, y0, y1 - y0)?.narrow(3, x0, x1 - x0)?;
                cells.push(cell.flatten_from(2)?.mean(D::Minus1)?);
            }
        }
        Tensor::stack(&cells, 2)?.flatten_from(1)
    }

    /// Training-mode loss (mean over heads of each head's cross-entropy) and the gradient of
    /// every parameter, in [`Network::params`] order.
    pub fn gradients(
        &self,
        images: &[f32],
        n: usize,
        labels: &[&[u32]],
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let s = &self.spec;
        let x = Tensor::from_slice(images, (n, s.channels, s.height, s.width), &Device::Cpu)?;
        let (_, logits) = self.forward(&x, true, Readout::heads_input(s))?;
        let mut losses = Vec::new();
        let mut total: Option<Tensor> = None;
        for (lg, l) in logits.iter().zip(labels) {
            let t = Tensor::from_slice(l, n, &Device::Cpu)?;
            let loss = candle_nn::loss::cross_entropy(lg, &t)?;
            losses.push(loss.to_scalar::<f32>()?);
            total = Some(match total {
                None => loss,
                Some(acc) => (acc + loss)?,
            });
        }
        let total = (total.expect("at least one head") / labels.len() as f64)?;
        let grads = total.backward()?;
        let out = self
            .vars
            .iter()
            .map(|v| match grads.get(v) {
                Some(g) => g.flatten_all()?.to_vec1::<f32>(),
                None => Ok(vec![0.0; v.elem_count()]),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((losses, out))
    }

    /// One training step through candle's autograd, updating the variables with `optimizer`.
    pub fn train_step(
        &mut self,
        images: &[f32],
        n: usize,
        labels: &[&[u32]],
        optimizer: &mut Optimizer,
        lr: f64,
    ) -> Result<Vec<f32>> {
        let (losses, grads) = self.gradients(images, n, labels)?;
        let mut params = self
            .vars
            .iter()
            .zip(&self.names)
            .map(|(v, name)| {
                Ok(crate::network::Param {
                    name: name.clone(),
                    shape: v.dims().to_vec(),
                    data: v.flatten_all()?.to_vec1::<f32>()?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        optimizer.step(&mut params, &grads, lr)?;
        for (v, p) in self.vars.iter().zip(params) {
            v.set(
                &Tensor::from_vec(p.data, p.shape.as_slice(), &Device::Cpu)?
                    .to_dtype(DType::F32)?,
            )?;
        }
        Ok(losses)
    }
}
