//! The clock types the cores take as arguments.
//!
//! The protocol cores never read the clock: callers pass `now` in. Drivers read it from `std`
//! on native targets and from `performance.now()` (through `web-time`) in a browser, where
//! `std::time::Instant::now` panics.

#[cfg(not(wasm_browser))]
pub use std::time::{Duration, Instant};
#[cfg(wasm_browser)]
pub use web_time::{Duration, Instant};
