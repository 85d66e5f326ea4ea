//! Where `export` and `merge-adapter` may write, and what `export --force` may replace.
//!
//! No command deletes what it did not create. `export` writes a marker file
//! ([`EXPORT_MARKER`]) that lists the files it wrote; `--force` replaces a folder only when the
//! marker is there and every file in the folder is one the marker lists. Anything else in it, a
//! folder without the marker, and any folder that is, holds or lies inside the workdir are refused.
//! The marker is only a file in the folder, so it is not trusted: every entry must name a regular
//! file inside the folder (relative, no `..`, no symlink on the way) or the export is refused
//! before anything is deleted.
//! `merge-adapter` refuses to write into the base model's folder; `export-adapter` refuses to write
//! over a file of the base model or into the adapter's folder.

use crate::error::{bail, Context, Result};
use crate::model::load::source::{ModelFiles, ModelSource};
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// Written by `export` beside the files it wrote.
const EXPORT_MARKER: &str = ".reviewer2-export.json";
const WRITTEN_BY: &str = "reviewer2 pipeline export";

#[derive(Serialize, Deserialize)]
struct Marker {
    written_by: String,
    /// Paths relative to the export folder, `/`-separated.
    files: Vec<String>,
}

/// What `--out` holds before an export.
#[derive(Debug, PartialEq)]
pub(crate) enum ExportTarget {
    /// Nothing there yet.
    Absent,
    /// An empty folder.
    Empty,
    /// A previous export (marker present, nothing but its files): `--force` replaces it.
    PreviousExport { files: Vec<String> },
}

