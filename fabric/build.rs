//! Links c-toxcore when the `tox` feature is on, and says which Debian package to install when
//! it is missing instead of failing later with an opaque linker error.

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(wasm_browser)");
    let target_family = std::env::var("CARGO_CFG_TARGET_FAMILY").unwrap_or_default();
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_family == "wasm" && target_os == "unknown" {
        println!("cargo::rustc-cfg=wasm_browser");
    }
    if std::env::var_os("CARGO_FEATURE_TOX").is_some() {
        link_toxcore();
    }
}

/// Asks pkg-config how to link c-toxcore (`-L` and `-l` flags only: we declare the C functions
/// ourselves and compile no C, so include paths do not matter).
fn link_toxcore() {
    const MISSING: &str = "c-toxcore not found: install Debian package libtoxcore-dev \
                           (apt-get install libtoxcore-dev pkg-config)";
    println!("cargo::rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo::rerun-if-env-changed=PKG_CONFIG_LIBDIR");
    let output = Command::new("pkg-config")
        .args(["--libs", "toxcore"])
        .output();
    let flags = match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => panic!(
            "{MISSING}\npkg-config said: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("{MISSING}\ncould not run pkg-config: {e}"),
    };
    let mut linked = false;
    for flag in flags.split_whitespace() {
        if let Some(dir) = flag.strip_prefix("-L") {
            println!("cargo::rustc-link-search=native={dir}");
        } else if let Some(lib) = flag.strip_prefix("-l") {
            println!("cargo::rustc-link-lib={lib}");
            linked |= lib == "toxcore";
        }
    }
    if !linked {
        panic!("{MISSING}\npkg-config --libs toxcore gave no -ltoxcore: {flags:?}");
    }
}
