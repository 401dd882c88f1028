//! The HTTP proxy front-end, on hyper 1.
//!
//! - `CONNECT host:port`: dial, answer `200`, then relay raw bytes over the upgraded
//!   connection (HTTPS, and anything else a client tunnels).
//! - Absolute-form requests (`GET http://host/path`) of any method: forwarded with their
//!   bodies to the origin in origin-form, hop-by-hop headers stripped both ways. Each client
//!   connection keeps its last upstream connection for the next request to the same origin,
//!   so a keep-alive client gets a keep-alive path end to end.
//! - Origin-form requests are addressed to the proxy itself: `GET /proxy.pac` serves a PAC
//!   file naming both listeners ([`pac`]); anything else gets a short 404 that says so.
//!
//! Failures are answered with a status that says why (403 refused by policy, 504 timed out,
//! 502 otherwise) and a one-line text body naming the target and the reason.
//!
//! With credentials set (`--socks-user`/`--socks-pass`, shared with SOCKS5), proxy requests
//! need `Proxy-Authorization: Basic` and get `407` without it. Requests to the proxy itself
//! (`/status`, `/metrics`, `/proxy.pac`) must name this host in `Host` (no DNS rebinding),
//! and `/status` and `/metrics` show keys only to clients on loopback or with credentials.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::dialer::{DialError, Target};
use crate::guard::{is_local_client, is_own_host_header};
use crate::relay::{relay, relay_tcp};
use crate::server::{Shared, accept_loop};
use crate::socks::Credentials;
use crate::status::Audience;

type Body = BoxBody<Bytes, hyper::Error>;

/// What the PAC file needs to know about the listeners.
#[derive(Debug, Clone, Copy)]
pub struct PacInfo {
    /// The HTTP listener's address.
    pub http: SocketAddr,
    /// The SOCKS5 listener's address, if it runs.
    pub socks: Option<SocketAddr>,
}

/// Serves the HTTP proxy on `listener` until `shared.shutdown` is cancelled.
pub async fn serve(listener: TcpListener, shared: Shared, pac: PacInfo) {
    let shared2 = shared.clone();
    accept_loop(listener, shared, "http", move |stream, peer| {
        let shared = shared2.clone();
        async move { handle(stream, peer, shared, pac).await }
    })
    .await;
}

/// Per client connection: the upstream kept alive for the next request, and the tunnel task
/// of a CONNECT (awaited so the connection keeps its slot in the limit while it runs).
#[derive(Debug, Default)]
struct ConnState {
    upstream: Mutex<Option<(Target, SendRequest<Incoming>)>>,
    tunnel: Mutex<Option<JoinHandle<()>>>,
}

/// Runs one client connection.
pub async fn handle(stream: TcpStream, peer: SocketAddr, shared: Shared, pac: PacInfo) {
    let _ = stream.set_nodelay(true);
    let state = Arc::new(ConnState::default());
    let service = {
        let (shared, state) = (shared.clone(), state.clone());
        hyper::service::service_fn(move |req| {
            let (shared, state) = (shared.clone(), state.clone());
            async move { Ok::<_, Infallible>(route(req, peer, &shared, &state, pac).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.handshake_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        () = shared.shutdown.cancelled() => {
            // Finish the request in flight, then close instead of keeping the client alive.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = res {
        debug!(%err, "http connection ended");
    }
    let tunnel = state.tunnel.lock().ok().and_then(|mut t| t.take());
    if let Some(tunnel) = tunnel {
        let _ = tunnel.await;
    }
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
    state: &ConnState,
    pac: PacInfo,
) -> Response<Body> {
    let authorized = match &shared.auth {
        None => true,
        Some(creds) => presents(req.headers(), header::PROXY_AUTHORIZATION, creds),
    };
    if req.method() == Method::CONNECT {
        if !authorized {
            return auth_required(shared);
        }
        return connect(req, peer, shared, state).await;
    }
    let Some(authority) = req.uri().authority() else {
        return local(&req, peer, pac, shared);
    };
    let port = req.uri().port_u16().unwrap_or(80);
    let target = Target::from_host_port(authority.host(), port);
    if target == Target::Ip(pac.http) {
        // The proxy asked, through itself, for itself: answer instead of looping.
        return local(&req, peer, pac, shared);
    }
    if !authorized {
        return auth_required(shared);
    }
    if req.uri().scheme_str() != Some("http") {
        return text(
            StatusCode::BAD_REQUEST,
            "proxy: only http:// URLs can be forwarded; tunnel https:// with CONNECT\n".into(),
        );
    }
    forward(req, peer, target, shared, state).await
}

/// Whether `headers` carry `creds` as Basic credentials in the header `name`.
fn presents(headers: &HeaderMap, name: HeaderName, creds: &Credentials) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| basic_credentials(v.as_bytes()))
        .any(|(user, pass)| creds.matches(&user, &pass))
}

/// The user and password of a `Basic` credentials value (RFC 7617), if it is one.
pub fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// `407`: this proxy wants credentials (and says which scheme).
fn auth_required(shared: &Shared) -> Response<Body> {
    shared.counters.auth_failed();
    let mut resp = text(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "proxy: credentials required\n".into(),
    );
    resp.headers_mut().insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"proxy\", charset=\"UTF-8\""),
    );
    resp
}

async fn connect(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
    state: &ConnState,
) -> Response<Body> {
    let target = match req.uri().authority() {
        Some(a) if a.port_u16().is_some() => {
            Target::from_host_port(a.host(), a.port_u16().unwrap_or(443))
        }
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("proxy: CONNECT needs host:port, got {}\n", req.uri()),
            );
        }
    };
    debug!(%target, "connect");
    let mut upstream = match shared.dialer_for(peer).connect(target.clone()).await {
        Ok(s) => s,
        Err(err) => {
            shared.counters.dial_failed();
            return dial_failed(&target, &err);
        }
    };
    let idle = shared.idle_timeout;
    let counters = shared.counters.clone();
    let tunnel = shared.tracker.spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => match tunnel(upgraded, &mut upstream, idle).await {
                Ok(t) => {
                    counters.relayed(t);
                    debug!(%target, up = t.up, down = t.down, "tunnel done");
                }
                Err(err) => debug!(%target, %err, "tunnel ended"),
            },
            Err(err) => debug!(%err, "upgrade failed"),
        }
    });
    if let Ok(mut slot) = state.tunnel.lock() {
        *slot = Some(tunnel);
    }
    Response::new(empty())
}

