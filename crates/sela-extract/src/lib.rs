//! sela-extract
