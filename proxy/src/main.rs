//! The `proxy` command: flags, logging, exit codes. Everything else is in the library.
//!
//! Exit codes: 0 after a clean shutdown (Ctrl-C / SIGTERM), 1 when something failed at run
//! time (a listener could not bind, a role is not available yet), 2 for bad flags or a bad
//! config file.

#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use fabric::id::{BootstrapNode, ToxId};
use fabric::path::PathConfig;
use fabric::peer::{Fabric, FabricConfig};
use fabric::tox::{ToxConfig, ToxNode};
use proxy::Proxy;
use proxy::cli::{Cli, Command};
use proxy::config::{CommonSettings, ExitSettings, RunSettings, id_data_dir, status_addr};
use proxy::dialer::{Dialer, DirectDialer};
use proxy::exit::dns::Upstreams;
use proxy::exit::{ExitOptions, FabricDialer, UdpOptions};
use proxy::exit_policy::PolicyDialer;
use proxy::guard::Dialers;
use proxy::mesh::Mesh;
use proxy::node::Live;
use proxy::status::peers::MeshStatus;
use proxy::status::{Counters, Role, Status};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// How long connections in flight get to finish after Ctrl-C.
const GRACE: Duration = Duration::from_secs(5);

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
        Err(Failure::Usage(err)) => {
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
    /// A flag's value is wrong (a Tox ID with a typo, a bad bootstrap node).
    Usage(String),
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Self::Run(err)
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // The long-running roles listen for signals before they announce anything on stdout: a
    // Ctrl-C right after "listening" must find its handler, and must not be lost.
    let signals = || Signals::install().context("installing signal handlers");
    match cli.command {
        Some(Command::Exit(args)) => {
            let signals = signals()?;
            let settings = ExitSettings::resolve(&args).map_err(Failure::Settings)?;
            run_exit(settings, signals).await
        }
        Some(Command::Status(args)) => {
            print!("{}", ask(&args, "status").await?);
            Ok(())
        }
        Some(Command::Peers(args)) => {
            print!("{}", ask(&args, "peers").await?);
            Ok(())
        }
        Some(Command::Peer(args)) => {
            let dir = node_dir(args.config.as_deref(), args.data_dir.as_deref())?;
            tell(&dir, &args.change.request(), Duration::from_secs(30)).await
        }
        Some(Command::Invite(args)) => {
            let dir = node_dir(args.config.as_deref(), args.data_dir.as_deref())?;
            let line = if args.list {
                "invites".to_owned()
            } else if let Some(id) = &args.revoke {
                format!("invite-revoke {id}")
            } else {
                let mut line = "invite".to_owned();
                if let Some(n) = &args.name {
                    line.push_str(&format!(" name={n}"));
                }
                if args.exit {
                    line.push_str(" exit");
                }
                if let Some(p) = &args.share {
                    line.push_str(&format!(" share={p}"));
                }
                if let Some(t) = args.ttl {
                    line.push_str(&format!(" ttl={t}"));
                }
                line
            };
            if proxy::control::node_runs(&dir).await {
                let answer = proxy::control::request_within(&dir, &line, Duration::from_secs(30))
                    .await
                    .map_err(|e| Failure::Run(anyhow::anyhow!("{e}")))?;
                print_invitation(answer.trim_end());
                return Ok(());
            }
            // No node runs there: the invitation is kept in the data dir, for the node to
            // take when it starts.
            let words: Vec<&str> = line.split_whitespace().collect();
            let inviter = ToxNode::identity(&dir)
                .with_context(|| format!("reading the identity in {}", dir.display()))?;
            let endpoints = Fabric::direct_endpoints_of(&dir, fabric::pairing::MAX_ENDPOINTS);
            let answer = invitations(&dir)?
                .answer(&words, inviter, endpoints, proxy::mesh::unix_now())
                .unwrap_or_else(|| Err(format!("cannot read {line:?}")))
                .map_err(|e| Failure::Run(anyhow::anyhow!("{e}")))?;
            print_invitation(&answer);
            if line.starts_with("invite ") || line == "invite" {
                eprintln!(
                    "(no node runs on {}: the invitation works once one starts there)",
                    dir.display()
                );
            }
            Ok(())
        }
        Some(Command::Join(args)) => {
            let dir = node_dir(args.config.as_deref(), args.data_dir.as_deref())?;
            let mut line = format!("join {} wait={}", args.ticket.trim(), args.wait);
            if let Some(n) = &args.name {
                line.push_str(&format!(" name={n}"));
            }
            // A mangled paste is said first, whatever runs.
            fabric::pairing::Ticket::parse(args.ticket.trim())
                .map_err(|e| Failure::Run(anyhow::anyhow!("{e}")))?;
            if !proxy::control::node_runs(&dir).await {
                // Pairing needs the node that will hold the session.
                return Err(Failure::Run(anyhow::anyhow!(
                    "no node runs on {}: start one there (proxy --node, or proxy with your \
                     usual flags), then join again",
                    dir.display()
                )));
            }
            tell(
                &dir,
                &line,
                Duration::from_secs(args.wait.saturating_add(30)),
            )
            .await
        }
        Some(Command::Id(args)) => {
            let dir = id_data_dir(args.config.as_deref(), args.data_dir.as_deref())
                .map_err(Failure::Settings)?;
            let dir = data_dir(dir)?;
            let id = ToxNode::identity(&dir)
                .with_context(|| format!("reading the identity in {}", dir.display()))?;
            println!("{id}");
            Ok(())
        }
        None => {
            let signals = signals()?;
            let settings = RunSettings::resolve(&cli.run).map_err(Failure::Settings)?;
            if settings.tun {
                return run_tun(settings, signals).await;
            }
            // Keep the node alive as long as the listeners.
            let node = start_node(&settings, None)?;
            let mut held = None;
            let mut dialers = match node.as_ref().and_then(|n| n.exits.clone()) {
                Some(exits) => {
                    held = Some(exits.held());
                    Dialers::through_exits(Arc::new(exits), &settings.common.policy)
                }
                None => Proxy::direct_dialers(&settings),
            };
            if let Some(node) = &node {
                dialers = dialers.with_mesh(&node.mesh);
            }
            let fabric = node.as_ref().map(|n| n.fabric.clone());
            let mesh = node.as_ref().map(|n| (n.status.clone(), n.live.clone()));
            let proxy =
                start_frontends(&settings, dialers, fabric.clone(), held, None, mesh).await?;
            proxy.run(shutdown_signal(signals), GRACE).await;
            if let Some(fabric) = fabric {
                fabric.shutdown().await;
            }
            Ok(())
        }
    }
}

