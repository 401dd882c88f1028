//! `proxy`: route your traffic through a peer you trust.
//!
//! ```text
//!  app ──SOCKS5──► socks ──┐
//!  app ──HTTP────► http  ──┼─► Arc<dyn Dialer> ──┬─ DirectDialer: TCP/UDP from this host
//!  (later) TUN ────────────┘   Target + stream   ├─ PolicyDialer(DirectDialer): exit role
//!                              or UDP flow       └─ (later) fabric: mux stream to an exit peer
//! ```
//!
//! The front-ends ([`socks`], [`http`]) only know [`dialer::Dialer`]; [`relay`] copies bytes
//! both ways; [`exit_policy`] decides which destinations may be dialed; [`cli`] and
//! [`config`] turn flags and the config file into settings; [`Proxy`] binds the listeners
//! and runs them until shutdown.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod cli;
pub mod config;
pub mod dialer;
pub mod exit;
pub mod exit_policy;
pub mod http;
pub mod relay;
pub mod server;
pub mod socks;
pub mod status;
#[cfg(target_os = "linux")]
pub mod tun_mode;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::RunSettings;
use crate::dialer::{Dialer, DirectDialer};
use crate::exit_policy::PolicyDialer;
use crate::server::Shared;
use crate::socks::Credentials;
use crate::status::Status;

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    /// Which listener.
    pub what: &'static str,
    /// Where.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// The client role with its listeners bound, ready to [`run`](Self::run).
#[derive(Debug)]
pub struct Proxy {
    shared: Shared,
    socks: Option<TcpListener>,
    http: Option<TcpListener>,
    socks_auth: Option<Credentials>,
}

impl Proxy {
    /// Binds the listeners `settings` ask for, dialing through `dialer`.
    pub async fn bind(settings: &RunSettings, dialer: Arc<dyn Dialer>) -> Result<Self, BindError> {
        let bind = |what, addr: Option<SocketAddr>| async move {
            match addr {
                None => Ok(None),
                Some(addr) => TcpListener::bind(addr)
                    .await
                    .map(Some)
                    .map_err(|source| BindError { what, addr, source }),
            }
        };
        let socks = bind("socks5", settings.socks).await?;
        let http = bind("http", settings.http).await?;
        let c = &settings.common;
        Ok(Self {
            shared: Shared::new(dialer, c.idle_timeout, c.max_connections),
            socks,
            http,
            socks_auth: settings.socks_auth.clone(),
        })
    }

    /// The dialer direct mode uses: straight out, through the destination rules if
    /// `direct_policy` is set.
    pub fn direct_dialer(settings: &RunSettings) -> Arc<dyn Dialer> {
        let direct = DirectDialer::new(settings.common.connect_timeout);
        if settings.direct_policy {
            Arc::new(PolicyDialer::new(direct, settings.common.policy.clone()))
        } else {
            Arc::new(direct)
        }
    }

    /// The SOCKS5 listener's address (with the real port when 0 was asked for).
    pub fn socks_addr(&self) -> Option<SocketAddr> {
        self.socks.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The HTTP listener's address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Makes `GET /status` on the HTTP listener answer from `status`.
    pub fn set_status(&mut self, status: Arc<Status>) {
        self.shared.status = Some(status);
    }

    /// What every connection shares (its shutdown token stops the listeners).
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Serves until `shutdown` completes, then stops accepting and gives connections in
    /// flight up to `grace` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>, grace: Duration) {
        let socks_addr = self.socks_addr();
        let http_addr = self.http_addr();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = self.socks {
            tasks.spawn(socks::serve(listener, self.shared.clone(), self.socks_auth));
        }
        if let (Some(listener), Some(http)) = (self.http, http_addr) {
            let pac = http::PacInfo {
                http,
                socks: socks_addr,
            };
            tasks.spawn(http::serve(listener, self.shared.clone(), pac));
        }
        shutdown.await;
        info!("shutting down");
        let left = self.shared.shut_down(grace).await;
        if left > 0 {
            warn!(
                left,
                "connections still open after the grace period; closing them"
            );
        }
        tasks.shutdown().await;
    }
}
