//! The fabric's protocol core compiled for a browser page: two sessions joined by a simulated
//! lossy network, driven by the page's clock.

#![forbid(unsafe_code)]
