//! Cache keys cover what changes a stage's output, and `status` computes them without fetching
//! or downloading anything: the model's whole file, batching where quantized results depend on
//! it, and the pipeline's presets end to end.

use crate::support::*;
use reviewer2::model::load::source::{resolve_spec, FingerprintMemo, HubAccess, ModelSpec};

fn identity(path: &std::path::Path, memo: &FingerprintMemo) -> String {
    let hub = HubAccess {
        cache_dir: tempdir().path().to_path_buf(),
        endpoint: None,
        token: None,
        offline: true,
    };
    resolve_spec(&ModelSpec::Gguf(path.to_path_buf()), &hub, memo)
        .unwrap()
        .identity
}

#[test]
fn the_model_fingerprint_covers_every_byte_and_is_remembered() {
    let d = tempdir();
    let gguf = d.path().join("model.gguf");
    std::fs::copy(smollm2(), &gguf).unwrap();
    let memo = FingerprintMemo::new(Some(d.path().join("fingerprints.json")));
    let a = identity(&gguf, &memo);
    assert_eq!(identity(&gguf, &memo), a);
    let memo_file = std::fs::read_to_string(d.path().join("fingerprints.json")).unwrap();
    assert!(memo_file.contains("model.gguf"), "{memo_file}");
    // One byte in the middle of the file, far from the first and last 4 MiB, same size.
    let mtime = std::fs::metadata(&gguf).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&gguf).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&gguf, &bytes).unwrap();
    // Remembered: the memo answers by path, size and mtime (as make and cargo do), so with the
    // old mtime put back it still gives the old hash: it was not hashed again.
    std::fs::File::options()
        .write(true)
        .open(&gguf)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(identity(&gguf, &memo), a, "the memo was not consulted");
    // Whole-file: a fresh memo sees the changed byte.
    let b = identity(&gguf, &FingerprintMemo::new(None));
    assert_ne!(
        a, b,
        "a changed weight must change every model-dependent key"
    );
    // And a new mtime makes the old memo hash the file again.
    std::fs::File::options()
        .write(true)
        .open(&gguf)
        .unwrap()
        .set_modified(mtime + std::time::Duration::from_secs(1))
        .unwrap();
    assert_eq!(identity(&gguf, &memo), b);
}

