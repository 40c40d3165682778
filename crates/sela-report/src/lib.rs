//! sela-report
