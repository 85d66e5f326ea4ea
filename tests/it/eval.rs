//! The eval stage on the real SmolLM2 with a small trained adapter: its report recomputed here,
//! independently, from `samples.jsonl` and the test split (scores by the reference VADER), the
//! TensorBoard events read back by TensorBoard itself, and the unpaired (KTO) export read back
//! with pyarrow and trained on.

use crate::support::*;
use serde_json::Value;

/// `python -c SCRIPT ARGS`; its stdout.
fn run_py(py: &str, script: &str, args: &[&str]) -> String {
    run_python(py, &[&["-c", script][..], args].concat())
}

/// Distinct-2 written again from its definition: distinct word bigrams over all bigrams.
fn distinct2(texts: &[&str]) -> f64 {
    let mut all = Vec::new();
    for t in texts {
        let w: Vec<String> = t.split_whitespace().map(|w| w.to_lowercase()).collect();
        for i in 1..w.len() {
            all.push(format!("{} {}", w[i - 1], w[i]));
        }
    }
    let total = all.len();
    all.sort();
    all.dedup();
    all.len() as f64 / total as f64
}

#[test]
fn eval_report_is_recomputed_from_its_samples_and_the_reference_vader() {
    let py = python_with(&[
        ("vaderSentiment", "vaderSentiment"),
        ("tensorboard", "tensorboard"),
    ]);
    let d = tempdir();
    // 5 test pairs at batch 2: the eval mean must weigh rows, not batches.
    small_recipe(
        d.path(),
        16,
        9,
        5,
        24,
        "[train]\nmax_steps = 6\nbatch_size = 2\neval_steps = 3\nlogging_steps = 2\nlearning_rate = 1e-3\n\n[eval]\nsamples = 2\n",
    );
    let out = pipeline_ok(d.path(), &["run"]);
    assert!(out.contains("Building eval"), "{out}");
    let eval = status_path(d.path(), "eval", &[]);
    let split = status_path(d.path(), "split", &[]);
    let train = status_path(d.path(), "train", &[]);

    let report: Value = read_json(&eval.join("report.json"));
    let keys: Vec<&str> = report
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let mut want = vec![
        "n",
        "judge",
        "judge_auroc",
        "harsher_rate",
        "harsher_rate_ci",
        "negativity_base",
        "negativity_adapter",
        "eval_loss",
        "eval_reward_accuracy",
        "distinct2_base",
        "distinct2_adapter",
        "mean_chars_base",
        "mean_chars_adapter",
    ];
    want.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, want);

    let samples = read_jsonl(&eval.join("samples.jsonl"));
    // 5 test titles x 2 samples.
    assert_eq!(samples.len(), 10);
    assert_eq!(report["n"], 10);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    let r = |k: &str| report[k].as_f64().unwrap();
    let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() < 1e-9, "{what}: {a} vs {b}");

    // Every score again, by the reference VADER (negated compound), and the test pairs' AUROC.
    let texts: Vec<&str> = samples
        .iter()
        .flat_map(|s| [s["base"].as_str().unwrap(), s["adapter"].as_str().unwrap()])
        .collect();
    let script = r#"
