//! sela-sinkhorn
