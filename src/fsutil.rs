//! Small filesystem helpers: the one atomic write (temp file, fsync, rename, fsync of the folder)
//! every writer uses, checksums, JSONL.
//!
//! Everything the pipeline writes goes through a temporary name and a rename, so a reader never
//! sees a half-written file, whatever moment the process is killed.

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
    write_atomic_via(path, |tmp| {
        let mut f = fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        write(&mut f).with_context(|| format!("writing {}", tmp.display()))?;
        Ok(())
    })
}

/// The same for writers that take a path (safetensors, image encoders): `write` creates the
/// temporary file it is given; it is then fsynced and renamed into place.
pub(crate) fn write_atomic_via(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tmp_sibling(path);
    if let Err(e) = write(&tmp) {
        fs::remove_file(&tmp).ok();
        return Err(e);
    }
    commit_tmp(&tmp, path)
}

/// Put a fully written temporary file in place: fsync it, rename it to `path`, fsync the folder.
/// For writers that must choose the temporary name themselves (an image encoder reads the
/// format from the extension).
pub(crate) fn commit_tmp(tmp: &Path, path: &Path) -> Result<()> {
    let synced = fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()));
    if let Err(e) = synced {
        fs::remove_file(tmp).ok();
        return Err(e);
    }
    fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
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
    #[test]
    fn sha256_matches_the_published_test_vector() {
        // FIPS 180-2, appendix B.1: SHA-256("abc").
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
