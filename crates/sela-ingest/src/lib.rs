//! sela-ingest