/// Prints what `proxy invite` answered; a new ticket (the last line) is drawn as a QR code
/// above it when stdout is a terminal, and stays the last line.
fn print_invitation(answer: &str) {
    let (head, last) = answer.rsplit_once('\n').unwrap_or(("", answer));
    if !head.is_empty() {
        println!("{head}");
    }
    if last.starts_with(fabric::pairing::TICKET_PREFIX)
        && std::io::stdout().is_terminal()
        && let Some(code) = proxy::pairing::qr(last)
    {
        println!("{code}");
    }
    println!("{last}");
}

/// The data dir of the running node a command talks to: `--data-dir`, the config file's, or
/// the default.
fn node_dir(
    config: Option<&std::path::Path>,
    dir: Option<&std::path::Path>,
) -> Result<std::path::PathBuf, Failure> {
    data_dir(id_data_dir(config, dir).map_err(Failure::Settings)?)
}

/// Sends `line` to the node on `dir` by its control socket and prints the answer (at most
/// `limit` for it); a refusal is the command's error.
async fn tell(dir: &std::path::Path, line: &str, limit: Duration) -> Result<(), Failure> {
    let done = proxy::control::request_within(dir, line, limit)
        .await
        .map_err(|e| Failure::Run(anyhow::anyhow!("{e}")))?;
    print!("{done}");
    Ok(())
}

