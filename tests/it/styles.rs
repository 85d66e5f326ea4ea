//! Styles as data: the recipe names its two styles and which is chosen; merge, the judges and
//! the eval follow it. The judges' direction on written examples, the styles' validation, and
//! `--preset kind` (the opposite bot, items from a text file) end to end offline.

use crate::support::*;
use reviewer2::judge::{Judge, JudgeKind, JudgeSettings};
use serde_json::Value;

fn lexicon(chosen_sentiment: &str) -> Vec<f64> {
    let s: JudgeSettings =
        serde_json::from_value(serde_json::json!({ "chosen_sentiment": chosen_sentiment }))
            .unwrap();
    let j = Judge::new(JudgeKind::Lexicon, &s, None).unwrap();
    j.score(&[
        "A wonderful, inspiring paper with a beautiful and convincing idea.",
        "A useless paper with serious flaws; the idea is wrong and badly evaluated.",
    ])
    .unwrap()
}

#[test]
fn the_lexicon_judge_scores_toward_the_chosen_sentiment() {
    let pos = lexicon("positive");
    assert!(
        pos[0] > pos[1],
        "chosen = positive: the kind sentence is more chosen-like: {pos:?}"
    );
    let neg = lexicon("negative");
    assert!(
        neg[1] > neg[0],
        "chosen = negative: the harsh sentence is: {neg:?}"
    );
    // One direction is the other turned around, not another scale.
    assert_eq!(pos[0], -neg[0]);
    assert_eq!(
        JudgeSettings::default(),
        serde_json::from_value(serde_json::json!({})).unwrap()
    );
}

