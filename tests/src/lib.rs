//! Helpers for the end-to-end tests: private Tox networks, network namespaces, local servers and
//! child processes that are always cleaned up.

#![forbid(unsafe_code)]

pub mod bench;
pub mod nat;
pub mod netns;
pub mod servers;
pub mod streams;
pub mod tcpbench;
pub mod toxnet;

/// Logs of the code under test, shown for failing tests (`RUST_LOG` overrides the default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,toxcore=warn".into()),
        )
        .with_test_writer()
        .try_init();
}
