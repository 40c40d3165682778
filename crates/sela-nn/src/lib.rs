//! sela's network and its training arithmetic, on CPU.
//!
//! - [`spec`]: the architecture, from the pipeline config ([`ModelSpec`]);
//! - [`network`]: the compact ResNet with H linear heads ([`Network`]): deterministic
//!   initialisation, batch-independent inference, and a training step whose forward and backward
//!   passes run on preallocated buffers;
//! - [`conv`]: the convolution as batched matrix multiplies over im2col/col2im, also offered as a
//!   candle custom op with its own backward ([`conv::conv2d`]);
//! - [`batchnorm`]: training-mode batch normalisation fused with ReLU and the residual add;
//! - [`optim`]: SGD with momentum and AdamW; [`schedule`]: the learning-rate schedule;
//! - [`checkpoint`]: safetensors checkpoints with BatchNorm statistics, optimiser state and metadata;
//! - [`reference`]: the same network as a plain candle autograd graph, the yardstick for tests
//!   and benchmarks.

pub mod batchnorm;
pub mod checkpoint;
pub mod conv;
mod error;
mod gemm;
pub mod network;
pub mod optim;
pub mod reference;
pub mod schedule;
mod simd;
pub mod spec;

pub use error::{NnError, Result};
pub use network::{Network, Outputs, Param, ReadoutOutputs, StepStats};
pub use optim::{Optimizer, OptimizerKind};
pub use schedule::LrSchedule;
pub use spec::{ModelSpec, Readout};
