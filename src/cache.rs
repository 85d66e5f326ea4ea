//! The stage cache: `<workdir>/cache/<stage>/<key>/`.
//!
//! A stage's key is the hash of everything its output depends on ([`KeyMaterial`]): its name and
//! format version, its own settings, the templates it reads, the model's identity, and the keys of
//! its inputs. An output folder is built under a temporary name and renamed into place only when
//! complete, with a manifest that records checksums; an artifact whose files no longer match their
//! checksums is reported as damaged and rebuilt, never read.

use crate::error::{Context, Result};
use crate::fsutil::{sha256_file, sha256_hex, stale_leftover, write_json_pretty};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Everything a stage's output depends on. Its hash is the stage's cache key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub(crate) struct KeyMaterial {
    pub(crate) stage: String,
    pub(crate) version: u32,
    /// The stage's own settings (a JSON object, flattened for diffs).
    pub(crate) settings: serde_json::Value,
    /// Template or data files read by the stage: name -> sha256.
    pub(crate) files: BTreeMap<String, String>,
    /// Identity of the model the stage uses, if any.
    pub(crate) model: Option<String>,
    /// Input stage name -> its key.
    pub(crate) inputs: BTreeMap<String, String>,
}

impl KeyMaterial {
    pub(crate) fn key(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("key material serializes");
        sha256_hex(&bytes)[..16].to_string()
    }

    /// Human-readable differences from an older material: why a stage is stale.
    pub(crate) fn diff(&self, old: &KeyMaterial) -> Vec<String> {
        let mut out = Vec::new();
        if self.version != old.version {
            out.push(format!(
                "format version {} -> {}",
                old.version, self.version
            ));
        }
        let (a, b) = (flatten(&old.settings), flatten(&self.settings));
        for (k, v) in &b {
            match a.get(k) {
                Some(o) if o == v => {}
                Some(o) => out.push(format!("{}.{k} changed ({o} -> {v})", self.stage)),
                None => out.push(format!("{}.{k} added ({v})", self.stage)),
            }
        }
        for k in a.keys().filter(|k| !b.contains_key(*k)) {
            out.push(format!("{}.{k} removed", self.stage));
        }
        for (k, v) in &self.files {
            if old.files.get(k) != Some(v) {
                out.push(format!("file {k} changed"));
            }
        }
        if self.model != old.model {
            out.push(format!(
                "model changed ({} -> {})",
                old.model.as_deref().unwrap_or("none"),
                self.model.as_deref().unwrap_or("none")
            ));
        }
        for (k, v) in &self.inputs {
            if old.inputs.get(k) != Some(v) {
                out.push(format!("input `{k}` changed"));
            }
        }
        out
    }
}

fn flatten(v: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(p: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if p.is_empty() {
                        k.clone()
                    } else {
                        format!("{p}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                let mut s = other.to_string();
                if s.len() > 60 {
                    s = format!(
                        "{}…",
                        &s[..s.char_indices().nth(57).map(|c| c.0).unwrap_or(57)]
                    );
                }
                out.insert(p.to_string(), s);
            }
        }
    }
    walk("", v, &mut out);
    out
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub(crate) stage: String,
    pub(crate) key: String,
    pub(crate) material: KeyMaterial,
    files: Vec<FileEntry>,
    /// Named row counts ("titles": 1100, "dropped_empty": 3, ...).
    pub(crate) counts: BTreeMap<String, u64>,
    /// RFC 3339 time the build finished.
    pub(crate) finished_at: String,
    pub(crate) seconds: f64,
    /// What a build wants on record beyond counts (the openai backend: the served model and
    /// each endpoint's answers). Never part of the key.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub(crate) info: serde_json::Value,
}

impl Manifest {
    pub(crate) fn count(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }
}

