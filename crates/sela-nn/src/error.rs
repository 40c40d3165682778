use std::path::PathBuf;

/// An error of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// The architecture description is unusable.
    #[error("invalid model: {0}")]
    Spec(String),
    /// Inputs of the wrong size or labels out of range.
    #[error("{0}")]
    Input(String),
    /// A checkpoint that cannot be used.
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// Writing a checkpoint failed.
    #[error(transparent)]
    Io(#[from] sela_io::IoError),
    /// A candle error (reference graph and custom op).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this crate.
pub type Result<T, E = NnError> = std::result::Result<T, E>;
