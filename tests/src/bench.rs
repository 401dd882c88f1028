//! What the benchmark binaries in namespaces share: the helper tool's path, settings from the
//! environment, commands' output, the session's path from `proxy status`, routes to the
//! site's private network, medians.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::netns::Topology;
use crate::servers::run_with_timeout;

/// `nst-tool` beside the running benchmark binary.
pub fn tool() -> String {
    let exe = std::env::current_exe().expect("own path");
    let dir = exe.parent().expect("target/<profile>");
    let tool: PathBuf = dir.join("nst-tool");
    assert!(
        tool.exists(),
        "{} missing: build it (cargo build --release -p tests)",
        tool.display()
    );
    tool.to_string_lossy().into_owned()
}

/// The number in the environment variable `name`, else `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `cmd` (at most 120 s) and returns its stdout, or its stderr as the error.
pub fn output(mut cmd: Command) -> Result<String, String> {
    let out = run_with_timeout(&mut cmd, Duration::from_secs(120)).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The line of `proxy status` (asked of the client at `status`, in the client namespace)
/// that names the session's path and RTT.
pub fn path_line(topo: &Topology, bin: &str, status: &str) -> String {
    output(topo.in_client(&[bin, "status", "--from", status]))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.trim_start().starts_with("path "))
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "path unknown".into())
}

/// Routes the site's private /16 (the client's LAN and the server's network) through the
/// router on both ends, beside their default routes, as an office or a VPN does: each end then
/// has a route to the other's private address, and the session may ride a punched link.
pub fn site_routes(topo: &Topology) {
    let router_lan = topo.router_lan_v4.clone().expect("a routed topology");
    let octets: Vec<&str> = topo.server_v4.split('.').collect();
    let site = format!("{}.{}.0.0/16", octets[0], octets[1]);
    let router_wan = format!("{}.{}.{}.1", octets[0], octets[1], octets[2]);
    for (ns, via) in [(&topo.client, &router_lan), (&topo.server, &router_wan)] {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", ns, "route", "add", &site, "via", via]);
        output(cmd).expect("site route");
    }
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
