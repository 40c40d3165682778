//! sela-assign