/// Relays a CONNECT tunnel. The client's socket is taken back out of hyper when possible, so
/// the tunnel is socket to socket (spliced on Linux) instead of going through hyper's
/// `Upgraded` indirection. Bytes the client sent after its request head and hyper already
/// read go first.
async fn tunnel(
    upgraded: hyper::upgrade::Upgraded,
    upstream: &mut crate::dialer::BoxedStream,
    idle: Option<std::time::Duration>,
) -> std::io::Result<crate::relay::Transferred> {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let mut client = parts.io.into_inner();
            if !parts.read_buf.is_empty() {
                upstream.write_all(&parts.read_buf).await?;
            }
            relay_tcp(&mut client, upstream, idle).await
        }
        Err(upgraded) => relay(&mut TokioIo::new(upgraded), upstream, idle).await,
    }
}

async fn forward(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    target: Target,
    shared: &Shared,
    state: &ConnState,
) -> Response<Body> {
    debug!(method = %req.method(), %target, "forward");
    // Origin-form toward the origin, with the Host header the client meant.
    // Never userinfo (`http://user:pass@host/`): that must not leak into a Host header.
    let host = req.uri().authority().map(|a| match a.port() {
        Some(port) => format!("{}:{port}", a.host()),
        None => a.host().to_owned(),
    });
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    *req.uri_mut() = path;
    *req.version_mut() = Version::HTTP_11;
    strip_hop_by_hop(req.headers_mut());
    if !req.headers().contains_key(header::HOST)
        && let Some(value) = host.and_then(|h| HeaderValue::from_str(&h).ok())
    {
        req.headers_mut().insert(header::HOST, value);
    }

    let mut sender = match upstream_for(&target, peer, shared, state).await {
        Ok(s) => s,
        Err(resp) => return *resp,
    };
    match sender.send_request(req).await {
        Ok(mut resp) => {
            strip_hop_by_hop(resp.headers_mut());
            if let Ok(mut slot) = state.upstream.lock() {
                *slot = Some((target, sender));
            }
            resp.map(|b| b.boxed())
        }
        Err(err) => text(
            StatusCode::BAD_GATEWAY,
            format!("proxy: {target} did not answer: {err}\n"),
        ),
    }
}

