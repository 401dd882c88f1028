//! Persisting c-toxcore's savedata: `<data-dir>/tox.save`, mode 0600, replaced atomically.
//!
//! The savedata holds the secret key, so it is never logged and never readable by others. A
//! crash while saving must not lose the identity: we write a temporary file beside the real one,
//! fsync it, rename it over the old one and fsync the directory, so the file on disk is always
//! either the old or the new savedata, complete.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Name of the savedata file inside the data directory.
pub(crate) const SAVE_FILE: &str = "tox.save";

/// Where a data directory keeps its savedata.
pub(crate) fn save_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SAVE_FILE)
}

/// Reads the savedata, or `None` if there is none yet (a new identity will be created).
pub(crate) fn load(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `path` atomically with mode 0600, creating the directory (mode 0700) if
/// needed.
pub fn store(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = write_synced(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // The rename is durable only once the directory entry is.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn write_synced(tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(tmp)?;
    // A leftover temp file from a crash may have other permissions: fix them before writing.
    #[cfg(unix)]
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fabric-save-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn missing_file_is_none() {
        let d = scratch("missing");
        assert_eq!(load(&save_path(&d)).unwrap(), None);
    }

    #[test]
    fn store_creates_private_file_and_replaces() {
        let d = scratch("store").join("nested");
        let p = save_path(&d);
        store(&p, b"first").unwrap();
        assert_eq!(load(&p).unwrap().as_deref(), Some(&b"first"[..]));
        #[cfg(unix)]
        {
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let dmode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(dmode, 0o700);
        }
        store(&p, b"second, longer").unwrap();
        assert_eq!(load(&p).unwrap().as_deref(), Some(&b"second, longer"[..]));
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SAVE_FILE)]);
        fs::remove_dir_all(d.parent().unwrap()).unwrap();
    }
}
