//! Image formats and pixels for sela.
//!
//! - [`idx`]: the IDX files MNIST-style datasets ship as;
//! - [`codec`]: PNG/JPEG encoding and decoding;
//! - [`imageset`]: a dataset Parquet decoded once into memory;
//! - [`augment`]: clean and seeded random views as normalised network inputs;
//! - [`loader`]: shuffled, prefetched training batches;
//! - [`rng`]: the deterministic random numbers everything above draws from.

pub mod augment;
pub mod codec;
pub mod idx;
pub mod imageset;
pub mod loader;
pub mod rng;

pub use augment::{Normalize, Shape};
pub use imageset::{ImageSet, ImageSetError};
pub use rng::Rng;
