//! The fabric's protocol core compiled for a browser page: two sessions joined by a simulated
//! lossy network, driven by the page's clock, beside a TCP-like baseline on an identical link.
//!
//! ```text
//!  page (www/main.js) ── requestAnimationFrame ──► WebDemo::tick ── performance.now() ──┐
//!                                                                                      ▼
//!   lane "fabric":   Connection A ─► SimNet (loss, delay, jitter, rate) ─► Connection B
//!                    (fabric::connection: the mux over a KCP session, as the proxy runs it)
//!   lane "baseline": Baseline A   ─► SimNet (same settings, same seed)  ─► Baseline B
//!                    (baseline: TCP NewReno without SACK, one flow per stream)
//! ```
//!
//! [`demo`] and [`lane`] are plain Rust (tested natively in virtual time); [`web`] is the thin
//! `wasm-bindgen` surface the page calls.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod baseline;
pub mod demo;
pub mod lane;
pub mod web;