pub(crate) enum Lookup {
    Fresh(Box<Manifest>),
    Missing,
    Damaged(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Cache {
    pub(crate) root: PathBuf,
}

impl Cache {
    pub(crate) fn new(workdir: &Path) -> Self {
        Self {
            root: workdir.join("cache"),
        }
    }

    pub(crate) fn dir(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(stage).join(key)
    }

    /// A persistent folder for resumable partial work on `key` (e.g. generation chunks).
    pub(crate) fn partial_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(stage).join(format!("{key}.partial"))
    }

    /// Is the artifact present and intact? Checks every file's size and checksum.
    pub(crate) fn lookup(&self, stage: &str, key: &str) -> Lookup {
        let dir = self.dir(stage, key);
        let mpath = dir.join("manifest.json");
        if !dir.exists() {
            return Lookup::Missing;
        }
        let m: Manifest = match fs::read(&mpath)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(m) => m,
            None => {
                return Lookup::Damaged(format!("{} is missing or unreadable", mpath.display()))
            }
        };
        for f in &m.files {
            let p = dir.join(&f.name);
            match fs::metadata(&p) {
                Ok(md) if md.len() == f.bytes => {}
                Ok(md) => {
                    return Lookup::Damaged(format!(
                        "{} is {} bytes, manifest says {}",
                        p.display(),
                        md.len(),
                        f.bytes
                    ))
                }
                Err(_) => return Lookup::Damaged(format!("{} is missing", p.display())),
            }
            match sha256_file(&p) {
                Ok(h) if h == f.sha256 => {}
                _ => return Lookup::Damaged(format!("{} fails its checksum", p.display())),
            }
        }
        Lookup::Fresh(Box::new(m))
    }

