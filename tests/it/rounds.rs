//! On-policy rounds on tiny quick-preset settings and the real SmolLM2: every round pair's
//! prompt is the prompt both its reviews were sampled from, on titles no earlier part saw; a run
//! killed in a round's training and again in a round's sampling resumes to the same bytes as an
//! uninterrupted run; and each round's keys follow the round before.

use crate::support::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// On top of [`TINY_QUICK`]: two rounds of three titles, three reviews each.
const ROUNDS: &[&str] = &[
    "eval.samples=2",
    "rounds.count=2",
    "rounds.titles=3",
    "rounds.samples=3",
    "rounds.margin=0",
];

fn cmd(work: &Path, verb: &[&str], extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    c.current_dir(repo())
        .arg("--config")
        .arg(repo().join("pipeline.toml"))
        .arg("--workdir")
        .arg(work)
        .args(verb)
        .args(["--preset", "quick", "--set"])
        .arg(format!("generate.model={}", smollm2().display()));
    for s in TINY_QUICK.iter().chain(ROUNDS).chain(extra) {
        c.args(["--set", s]);
    }
    c.env_remove("REVIEWER2_LOG").env("NO_COLOR", "1");
    c
}

fn run_ok(work: &Path) -> String {
    let o = cmd(work, &["run", "--yes"], &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "pipeline run failed:\n{err}");
    err
}

