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
        ("sklearn", "scikit-learn"),
    ]);
    let d = tempdir();
    // 5 test pairs at batch 2: the eval mean must weigh rows, not batches.
    small_recipe(
        d.path(),
        16,
        9,
        5,
        24,
        // Short rows: what is checked is the report's arithmetic, not what the bot learns.
        "[train]\nmax_steps = 6\nbatch_size = 2\neval_steps = 3\nlogging_steps = 2\nlearning_rate = 1e-3\nmax_length = 128\nmax_prompt_length = 96\n\n[eval]\nsamples = 2\n",
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
        "mean_tokens_base",
        "mean_tokens_adapter",
        "repeat_sentence_base",
        "repeat_sentence_adapter",
        "repeat_ngram_base",
        "repeat_ngram_adapter",
        "hit_max_tokens_base",
        "hit_max_tokens_adapter",
        "fluent_pairs",
        "harsher_rate_fluent",
        "harsher_rate_fluent_ci",
        "judges",
        "independent_judges",
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
    // Coherence and the trained judge, recomputed in Python from their definitions (README,
    // src/judge/coherence.rs and trained.rs), the logistic regression by scikit-learn.
    let script = r#"
import json, sys
import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

def words(t):
    out = []
    for w in t.split():
        i, j = 0, len(w)
        while i < j and not w[i].isalnum(): i += 1
        while j > i and not w[j - 1].isalnum(): j -= 1
        if i < j: out.append(w[i:j].lower())
    return out

def repeats_sentence(t):
    s = [tuple(words(x)) for x in t.replace("!", ".").replace("?", ".").replace("\n", ".").split(".")]
    s = [x for x in s if len(x) >= 3]
    return len(set(s)) < len(s)

def repeats_ngram(t):
    w = words(t)
    g = [tuple(w[i:i + 4]) for i in range(len(w) - 3)]
    return len(set(g)) < len(g)

NEG = {"not", "no", "never", "nor", "cannot", "without", "none", "nothing", "neither", "nobody",
       "nowhere", "hardly", "barely", "scarcely"}

def marked(t):
    t = t.lower().replace("\u2019", "'")
    toks, cur = [], ""
    for c in t + " ":
        if c.isalnum() or c == "'":
            cur += c
            continue
        if cur: toks.append(cur); cur = ""
        if c in ".,;:!?": toks.append(c)
    out, neg = [], False
    for tok in toks:
        if tok in ".,;:!?":
            neg = False
            continue
        out.append("not_" + tok if neg else tok)
        if tok in NEG or tok.endswith("n't"): neg = True
    return out

def feats(t):
    w = marked(t)
    return set(w) | {a + " " + b for a, b in zip(w, w[1:])}

samples = [json.loads(l) for l in open(sys.argv[1])]
train = pq.read_table(sys.argv[2]).to_pylist()
test = pq.read_table(sys.argv[3]).to_pylist()
docs = [feats(r["chosen"]) for r in train] + [feats(r["rejected"]) for r in train]
y = [1] * len(train) + [0] * len(train)
df = {}
for d in docs:
    for f in d: df[f] = df.get(f, 0) + 1
vocab = sorted(f for f, n in df.items() if n >= 2)
ix = {f: i for i, f in enumerate(vocab)}
def X(texts):
    m = np.zeros((len(texts), len(vocab)))
    for r, t in enumerate(texts):
        for f in feats(t):
            if f in ix: m[r, ix[f]] = 1.0
    return m
lr = LogisticRegression(C=1.0, tol=1e-12, max_iter=100000).fit(
    X([r["chosen"] for r in train] + [r["rejected"] for r in train]), y)
p = lambda texts: lr.predict_proba(X(texts))[:, 1].tolist()
c, rj = p([r["chosen"] for r in test]), p([r["rejected"] for r in test])
base, adapter = [s["base"] for s in samples], [s["adapter"] for s in samples]
print(json.dumps({
    "vocab": vocab, "weights": lr.coef_[0].tolist(), "bias": float(lr.intercept_[0]),
    "auroc": roc_auc_score([1] * len(c) + [0] * len(rj), c + rj),
    "base": p(base), "adapter": p(adapter),
    "repeat_sentence": [[repeats_sentence(t) for t in base], [repeats_sentence(t) for t in adapter]],
    "repeat_ngram": [[repeats_ngram(t) for t in base], [repeats_ngram(t) for t in adapter]],
    "marked": marked("It is not novel, but it\u2019s clear. Doesn't scale; NO gains!"),
}))
"#;
    let sk: Value = serde_json::from_str(&run_py(
        &py,
        script,
        &[
            eval.join("samples.jsonl").to_str().unwrap(),
            split.join("train.parquet").to_str().unwrap(),
            test_parquet.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert_eq!(
        sk["marked"],
        serde_json::json!(reviewer2::judge::trained::marked_words(
            "It is not novel, but it\u{2019}s clear. Doesn't scale; NO gains!"
        ))
    );
    let tj: Value = read_json(&eval.join("trained_judge.json"));
    let ours: Vec<&String> = tj["weights"].as_object().unwrap().keys().collect();
    let theirs: Vec<String> = sk["vocab"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ours.len(), theirs.len(), "vocabulary sizes");
    assert!(!theirs.is_empty());
    for (i, f) in theirs.iter().enumerate() {
        let w = tj["weights"][f].as_f64().unwrap();
        let want = sk["weights"][i].as_f64().unwrap();
        assert!(
            (w - want).abs() < 1e-4,
            "weight of {f:?}: {w} vs scikit-learn {want}"
        );
    }
    assert!((f(&tj, "bias") - sk["bias"].as_f64().unwrap()).abs() < 1e-4);
    let judges = &report["judges"];
    assert!(
        (judges["trained"]["auroc"].as_f64().unwrap() - sk["auroc"].as_f64().unwrap()).abs() < 1e-9,
        "{judges} vs {}",
        sk["auroc"]
    );
    for (i, s) in samples.iter().enumerate() {
        for (j, who) in ["base", "adapter"].iter().enumerate() {
            let got = s["scores"]["trained"][j].as_f64().unwrap();
            let want = sk[*who][i].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-5,
                "sample {i} {who}: trained {got} vs {want}"
            );
        }
        // eval.judge's scores are the lexicon judge's, also under its name.
        assert_eq!(s["scores"]["lexicon"][0], s["base_score"]);
        assert_eq!(s["scores"]["lexicon"][1], s["adapter_score"]);
    }
    // Each judge's harsher rate and interval, and over the pairs where neither review loops.
    let flag = |k: &str, who: usize, i: usize| sk[k][who][i].as_bool().unwrap();
    let fluent: Vec<bool> = (0..samples.len())
        .map(|i| !flag("repeat_sentence", 0, i) && !flag("repeat_sentence", 1, i))
        .collect();
    let nf = fluent.iter().filter(|x| **x).count();
    assert_eq!(report["fluent_pairs"], nf);
    for name in ["lexicon", "trained"] {
        let sc = |i: usize, j: usize| samples[i]["scores"][name][j].as_f64().unwrap();
        let k = (0..samples.len()).filter(|&i| sc(i, 1) > sc(i, 0)).count();
        let kf = (0..samples.len())
            .filter(|&i| fluent[i] && sc(i, 1) > sc(i, 0))
            .count();
        let j = &judges[name];
        close(j["harsher_rate"].as_f64().unwrap(), k as f64 / n, name);
        if nf == 0 {
            // A rate over no pairs is not 0: the report says null.
            assert!(j["harsher_rate_fluent"].is_null(), "{j}");
        } else {
            close(
                j["harsher_rate_fluent"].as_f64().unwrap(),
                kf as f64 / nf as f64,
                name,
            );
        }
        // Nothing labelled this dataset (merge.judge is off): every judge is independent.
        assert_eq!(j["labeled_training_data"], false);
    }
    assert_eq!(
        report["independent_judges"],
        serde_json::json!(["lexicon", "trained"])
    );
    assert_eq!(
        report["harsher_rate_fluent"],
        judges["lexicon"]["harsher_rate_fluent"]
    );
    for (j, who) in ["base", "adapter"].iter().enumerate() {
        let share = |k: &str| (0..samples.len()).filter(|&i| flag(k, j, i)).count() as f64 / n;
        close(
            r(&format!("repeat_sentence_{who}")),
            share("repeat_sentence"),
            who,
        );
        close(
            r(&format!("repeat_ngram_{who}")),
            share("repeat_ngram"),
            who,
        );
        let at_max = samples
            .iter()
            .filter(|s| s[format!("{who}_finish")] == "length")
            .count() as f64;
        close(r(&format!("hit_max_tokens_{who}")), at_max / n, who);
        let toks = samples
            .iter()
            .map(|s| s[format!("{who}_tokens")].as_f64().unwrap())
            .sum::<f64>();
        close(r(&format!("mean_tokens_{who}")), toks / n, who);
        // At 24 new tokens a review that has not ended has exactly 24.
        for s in &samples {
            if s[format!("{who}_finish")] == "length" {
                assert_eq!(s[format!("{who}_tokens")], 24, "{s}");
            }
        }
    }
    assert!(eval.join("coherence.png").metadata().unwrap().len() > 100);

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