/// Asks the running node for `what` (`status`, `peers`): by its control socket with
/// `--data-dir`, else by HTTP at `--from` (or the config file's address).
async fn ask(args: &proxy::cli::StatusArgs, what: &str) -> Result<String, Failure> {
    if let Some(dir) = &args.data_dir {
        return Ok(proxy::control::request(dir, what)
            .await
            .with_context(|| format!("asking the proxy on {} for its {what}", dir.display()))?);
    }
    let addr = status_addr(args).map_err(Failure::Settings)?;
    Ok(proxy::status::fetch_path(addr, &format!("/{what}"))
        .await
        .with_context(|| format!("asking the proxy at {addr} for its {what}"))?)
}

/// Binds the listeners (if any is on), serves status on them and on `--metrics`, and
/// announces their addresses on stdout.
async fn start_frontends(
    settings: &RunSettings,
    dialers: Dialers,
    fabric: Option<Arc<Fabric>>,
    held: Option<Arc<std::sync::atomic::AtomicUsize>>,
    tun: Option<Arc<std::sync::OnceLock<proxy::status::TunCapture>>>,
    mesh: Option<(MeshStatus, Arc<Live>)>,
) -> Result<Proxy, Failure> {
    let mut proxy = Proxy::bind(settings, dialers)
        .await
        .context("starting listeners")?;
    let role = if fabric.is_some() {
        Role::Client
    } else {
        Role::Direct
    };
    let counters = proxy.shared().counters.clone();
    let mut status = Status::new(role, fabric, counters);
    if let Some(held) = held {
        status = status.with_held(held);
    }
    if let Some(tun) = tun {
        status = status.with_tun(tun);
    }
    let mut changes = None;
    if let Some((peers, live)) = mesh {
        status = status.with_mesh(peers);
        changes = Some(live);
    }
    let status = Arc::new(status);
    proxy.set_status(status.clone());
    if status.has_fabric() {
        // A node (with an identity, so a data dir): its control socket.
        let dir = data_dir(settings.common.data_dir.clone())?;
        let changes = changes.map(|l| l as Arc<dyn proxy::control::Changes>);
        serve_control(
            &dir,
            status.clone(),
            changes,
            proxy.shared().shutdown.clone(),
        )
        .await?;
    }
    serve_metrics(&settings.common, status, proxy.shared().shutdown.clone()).await?;
    // Tests and scripts read these lines to learn the ports (useful with port 0): the first
    // address is the one to use, any other follows "and".
    if proxy.socks_addr().is_some() {
        println!("socks5 listening on {}", and_list(&proxy.socks_addrs()));
    }
    if let Some(addr) = proxy.http_addr() {
        println!(
            "http listening on {} (PAC file: http://{addr}/proxy.pac)",
            and_list(&proxy.http_addrs())
        );
    }
    Ok(proxy)
}

/// The default mode's Tox node, when it has anything to do (exits to use, peers to reach,
/// rights to serve): its fabric, a dialer through the `--exit` peers, and the peers by name.
struct Node {
    fabric: Arc<Fabric>,
    /// Through the exits, when there are any.
    exits: Option<FabricDialer>,
    /// To the known peers' shares (its onward dialer is a placeholder: use
    /// [`proxy::route::MeshDialer::in_front_of`]).
    mesh: proxy::route::MeshDialer,
    /// The peers part of status.
    status: MeshStatus,
    /// What the control socket changes.
    live: Arc<Live>,
}

/// The node's live peers and rights: the flags' and config file's, then those kept in the
/// data dir `dir`, which changes are kept in.
fn live_mesh(common: &CommonSettings, dir: &std::path::Path) -> Result<Arc<Mesh>, Failure> {
    let own = ToxNode::identity(dir)
        .with_context(|| format!("reading the identity in {}", dir.display()))?
        .public_key();
    let mesh = Mesh::new(
        common.peers.clone(),
        common.rights.clone(),
        own,
        Some(dir.join(proxy::mesh::STORE)),
    );
    mesh.load(dir)
        .context("reading the peers kept in the data dir")?;
    Ok(Arc::new(mesh))
}

