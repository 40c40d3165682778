//! sela-nn
