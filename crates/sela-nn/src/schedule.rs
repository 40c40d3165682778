//! The learning rate as a function of the global optimisation step, planned over the whole
//! pipeline (all rounds), so it is not reset at every round.

use crate::error::{NnError, Result};

/// The shape of the decay after warm-up.
#[derive(Debug, Clone, PartialEq)]
pub enum Decay {
    /// Half a cosine from the peak down to zero at the end of the run.
    Cosine,
    /// Multiply by `gamma` at each milestone (fractions of the run).
    Step { milestones: Vec<f64>, gamma: f64 },
    /// The peak throughout.
    Constant,
}

/// A learning-rate schedule over `total_steps` steps.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub decay: Decay,
    /// Steps of linear warm-up from peak/warmup to the peak.
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The schedule of `[train]` for a run of `total_epochs` epochs of `steps_per_epoch` steps.
    pub fn from_config(
        train: &sela_config::TrainSection,
        steps_per_epoch: u64,
        total_epochs: u64,
    ) -> Result<LrSchedule> {
        let decay = match train.schedule.as_str() {
            "cosine" => Decay::Cosine,
            "constant" => Decay::Constant,
            "step" => Decay::Step {
                milestones: train.step_milestones.clone(),
                gamma: train.step_gamma,
            },
            other => {
                return Err(NnError::Spec(format!(
                    "train.schedule `{other}` is not known (cosine, step or constant)"
                )))
            }
        };
        Ok(LrSchedule {
            peak: train.lr,
            decay,
            warmup_steps: (train.warmup_epochs.max(0.0) * steps_per_epoch as f64).round() as u64,
            total_steps: (steps_per_epoch * total_epochs).max(1),
        })
    }

    /// The rate at global step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let progress = |from: u64| -> f64 {
            let span = self.total_steps.saturating_sub(from).max(1);
            ((step - from) as f64 / span as f64).min(1.0)
        };
        match &self.decay {
            Decay::Constant => self.peak,
            Decay::Cosine => {
                let t = progress(self.warmup_steps);
                self.peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Decay::Step { milestones, gamma } => {
                let t = progress(0);
                let passed = milestones.iter().filter(|&&m| t >= m).count();
                self.peak * gamma.powi(passed as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_and_step() {
        let s = LrSchedule {
            peak: 0.1,
            decay: Decay::Cosine,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(0) - 0.01).abs() < 1e-12);
        assert!((s.lr(9) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 0.1).abs() < 1e-12);
        assert!((s.lr(60) - 0.05).abs() < 1e-12);
        assert!(s.lr(109) < 1e-3 && s.lr(109) > 0.0);
        let st = LrSchedule {
            peak: 1.0,
            decay: Decay::Step {
                milestones: vec![0.5, 0.75],
                gamma: 0.1,
            },
            warmup_steps: 0,
            total_steps: 100,
        };
        assert_eq!(st.lr(49), 1.0);
        assert!((st.lr(50) - 0.1).abs() < 1e-12);
        assert!((st.lr(80) - 0.01).abs() < 1e-12);
    }
}