/// The invitations kept in the data dir `dir`.
fn invitations(dir: &std::path::Path) -> Result<proxy::pairing::Invitations, Failure> {
    Ok(
        proxy::pairing::Invitations::load(dir)
            .context("reading the invitations in the data dir")?,
    )
}

/// Who may hold a session with this node: anyone it knows or gave a right, and the exits it
/// dials (a pair holds one session, whoever opens).
fn allow_policy(tox: &mut ToxConfig, mesh: &Mesh, exits: &[ToxId]) {
    let now = mesh.now();
    tox.allow.allow_any = now.rights.any_exit();
    tox.allow.keys.extend(
        now.rights
            .session_peers(&now.peers)
            .into_iter()
            .chain(exits.iter().map(ToxId::public_key)),
    );
}

/// The known peers' dialer and status, sessions to every exit and known peer (each once), and
/// the serving of what peers ask.
fn wire_node(
    fabric: &Arc<Fabric>,
    mesh: &Arc<Mesh>,
    common: &CommonSettings,
    exits: (&[ToxId], Option<FabricDialer>),
    books: Arc<proxy::accounts::PeerAccounts>,
    serving: (Vec<std::net::SocketAddr>, Option<u32>),
    invitations: proxy::pairing::Invitations,
) -> (proxy::route::MeshDialer, MeshStatus, Arc<Live>) {
    let (exit_ids, exit_dialer) = exits;
    let placeholder: Arc<dyn Dialer> = Arc::new(DirectDialer::new(common.connect_timeout));
    let dialer = proxy::route::MeshDialer::new(
        mesh.clone(),
        fabric.clone(),
        common.connect_timeout,
        placeholder,
        books.clone(),
    );
    let status = MeshStatus {
        mesh: mesh.clone(),
        accounts: books,
        exits: exit_ids.iter().map(ToxId::public_key).collect(),
        granted: dialer.granted(),
    };
    let mut dial: Vec<ToxId> = exit_ids.to_vec();
    for peer in mesh.now().peers.iter() {
        if dial.iter().all(|d| d.public_key() != peer.id.public_key()) {
            dial.push(peer.id);
        }
    }
    for id in dial {
        tokio::spawn(proxy::node::connect_peer(
            fabric.clone(),
            exit_dialer.clone(),
            dialer.clone(),
            id,
        ));
    }
    let (news, heard) = tokio::sync::mpsc::channel(256);
    serve_peers(fabric, &status, common, serving, news);
    let live = Arc::new(Live::new(
        mesh.clone(),
        fabric.clone(),
        dialer.clone(),
        exit_dialer,
        invitations,
    ));
    tokio::spawn(proxy::node::accept_joins(live.clone()));
    tokio::spawn(proxy::node::introductions(live.clone(), heard));
    (dialer, status, live)
}

/// Whether the default mode runs a Tox node: for exits, peers or rights, for the peers kept
/// in the data dir `dir`, or when asked to (`--node`, to invite or join).
fn wants_node(settings: &RunSettings, dir: &std::path::Path) -> bool {
    let common = &settings.common;
    !settings.exits.is_empty()
        || !common.peers.is_empty()
        || !common.rights.is_empty()
        || settings.node
        || dir.join(proxy::mesh::STORE).exists()
}

