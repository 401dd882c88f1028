//! The demo page in a real browser: headless Chromium opens the page `scripts/build-wasm-demo`
//! built, runs a transfer at 10 % loss, and the fabric lane must report it complete with every
//! stream's SHA-256 matching. `tools/browser-test.mjs` drives the browser; this test runs it,
//! checks what it reports, and keeps its screenshot in `target/wasm-demo/screenshot.png`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const TIMEOUT: Duration = Duration::from_secs(180);

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Newest modification time of the Rust sources and lockfile the page is built from.
fn newest_source(root: &Path) -> (SystemTime, PathBuf) {
    let mut newest = (SystemTime::UNIX_EPOCH, PathBuf::new());
    let mut stack = vec![
        root.join("fabric/src"),
        root.join("wasm-demo/src"),
        root.join("Cargo.lock"),
    ];
    while let Some(path) = stack.pop() {
        let Ok(meta) = path.metadata() else { continue };
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                stack.push(entry.path());
            }
        } else if let Ok(modified) = meta.modified()
            && modified > newest.0
        {
            newest = (modified, path);
        }
    }
    newest
}

/// `"sent":"…","received":"…"` pairs from the report.
fn digest_pairs(report: &str) -> Vec<(String, String)> {
    report
        .split(r#"{"sent":""#)
        .skip(1)
        .map(|rest| {
            let sent: String = rest.chars().take_while(|c| *c != '"').collect();
            let received = rest
                .split_once(r#""received":""#)
                .map(|(_, r)| r.chars().take_while(|c| *c != '"').collect())
                .unwrap_or_default();
            (sent, received)
        })
        .collect()
}

#[test]
fn chromium_runs_a_transfer_at_ten_percent_loss_with_matching_checksums() {
    let demo = demo_dir();
    let root = demo.parent().unwrap().to_path_buf();
    let wasm = demo.join("www/pkg/wasm_demo_bg.wasm");
    let built = wasm
        .metadata()
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: run scripts/build-wasm-demo", wasm.display()));
    let (newest, source) = newest_source(&root);
    assert!(
        built >= newest,
        "the page is older than {}: run scripts/build-wasm-demo",
        source.display()
    );
    assert!(
        demo.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run scripts/setup"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out = target.join("wasm-demo");
    let screenshot = out.join("screenshot.png");
    let _ = std::fs::remove_file(&screenshot);

    let mut child = Command::new("node")
        .arg(demo.join("tools/browser-test.mjs"))
        .args(["--loss", "10", "--timeout", "120", "--out"])
        .arg(&out)
        .current_dir(&demo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node (scripts/setup installs it)");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the browser test took more than {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let report = stdout.lines().last().unwrap_or_default();
    assert!(
        status.success(),
        "browser test failed ({status}):\n{report}\n{stderr}"
    );
    assert!(report.contains(r#""ok":true"#), "{report}");
    assert!(report.contains(r#""loss":10,"#), "{report}");
    assert!(report.contains(r#""lossShown":"10 %""#), "{report}");
    assert!(report.contains(r#""status":"complete""#), "{report}");
    assert!(report.contains(r#""verdict":"match""#), "{report}");
    let pairs = digest_pairs(report);
    assert_eq!(pairs.len(), 8, "{report}");
    for (sent, received) in &pairs {
        assert_eq!(sent.len(), 64, "{report}");
        assert_eq!(sent, received, "{report}");
    }
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
}