/// The kept upstream connection if it goes to `target` and is still usable, else a new one.
async fn upstream_for(
    target: &Target,
    peer: SocketAddr,
    shared: &Shared,
    state: &ConnState,
) -> Result<SendRequest<Incoming>, Box<Response<Body>>> {
    let kept = state.upstream.lock().ok().and_then(|mut s| s.take());
    if let Some((kept_target, mut sender)) = kept
        && &kept_target == target
        && sender.ready().await.is_ok()
    {
        return Ok(sender);
    }
    let stream = match shared.dialer_for(peer).connect(target.clone()).await {
        Ok(s) => s,
        Err(err) => {
            shared.counters.dial_failed();
            return Err(Box::new(dial_failed(target, &err)));
        }
    };
    let (sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(err) => {
            return Err(Box::new(text(
                StatusCode::BAD_GATEWAY,
                format!("proxy: cannot talk http to {target}: {err}\n"),
            )));
        }
    };
    // The connection driver ends when the sender is dropped or the origin closes.
    shared.tracker.spawn(async move {
        if let Err(err) = conn.await {
            debug!(%err, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// Removes the headers that describe one hop (RFC 9110 §7.6.1), including any the
/// `Connection` header names. hyper sets its own framing (`Transfer-Encoding`,
/// `Content-Length`) on each side.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Requests addressed to the proxy itself.
fn local(
    req: &Request<Incoming>,
    peer: SocketAddr,
    pac_info: PacInfo,
    shared: &Shared,
) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or(""))
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    // Browsers always send Host; a page on another site, pointed at this host by DNS
    // rebinding, sends its own name.
    if host.is_some_and(|h| !is_own_host_header(h)) {
        return text(
            StatusCode::FORBIDDEN,
            "proxy: this host name is not this proxy's (ask for it by address or localhost)\n"
                .into(),
        );
    }
    if req.method() == Method::GET
        && let Some(status) = &shared.status
        && let path @ ("/status" | "/peers" | "/metrics") = req.uri().path()
    {
        let trusted = is_local_client(peer.ip())
            || shared.auth.as_ref().is_some_and(|creds| {
                presents(req.headers(), header::AUTHORIZATION, creds)
                    || presents(req.headers(), header::PROXY_AUTHORIZATION, creds)
            });
        let audience = if trusted {
            Audience::Trusted
        } else {
            Audience::Anyone
        };
        let (code, kind, body) = crate::status::respond(path, status, audience);
        let mut resp = Response::new(full(body));
        *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
        return resp;
    }
    if req.method() == Method::GET && req.uri().path() == "/proxy.pac" {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok())
            .map(|a| a.host().to_owned());
        let body = pac(&pac_info, host.as_deref());
        let mut resp = Response::new(full(body));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ns-proxy-autoconfig"),
        );
        return resp;
    }
    text(
        StatusCode::NOT_FOUND,
        "proxy: this is an HTTP proxy; configure it as your proxy, or fetch /proxy.pac or /status\n"
            .into(),
    )
}

/// The PAC file: the HTTP proxy first, then SOCKS5 (for clients whose HTTP proxy support is
/// broken), and **no `DIRECT` fallback** for remote hosts: when the proxy is down, falling
/// back to direct would silently send traffic around the exit peer the user chose. Plain
/// host names and loopback go direct, as they would never be reachable through an exit.
/// `host` is the name the client used to fetch the PAC file (so a listener on 0.0.0.0 gets
/// an address the client can reach); else the listener's address.
pub fn pac(info: &PacInfo, host: Option<&str>) -> String {
    let listen_host = |addr: SocketAddr| match (host, addr.ip()) {
        (Some(h), _) => h.to_owned(),
        (None, std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        (None, ip) => ip.to_string(),
    };
    let mut route = format!("PROXY {}:{}", listen_host(info.http), info.http.port());
    if let Some(socks) = info.socks {
        route.push_str(&format!("; SOCKS5 {}:{}", listen_host(socks), socks.port()));
    }
    format!(
        "function FindProxyForURL(url, host) {{\n\
         \x20 if (isPlainHostName(host) || host == \"localhost\" || shExpMatch(host, \"127.*\") || host == \"::1\")\n\
         \x20   return \"DIRECT\";\n\
         \x20 return \"{route}\";\n\
         }}\n"
    )
}

fn dial_failed(target: &Target, err: &DialError) -> Response<Body> {
    let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    if status == StatusCode::BAD_GATEWAY {
        debug!(%target, %err, "dial failed");
    } else {
        warn!(%target, %err, "dial failed");
    }
    text(status, format!("proxy: cannot reach {target}: {err}\n"))
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn pac_names_both_listeners_and_no_direct_fallback() {
        let info = PacInfo {
            http: "127.0.0.1:8080".parse().unwrap(),
            socks: Some("127.0.0.1:1080".parse().unwrap()),
        };
        let p = pac(&info, None);
        assert!(
            p.contains("return \"PROXY 127.0.0.1:8080; SOCKS5 127.0.0.1:1080\";"),
            "{p}"
        );
        let p = pac(&info, Some("proxybox"));
        assert!(
            p.contains("PROXY proxybox:8080; SOCKS5 proxybox:1080"),
            "{p}"
        );
        let info = PacInfo {
            http: "[::1]:8080".parse().unwrap(),
            socks: None,
        };
        let p = pac(&info, None);
        assert!(p.contains("return \"PROXY [::1]:8080\";"), "{p}");
    }

    #[test]
    fn dial_errors_become_statuses() {
        let t = Target::Domain("example.com".into(), 443);
        assert_eq!(dial_failed(&t, &DialError::TimedOut).status(), 504);
        assert_eq!(
            dial_failed(&t, &DialError::PolicyDenied("x".into())).status(),
            403
        );
        assert_eq!(dial_failed(&t, &DialError::Refused).status(), 502);
    }
}