/// Starts the node (see [`Node`]) unless there is nothing for it to do: it connects to every
/// exit and known peer in the background, one session per peer, and serves what the peers
/// may ask of it. `mark`: the TUN's socket mark for what it dials for peers.
fn start_node(settings: &RunSettings, mark: Option<u32>) -> Result<Option<Node>, Failure> {
    let common = &settings.common;
    let dir = data_dir(common.data_dir.clone())?;
    if !wants_node(settings, &dir) {
        return Ok(None);
    }
    let mesh = live_mesh(common, &dir)?;
    let mut config = fabric_config(common)?;
    allow_policy(&mut config.tox, &mesh, &settings.exits);
    let fabric = Arc::new(Fabric::start(config).context("starting the Tox node")?);
    println!("tox id: {}", fabric.id());
    // The dialer knows every exit and its place from the start, so the failover order is the
    // order given here, whichever session comes up first.
    let books: Arc<proxy::accounts::PeerAccounts> = Arc::default();
    let exits = (!settings.exits.is_empty()).then(|| {
        FabricDialer::new(
            common.connect_timeout,
            settings.exits.iter().map(ToxId::public_key),
        )
        .with_accounts(books.clone())
    });
    if let Some(exits) = &exits {
        tokio::spawn(exits.deliver_datagrams(fabric.clone()));
        tokio::spawn(exits.follow_sessions(&fabric));
    }
    let (mesh_dialer, status, live) = wire_node(
        &fabric,
        &mesh,
        common,
        (&settings.exits, exits.clone()),
        books,
        (Vec::new(), mark),
        invitations(&dir)?,
    );
    Ok(Some(Node {
        fabric,
        exits,
        mesh: mesh_dialer,
        status,
        live,
    }))
}

/// Serves what peers ask of this node, under their rights: exit requests through the exit
/// policy, shared ports on this host's loopback.
fn serve_peers(
    fabric: &Arc<Fabric>,
    status: &MeshStatus,
    common: &CommonSettings,
    (dns, mark): (Vec<std::net::SocketAddr>, Option<u32>),
    news: tokio::sync::mpsc::Sender<proxy::exit::PeerNews>,
) {
    let mut direct = DirectDialer::new(common.connect_timeout);
    if let Some(mark) = mark {
        direct = direct.with_mark(mark);
    }
    let dialer: Arc<dyn Dialer> =
        Arc::new(PolicyDialer::new(direct.clone(), common.policy.clone()));
    // Read whether or not a peer may use this node as its exit yet: the right can be given
    // at run time (`proxy peer grant`, a join).
    let resolvers = if dns.is_empty() {
        Upstreams::system().unwrap_or_else(|err| {
            if status.mesh.now().rights.is_empty() {
                tracing::debug!(%err, "no resolver for peers' DNS");
            } else {
                tracing::warn!(%err, "no resolver for peers' DNS (they get SERVFAIL): pass --dns ADDR");
            }
            Upstreams::new(Vec::new())
        })
    } else {
        Upstreams::new(dns)
    };
    tracing::debug!(servers = ?resolvers.servers(), "peers' DNS resolvers");
    let options = ExitOptions {
        idle_timeout: common.idle_timeout,
        max_streams: common.max_connections,
        resolvers: Arc::new(resolvers),
        mesh: status.mesh.clone(),
        accounts: status.accounts.clone(),
        loopback: direct,
        news: Some(news),
        ..ExitOptions::default()
    };
    let udp = UdpOptions {
        mesh: status.mesh.clone(),
        ..UdpOptions::default()
    };
    tokio::spawn(proxy::exit::serve(fabric.clone(), dialer.clone(), options));
    tokio::spawn(proxy::exit::serve_udp(fabric.clone(), dialer, udp));
}

