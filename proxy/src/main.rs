//! The `proxy` command: flags, logging, exit codes. Everything else is in the library.
//!
//! Exit codes: 0 after a clean shutdown (Ctrl-C / SIGTERM), 1 when something failed at run
//! time (a listener could not bind, a role is not available yet), 2 for bad flags or a bad
//! config file.

#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use proxy::Proxy;
use proxy::cli::{Cli, Command};
use proxy::config::{ExitSettings, RunSettings, id_data_dir};
use tracing_subscriber::EnvFilter;

/// How long connections in flight get to finish after Ctrl-C.
const GRACE: Duration = Duration::from_secs(5);

/// The seam the lead wires once `fabric`'s Tox binding lands.
const NO_TOX: &str = "exit peers need the Tox binding, not built yet";

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    #[cfg(target_os = "linux")]
    match proxy::server::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(err) => tracing::warn!(%err, "cannot raise the open file limit"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("proxy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Settings(err)) => {
            eprintln!("proxy: {err}");
            ExitCode::from(2)
        }
        Err(Failure::Run(err)) => {
            eprintln!("proxy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Settings(proxy::config::ConfigError),
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Self::Run(err)
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Some(Command::Exit(args)) => {
            let settings = ExitSettings::resolve(&args).map_err(Failure::Settings)?;
            tracing::debug!(?settings, "exit settings");
            Err(anyhow::anyhow!(NO_TOX).into())
        }
        Some(Command::Id(args)) => {
            let dir = id_data_dir(args.config.as_deref(), args.data_dir.as_deref())
                .map_err(Failure::Settings)?;
            tracing::debug!(?dir, "data dir");
            Err(anyhow::anyhow!(NO_TOX).into())
        }
        None => {
            let settings = RunSettings::resolve(&cli.run).map_err(Failure::Settings)?;
            if !settings.exits.is_empty() {
                return Err(anyhow::anyhow!(NO_TOX).into());
            }
            if settings.tun {
                return Err(anyhow::anyhow!("TUN mode is not built yet").into());
            }
            let dialer = Proxy::direct_dialer(&settings);
            let proxy = Proxy::bind(&settings, dialer)
                .await
                .context("starting listeners")?;
            // Tests and scripts read these lines to learn the ports (useful with port 0).
            if let Some(addr) = proxy.socks_addr() {
                println!("socks5 listening on {addr}");
            }
            if let Some(addr) = proxy.http_addr() {
                println!("http listening on {addr} (PAC file: http://{addr}/proxy.pac)");
            }
            proxy.run(shutdown_signal(), GRACE).await;
            Ok(())
        }
    }
}

/// Completes on the first Ctrl-C or SIGTERM; a second one ends the process at once.
async fn shutdown_signal() {
    wait_signal().await;
    tokio::spawn(async {
        wait_signal().await;
        eprintln!("proxy: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "proxy=info,warn",
        1 => "proxy=debug,info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
