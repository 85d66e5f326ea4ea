//! The stage graph end to end on the real SmolLM2 model and the saved NeurIPS page: caching,
//! exactly-the-right reruns, damaged artifacts, a killed generate stage, and the Hub export read
//! back by pyarrow (a reader nobody here wrote).

use crate::support::*;
use std::time::{Duration, Instant};

/// Stage names that were built (not fresh) in a run's output.
fn built(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.trim_start().strip_prefix("Building "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn a_changed_setting_reruns_exactly_what_depends_on_it() {
    let d = tempdir();
    small_recipe(d.path(), 4, 3, 1, 8, "");
    let run = |extra: &[&str]| {
        let mut a = vec!["run", "--until", "split"];
        a.extend_from_slice(extra);
        built(&pipeline_ok(d.path(), &a))
    };
    assert_eq!(
        run(&[]),
        ["scrape", "prompts", "generate", "merge", "split"]
    );
    let t0 = Instant::now();
    assert!(run(&[]).is_empty());
    eprintln!("all-cached run: {:?}", t0.elapsed());
    assert_eq!(run(&["--set", "split.seed=9"]), ["split"]);
    assert_eq!(
        run(&["--set", "generate.temperature=0.9"]),
        ["generate", "merge", "split"]
    );
    assert_eq!(run(&["--set", "merge.min_chars=3"]), ["merge", "split"]);
    assert_eq!(run(&["--force", "merge"]), ["merge"]);
    // A template edit reruns prompts and what follows it.
    let tpl = d.path().join("templates/chat_user.jinja");
    std::fs::write(&tpl, "Title: {{ title }}\n").unwrap();
    assert_eq!(run(&[]), ["prompts", "generate", "merge", "split"]);
    // status says why a stage is stale.
    let st = pipeline_ok(
        d.path(),
        &["status", "--set", "split.test=2", "--set", "split.train=2"],
    );
    assert!(st.contains("split.test changed (1 -> 2)"), "{st}");
    // --json prints the JSON alone on stdout.
    let js = status_json(d.path(), &[]);
    assert_eq!(js[4]["stage"], "split");
    assert_eq!(js[4]["state"], "up to date");
    assert_eq!(js[4]["counts"]["train"], 3);
    // --only needs fresh inputs, and says which.
    let o = pipeline(
        d.path(),
        &["run", "--only", "merge", "--set", "generate.seed=5"],
    );
    let e = stderr_of(&o);
    assert!(
        !o.status.success()
            && e.contains("needs the output of generate")
            && e.contains("--until generate"),
        "{e}"
    );
    // `pipeline eval` with nothing built names itself, and the command that builds every input
    // it reads (not just the first stale one).
    let empty = tempdir();
    small_recipe(empty.path(), 4, 3, 1, 8, "");
    let o = pipeline(empty.path(), &["eval"]);
    let e = stderr_of(&o);
    assert!(
        !o.status.success()
            && e.contains("`pipeline eval` needs the output of scrape")
            && e.contains("run `pipeline run --until train` first")
            && !e.contains("--only"),
        "{e}"
    );
}

#[test]
fn damaged_artifacts_are_reported_and_rebuilt() {
    let d = tempdir();
    small_recipe(d.path(), 3, 2, 1, 6, "");
    pipeline_ok(d.path(), &["run", "--until", "split"]);
    let gen = latest_build(&d.path().join("data"), "generate");
    let f = gen.join("generations.jsonl");
    let good = std::fs::read(&f).unwrap();
    // Same size, one byte changed: only the checksum can tell.
    let mut bad = good.clone();
    let i = bad.iter().position(|&b| b == b'"').unwrap();
    bad[i] = b'\'';
    std::fs::write(&f, &bad).unwrap();
    let out = pipeline_ok(d.path(), &["run", "--until", "split"]);
    assert!(
        out.contains("Damaged generate") && out.contains("checksum"),
        "{out}"
    );
    assert_eq!(
        built(&out),
        ["generate"],
        "downstream is unchanged once generate is rebuilt identically"
    );
    assert_eq!(std::fs::read(&f).unwrap(), good);
    // Truncated file.
    let split = latest_build(&d.path().join("data"), "split");
    let pq = split.join("train.parquet");
    let n = std::fs::metadata(&pq).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pq)
        .unwrap()
        .set_len(n / 2)
        .unwrap();
    let out = pipeline_ok(d.path(), &["run", "--until", "split"]);
    assert!(
        out.contains("Damaged split") && out.contains("bytes"),
        "{out}"
    );
    // Lost manifest.
    std::fs::remove_file(split.join("manifest.json")).unwrap();
    let out = pipeline_ok(d.path(), &["run", "--until", "split"]);
    assert!(out.contains("Damaged split"), "{out}");
}

#[test]
fn a_killed_generate_stage_resumes_to_an_identical_artifact() {
    let extra = "";
    // Reference: an uninterrupted run.
    let a = tempdir();
    small_recipe(a.path(), 8, 6, 2, 24, extra);
    pipeline_ok(a.path(), &["run", "--until", "generate"]);
    let want =
        std::fs::read(latest_build(&a.path().join("data"), "generate").join("generations.jsonl"))
            .unwrap();

    let b = tempdir();
    small_recipe(b.path(), 8, 6, 2, 24, extra);
    pipeline_ok(b.path(), &["run", "--until", "prompts"]);
    for round in 0..2 {
        let mut child = pipeline_cmd(b.path())
            .args(["run", "--until", "generate", "-q"])
            .spawn()
            .unwrap();
        // Kill it once some chunks are on disk but before it finishes.
        let gen_dir = b.path().join("data/cache/generate");
        let t0 = Instant::now();
        let target = 2 + 2 * round;
        loop {
            let chunks = std::fs::read_dir(&gen_dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
                .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
                .filter(|c| c.file_name().to_string_lossy().starts_with("chunk-"))
                .count();
            if chunks >= target || t0.elapsed() > Duration::from_secs(300) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Nothing half-written is visible as an artifact.
        let finished: Vec<_> = std::fs::read_dir(&gen_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().join("manifest.json").exists())
            .collect();
        assert!(finished.is_empty(), "a killed run left a final artifact");
    }
    let out = pipeline_ok(b.path(), &["run", "--until", "generate"]);
    assert!(out.contains("Resuming"), "{out}");
    let got =
        std::fs::read(latest_build(&b.path().join("data"), "generate").join("generations.jsonl"))
            .unwrap();
    assert_eq!(
        String::from_utf8(got).unwrap(),
        String::from_utf8(want).unwrap()
    );
    // The resumable partial folder is gone once the artifact is committed.
    assert!(std::fs::read_dir(b.path().join("data/cache/generate"))
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().ends_with(".partial")));
}

#[test]
fn end_to_end_eight_titles_to_a_hub_folder_read_by_pyarrow() {
    let py = python();
    let d = tempdir();
    small_recipe(d.path(), 8, 6, 2, 32, "");
    let out = pipeline_ok(d.path(), &["run", "--until", "split"]);
    // Every title becomes a pair unless merge dropped it, and says so.
    let st = status_json(d.path(), &[]);
    let c = &st.iter().find(|s| s["stage"] == "merge").unwrap()["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    assert_eq!(
        n("pairs") + n("dropped_empty") + n("dropped_identical"),
        8,
        "{out}"
    );
    let hub = d.path().join("hub");
    pipeline_ok(d.path(), &["export", "--out", hub.to_str().unwrap()]);
    assert!(hub.join("data/train-00000-of-00001.parquet").is_file());
    assert!(hub.join("data/test-00000-of-00001.parquet").is_file());
    let check = r###"
import sys, pyarrow.parquet as pq, yaml, os
hub = sys.argv[1]
counts = {}
for split in ["train", "test"]:
    path = os.path.join(hub, "data", f"{split}-00000-of-00001.parquet")
    t = pq.read_table(path)
    assert t.schema.names == ["prompt", "chosen", "rejected"], t.schema
    assert all(str(f.type) == "string" for f in t.schema), t.schema
    rows = t.to_pylist()
    for r in rows:
        assert r["prompt"] and r["chosen"].strip() and r["rejected"].strip(), r
        assert r["chosen"] != r["rejected"]
    counts[split] = (len(rows), os.path.getsize(path))
card = open(os.path.join(hub, "README.md")).read()
assert card.startswith("---\n")
meta = yaml.safe_load(card.split("---\n")[1])
info = meta["dataset_info"]
assert [f["name"] for f in info["features"]] == ["prompt", "chosen", "rejected"]
assert all(f["dtype"] == "string" for f in info["features"])
splits = {s["name"]: s for s in info["splits"]}
assert set(splits) == {"train", "test"}
for name, (n, size) in counts.items():
    assert splits[name]["num_examples"] == n, (name, n, splits[name])
    assert splits[name]["num_bytes"] > 0
assert info["download_size"] == sum(s for _, s in counts.values())
assert info["dataset_size"] == sum(s["num_bytes"] for s in splits.values())
cfg = meta["configs"][0]
assert cfg["config_name"] == "default"
assert {d["split"]: d["path"] for d in cfg["data_files"]} == {"train": "data/train-*", "test": "data/test-*"}
assert "## How it was built" in card
print("OK", counts["train"][0], counts["test"][0])
"###;
    let so = run_python(&py, &["-c", check, hub.to_str().unwrap()]);
    assert_eq!(so.trim(), "OK 6 2");
    // A non-empty folder is not overwritten without --force.
    let o = pipeline(d.path(), &["export", "--out", hub.to_str().unwrap()]);
    assert!(!o.status.success() && stderr_of(&o).contains("--force"));
    pipeline_ok(
        d.path(),
        &["export", "--out", hub.to_str().unwrap(), "--force"],
    );
    // Identical settings give byte-identical Parquet files.
    let e = tempdir();
    small_recipe(e.path(), 8, 6, 2, 32, "");
    pipeline_ok(e.path(), &["run", "--until", "split"]);
    let a =
        std::fs::read(latest_build(&d.path().join("data"), "split").join("train.parquet")).unwrap();
    let b =
        std::fs::read(latest_build(&e.path().join("data"), "split").join("train.parquet")).unwrap();
    assert_eq!(a, b);
}
