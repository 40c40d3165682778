//! sela-train
