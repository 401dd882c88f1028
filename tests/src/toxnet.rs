//! A private Tox network on 127.0.0.1: several tox-bootstrapd nodes, LAN discovery off.
//!
//! The launcher lives in `fabric::tox::testnet` (feature `test-util`) so that fabric's own
//! benches can use it too; this module re-exports it for the end-to-end tests.

pub use fabric::tox::testnet::ToxNet;