/// Start a run and SIGKILL it at the first stderr line `at` accepts. Returns stderr up to then.
fn run_and_kill(work: &Path, at: impl Fn(&str) -> bool) -> String {
    let mut child = cmd(work, &["run", "--yes"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for l in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        seen.push_str(&l);
        seen.push('\n');
        if at(&l) {
            child.kill().unwrap();
            child.wait().unwrap();
            return seen;
        }
    }
    panic!(
        "the run ended ({:?}) before the kill point:\n{seen}",
        child.wait().unwrap()
    );
}

/// `stage` -> its status entry.
fn statuses(work: &Path, extra: &[&str]) -> BTreeMap<String, Value> {
    let o = cmd(work, &["status", "--json"], extra).output().unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let v: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    v.into_iter()
        .map(|s| (s["stage"].as_str().unwrap().to_string(), s))
        .collect()
}

fn key(st: &BTreeMap<String, Value>, stage: &str) -> String {
    st[stage]["key"]
        .as_str()
        .unwrap_or_else(|| panic!("{stage} has no key: {}", st[stage]))
        .to_string()
}

fn folder(work: &Path, stage: &str) -> PathBuf {
    let st = statuses(work, &[]);
    assert_eq!(st[stage]["state"], "up to date", "{}", st[stage]);
    PathBuf::from(st[stage]["path"].as_str().unwrap())
}

/// Every file a round folder's manifest lists, equal in both workdirs (the run reports' wall
/// times and TensorBoard's wall-clock file aside).
fn same_bytes(a: &Path, b: &Path, stage: &str) -> usize {
    let (da, db) = (folder(a, stage), folder(b, stage));
    assert_eq!(da.file_name(), db.file_name(), "{stage}: different keys");
    let m: Value = read_json(&da.join("manifest.json"));
    let mut n = 0;
    for f in m["files"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        if name.starts_with("events.out.tfevents.") || name == "summary.json" {
            continue;
        }
        let (x, y) = (
            std::fs::read(da.join(name)).unwrap(),
            std::fs::read(db.join(name)).unwrap(),
        );
        assert!(x == y, "{stage}/{name} differs after the kills");
        n += 1;
    }
    n
}

#[test]
fn rounds_pair_the_bots_own_reviews_resume_after_kills_and_chain_their_keys() {
    let py = python_with(&[("pyarrow", "pyarrow")]);
    let a = tempdir();
    let err = run_ok(a.path());
    for r in 1..=2 {
        for step in ["sample", "label", "train", "eval"] {
            assert!(
                err.contains(&format!("Built round-{r}-{step} in")),
                "round {r} {step} not built:\n{err}"
            );
        }
    }

    // Fresh titles: in neither split (the scrape stage's sample), nor in another round.
    let scraped: BTreeSet<String> = read_jsonl(&folder(a.path(), "scrape").join("titles.jsonl"))
        .iter()
        .map(|t| t["title"].as_str().unwrap().to_string())
        .collect();
    let mut seen = BTreeSet::new();
    for r in 1..=2 {
        let samples =
            read_jsonl(&folder(a.path(), &format!("round-{r}-sample")).join("samples.jsonl"));
        assert_eq!(samples.len(), 9, "3 titles x 3 reviews");
        let titles: BTreeSet<String> = samples
            .iter()
            .map(|s| s["title"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(titles.len(), 3);
        for t in &titles {
            assert!(
                !scraped.contains(t),
                "round {r}'s {t:?} is in the split's sample"
            );
            assert!(seen.insert(t.clone()), "{t:?} in two rounds");
        }
        // The pairs: each row of the round's Parquet (read by pyarrow) holds a prompt, and its
        // chosen and rejected texts are two of the reviews sampled from exactly that prompt.
        let label = folder(a.path(), &format!("round-{r}-label"));
        let out = run_python(
            &py,
            &[
                "-c",
                "import json,sys,pyarrow.parquet as pq\nprint(json.dumps(pq.read_table(sys.argv[1]).to_pylist()))",
                label.join("train.parquet").to_str().unwrap(),
            ],
        );
        let rows: Value = serde_json::from_str(&out).unwrap();
        let rows = rows.as_array().unwrap();
        assert!(!rows.is_empty(), "round {r} made no pair");
        for row in rows {
            let p = row["prompt"].as_str().unwrap();
            let from: Vec<&Value> = samples.iter().filter(|s| s["prompt"] == p).collect();
            assert_eq!(
                from.len(),
                3,
                "round {r}: a pair prompt that sampled no review set"
            );
            assert!(p.ends_with("<|im_start|>assistant\n"), "{p}");
            let texts: Vec<&str> = from.iter().map(|s| s["text"].as_str().unwrap()).collect();
            for side in ["chosen", "rejected"] {
                let t = row[side].as_str().unwrap();
                assert!(
                    texts.contains(&t),
                    "round {r}: {side} {t:?} not among {texts:?}"
                );
            }
            assert_ne!(row["chosen"], row["rejected"]);
        }
        // The chosen review outscored the rejected one.
        for p in read_jsonl(&label.join("pairs.jsonl")) {
            let s = p["scores"].as_array().unwrap();
            let (c, w) = (
                p["chosen_sample"].as_u64().unwrap() as usize,
                p["rejected_sample"].as_u64().unwrap() as usize,
            );
            assert!(s[c].as_f64().unwrap() > s[w].as_f64().unwrap(), "{p}");
        }
    }
    // The side-by-side table of the last round names rounds 0 to 2.
    let table: Value = read_json(&folder(a.path(), "round-2-eval").join("rounds.json"));
    let rounds = table["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{table}");
    assert_eq!(table["labelled_by"], "trained");
    assert_eq!(table["independent_judges"], serde_json::json!(["lexicon"]));
    assert!(rounds[2]["vs_round0"]["lexicon"]["n"].as_u64().unwrap() > 0);
    let report: Value = read_json(&folder(a.path(), "round-1-eval").join("report.json"));
    assert_eq!(report["judges"]["trained"]["labeled_training_data"], true);
    assert_eq!(report["judges"]["lexicon"]["labeled_training_data"], false);
    assert_eq!(report["independent_judges"], serde_json::json!(["lexicon"]));

    // Each round's pairs export as a dataset like the split.
    let ex = tempdir();
    let out = ex.path().join("round-1");
    let o = cmd(
        a.path(),
        &["export", "--round", "1", "--out", out.to_str().unwrap()],
        &[],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let exported = std::fs::read(out.join("data/train-00000-of-00001.parquet")).unwrap();
    let label = folder(a.path(), "round-1-label");
    assert_eq!(
        exported,
        std::fs::read(label.join("train.parquet")).unwrap()
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("the Reviewer #2 bot's own reviews")
            && card.contains("its best and its worst by the trained judge")
            && !card.contains("chosen = negative review"),
        "{card}"
    );
    let o = cmd(a.path(), &["export", "--round", "3", "--out", "x"], &[])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("rounds 1 to 2"), "{}", stderr_of(&o));

    // Keys follow the round before: a setting of the rounds' training changes round 1's train
    // and everything after it, and round 2's reviews through the adapter they come from; round
    // 1's reviews and labels do not move.
    let st = statuses(a.path(), &[]);
    let moved = statuses(a.path(), &["rounds.epochs=2"]);
    for same in ["train", "eval", "round-1-sample", "round-1-label"] {
        assert_eq!(key(&st, same), key(&moved, same), "{same}");
    }
    for changed in [
        "round-1-train",
        "round-1-eval",
        "round-2-sample",
        "round-2-label",
        "round-2-train",
        "round-2-eval",
    ] {
        assert_ne!(key(&st, changed), key(&moved, changed), "{changed}");
        assert_eq!(moved[changed]["state"], "stale", "{}", moved[changed]);
    }
    let why = |stage: &str| moved[stage]["reasons"].to_string();
    assert!(why("round-1-train").contains("round-train.epochs changed (1 -> 2)"));
    // Round 2's reviews changed nothing of their own: the adapter they come from moved.
    assert_eq!(why("round-2-sample"), r#"["input `adapter` changed"]"#);
    // One more round adds its stages and changes none before it.
    let more = statuses(a.path(), &["rounds.count=3"]);
    for (stage, s) in &st {
        assert_eq!(key(&more, stage), key(&st, stage), "{stage}");
        assert_eq!(s["state"], "up to date", "{s}");
    }
    assert_eq!(more["round-3-sample"]["state"], "missing");
    // Without rounds the published recipe's keys are those of a recipe with none.
    let none = statuses(a.path(), &["rounds.count=0"]);
    assert!(!none.contains_key("round-1-sample"));
    assert_eq!(key(&none, "eval"), key(&st, "eval"));

    // Killed in round 1's training (after a checkpoint), then in round 2's sampling (after a
    // chunk), a workdir that already holds the recipe's own stages ends with the same bytes.
    let b = tempdir();
    let cache = b.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    for stage in [
        "scrape", "prompts", "generate", "merge", "split", "train", "eval",
    ] {
        let o = Command::new("cp")
            .arg("-a")
            .arg(a.path().join("cache").join(stage))
            .arg(&cache)
            .status()
            .unwrap();
        assert!(o.success());
    }
    let seen = run_and_kill(b.path(), |l| l.contains("Training step 2/"));
    assert!(seen.contains("Building round-1-train"), "{seen}");
    let seen = run_and_kill(b.path(), |l| l.contains("round-sample 2/9 reviews"));
    assert!(
        seen.contains("Resuming") && seen.contains("Building round-2-sample"),
        "{seen}"
    );
    let err = run_ok(b.path());
    assert!(
        err.contains("round-sample: 2 of 9 reviews already done"),
        "{err}"
    );
    let mut files = 0;
    for r in 1..=2 {
        for step in ["sample", "label", "train", "eval"] {
            files += same_bytes(a.path(), b.path(), &format!("round-{r}-{step}"));
        }
    }
    assert!(files >= 20, "{files} files compared");
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
