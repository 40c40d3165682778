//! Optimisers over the network's flat parameter tensors: SGD with momentum and (coupled) weight
//! decay, as PyTorch's `SGD`, and AdamW (decoupled weight decay), as PyTorch's `AdamW`.

use serde::{Deserialize, Serialize};

use crate::error::{NnError, Result};
use crate::network::Param;

/// Which optimiser, with its hyperparameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `g ← ∇ + wd·w; v ← μ·v + g; w ← w − lr·v`.
    Sgd { momentum: f32, weight_decay: f32 },
    /// `w ← w − lr·wd·w; m, v ← EMAs of ∇, ∇²; w ← w − lr·m̂/(√v̂ + ε)`.
    Adamw {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

impl OptimizerKind {
    /// The optimiser the pipeline config's `[train]` section asks for.
    pub fn from_config(train: &sela_config::TrainSection) -> Result<OptimizerKind> {
        match train.optimizer.as_str() {
            "sgd" => Ok(OptimizerKind::Sgd {
                momentum: train.momentum as f32,
                weight_decay: train.weight_decay as f32,
            }),
            "adamw" => Ok(OptimizerKind::Adamw {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: train.weight_decay as f32,
            }),
            other => Err(NnError::Spec(format!(
                "train.optimizer `{other}` is not known (sgd or adamw)"
            ))),
        }
    }

    /// A short name: `sgd` or `adamw`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerKind::Sgd { .. } => "sgd",
            OptimizerKind::Adamw { .. } => "adamw",
        }
    }

    /// Names of the per-parameter state tensors.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Sgd { .. } => &["momentum"],
            OptimizerKind::Adamw { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

/// An optimiser and its state.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    /// Updates applied so far (AdamW's bias correction uses it).
    pub steps: u64,
    /// `state[s][p]`: state tensor `kind.state_names()[s]` of parameter `p`.
    pub state: Vec<Vec<Vec<f32>>>,
}

impl Optimizer {
    /// A fresh optimiser (zero state) for `params`.
    pub fn new(kind: OptimizerKind, params: &[Param]) -> Optimizer {
        let state = kind
            .state_names()
            .iter()
            .map(|_| params.iter().map(|p| vec![0.0; p.data.len()]).collect())
            .collect();
        Optimizer {
            kind,
            steps: 0,
            state,
        }
    }

    /// Applies one update with learning rate `lr`.
    pub fn step(&mut self, params: &mut [Param], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if grads.len() != params.len() || self.state.iter().any(|s| s.len() != params.len()) {
            return Err(NnError::Input(format!(
                "optimiser has state for {} tensors, the network has {}",
                self.state.first().map_or(0, Vec::len),
                params.len()
            )));
        }
        self.steps += 1;
        let lr = lr as f32;
        match self.kind.clone() {
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => {
                for ((p, g), v) in params.iter_mut().zip(grads).zip(&mut self.state[0]) {
                    for ((w, &g), v) in p.data.iter_mut().zip(g).zip(v.iter_mut()) {
                        let d = g + weight_decay * *w;
                        *v = momentum * *v + d;
                        *w -= lr * *v;
                    }
                }
            }
            OptimizerKind::Adamw {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let t = self.steps as i32;
                let c1 = 1.0 - beta1.powi(t);
                let c2 = 1.0 - beta2.powi(t);
                let (ms, vs) = self.state.split_at_mut(1);
                for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut ms[0]).zip(&mut vs[0])
                {
                    for (((w, &g), m), v) in
                        p.data.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        *w -= lr * weight_decay * *w;
                        *m = beta1 * *m + (1.0 - beta1) * g;
                        *v = beta2 * *v + (1.0 - beta2) * g * g;
                        let mhat = *m / c1;
                        let vhat = *v / c2;
                        *w -= lr * mhat / (vhat.sqrt() + eps);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(data: Vec<f32>) -> Param {
        Param {
            name: "w".into(),
            shape: vec![data.len()],
            data,
        }
    }

    #[test]
    fn sgd_momentum_matches_a_hand_computed_step() {
        let mut p = vec![param(vec![1.0, -2.0])];
        let kind = OptimizerKind::Sgd {
            momentum: 0.9,
            weight_decay: 0.1,
        };
        let mut opt = Optimizer::new(kind, &p);
        // Step 1: d = g + 0.1·w = [0.5 + 0.1, 1.0 − 0.2] = [0.6, 0.8]; v = d; w −= 0.5·v.
        opt.step(&mut p, &[vec![0.5, 1.0]], 0.5).unwrap();
        assert_eq!(p[0].data, vec![0.7, -2.4]);
        assert_eq!(opt.state[0][0], vec![0.6, 0.8]);
        // Step 2: d = [0.5 + 0.07, 1.0 − 0.24] = [0.57, 0.76]; v = 0.9·[0.6, 0.8] + d
        // = [1.11, 1.48]; w −= 0.1·v.
        opt.step(&mut p, &[vec![0.5, 1.0]], 0.1).unwrap();
        let want = [0.7 - 0.1 * 1.11, -2.4 - 0.1 * 1.48];
        for (a, b) in p[0].data.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(opt.steps, 2);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        let mut p = vec![param(vec![1.0, 1.0])];
        let kind = OptimizerKind::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = Optimizer::new(kind, &p);
        opt.step(&mut p, &[vec![3.0, -0.5]], 0.1).unwrap();
        // Decay first (1 − 0.1·0.01 = 0.999), then m̂/√v̂ = sign(g) on the first step.
        assert!((p[0].data[0] - (0.999 - 0.1)).abs() < 1e-6);
        assert!((p[0].data[1] - (0.999 + 0.1)).abs() < 1e-6);
    }
}
