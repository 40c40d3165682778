//! sela-eval