    /// The material of the last artifact built for `stage`, to explain staleness.
    pub(crate) fn latest(&self, stage: &str) -> Option<Manifest> {
        let b = fs::read(self.root.join(stage).join("latest.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Start building `stage`/`key` in a fresh temporary folder.
    pub(crate) fn begin(&self, stage: &str, key: &str) -> Result<Staging> {
        let tmp = self
            .root
            .join(stage)
            .join(format!(".tmp-{key}-{}", std::process::id()));
        if tmp.symlink_metadata().is_ok() {
            // This process's own name: left by an earlier process that had the same pid.
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(self.root.join(stage))?;
        // create_dir, not create_dir_all: the folder must be a new one, made here.
        fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Staging {
            dir: tmp,
            stage: stage.to_string(),
            key: key.to_string(),
        })
    }

    /// Remove what killed runs left in the stage folders: stage folders being built (`.tmp-*`),
    /// artifacts moved aside for a replacement (`.old-*`) and files being written, whose process
    /// is gone (see [`crate::fsutil::stale_leftover`]). Never the resumable `.partial` folders.
    pub(crate) fn sweep(&self) {
        let Ok(stages) = fs::read_dir(&self.root) else {
            return;
        };
        for s in stages.flatten() {
            let Ok(entries) = fs::read_dir(s.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !stale_leftover(&name) {
                    continue;
                }
                // Not following a symlink: a link is removed, never what it points at.
                match e.file_type() {
                    Ok(t) if t.is_dir() => fs::remove_dir_all(e.path()).ok(),
                    Ok(_) => fs::remove_file(e.path()).ok(),
                    Err(_) => None,
                };
            }
        }
    }
}

/// A stage output being built. Nothing is visible under the final key until [`Staging::commit`].
pub(crate) struct Staging {
    pub(crate) dir: PathBuf,
    stage: String,
    key: String,
}

impl Staging {
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Checksum every file, write the manifest, and rename the folder into place.
    pub(crate) fn commit(
        self,
        cache: &Cache,
        material: KeyMaterial,
        counts: BTreeMap<String, u64>,
        info: serde_json::Value,
        seconds: f64,
    ) -> Result<Manifest> {
        let mut files = Vec::new();
        let mut names: Vec<_> = fs::read_dir(&self.dir)?
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "manifest.json" && !n.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            let p = self.dir.join(&name);
            files.push(FileEntry {
                bytes: fs::metadata(&p)?.len(),
                sha256: sha256_file(&p)?,
                name,
            });
        }
        let m = Manifest {
            stage: self.stage.clone(),
            key: self.key.clone(),
            material,
            files,
            counts,
            info,
            finished_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
            seconds,
        };
        write_json_pretty(&self.dir.join("manifest.json"), &m)?;
        let fin = cache.dir(&self.stage, &self.key);
        if let Err(e) = place(&self.dir, &fin, &self.key) {
            // Nothing half-done stays: the built folder goes, whatever was in place stays.
            let _ = fs::remove_dir_all(&self.dir);
            return Err(e);
        }
        if let Some(parent) = fin.parent() {
            crate::fsutil::sync_dir(parent);
        }
        write_json_pretty(&cache.root.join(&self.stage).join("latest.json"), &m)?;
        Ok(m)
    }
}

/// Rename the built folder `dir` to `fin`. A damaged or forced artifact already there is moved
/// aside first (to `.old-<key>-<pid>`, so the rename is atomic) and removed after; if the rename
/// fails it is put back, so the stage never loses the artifact it had.
fn place(dir: &Path, fin: &Path, key: &str) -> Result<()> {
    if !fin.exists() {
        return fs::rename(dir, fin)
            .with_context(|| format!("moving {} into place", fin.display()));
    }
    let old = fin.with_file_name(format!(".old-{key}-{}", std::process::id()));
    if old.symlink_metadata().is_ok() {
        // This process's own name: left by an earlier process that had the same pid.
        fs::remove_dir_all(&old)?;
    }
    fs::rename(fin, &old).with_context(|| format!("moving {} aside", fin.display()))?;
    if let Err(e) = fs::rename(dir, fin) {
        let _ = fs::rename(&old, fin);
        return Err(e).with_context(|| format!("moving {} into place", fin.display()));
    }
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_the_leftovers_of_dead_runs_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path());
        let stage = cache.root.join("generate");
        fs::create_dir_all(&stage).unwrap();
        // Linux pids stay below 2^22; pid 1 is always alive.
        let dead = (1u32 << 22) + 1;
        let gone = [
            format!(".old-0123abcd-{dead}"),
            format!(".tmp-0123abcd-{dead}"),
        ];
        for g in &gone {
            fs::create_dir_all(stage.join(g).join("sub")).unwrap();
            fs::write(stage.join(g).join("sub/x"), "x").unwrap();
        }
        let file = format!(".latest.json.tmp-{dead}");
        fs::write(stage.join(&file), "{").unwrap();
        let kept = [
            ".old-0123abcd-1",
            "0123abcd.partial",
            "0123abcd",
            ".notes.tmp-draft",
        ];
        for k in kept {
            fs::create_dir_all(stage.join(k)).unwrap();
        }
        cache.sweep();
        for g in gone.iter().chain([&file]) {
            assert!(stage.join(g).symlink_metadata().is_err(), "{g} was kept");
        }
        for k in kept {
            assert!(stage.join(k).is_dir(), "{k} was swept");
        }
    }

    #[test]
    fn a_failed_commit_keeps_the_old_artifact_and_leaves_no_leftover() {
        let d = tempfile::tempdir().unwrap();
        let stage = d.path().join("s");
        fs::create_dir_all(stage.join("k")).unwrap();
        fs::write(stage.join("k/out.txt"), "old").unwrap();
        // A staging folder that cannot be renamed: it is not there.
        let e = place(&stage.join(".tmp-k-1"), &stage.join("k"), "k").unwrap_err();
        assert!(format!("{e:#}").contains("into place"), "{e:#}");
        assert_eq!(fs::read_to_string(stage.join("k/out.txt")).unwrap(), "old");
        let names: Vec<String> = fs::read_dir(&stage)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["k"]);
    }
}
