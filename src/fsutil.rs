//! Small filesystem helpers: the one atomic write (temp file, fsync, rename, fsync of the folder)
//! every writer uses, checksums, JSONL.
//!
//! Everything the pipeline writes goes through a temporary name and a rename, so a reader never
//! sees a half-written file, whatever moment the process is killed. A temporary file is created
//! exclusively (never through something already at its name, such as a planted symlink) and
//! removed when it cannot be put in place; [`stale_leftover`] tells the sweeps which leftovers of
//! killed runs are theirs to remove.

use crate::error::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically (see [`write_atomic_with`]).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| Ok(f.write_all(bytes)?))
}

/// Write `path` atomically through a writer: a sibling temporary file, fsync, rename, fsync of
/// the folder. A reader never sees a half-written file, and after a crash the file is either the
/// old one or the new one, whatever moment the process or the machine stopped.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> Result<()>,
) -> Result<()> {
    let tmp = tmp_sibling(path);
    in_place(path, &tmp, |tmp, f| {
        write(f).with_context(|| format!("writing {}", tmp.display()))
    })
}

/// The same for writers that take a path (safetensors, image encoders): `write` writes the
/// temporary file it is given (already created, empty, by this function); it is then fsynced and
/// renamed into place.
pub(crate) fn write_atomic_via(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_sibling(path);
    in_place(path, &tmp, |tmp, _| write(tmp))
}

/// Create `tmp` (beside `path`) exclusively, let `write` fill it, and put it in place; on any
/// failure the temporary file is removed. Called directly by writers that must choose the
/// temporary name themselves (an image encoder reads the format from the extension).
pub(crate) fn in_place(
    path: &Path,
    tmp: &Path,
    write: impl FnOnce(&Path, &mut fs::File) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut f = create_tmp(tmp)?;
    if let Err(e) = write(tmp, &mut f) {
        fs::remove_file(tmp).ok();
        return Err(e);
    }
    drop(f);
    commit_tmp(tmp, path)
}

/// Create the temporary file `tmp` for writing, exclusively (`O_CREAT | O_EXCL`): a symlink or
/// file someone put at that name is never followed or written through. The name is this
/// process's own ([`tmp_sibling`]), so whatever is there already was left by an earlier process
/// that had the same pid: it is removed (a symlink itself, never what it points at) and the
/// file created afresh.
fn create_tmp(tmp: &Path) -> Result<fs::File> {
    let create = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
    };
    let f = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            fs::remove_file(tmp)
                .with_context(|| format!("removing the leftover {}", tmp.display()))?;
            create()
        }
        r => r,
    };
    f.with_context(|| format!("creating {}", tmp.display()))
}

/// Put a fully written temporary file in place: fsync it, rename it to `path`, fsync the folder.
/// A temporary file that cannot be put in place is removed.
fn commit_tmp(tmp: &Path, path: &Path) -> Result<()> {
    let synced = fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()));
    if let Err(e) = synced {
        fs::remove_file(tmp).ok();
        return Err(e);
    }
    if let Err(e) = fs::rename(tmp, path) {
        fs::remove_file(tmp).ok();
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(dir);
    }
    Ok(())
}

/// Make a rename in `dir` durable. Best effort: some filesystems refuse to open a folder.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        d.sync_all().ok();
    }
}

/// A temporary name next to `path` that is unique to this process.
pub(crate) fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Is `name` a temporary left by a run that is gone, which a sweep may remove? Three kinds of
/// name are temporaries: a stage folder being built (`.tmp-<key>-<pid>`), an artifact moved aside
/// while its replacement is renamed in (`.old-<key>-<pid>`), and a file being written
/// (`.<name>.tmp-<pid>`, [`tmp_sibling`]). One whose pid is alive belongs to a running process
/// (the workdir lock says which, not the name) and is left alone, unless the pid is this
/// process's own: then it was left by an earlier process that had the same pid.
pub(crate) fn stale_leftover(name: &str) -> bool {
    let pid = if let Some(rest) = name
        .strip_prefix(".tmp-")
        .or_else(|| name.strip_prefix(".old-"))
    {
        rest.rsplit_once('-').map(|(_, pid)| pid)
    } else if name.starts_with('.') {
        name.rsplit_once(".tmp-").map(|(_, pid)| pid)
    } else {
        None
    };
    // Without a pid where ours have one, the name is not one of ours: never swept.
    let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Serialize rows as JSON Lines and write them atomically.
pub(crate) fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut out = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut out, r)?;
        out.push(b'\n');
    }
    write_atomic(path, &out)
}

/// Read JSON Lines; an unparsable line is an error naming the file and line.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a valid record", path.display(), i + 1))?;
        rows.push(row);
    }
    Ok(rows)
}

pub(crate) fn write_json_pretty<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let mut s = serde_json::to_vec_pretty(v)?;
    s.push(b'\n');
    write_atomic(path, &s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every temporary name (`.tmp-`) in `dir`.
    fn temporaries(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn a_failed_rename_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        // A folder that is not empty cannot be replaced by a file: the rename fails.
        let target = d.path().join("out.json");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), "x").unwrap();
        let e = write_atomic(&target, b"{}").unwrap_err();
        assert!(format!("{e:#}").contains("renaming"), "{e:#}");
        assert_eq!(temporaries(d.path()), Vec::<String>::new());
        assert!(target.join("keep").is_file());
        // The same through a path-taking writer, and for a writer that fails.
        write_atomic_via(&target, |p| Ok(fs::write(p, "y")?)).unwrap_err();
        write_atomic_with(&d.path().join("other"), |_| Err(crate::error::err!("no"))).unwrap_err();
        assert_eq!(temporaries(d.path()), Vec::<String>::new());
    }

    #[test]
    fn the_temporary_file_is_created_exclusively_never_through_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim.txt");
        fs::write(&victim, "mine").unwrap();
        let target = d.path().join("page.html");
        // Planted at the temporary name this process will use.
        std::os::unix::fs::symlink(&victim, tmp_sibling(&target)).unwrap();
        write_atomic(&target, b"new").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "mine");
        assert!(!fs::symlink_metadata(&target).unwrap().is_symlink());
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        // And for a path-taking writer (it writes the file it is handed, which is a new one).
        std::os::unix::fs::symlink(&victim, tmp_sibling(&target)).unwrap();
        write_atomic_via(&target, |p| Ok(fs::write(p, "newer")?)).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "mine");
        assert_eq!(fs::read_to_string(&target).unwrap(), "newer");
        assert_eq!(temporaries(d.path()), Vec::<String>::new());
    }

    #[test]
    fn stale_leftovers_are_ours_and_of_dead_processes_only() {
        // Linux pids stay below 2^22; pid 1 is always alive.
        let dead = (1u32 << 22) + 1;
        let me = std::process::id();
        for stale in [
            format!(".tmp-0123abcd-{dead}"),
            format!(".old-0123abcd-{dead}"),
            format!(".latest.json.tmp-{dead}"),
            format!(".old-0123abcd-{me}"),
        ] {
            assert!(stale_leftover(&stale), "{stale}");
        }
        for kept in [
            ".tmp-0123abcd-1",
            ".old-0123abcd-1",
            ".page.html.tmp-1",
            ".tmp-nopid",
            ".old-",
            ".notes.tmp-draft",
            "old-0123abcd-5",
            "0123abcd.partial",
        ] {
            assert!(!stale_leftover(kept), "{kept}");
        }
    }

    #[test]
    fn sha256_matches_the_published_test_vector() {
        // FIPS 180-2, appendix B.1: SHA-256("abc").
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