/// `p` made absolute with symlinks resolved, also when it does not exist yet: the longest
/// existing ancestor is canonicalized and the rest appended (`..` applied lexically).
fn real_path(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let mut base = abs.as_path();
    let mut tail: Vec<&OsStr> = Vec::new();
    loop {
        if let Ok(mut out) = base.canonicalize() {
            for part in tail.iter().rev() {
                if *part == ".." {
                    out.pop();
                } else if *part != "." {
                    out.push(part);
                }
            }
            return Ok(out);
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(last)) => {
                tail.push(last.as_os_str());
                base = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// Check `out` for an export: refuse the workdir and folders export did not write.
pub(crate) fn check_export_target(out: &Path, workdir: &Path, force: bool) -> Result<ExportTarget> {
    let o = real_path(out)?;
    let w = real_path(workdir)?;
    if o == w || o.starts_with(&w) || w.starts_with(&o) {
        let how = if o == w {
            "is the workdir"
        } else if o.starts_with(&w) {
            "lies inside the workdir"
        } else {
            "holds the workdir"
        };
        bail!(
            "--out {} {how} ({}); export writes a separate folder and never replaces the cache: \
             choose a folder outside {}",
            out.display(),
            w.display(),
            w.display()
        );
    }
    if !out.exists() {
        return Ok(ExportTarget::Absent);
    }
    if !out.is_dir() {
        bail!(
            "--out {} exists and is not a folder; choose a new or empty folder",
            out.display()
        );
    }
    let present = files_below(out)?;
    if present.is_empty() && std::fs::read_dir(out)?.next().is_none() {
        return Ok(ExportTarget::Empty);
    }
    let marker = out.join(EXPORT_MARKER);
    let listed: Option<Marker> = std::fs::read(&marker)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|m: &Marker| m.written_by == WRITTEN_BY);
    let Some(mut listed) = listed else {
        bail!(
            "--out {} is not empty and is not a folder `pipeline export` wrote (it has no {EXPORT_MARKER}); \
             export never deletes what it did not write: choose a new or empty folder \
             (an export made by an older `pipeline` has no marker: delete it yourself)",
            out.display()
        );
    };
    // Before anything else: a marker is only a file in the folder, and whoever can write the
    // folder can write it. One entry that names something outside refuses the whole export.
    listed.files = marker_files(out, &marker, &listed.files)?;
    let foreign: Vec<&String> = present
        .iter()
        .filter(|f| f.as_str() != EXPORT_MARKER && !listed.files.contains(f))
        .collect();
    if !foreign.is_empty() {
        let shown: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "--out {} holds a previous export plus {} file(s) export did not write ({}{}); \
             export never deletes what it did not write: move them away or choose another folder",
            out.display(),
            foreign.len(),
            shown.join(", "),
            if foreign.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    if !force {
        bail!(
            "--out {} holds a previous export; pass --force to replace it, or choose another folder",
            out.display()
        );
    }
    Ok(ExportTarget::PreviousExport {
        files: listed.files,
    })
}

/// The marker's entries that `--force` may delete. Each must be a relative path of plain names
/// (no `..`, no root, no prefix) that is a regular file inside `out` with no symlink on the way
/// (export writes none; a symlink pointing outside is outside). An entry that names nothing is
/// dropped: there is nothing to delete. Anything else is an error naming the marker and the
/// entry, and nothing has been deleted.
fn marker_files(out: &Path, marker: &Path, files: &[String]) -> Result<Vec<String>> {
    let root = out
        .canonicalize()
        .with_context(|| format!("resolving --out {}", out.display()))?;
    let mut kept = Vec::with_capacity(files.len());
    for f in files {
        let rel = Path::new(f);
        let plain = !f.is_empty()
            && rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        let path = out.join(rel);
        let why = if !plain {
            "is not a plain relative path (it is absolute, or has a `..` or `.` in it)"
        } else {
            match path.canonicalize() {
                Ok(real) if !real.starts_with(&root) => {
                    "leads outside the folder through a symlink"
                }
                Ok(real) if real != root.join(rel) => {
                    "passes through a symlink (export writes none)"
                }
                Ok(real) if !real.is_file() => "is not a regular file",
                Ok(_) => {
                    kept.push(f.clone());
                    continue;
                }
                // Nothing there, and no dangling symlink on the way: nothing to delete.
                Err(_) if !path_has_link(&root, rel) => continue,
                Err(_) => "is a symlink that cannot be resolved",
            }
        };
        bail!(
            "{}: the entry {f:?} {why}; export --force deletes only files a previous export \
             wrote inside --out {}, so it refused this marker and deleted nothing. Remove that \
             entry from the marker (or delete the folder yourself), or choose another folder",
            marker.display(),
            out.display()
        );
    }
    Ok(kept)
}

/// Does a folder on the way from `root` to `root/rel` exist as a symlink?
fn path_has_link(root: &Path, rel: &Path) -> bool {
    let mut p = root.to_path_buf();
    rel.components().any(|c| {
        p.push(c);
        p.symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
    })
}

/// Every file (and symlink, and anything that is not a folder) below `dir`, relative, `/`-separated.
fn files_below(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                walk(root, &p, out)?;
            } else {
                let rel = p.strip_prefix(root).unwrap();
                out.push(
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Record, in the staging folder, which files this export wrote.
pub(crate) fn write_marker(staging: &Path, files: &[String]) -> Result<()> {
    crate::fsutil::write_json_pretty(
        &staging.join(EXPORT_MARKER),
        &Marker {
            written_by: WRITTEN_BY.into(),
            files: files.to_vec(),
        },
    )
}

/// Put the finished staging folder at `out`. A previous export there is swapped out and then
/// removed file by file (only the files its marker lists); anything that appeared meanwhile stays.
pub(crate) fn install(staging: &Path, out: &Path, target: &ExportTarget) -> Result<()> {
    match target {
        ExportTarget::Absent => {
            if let Some(p) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(p)?;
            }
            std::fs::rename(staging, out)
                .with_context(|| format!("moving the export into {}", out.display()))?;
        }
        ExportTarget::Empty => {
            // remove_dir only removes an empty folder: nothing of anyone's is lost.
            std::fs::remove_dir(out)
                .with_context(|| format!("{} is no longer empty", out.display()))?;
            if let Err(e) = std::fs::rename(staging, out) {
                let _ = std::fs::create_dir(out);
                return Err(e).with_context(|| format!("moving the export into {}", out.display()));
            }
        }
        ExportTarget::PreviousExport { files } => {
            let name = out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let old = out.with_file_name(format!(".{name}.old-export-{}", std::process::id()));
            std::fs::rename(out, &old).with_context(|| {
                format!(
                    "moving the previous export {} aside to {}",
                    out.display(),
                    old.display()
                )
            })?;
            if let Err(e) = std::fs::rename(staging, out) {
                let _ = std::fs::rename(&old, out);
                return Err(e).with_context(|| format!("moving the export into {}", out.display()));
            }
            remove_export(&old, files);
        }
    }
    if let Some(p) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::fsutil::sync_dir(p);
    }
    Ok(())
}

/// Remove a previous export: its listed files, its marker, then the folders if empty.
fn remove_export(dir: &Path, files: &[String]) {
    let mut dirs = std::collections::BTreeSet::new();
    for f in files.iter().map(String::as_str).chain([EXPORT_MARKER]) {
        let p = dir.join(f);
        let _ = std::fs::remove_file(&p);
        let mut d = p.parent();
        while let Some(x) = d.filter(|x| x.starts_with(dir) && *x != dir) {
            dirs.insert(x.to_path_buf());
            d = x.parent();
        }
    }
    // Deepest first; remove_dir fails (and leaves it) on anything not empty.
    for d in dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
    if std::fs::remove_dir(dir).is_err() {
        tracing::warn!(
            "the previous export was replaced, but {} still holds files export did not write; left as is",
            dir.display()
        );
    }
}

/// The files a model source reads.
fn source_files(base: &ModelSource) -> Vec<PathBuf> {
    match &base.files {
        ModelFiles::Gguf(p) => vec![p.clone()],
        ModelFiles::Hf {
            config,
            tokenizer,
            tokenizer_config,
            weights,
            ..
        } => [config, tokenizer]
            .into_iter()
            .chain(tokenizer_config)
            .chain(weights)
            .cloned()
            .collect(),
    }
}

/// Refuse an output file that is one of the base model's files (by its real location), or lies
/// in the adapter folder `adapter` (PEFT and this engine read that folder whole, and a trained
/// adapter's folder is a cache artifact whose files its manifest lists).
pub(crate) fn refuse_model_files(out: &Path, base: &ModelSource, adapter: &Path) -> Result<()> {
    let o = real_path(out)?;
    for f in source_files(base) {
        if real_path(&f)? == o {
            bail!(
                "--out {} is a file of the base model {}; choose another file name",
                out.display(),
                base.spec
            );
        }
    }
    let a = real_path(adapter)?;
    if o.starts_with(&a) {
        bail!(
            "--out {} lies inside the adapter folder {}; write the GGUF outside it",
            out.display(),
            adapter.display()
        );
    }
    Ok(())
}

/// Refuse to replace a file that is already there (a model export nobody asked to overwrite, or
/// a user's own file under the same name) unless `--force` says to.
pub(crate) fn refuse_existing(paths: &[PathBuf], force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    if let Some(p) = paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        bail!(
            "{} already exists; pass --force to replace it, or choose another --out",
            p.display()
        );
    }
    Ok(())
}

/// Refuse an output folder that is, or lies inside, the base model's folder (for a GGUF: the
/// folder holding the file, by the path given and by the file's real location), or that names one
/// of the base model's files.
pub(crate) fn refuse_base_folder(out: &Path, base: &ModelSource) -> Result<()> {
    let o = real_path(out)?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let ModelFiles::Hf { dir, .. } = &base.files {
        dirs.push(dir.clone());
    }
    let files = source_files(base);
    for f in &files {
        // The folder as named and the folder the file really lives in (symlinks resolved).
        if let Some(parent) = f.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.push(parent.to_path_buf());
        } else {
            dirs.push(PathBuf::from("."));
        }
        if let Ok(real) = f.canonicalize() {
            if let Some(parent) = real.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
        if real_path(f)? == o {
            bail!(
                "merge-adapter --out {} is a file of the base model {}; choose a new folder",
                out.display(),
                base.spec
            );
        }
    }
    for d in &dirs {
        let d = real_path(d)?;
        if o == d || o.starts_with(&d) {
            bail!(
                "merge-adapter --out {} {} the base model's folder {} ({}); the merged model must \
                 not be written over or beside the base: choose a folder outside it",
                out.display(),
                if o == d { "is" } else { "lies inside" },
                d.display(),
                base.spec
            );
        }
    }
    Ok(())
}
