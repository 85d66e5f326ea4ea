//! Finished rows of a long generation on their way to disk, and back after a kill: the unit a
//! killed run resumes from. The generate stage and each round's sampling write through it.
//!
//! Every `size` rows become `<key>.partial/chunk-NNNNN.jsonl`, written atomically. A resumed run
//! reads them back ([`read_chunks`]), skips the rows they hold, and because every row's sampler
//! is seeded from (seed, row id) its final artifact equals an uninterrupted run's.

use super::Ctx;
use crate::error::{Context, Result};
use crate::fsutil::{read_jsonl, write_jsonl};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A row a chunk holds: its id (unique in the stage) and the tokens it generated.
pub(crate) trait Row: Serialize + DeserializeOwned {
    fn id(&self) -> usize;
    fn tokens(&self) -> usize;
}

/// Finished rows on their way to disk.
pub(crate) struct Chunks<R> {
    /// The stage and what a row is ("prompts", "reviews"), for messages.
    stage: &'static str,
    unit: &'static str,
    dir: PathBuf,
    buf: Vec<R>,
    pub(crate) done: Vec<R>,
    /// The number of the last chunk written.
    n: usize,
    size: usize,
    pub(crate) bar: indicatif::ProgressBar,
    quiet: bool,
    pub(crate) t0: Instant,
    /// Tokens generated in this run.
    pub(crate) tokens: usize,
}

impl<R: Row> Chunks<R> {
    /// The chunks in `dir` (created if missing): the rows of earlier runs in `done`, new chunks
    /// numbered past every chunk name there. `total` rows are wanted in all.
    pub(crate) fn open(
        ctx: &Ctx,
        (stage, unit): (&'static str, &'static str),
        dir: PathBuf,
        size: usize,
        total: usize,
    ) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (done, n) = read_chunks::<R>(stage, &dir)?;
        if !done.is_empty() {
            ctx.say(
                "Resuming",
                format!("{stage}: {} of {total} {unit} already done", done.len()),
            );
        }
        Ok(Self {
            stage,
            unit,
            bar: progress_bar(ctx, total as u64, done.len() as u64, unit),
            dir,
            buf: Vec::new(),
            done,
            n,
            size: size.max(1),
            quiet: ctx.quiet,
            t0: Instant::now(),
            tokens: 0,
        })
    }

    /// The ids already done.
    pub(crate) fn done_ids(&self) -> BTreeSet<usize> {
        self.done.iter().map(|r| r.id()).collect()
    }

    pub(crate) fn push(&mut self, row: R) -> Result<()> {
        self.tokens += row.tokens();
        self.buf.push(row);
        let rate = self.tokens as f64 / self.t0.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!("{rate:.1} tok/s"));
        self.bar.inc(1);
        if self.buf.len() >= self.size {
            self.flush()?;
            if !self.quiet && self.bar.is_hidden() {
                // No bar off a terminal (a log file, CI): a line per flushed chunk instead.
                eprintln!(
                    "{:>12} {} {}/{} {}, {rate:.1} tok/s",
                    "Generating",
                    self.stage,
                    self.bar.position(),
                    self.bar.length().unwrap_or(0),
                    self.unit,
                );
            }
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.n += 1;
        write_jsonl(&self.dir.join(chunk_name(self.n)), &self.buf)?;
        self.done.append(&mut self.buf);
        Ok(())
    }

    /// Every row, sorted by id, checked to be exactly `want` (sorted ids).
    pub(crate) fn finish(mut self, want: &[usize]) -> Result<Vec<R>> {
        self.flush()?;
        self.bar.finish_and_clear();
        let mut done = self.done;
        done.sort_by_key(|r| r.id());
        let ids: Vec<usize> = done.iter().map(|r| r.id()).collect();
        if ids != want {
            crate::error::bail!(
                "{}: chunks in {} do not cover the rows exactly ({} records for {} rows); delete that folder to start over",
                self.stage,
                self.dir.display(),
                ids.len(),
                want.len()
            );
        }
        Ok(done)
    }
}

/// Finished records from earlier runs. Chunks are written atomically, but a disk can still lose
/// the end of one (a crash before the data reached it): a chunk that does not read back whole is
/// discarded with a warning, and its rows are generated again. Anything else in the folder (a
/// name this module does not write, a folder) is left alone with a warning naming it.
fn read_chunks<R: Row>(stage: &str, dir: &Path) -> Result<(Vec<R>, usize)> {
    let mut chunks: Vec<(usize, PathBuf)> = Vec::new();
    let mut max = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let name = e.file_name();
        let path = e.path();
        let number = name.to_str().and_then(chunk_number);
        // New chunks are numbered past every chunk name taken, by a chunk or not, so that no
        // rename meets something already there.
        max = max.max(number.unwrap_or(0));
        match number {
            Some(n) if path.is_file() => chunks.push((n, path)),
            // This module's own file being written when a run was killed.
            _ if name.to_string_lossy().starts_with(".chunk-") => {}
            _ => tracing::warn!(
                "{stage}: ignoring {}: not a chunk this stage writes (chunk-NNNNN.jsonl)",
                path.display()
            ),
        }
    }
    chunks.sort();
    let mut rows = Vec::new();
    let mut seen = BTreeSet::new();
    for (_, path) in &chunks {
        let chunk = match read_jsonl::<R>(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "{stage}: discarding the damaged chunk {} ({e:#}); its rows are generated again",
                    path.display()
                );
                std::fs::remove_file(path)
                    .with_context(|| format!("removing {}", path.display()))?;
                continue;
            }
        };
        for r in chunk {
            if seen.insert(r.id()) {
                rows.push(r);
            }
        }
    }
    Ok((rows, max))
}

/// The number of a chunk file's name exactly as [`Chunks::flush`] writes it (`chunk-00042.jsonl`
/// is 42); `None` for any other name.
fn chunk_number(name: &str) -> Option<usize> {
    let n: usize = name
        .strip_prefix("chunk-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()?;
    // A number far past any run's chunk count is not ours either (and the next chunk's number
    // must not overflow).
    (n < 1_000_000_000 && chunk_name(n) == name).then_some(n)
}

fn chunk_name(n: usize) -> String {
    format!("chunk-{n:05}.jsonl")
}

fn progress_bar(ctx: &Ctx, len: u64, pos: u64, unit: &str) -> indicatif::ProgressBar {
    if ctx.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{prefix:>12.cyan.bold}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{msg}}, ETA {{eta}}"
        ))
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_prefix("Generating");
    bar.set_position(pos);
    bar
}

#[cfg(test)]
mod tests {
    use super::{chunk_name, chunk_number};

    #[test]
    fn only_the_names_flush_writes_are_chunks() {
        assert_eq!(chunk_number(&chunk_name(7)), Some(7));
        assert_eq!(chunk_number(&chunk_name(123_456)), Some(123_456));
        for odd in [
            "chunk-0000é.jsonl",
            "chunk-é0000.jsonl",
            "chunk-.jsonl",
            "chunk-7.jsonl",
            "chunk-+0007.jsonl",
            "chunk-00007.jsonl.bak",
            "chunk-99999999999999999999999.jsonl",
            "chunk-1000000000.jsonl",
            "notes.txt",
        ] {
            assert_eq!(chunk_number(odd), None, "{odd}");
        }
    }
}
