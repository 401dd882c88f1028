//! Helpers for the end-to-end tests: private Tox networks, network namespaces, child processes
//! that are always cleaned up.

#![forbid(unsafe_code)]
