//! Evaluation metrics for sela.
//!
//! - agreement between labelings: [`nmi`], [`ari`], [`matched_accuracy`] (Hungarian
//!   one-to-one matching), [`purity`], all over a sparse [`Contingency`] table;
//! - [`hungarian`]: minimum-cost assignment;
//! - [`knn_classify`]: weighted k-nearest-neighbour classification on cosine similarity, and
//!   [`nearest_neighbours`], the exact neighbour lists behind it;
//! - [`LinearProbe`]: multinomial logistic regression on standardised embeddings.
//!
//! Pure Rust; parallel parts use rayon over fixed-size blocks combined in order, so results are
//! reproducible bit for bit whatever the number of threads.

pub mod contingency;
pub mod knn;
mod linalg;
pub mod matching;
pub mod probe;

pub use contingency::{ari, nmi, Contingency};
pub use knn::{accuracy, knn_classify, nearest_neighbours, KnnParams};
pub use matching::{hungarian, matched_accuracy, purity, ClassMatching};
pub use probe::{LinearProbe, ProbeParams};