/// `pipeline status` with these settings on the quick preset fails with exit 2 naming `want`.
fn refused(sets: &[&str], want: &[&str]) {
    let d = tempdir();
    let cfg = repo().join("pipeline.toml");
    let mut args = vec![
        "status",
        "--config",
        cfg.to_str().unwrap(),
        "--preset",
        "kind",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let o = pipeline(d.path(), &args);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{sets:?}: {err}");
    for w in want {
        assert!(err.contains(w), "{sets:?}: no {w:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn styles_are_validated_by_name() {
    refused(
        &["prompts.rejected=kind"],
        &["prompts.rejected", "must differ from prompts.chosen"],
    );
    refused(
        &["prompts.chosen=gentle"],
        &["prompts.pool", "entry 1", "no `gentle` example"],
    );
    refused(
        &["prompts.chosen=two words"],
        &["prompts.chosen", "a style's name"],
    );
    // The default pool is keyed negative / positive: with other names every entry is refused.
    let d = tempdir();
    let o = pipeline(
        d.path(),
        &[
            "status",
            "--set",
            "prompts.chosen=kind",
            "--set",
            "prompts.rejected=harsh",
        ],
    );
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("prompts.pool") && err.contains("no `kind` example"),
        "{err}"
    );
}

#[test]
fn the_kind_preset_runs_offline_and_moves_toward_its_chosen_style() {
    let d = tempdir();
    let cfg = repo().join("pipeline.toml");
    let model = format!("generate.model={}", smollm2().display());
    let items = format!(
        "scrape.file={}",
        repo().join("data/kind-titles.txt").display()
    );
    let mut args = vec![
        "run",
        "-q",
        "--yes",
        "--config",
        cfg.to_str().unwrap(),
        "--preset",
        "kind",
        "--workdir",
        "w",
        "--set",
        &model,
        "--set",
        &items,
    ];
    // 24 titles: 18 train pairs and 6 held out, so the eval's verdict rests on 12 pairs, not 4
    // (with 4, one review more or less kind moved the rate across one half).
    let shrink = [
        "scrape.count=24",
        "generate.max_new_tokens=16",
        "generate.batch_size=4",
        "split.train=18",
        "split.test=6",
        "train.max_steps=12",
        "train.batch_size=2",
        "train.max_length=160",
        "train.max_prompt_length=128",
        "train.eval_steps=12",
        "train.save_steps=12",
    ];
    for s in &shrink {
        args.extend(["--set", s]);
    }
    let t = std::time::Instant::now();
    pipeline_ok(d.path(), &args);
    eprintln!("kind preset, shrunk: {:.1} s", t.elapsed().as_secs_f64());
    let w = d.path().join("w");
    // The items are the file's lines.
    let file: Vec<String> = std::fs::read_to_string(repo().join("data/kind-titles.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let titles = read_jsonl(&latest_build(&w, "scrape").join("titles.jsonl"));
    assert_eq!(titles.len(), 24);
    assert!(titles
        .iter()
        .all(|t| file.contains(&t["title"].as_str().unwrap().to_string())));
    // Requests: the chosen style first, each with its own system message and examples.
    let prompts = read_jsonl(&latest_build(&w, "prompts").join("prompts.jsonl"));
    for p in &prompts {
        let id = p["id"].as_u64().unwrap();
        let style = if id % 2 == 0 { "kind" } else { "harsh" };
        assert_eq!(p["polarity"], style, "{p}");
        let text = p["prompt"].as_str().unwrap();
        let other = if style == "kind" {
            "dismissive review"
        } else {
            "warm, appreciative"
        };
        assert!(
            !text.contains(other),
            "{style} request holds the other style's message: {text}"
        );
    }
    // Merge: chosen = the kind generation of each title.
    let gens = read_jsonl(&latest_build(&w, "generate").join("generations.jsonl"));
    let pairs = read_jsonl(&latest_build(&w, "merge").join("pairs.jsonl"));
    assert!(!pairs.is_empty());
    for pair in &pairs {
        let kind = gens
            .iter()
            .find(|g| g["title_id"] == pair["title_id"] && g["polarity"] == "kind")
            .unwrap();
        assert_eq!(
            pair["chosen"].as_str().unwrap().trim(),
            kind["text"].as_str().unwrap().trim(),
            "{pair}"
        );
    }
    // The eval names the chosen style and measures the move toward it. At this size the
    // adapter has learned the pairs (reward accuracy), and the trained judge, which learned the
    // split's own kind and harsh reviews, scores its reviews as more kind on average. VADER does
    // not: the base's reviews under the preset's "generous" system message are already warm,
    // and its rate sat at 33% to 75% across runs of 4 and 12 pairs (docs/RESULTS.md), so no
    // verdict of it is asserted.
    let report: Value = read_json(&latest_build(&w, "eval").join("report.json"));
    assert_eq!(report["chosen_style"], "kind", "{report}");
    let toward = report["toward_chosen_rate"].as_f64().unwrap();
    assert_eq!(toward, report["harsher_rate"].as_f64().unwrap());
    assert_eq!(report["n"], 12, "{report}");
    assert!(
        report["eval_reward_accuracy"].as_f64().unwrap() > 0.5,
        "the adapter did not learn the pairs: {report}"
    );
    let trained = &report["judges"]["trained"];
    assert!(
        trained["negativity_adapter"].as_f64().unwrap()
            > trained["negativity_base"].as_f64().unwrap() + 0.05,
        "the trained judge's mean kind-likeness did not rise: {report}"
    );
    let md = std::fs::read_to_string(latest_build(&w, "eval").join("eval.md")).unwrap();
    assert!(md.contains("toward its chosen style, `kind`"), "{md}");
    assert!(md.contains("| mean kind-likeness |"), "{md}");
    assert!(!md.contains("negativity"), "{md}");

    // The exported dataset's card tells the recipe's own story: its items file and its styles,
    // not NeurIPS titles and a harsh Reviewer #2.
    let mut export = vec!["export", "--out", "hub"];
    export.extend_from_slice(&args[3..]);
    pipeline_ok(d.path(), &export);
    let card = std::fs::read_to_string(d.path().join("hub/README.md")).unwrap();
    for want in [
        "# A kind / harsh preference dataset, ",
        "for each item of `kind-titles.txt`",
        "1. **Items**: 48 items read from `kind-titles.txt`",
        "`chosen` is a kind review and `rejected` a harsh one",
        "chosen = kind review, rejected = harsh review",
        "toward the `kind` style",
    ] {
        assert!(card.contains(want), "{want:?} not in the card:\n{card}");
    }
    for stale in ["Reviewer #2", "NeurIPS", "negative", "selector"] {
        assert!(!card.contains(stale), "{stale:?} in the card:\n{card}");
    }
}
