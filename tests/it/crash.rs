//! Crash consistency: the whole pipeline is killed with SIGKILL at seeded moments in every stage,
//! rerun with the same command after each kill, and its final artifacts must equal an
//! uninterrupted run's byte for byte. After every kill nothing half-written may be visible: every
//! `cache/<stage>/<key>/` folder with a manifest verifies, and `status` reports no stage damaged.
//! After the final run no temporary file or folder is left behind.
//!
//! `cargo test --test it crash::` runs the reduced CI form (a handful of kill points, tiny settings).
//! `scripts/crash-test.sh` runs the full form (`REVIEWER2_CRASH_FULL=1`: 30 kill points on the
//! quick preset, against the release binary). Knobs: `REVIEWER2_CRASH_KILLS` (number of kill
//! points), `REVIEWER2_CRASH_SEED`, `REVIEWER2_CRASH_BIN` (the `pipeline` binary to drive).

use crate::support::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const STAGES: [&str; 6] = ["scrape", "prompts", "generate", "merge", "split", "train"];

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

struct Harness {
    bin: PathBuf,
    /// Everything after the workdir: the preset and the `--set`s, the same for every run.
    recipe: Vec<String>,
    /// "Resuming" lines seen (generation chunks or a checkpoint picked up after a kill).
    resumes: std::cell::Cell<usize>,
}

impl Harness {
    fn cmd(&self, work: &Path, verb: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.current_dir(repo())
            .arg("--config")
            .arg(repo().join("pipeline.toml"))
            .arg("--workdir")
            .arg(work)
            .args(verb)
            .args(&self.recipe)
            .env_remove("REVIEWER2_LOG")
            .env("NO_COLOR", "1");
        c
    }

    /// A run to the end; returns its stderr.
    fn run_ok(&self, work: &Path) -> String {
        let o = self.cmd(work, &["run", "--yes"]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "the rerun after a kill failed:\n{err}");
        err.lines().for_each(|l| self.note(l));
        err
    }

    fn note(&self, l: &str) {
        if l.trim_start().starts_with("Resuming") {
            self.resumes.set(self.resumes.get() + 1);
        }
    }

    /// Start a run, wait until a stage at or after `target` starts building, then wait a seeded
    /// delay and SIGKILL it. Returns the stage that was being built when the kill landed, or
    /// `None` when the run finished first.
    fn run_and_kill(
        &self,
        work: &Path,
        target: usize,
        delay_for: impl Fn(usize) -> Duration,
    ) -> Option<String> {
        let mut child = self
            .cmd(work, &["run", "--yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let mut deadline: Option<Instant> = None;
        let killed = loop {
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    child.kill().unwrap(); // SIGKILL on Unix
                    break true;
                }
            }
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(l) => {
                    if deadline.is_none() {
                        if let Some(i) = building(&l).and_then(stage_index) {
                            if i >= target {
                                deadline = Some(Instant::now() + delay_for(i));
                            }
                        }
                    }
                    self.note(&l);
                    lines.push(l);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break false,
            }
        };
        let status = child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        if !killed {
            assert!(status.success(), "a run failed:\n{}", lines.join("\n"));
            return None;
        }
        // The stage in progress: the last one started and not reported built.
        let mut open = None;
        for l in &lines {
            if let Some(s) = building(l) {
                open = Some(s.to_string());
            }
            if let Some(s) = l.trim_start().strip_prefix("Built ") {
                if open.as_deref() == s.split_whitespace().next() {
                    open = None;
                }
            }
        }
        Some(open.unwrap_or_else(|| "between stages".into()))
    }

    /// No stage is reported damaged (status reads only manifests and local files).
    fn status_clean(&self, work: &Path) {
        let o = self.cmd(work, &["status", "--json"]).output().unwrap();
        assert!(
            o.status.success(),
            "status failed after a kill: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let js: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for s in js.as_array().unwrap() {
            assert_ne!(s["state"], "damaged", "after a kill: {s}");
        }
    }
}

fn building(l: &str) -> Option<&str> {
    l.trim_start()
        .strip_prefix("Building ")?
        .split_whitespace()
        .next()
}

fn stage_index(s: &str) -> Option<usize> {
    STAGES.iter().position(|x| *x == s)
}