/// `proxy --tun`: the TUN device in front of the same dialers as the listeners.
#[cfg(target_os = "linux")]
async fn run_tun(settings: RunSettings, signals: Signals) -> Result<(), Failure> {
    // c-toxcore's sockets (with --exit) and the system resolver's (fake-IP mode resolves names
    // here when direct) cannot be marked one by one: mark the whole process's, before any of
    // them exists.
    let has_node = wants_node(&settings, &data_dir(settings.common.data_dir.clone())?);
    let _own = if has_node || settings.tun_options.fake_ip {
        Some(proxy::tun_mode::OwnSockets::install().context("tun mode")?)
    } else {
        None
    };
    // The same dialers serve the TUN and the listeners; direct ones carry the mark, so what
    // they dial leaves by the real link instead of coming back into the TUN.
    let node = start_node(&settings, Some(proxy::tun_mode::MARK))?;
    let (mut tun_dialer, mut dialers, held) = match node.as_ref().and_then(|n| n.exits.clone()) {
        None => {
            let direct =
                DirectDialer::new(settings.common.connect_timeout).with_mark(proxy::tun_mode::MARK);
            let dialer: Arc<dyn Dialer> = if settings.direct_policy {
                Arc::new(PolicyDialer::new(
                    direct.clone(),
                    settings.common.policy.clone(),
                ))
            } else {
                Arc::new(direct.clone())
            };
            let dialers = Dialers::direct(dialer.clone(), direct, &settings.common.policy);
            (dialer, dialers, None)
        }
        Some(exits) => {
            let held = exits.held();
            let dialer: Arc<dyn Dialer> = Arc::new(exits);
            let dialers = Dialers::through_exits(dialer.clone(), &settings.common.policy);
            (dialer, dialers, Some(held))
        }
    };
    if let Some(node) = &node {
        tun_dialer = Arc::new(node.mesh.in_front_of(tun_dialer));
        dialers = dialers.with_mesh(&node.mesh);
    }
    let mesh = node.as_ref().map(|n| (n.status.clone(), n.live.clone()));
    let peer_routes = node.as_ref().map(|n| n.mesh.clone());
    let fabric = node.map(|n| n.fabric);
    let capture = Arc::new(std::sync::OnceLock::new());
    let listeners = start_frontends(
        &settings,
        dialers,
        fabric.clone(),
        held,
        Some(capture.clone()),
        mesh,
    )
    .await?;
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal(signals).await;
            stop.cancel();
        }
    });
    let counters = listeners.shared().counters.clone();
    let listeners = tokio::spawn(listeners.run(stop.clone().cancelled_owned(), GRACE));
    let served = proxy::tun_mode::run(
        &settings,
        tun_dialer,
        counters,
        capture,
        peer_routes,
        stop.clone().cancelled_owned(),
    )
    .await
    .context("tun mode");
    // The TUN ended (shutdown, or it could not start): the listeners end with it.
    stop.cancel();
    let _ = listeners.await;
    if let Some(fabric) = fabric {
        fabric.shutdown().await;
    }
    served?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
async fn run_tun(_settings: RunSettings, _signals: Signals) -> Result<(), Failure> {
    Err(anyhow::anyhow!("TUN mode is only available on Linux").into())
}

/// The exit role: serves allowed clients until Ctrl-C.
async fn run_exit(settings: ExitSettings, signals: Signals) -> Result<(), Failure> {
    let common = &settings.common;
    let dir = data_dir(common.data_dir.clone())?;
    let mesh = live_mesh(common, &dir)?;
    let mut tox = tox_config(common)?;
    allow_policy(&mut tox, &mesh, &[]);
    if mesh.now().rights.is_empty() {
        tracing::warn!("no peer is allowed: pass --allow <TOXID|KEY|NAME> or --allow-any");
    }
    let mut config = FabricConfig::new(tox);
    config.path = path_config(&settings.common);
    let fabric = Arc::new(Fabric::start(config).context("starting the Tox node")?);
    // Scripts and tests read this line.
    println!("tox id: {}", fabric.id());
    let stop_metrics = CancellationToken::new();
    let (_dialer, peers, live) = wire_node(
        &fabric,
        &mesh,
        common,
        (&[], None),
        Arc::default(),
        (settings.dns.clone(), None),
        invitations(&dir)?,
    );
    let status = Arc::new(
        Status::new(
            Role::Exit,
            Some(fabric.clone()),
            Arc::new(Counters::default()),
        )
        .with_mesh(peers),
    );
    serve_metrics(&settings.common, status.clone(), stop_metrics.clone()).await?;
    serve_control(&dir, status, Some(live), stop_metrics.clone()).await?;
    shutdown_signal(signals).await;
    stop_metrics.cancel();
    fabric.shutdown().await;
    Ok(())
}

