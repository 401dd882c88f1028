//! `proxy`: route your traffic through a peer you trust.
//!
//! ```text
//!  app ──SOCKS5──► socks ──┐  guard (own listeners,  ┌─ DirectDialer: TCP/UDP from this host
//!  app ──HTTP────► http  ──┼─► rules for LAN ───────►├─ PolicyDialer(DirectDialer): exit role
//!  TUN ──netstack► tun_mode┘   clients) ─► Dialer    └─ FabricDialer: mux stream to an exit
//! ```
//!
//! The front-ends ([`socks`], [`http`]) only know [`dialer::Dialer`], behind the [`guard`]s
//! of the local listeners; [`relay`] copies bytes
//! both ways; [`exit_policy`] decides which destinations may be dialed; [`cli`] and
//! [`config`] turn flags and the config file into settings; [`Proxy`] binds the listeners
//! and runs them until shutdown.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod accounts;
pub mod cli;
pub mod config;
pub mod control;
pub mod dialer;
pub mod exit;
pub mod exit_policy;
pub mod guard;
pub mod http;
pub mod introduce;
pub mod mesh;
pub mod node;
pub mod pairing;
pub mod peers;
pub mod relay;
pub mod rights;
pub mod route;
pub mod server;
pub mod share;
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
use crate::guard::{Dialers, OwnListeners};
use crate::server::Shared;
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
    socks: Vec<TcpListener>,
    http: Vec<TcpListener>,
}

impl Proxy {
    /// Binds the listeners `settings` ask for, dialing through `dialers` (behind a guard
    /// that refuses requests for these very listeners).
    pub async fn bind(settings: &RunSettings, dialers: Dialers) -> Result<Self, BindError> {
        let socks = match settings.socks {
            Some(at) => server::bind("socks5", at).await?,
            None => Vec::new(),
        };
        let http = match settings.http {
            Some(at) => server::bind("http", at).await?,
            None => Vec::new(),
        };
        for (what, at) in [("socks5", settings.socks), ("http", settings.http)] {
            if let Some(at) = at
                && at.is_open_to_network()
                && settings.auth.is_none()
            {
                warn!(
                    "the {what} listener on {at} is open to the network without credentials: \
                     anyone who reaches it can use this proxy (clients from other hosts are \
                     held to the destination rules; set --socks-user and PROXY_SOCKS_PASS)"
                );
            }
        }
        let own: Vec<SocketAddr> = socks
            .iter()
            .chain(&http)
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let c = &settings.common;
        let counters = Arc::new(status::Counters::default());
        let dialers = dialers.guarded(Arc::new(OwnListeners::new(own)), counters.clone());
        let mut shared = Shared::new(dialers, c.idle_timeout, c.max_connections);
        shared.counters = counters;
        shared.auth = settings.auth.clone().map(Arc::new);
        Ok(Self {
            shared,
            socks,
            http,
        })
    }

    /// The dialer direct mode uses for clients on this host: straight out, through the
    /// destination rules if `direct_policy` is set.
    pub fn direct_dialer(settings: &RunSettings) -> Arc<dyn Dialer> {
        let direct = DirectDialer::new(settings.common.connect_timeout);
        if settings.direct_policy {
            Arc::new(PolicyDialer::new(direct, settings.common.policy.clone()))
        } else {
            Arc::new(direct)
        }
    }

    /// Direct mode's dialers: [`Self::direct_dialer`] for clients on this host, the
    /// destination rules for clients from elsewhere.
    pub fn direct_dialers(settings: &RunSettings) -> Dialers {
        Dialers::direct(
            Self::direct_dialer(settings),
            DirectDialer::new(settings.common.connect_timeout),
            &settings.common.policy,
        )
    }

    /// The SOCKS5 listener's address (the first, when `:PORT` bound two; with the real port
    /// when 0 was asked for).
    pub fn socks_addr(&self) -> Option<SocketAddr> {
        self.socks.first().and_then(|l| l.local_addr().ok())
    }

    /// The HTTP listener's address (the first).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.first().and_then(|l| l.local_addr().ok())
    }

    /// Every address the SOCKS5 listener bound.
    pub fn socks_addrs(&self) -> Vec<SocketAddr> {
        self.socks
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Every address the HTTP listener bound.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
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
        for listener in self.socks {
            tasks.spawn(socks::serve(listener, self.shared.clone()));
        }
        if let Some(http) = http_addr {
            let pac = http::PacInfo {
                http,
                socks: socks_addr,
            };
            for listener in self.http {
                tasks.spawn(http::serve(listener, self.shared.clone(), pac));
            }
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