import json, sys
import pyarrow.parquet as pq
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
a = SentimentIntensityAnalyzer()
neg = lambda t: -a.polarity_scores(t)["compound"]
texts = json.loads(sys.argv[1])
test = pq.read_table(sys.argv[2]).to_pylist()
c = [neg(r["chosen"]) for r in test]; rj = [neg(r["rejected"]) for r in test]
wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in c for y in rj)
print(json.dumps({"scores": [neg(t) for t in texts], "auroc": wins / (len(c) * len(rj))}))
"#;
    let test_parquet = split.join("test.parquet");
    let refv: Value = serde_json::from_str(&run_py(
        &py,
        script,
        &[
            &serde_json::to_string(&texts).unwrap(),
            test_parquet.to_str().unwrap(),
        ],
    ))
    .unwrap();
    let ref_scores: Vec<f64> = refv["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (i, s) in samples.iter().enumerate() {
        for (j, k) in ["base_score", "adapter_score"].iter().enumerate() {
            let want = ref_scores[2 * i + j];
            assert!(
                (f(s, k) - want).abs() < 1e-12,
                "sample {i} {k}: {} vs VADER {want} for {s}",
                f(s, k)
            );
        }
    }
    assert!((r("judge_auroc") - refv["auroc"].as_f64().unwrap()).abs() < 1e-12);

    let n = samples.len() as f64;
    let harsher = samples
        .iter()
        .filter(|s| f(s, "adapter_score") > f(s, "base_score"))
        .count() as f64;
    close(r("harsher_rate"), harsher / n, "harsher_rate");
    // Wilson's 95% interval from its formula.
    let (p, z) = (harsher / n, 1.959963984540054f64);
    let c = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let h = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    close(
        report["harsher_rate_ci"][0].as_f64().unwrap(),
        (c - h).max(0.0),
        "ci low",
    );
    close(
        report["harsher_rate_ci"][1].as_f64().unwrap(),
        (c + h).min(1.0),
        "ci high",
    );
    let mean = |k: &str| samples.iter().map(|s| f(s, k)).sum::<f64>() / n;
    close(r("negativity_base"), mean("base_score"), "negativity_base");
    close(
        r("negativity_adapter"),
        mean("adapter_score"),
        "negativity_adapter",
    );
    for (who, key) in [("base", "distinct2_base"), ("adapter", "distinct2_adapter")] {
        let t: Vec<&str> = samples.iter().map(|s| s[who].as_str().unwrap()).collect();
        close(r(key), distinct2(&t), key);
        let chars = t.iter().map(|x| x.chars().count() as f64).sum::<f64>() / n;
        close(r(&format!("mean_chars_{who}")), chars, "mean_chars");
    }
    // Every held-out title is a test title, each with `samples` samples.
    for s in &samples {
        assert!(!s["title"].as_str().unwrap().is_empty(), "{s}");
    }
    // The eval loss of the final adapter is the train stage's last eval, computed again.
    let metrics = read_jsonl(&train.join("metrics.jsonl"));
    let evals: Vec<&Value> = metrics
        .iter()
        .filter(|m| m.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals[0]["step"], 0, "eval runs before the first update");
    assert!((f(evals[0], "eval_loss") - std::f64::consts::LN_2).abs() < 1e-6);
    let last = evals.last().unwrap();
    assert_eq!(last["step"], 6);
    assert!((r("eval_loss") - f(last, "eval_loss")).abs() < 1e-5);
    assert!((r("eval_reward_accuracy") - f(last, "eval_rewards/accuracies")).abs() < 1e-9);
    for f in ["eval.md", "scores.png"] {
        assert!(eval.join(f).metadata().unwrap().len() > 100, "{f}");
    }

    // TensorBoard reads the event file back with every metric under TRL's tag.
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1]); ea.Reload()
print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}))
"#;
    let tb: Value = serde_json::from_str(&run_py(&py, script, &[train.to_str().unwrap()])).unwrap();
    let tb_eval = tb["eval/loss"].as_array().unwrap();
    assert_eq!(tb_eval.len(), evals.len());
    for (e, m) in tb_eval.iter().zip(&evals) {
        assert_eq!(e[0].as_i64().unwrap(), m["step"].as_i64().unwrap());
        assert!((e[1].as_f64().unwrap() - f(m, "eval_loss")).abs() < 1e-6);
    }
    let tb_train = tb["train/loss"].as_array().unwrap();
    let train_logs: Vec<&Value> = metrics.iter().filter(|m| m.get("loss").is_some()).collect();
    assert_eq!(tb_train.len(), train_logs.len());
    assert!(tb.get("train/rewards/margins").is_some() && tb.get("train/learning_rate").is_some());

    // `pipeline eval --adapter` on the same adapter gives the same report: the same prompts and
    // seeds give the same reviews.
    let out = pipeline_ok(d.path(), &["eval", "--adapter", train.to_str().unwrap()]);
    let again: Value =
        serde_json::from_str(&out[out.find('{').unwrap()..=out.rfind('}').unwrap()]).unwrap();
    assert_eq!(again, report);

    // With an adapter that is the base (B = 0, as PEFT initialises it), the same seeds give the
    // same reviews from both: base and adapter are sampled alike.
    let zero = d.path().join("zero-adapter");
    std::fs::create_dir_all(&zero).unwrap();
    std::fs::copy(
        train.join("adapter_config.json"),
        zero.join("adapter_config.json"),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        train.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let zeroed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("lora_B") {
                t.zeros_like().unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&zeroed, zero.join("adapter_model.safetensors")).unwrap();
    let out = pipeline_ok(d.path(), &["eval", "--adapter", zero.to_str().unwrap()]);
    let md = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Report "))
        .expect("eval names its report");
    let zdir = d.path().join(md).parent().unwrap().to_path_buf();
    for v in read_jsonl(&zdir.join("samples.jsonl")) {
        assert_eq!(v["base"], v["adapter"], "{v}");
    }

    // The unpaired export: two rows per pair, read back with pyarrow, and trained on with KTO.
    let x = d.path().join("unpaired");
    pipeline_ok(
        d.path(),
        &[
            "export",
            "--out",
            x.to_str().unwrap(),
            "--format",
            "unpaired",
        ],
    );
    let script = r#"
import json, sys
import pyarrow.parquet as pq
out = {}
for split in ["train", "test"]:
    t = pq.read_table(f"{sys.argv[1]}/data/{split}-00000-of-00001.parquet")
    p = pq.read_table(f"{sys.argv[2]}/{split}.parquet").to_pylist()
    want = [r for q in p for r in ({"prompt": q["prompt"], "completion": q["chosen"], "label": True},
                                  {"prompt": q["prompt"], "completion": q["rejected"], "label": False})]
    out[split] = {"types": [str(f.type) for f in t.schema], "names": t.schema.names,
                  "equal": t.to_pylist() == want, "rows": t.num_rows}
print(json.dumps(out))
"#;
    let ex: Value = serde_json::from_str(&run_py(
        &py,
        script,
        &[x.to_str().unwrap(), split.to_str().unwrap()],
    ))
    .unwrap();
    for (s, rows) in [("train", 18), ("test", 10)] {
        assert_eq!(
            ex[s]["names"],
            serde_json::json!(["prompt", "completion", "label"])
        );
        assert_eq!(
            ex[s]["types"],
            serde_json::json!(["string", "string", "bool"])
        );
        assert_eq!(ex[s]["equal"], true, "{s}");
        assert_eq!(ex[s]["rows"], rows);
    }
    let card = std::fs::read_to_string(x.join("README.md")).unwrap();
    assert!(
        card.contains("- kto") && card.contains("dtype: bool"),
        "{card}"
    );
    let out = pipeline_ok(
        d.path(),
        &[
            "run",
            "--until",
            "train",
            "--set",
            "train.loss=kto",
            "--set",
            &format!("train.dataset={}", x.display()),
            "--set",
            "train.max_steps=2",
        ],
    );
    assert!(out.contains("Trained 2 steps"), "{out}");
}