fn status_keys(dir: &std::path::Path, sets: &[&str]) -> serde_json::Value {
    let cfg = repo().join("pipeline.toml");
    let model = format!("generate.model={}", smollm2().display());
    let mut args = vec![
        "--config",
        cfg.to_str().unwrap(),
        "--preset",
        "quick",
        "--workdir",
        dir.to_str().unwrap(),
        "--set",
        &model,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    serde_json::Value::Object(
        status_json(dir, &args)
            .iter()
            .map(|s| (s["stage"].as_str().unwrap().to_string(), s["key"].clone()))
            .collect(),
    )
}

#[test]
fn quantized_generation_keys_on_batch_size_and_dense_does_not() {
    let d = tempdir();
    let q8 = status_keys(
        d.path(),
        &["generate.weights=quantized", "generate.batch_size=8"],
    );
    let q16 = status_keys(
        d.path(),
        &["generate.weights=quantized", "generate.batch_size=16"],
    );
    let f8 = status_keys(d.path(), &["generate.batch_size=8"]);
    let f16 = status_keys(d.path(), &["generate.batch_size=16"]);
    assert!(q8["generate"].is_string(), "{q8}");
    assert_ne!(q8["generate"], q16["generate"]);
    assert_eq!(f8["generate"], f16["generate"]);
    assert_eq!(q8["prompts"], f8["prompts"]);
    // `mixed` decodes on blocks after a dense prefill: batch-dependent. `blocks` and `f32`
    // are not (`model::generate`'s invariance test), so their keys leave the batch size out.
    for (w, dependent) in [("mixed", true), ("blocks", false), ("f32", false)] {
        let at = |b: &str| {
            status_keys(
                d.path(),
                &[
                    &format!("generate.weights={w}"),
                    &format!("generate.batch_size={b}"),
                ],
            )["generate"]
                .clone()
        };
        assert_eq!(at("8") != at("16"), dependent, "{w}");
    }
    // Engine switches that change results are settings, and in the key.
    let composed = status_keys(d.path(), &["generate.attention=composed"]);
    let whole = status_keys(d.path(), &["generate.prefix_sharing=false"]);
    assert_ne!(composed["generate"], f16["generate"]);
    assert_ne!(whole["generate"], f16["generate"]);
    // status built nothing.
    assert!(!d.path().join("cache/scrape").exists());
}

/// The eval's and the rounds' reviews come from `train.model` on the batch stages' weights
/// (`generate.weights`): those weights are in their keys, with the batch size where the text
/// depends on it (`mixed`) and without where it does not (`blocks`, dense). A generate model
/// that is an HF folder is dense whatever the setting, so every key before them stays.
#[test]
fn eval_and_round_samples_key_on_the_weights_they_sample_on() {
    let d = tempdir();
    let folder = d.path().join("tiny");
    tiny_folder(&folder, 64, 2);
    let gen = format!("generate.model={}", folder.display());
    let train = format!("train.model={}", smollm2().display());
    let at = |w: &str, b: &str| {
        status_keys(
            d.path(),
            &[
                &gen,
                &train,
                "rounds.count=1",
                &format!("generate.weights={w}"),
                &format!("generate.batch_size={b}"),
            ],
        )
    };
    let (f8, b8, b16, m8, m16) = (
        at("f32", "8"),
        at("blocks", "8"),
        at("blocks", "16"),
        at("mixed", "8"),
        at("mixed", "16"),
    );
    for stage in ["generate", "merge", "split", "train"] {
        assert!(f8[stage].is_string(), "{f8}");
        for k in [&b8, &b16, &m8, &m16] {
            assert_eq!(k[stage], f8[stage], "{stage}");
        }
    }
    for stage in ["eval", "round-1-sample"] {
        assert!(f8[stage].is_string(), "{f8}");
        assert_ne!(b8[stage], f8[stage], "{stage}: blocks against f32");
        assert_eq!(b8[stage], b16[stage], "{stage}: blocks at batch 8 and 16");
        assert_ne!(m8[stage], m16[stage], "{stage}: mixed at batch 8 and 16");
        assert_ne!(m8[stage], b8[stage], "{stage}: mixed against blocks");
    }
}

#[test]
fn reference_log_probs_are_keyed_on_device_and_dtype() {
    let d = tempdir();
    let cfg = repo().join("pipeline.toml");
    let model = format!("generate.model={}", smollm2().display());
    let work = d.path().join("w");
    let mut args = vec![
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--preset",
        "quick",
        "--workdir",
        work.to_str().unwrap(),
        "--set",
        &model,
    ];
    for s in [
        "scrape.count=4",
        "split.train=2",
        "split.test=1",
        "generate.max_new_tokens=4",
        "train.max_steps=1",
        "train.batch_size=1",
        "train.eval_steps=0",
    ] {
        args.extend(["--set", s]);
    }
    pipeline_ok(d.path(), &args);
    let refs = built_dirs(&work, "train-ref");
    assert_eq!(refs.len(), 1);
    let m: serde_json::Value = read_json(&refs[0].join("manifest.json"));
    let s = &m["material"]["settings"];
    // Log-probs differ between devices and dtypes: a GPU run must not reuse CPU ones.
    assert_eq!(s["device"], "cpu", "{m}");
    assert_eq!(s["dtype"], "f32", "{m}");
}

/// A penalty that is on is in the generate and eval keys (local and openai backends); one set
/// to its off value changes no key, so every key from before penalties existed still holds.
#[test]
fn penalties_are_in_the_keys_only_when_on() {
    let d = tempdir();
    let openai = [
        "generate.backend=openai",
        "generate.openai.endpoints=[\"http://127.0.0.1:9/v1\"]",
        "generate.openai.model=smollm2",
    ];
    for backend in [&[][..], &openai[..]] {
        let keys = |extra: &[&str]| status_keys(d.path(), &[backend, extra].concat());
        let base = keys(&[]);
        assert!(
            base["generate"].is_string() && base["eval"].is_string(),
            "{base}"
        );
        let off = keys(&[
            "generate.repetition_penalty=1.0",
            "generate.frequency_penalty=0",
            "generate.presence_penalty=0.0",
        ]);
        assert_eq!(off, base, "penalties at their off values: {backend:?}");
        let mut seen = vec![base["generate"].clone()];
        for on in [
            "generate.repetition_penalty=1.2",
            "generate.frequency_penalty=0.5",
            "generate.presence_penalty=-0.5",
        ] {
            let k = keys(&[on]);
            assert!(!seen.contains(&k["generate"]), "{on} {backend:?}: {k}");
            assert_ne!(k["eval"], base["eval"], "{on} {backend:?}");
            // What comes before generation does not move.
            assert_eq!(k["prompts"], base["prompts"]);
            seen.push(k["generate"].clone());
        }
    }
}

/// The published recipe's keys (the quick preset shrunk by TINY_QUICK, on the CPU): a new
/// setting that leaks into a key, or a renamed one, would make every user's cache stale and the
/// published outputs other bytes. Pinned when items and styles became settings (unchanged by
/// them), and moved on purpose once since: `generate.weights = "auto"` runs a GGUF on its blocks
/// on every CPU with AVX2 (issue 25), and the generate key says `blocks` without the batch size
/// (the text no longer depends on it); and again when the eval's reviews moved to those weights
/// too (its key names them). A CPU without AVX2 keeps dense weights and other keys.
#[test]
fn the_default_recipes_keys_are_pinned() {
    let d = tempdir();
    let cfg = repo().join("pipeline.toml");
    let mut args = vec![
        "--config".to_string(),
        cfg.display().to_string(),
        "--preset".into(),
        "quick".into(),
        "--set".into(),
        format!("generate.model={}", smollm2().display()),
    ];
    for s in TINY_QUICK {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let keys: Vec<(String, String)> = status_json(d.path(), &args)
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["key"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = [
        ("scrape", "49f1f37f36e3a42d"),
        ("prompts", "bf6919bccaa0dd88"),
        ("generate", "a8740e0462c8441b"),
        ("merge", "c3af6c2e888c8a0e"),
        ("split", "d159412d576e9921"),
        ("train", "87e6ca9d11858045"),
        ("eval", "994f4d34853132d5"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(keys, want);
}

/// Switching the loss, or a loss's own setting, moves the train key (and eval's, downstream)
/// and nothing before it; a setting the loss does not read moves nothing.
#[test]
fn the_loss_is_in_the_train_and_eval_keys_only() {
    let d = tempdir();
    let base = status_keys(d.path(), &[]);
    let upstream = ["scrape", "prompts", "generate", "merge", "split"];
    let mut seen = vec![base["train"].clone()];
    for sets in [
        &["train.loss=ipo"][..],
        &["train.loss=simpo"],
        &["train.loss=orpo"],
        &["train.loss=[\"sigmoid\", \"sft\"]"],
        &[
            "train.loss=[\"sigmoid\", \"sft\"]",
            "train.loss_weights=[1.0, 0.5]",
        ],
        &["train.loss=simpo", "train.simpo_gamma=1.0"],
        &["train.loss=simpo", "train.cpo_alpha=0"],
        &["train.loss=discopop"],
        &["train.loss=discopop", "train.discopop_tau=0.1"],
    ] {
        let k = status_keys(d.path(), sets);
        for s in upstream {
            assert_eq!(k[s], base[s], "{sets:?} moved {s}");
        }
        assert!(!seen.contains(&k["train"]), "{sets:?}: train key {k}");
        assert_ne!(k["eval"], base["eval"], "{sets:?}");
        seen.push(k["train"].clone());
    }
    // SimPO's and DiscoPOP's settings are read by no other loss: not in its keys.
    let unread = status_keys(
        d.path(),
        &[
            "train.simpo_gamma=1.0",
            "train.cpo_alpha=0",
            "train.discopop_tau=0.1",
        ],
    );
    assert_eq!(unread, base);
}

/// A reference-free loss computes no reference log-probs: no train-ref artifact, and the plan
/// says so before anything is built.
#[test]
fn a_reference_free_run_builds_no_train_ref() {
    let d = tempdir();
    let cfg = repo().join("pipeline.toml");
    let model = format!("generate.model={}", smollm2().display());
    let work = d.path().join("w");
    let mut args = vec![
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--preset",
        "quick",
        "--workdir",
        work.to_str().unwrap(),
        "--until",
        "train",
        "--set",
        &model,
    ];
    for s in [
        "scrape.count=4",
        "split.train=2",
        "split.test=1",
        "generate.max_new_tokens=4",
        "train.max_steps=1",
        "train.batch_size=1",
        "train.loss=orpo",
    ] {
        args.extend(["--set", s]);
    }
    let err = pipeline_ok(d.path(), &args);
    assert!(
        err.contains("train without reference log-probs (train-ref): train.loss = orpo needs none"),
        "{err}"
    );
    assert!(built_dirs(&work, "train-ref").is_empty(), "{err}");
    assert_eq!(built_dirs(&work, "train").len(), 1);
    // ORPO's own metrics, by its trainer's names.
    let metrics =
        std::fs::read_to_string(built_dirs(&work, "train")[0].join("metrics.jsonl")).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().rfind(|l| l.contains("\"loss\"")).unwrap()).unwrap();
    for k in [
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
        "rewards/accuracies",
    ] {
        assert!(last[k].as_f64().is_some_and(f64::is_finite), "{k}: {last}");
    }
}