/// Every `cache/<stage>/<key>/` with a manifest holds exactly the bytes it lists. Returns the
/// number of folders checked.
fn manifests_verify(work: &Path) -> usize {
    let mut n = 0;
    for stage in std::fs::read_dir(work.join("cache")).unwrap().flatten() {
        if !stage.path().is_dir() {
            continue;
        }
        for e in std::fs::read_dir(stage.path()).unwrap().flatten() {
            let m = e.path().join("manifest.json");
            if !m.is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // a staging folder: the manifest is written last, then it is renamed
            }
            let v: serde_json::Value = read_json(&m);
            for f in v["files"].as_array().unwrap() {
                let p = e.path().join(f["name"].as_str().unwrap());
                let h = reviewer2::fsutil::sha256_file(&p)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                assert_eq!(h, f["sha256"].as_str().unwrap(), "{} fails", p.display());
            }
            n += 1;
        }
    }
    n
}

/// The built folder of each stage (from `latest.json`).
fn finals(work: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for s in STAGES.iter().chain(&["train-ref"]) {
        out.insert(s.to_string(), latest_build(work, s));
    }
    out
}

/// Compare every file each final manifest lists, byte for byte; returns the bytes compared.
fn compare(a: &Path, b: &Path) -> u64 {
    let (fa, fb) = (finals(a), finals(b));
    let mut bytes = 0;
    for (stage, da) in &fa {
        let db = &fb[stage];
        // train-ref's key holds the split folder's path, so it differs between workdirs by
        // design; its bytes must still be equal.
        if stage != "train-ref" {
            assert_eq!(da.file_name(), db.file_name(), "{stage}: different keys");
        }
        let m: serde_json::Value = read_json(&da.join("manifest.json"));
        for f in m["files"].as_array().unwrap() {
            let n = f["name"].as_str().unwrap();
            if n.starts_with("events.out.tfevents.") {
                // TensorBoard's file is named by its start time and holds wall times: the same
                // records (metrics.jsonl is compared byte for byte) in a file of the same size.
                let other = std::fs::read_dir(db)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| {
                        p.file_name()
                            .unwrap()
                            .to_string_lossy()
                            .starts_with("events.out.tfevents.")
                    })
                    .unwrap_or_else(|| panic!("{stage}: no TensorBoard events after the resume"));
                assert_eq!(
                    std::fs::metadata(da.join(n)).unwrap().len(),
                    std::fs::metadata(&other).unwrap().len(),
                    "{stage}/{n}"
                );
                continue;
            }
            let (x, y) = (
                std::fs::read(da.join(n)).unwrap(),
                std::fs::read(db.join(n)),
            );
            if n == "summary.json" {
                // The run's report: its wall time and the checkpoint it resumed from differ by
                // design; everything else in it must be equal.
                let strip = |b: &[u8]| {
                    let mut v: serde_json::Value = serde_json::from_slice(b).unwrap();
                    let o = v.as_object_mut().unwrap();
                    o.remove("seconds");
                    o.remove("resumed_from");
                    v
                };
                assert_eq!(strip(&x), strip(&y.unwrap()), "{stage}/{n} differs");
                continue;
            }
            assert!(
                y.as_ref().is_ok_and(|y| *y == x),
                "{stage}/{n} differs from the uninterrupted run's"
            );
            bytes += x.len() as u64;
        }
    }
    for (stage, f) in [
        ("split", "train.parquet"),
        ("split", "test.parquet"),
        ("train", "adapter_model.safetensors"),
        ("train", "metrics.jsonl"),
    ] {
        assert!(fa[stage].join(f).is_file(), "{stage}/{f} was not compared");
    }
    bytes
}

/// Temporary files and folders left anywhere in the workdir.
fn leftovers(work: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![work.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(".tmp-")
                || n.starts_with(".old-")
                || n.contains(".tmp-")
                || n.ends_with(".partial")
            {
                out.push(e.path().strip_prefix(work).unwrap().display().to_string());
            }
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

fn harness(full: bool) -> Harness {
    let bin = env("REVIEWER2_CRASH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pipeline")));
    let sets: &[&str] = if full {
        // The quick preset, shortened: every stage still runs, with several generation chunks
        // and checkpoints to resume from.
        &[
            "scrape.count=12",
            "generate.max_new_tokens=24",
            "generate.chunk_size=4",
            "split.train=9",
            "split.test=2",
            "train.max_steps=6",
            "train.save_steps=2",
            "train.logging_steps=1",
            "train.eval_steps=3",
        ]
    } else {
        TINY_QUICK
    };
    let mut recipe = vec![
        "--preset".to_string(),
        "quick".into(),
        "--set".into(),
        format!("generate.model={}", smollm2().display()),
    ];
    for s in sets {
        recipe.push("--set".into());
        recipe.push(s.to_string());
    }
    Harness {
        bin,
        recipe,
        resumes: Default::default(),
    }
}