/// Opens the node's control socket in its data dir `dir` and serves it until `stop`.
async fn serve_control(
    dir: &std::path::Path,
    status: Arc<Status>,
    changes: Option<Arc<dyn proxy::control::Changes>>,
    stop: CancellationToken,
) -> Result<(), Failure> {
    let listener = proxy::control::bind(dir)
        .await
        .context("starting the control socket")?;
    let node = proxy::control::Node { status, changes };
    tokio::spawn(proxy::control::serve(listener, node, stop));
    Ok(())
}

/// Opens the `--metrics` listener, if asked for, and serves it until `stop`.
async fn serve_metrics(
    common: &CommonSettings,
    status: Arc<Status>,
    stop: CancellationToken,
) -> Result<(), Failure> {
    let Some(at) = common.metrics else {
        return Ok(());
    };
    let listeners = proxy::server::bind("metrics", at)
        .await
        .context("starting the metrics listener")?;
    let addrs: Vec<_> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    // Tests and scripts read this line to learn the port (useful with port 0).
    println!(
        "metrics listening on {} (/metrics, /status)",
        and_list(&addrs)
    );
    for listener in listeners {
        tokio::spawn(proxy::status::serve(listener, status.clone(), stop.clone()));
    }
    Ok(())
}

/// `a`, `a and b`: the addresses one listener bound, the one to use first.
fn and_list(addrs: &[std::net::SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The fabric's settings (Tox node and paths) from the common flags.
fn fabric_config(common: &CommonSettings) -> Result<FabricConfig, Failure> {
    let mut config = FabricConfig::new(tox_config(common)?);
    config.path = path_config(common);
    Ok(config)
}

/// Punched paths: which to use, and the STUN servers that find our public addresses.
fn path_config(common: &CommonSettings) -> PathConfig {
    let mut path = PathConfig::default();
    path.choice = common.path;
    path.stun_servers = common.stun.clone();
    path
}

/// The Tox node's settings from the common flags.
fn tox_config(common: &CommonSettings) -> Result<ToxConfig, Failure> {
    let mut tox = ToxConfig::new(data_dir(common.data_dir.clone())?);
    tox.use_public_bootstrap = common.public_bootstrap;
    tox.lock_memory = common.tox_lock_memory;
    tox.udp_enabled = common.tox_udp;
    tox.local_discovery = common.tox_lan_discovery;
    for node in &common.bootstrap {
        let parsed: BootstrapNode = node
            .parse()
            .map_err(|e| Failure::Usage(format!("--bootstrap {node:?}: {e}")))?;
        tox.bootstrap.push(parsed.clone());
        // Bootstrap nodes given by hand are usually tox-bootstrapd with its TCP relay on the
        // same port, which lets a node without UDP reach the network.
        tox.tcp_relays.push(parsed);
    }
    Ok(tox)
}

/// The identity directory: the one configured, or `$XDG_DATA_HOME/proxy`
/// (`~/.local/share/proxy`).
fn data_dir(configured: Option<std::path::PathBuf>) -> Result<std::path::PathBuf, Failure> {
    proxy::config::default_data_dir(configured.as_deref())
        .ok_or_else(|| Failure::Usage("no --data-dir and no HOME to put the identity in".into()))
}

/// Completes on the first Ctrl-C or SIGTERM; a second one ends the process at once.
async fn shutdown_signal(mut signals: Signals) {
    signals.recv().await;
    tokio::spawn(async move {
        signals.recv().await;
        eprintln!("proxy: second signal, exiting now");
        std::process::exit(130);
    });
}

/// SIGINT and SIGTERM listeners, installed once at start: tokio only reports signals that
/// arrive after a listener exists.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
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
