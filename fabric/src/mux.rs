//! The seed-004 stream multiplexer.