/// Seconds each stage took in an uninterrupted run ("Built X in 1.2s").
fn durations(err: &str) -> [f64; 6] {
    let mut d = [0.0; 6];
    for l in err.lines() {
        let Some(rest) = l.trim_start().strip_prefix("Built ") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let (Some(s), Some("in"), Some(t)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        if let (Some(i), Ok(t)) = (
            stage_index(s),
            t.trim_end_matches(':').trim_end_matches('s').parse(),
        ) {
            d[i] = t;
        }
    }
    d
}

fn crash_consistency(full: bool, default_kills: usize) {
    let kills: usize = env("REVIEWER2_CRASH_KILLS")
        .map(|k| k.parse().unwrap())
        .unwrap_or(default_kills);
    let seed: u64 = env("REVIEWER2_CRASH_SEED")
        .map(|k| k.parse().unwrap())
        .unwrap_or(7);
    let h = harness(full);
    let t0 = Instant::now();
    let d = tempdir();
    let w0 = d.path().join("W0");
    let err = h.run_ok(&w0);
    let dur = durations(&err);
    eprintln!(
        "crash-test: uninterrupted run in {:.1}s; stages (s): {:?}",
        t0.elapsed().as_secs_f64(),
        dur
    );
    assert!(leftovers(&w0).is_empty(), "{:?}", leftovers(&w0));

    // Kill points: rounds from scratch, each one kill per stage in stage order (seeded subset
    // when fewer than six are left), then a final uninterrupted rerun and the comparison.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut survived, mut missed, mut bytes, mut checked) = (0, 0, 0u64, 0);
    let mut hit: BTreeMap<String, usize> = BTreeMap::new();
    let mut left = kills;
    let mut round = 0;
    while left > 0 {
        round += 1;
        let n = left.min(STAGES.len());
        left -= n;
        let mut targets: Vec<usize> = (0..STAGES.len()).collect();
        while targets.len() > n {
            targets.remove(rng.random_range(0..targets.len()));
        }
        let w = d.path().join(format!("W{round}"));
        for &t in &targets {
            // A delay within the stage's measured time (at least a few ms for the quick ones).
            // The CI form has few kill points: keep them off the first 30% of a stage (model
            // loading), so that a kill in generate or train leaves chunks or checkpoints to resume.
            let fr: f64 = if full {
                rng.random()
            } else {
                0.3 + 0.6 * rng.random::<f64>()
            };
            let delay_for =
                |i: usize| Duration::from_secs_f64((dur[i] * fr).max(0.002 + fr * 0.05));
            match h.run_and_kill(&w, t, delay_for) {
                Some(stage) => {
                    survived += 1;
                    *hit.entry(stage.clone()).or_default() += 1;
                    checked += manifests_verify(&w);
                    h.status_clean(&w);
                    eprintln!(
                        "crash-test: round {round}: killed in {stage} (aimed at {}, delay {:.0}% of it)",
                        STAGES[t],
                        fr * 100.0
                    );
                }
                None => {
                    missed += 1;
                    eprintln!(
                        "crash-test: round {round}: the run ended before the kill aimed at {}",
                        STAGES[t]
                    );
                }
            }
        }
        h.run_ok(&w);
        let left_over = leftovers(&w);
        assert!(
            left_over.is_empty(),
            "temporary files left after the final run: {left_over:?}"
        );
        bytes += compare(&w0, &w);
        // The final workdir is verified once more; then freed (disk).
        checked += manifests_verify(&w);
        std::fs::remove_dir_all(&w).ok();
    }
    eprintln!(
        "crash-test: {survived} kill points survived ({missed} missed: the run ended first) in {round} rounds; stages hit: {hit:?}; {checked} manifest folders verified after kills; {} resumes from chunks or checkpoints; {bytes} bytes compared equal; {:.0}s",
        h.resumes.get(),
        t0.elapsed().as_secs_f64()
    );
    assert!(survived * 4 >= kills * 3, "too many kill points missed");
}

/// The CI form: four kill points on tiny settings.
#[test]
fn killed_runs_resume_to_the_same_bytes() {
    if env("REVIEWER2_CRASH_FULL").is_some() {
        return crash_consistency(true, 30);
    }
    crash_consistency(false, 4);
}
