//! Helpers for the end-to-end tests: private Tox networks, network namespaces, local servers and
//! child processes that are always cleaned up.

#![forbid(unsafe_code)]

pub mod servers;
pub mod toxnet;
