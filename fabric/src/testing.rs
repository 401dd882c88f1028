//! Deterministic simulated networks for tests and benches.
