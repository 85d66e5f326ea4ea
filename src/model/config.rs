//! Llama hyper-parameters, read from a HF `config.json` or a GGUF header.

use crate::error::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_maxpos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_maxpos() -> usize {
    2048
}

impl LlamaConfig {
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: HfConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Llama config.json", path.display()))?;
        let arch_ok = c.model_type.as_deref() == Some("llama")
            || c.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !arch_ok {
            crate::error::unsupported!(
                "{}: unsupported architecture (model_type {:?}, architectures {:?}); only Llama-architecture models are supported",
                path.display(),
                c.model_type.unwrap_or_default(),
                c.architectures
            );
        }
        if let Some(rs) = c.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            crate::error::unsupported!("{}: rope_scaling {rs} is not supported", path.display());
        }
        if let Some(act) = c.hidden_act.as_deref().filter(|a| *a != "silu") {
            crate::error::unsupported!(
                "{}: hidden_act {act:?} is not supported (only silu)",
                path.display()
            );
        }
        let kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let cfg = Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: kv,
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        cfg.check().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    pub(crate) fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            crate::error::unsupported!(
                "{}: unsupported GGUF architecture {arch:?}; only \"llama\" is supported",
                path.display()
            );
        }
        let get = |k: &str| -> Result<&gguf_file::Value> {
            md.get(k)
                .with_context(|| format!("{}: GGUF metadata lacks {k}", path.display()))
        };
        let u = |k: &str| -> Result<usize> { Ok(get(k)?.to_u32()? as usize) };
        let heads = u("llama.attention.head_count")?;
        let hidden = u("llama.embedding_length")?;
        let vocab = match md.get("llama.vocab_size") {
            Some(v) => v.to_u32()? as usize,
            None => get("tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        let cfg = Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("llama.feed_forward_length")?,
            num_hidden_layers: u("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: md
                .get("llama.attention.head_count_kv")
                .map(|v| v.to_u32().map(|x| x as usize))
                .transpose()?
                .unwrap_or(heads),
            head_dim: md
                .get("llama.rope.dimension_count")
                .map(|v| v.to_u32().map(|x| x as usize))
                .transpose()?
                .unwrap_or(hidden / heads),
            rms_norm_eps: get("llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_theta: md
                .get("llama.rope.freq_base")
                .map(|v| v.to_f32())
                .transpose()?
                .unwrap_or(10000.0) as f64,
            max_position_embeddings: md
                .get("llama.context_length")
                .map(|v| v.to_u32().map(|x| x as usize))
                .transpose()?
                .unwrap_or(2048),
            tie_word_embeddings: !content
                .tensor_infos
                .contains_key(super::names::gguf::OUTPUT),
        };
        cfg.check().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim);
        }
        Ok(())
    }

    /// TinyLlama-1.1B-Chat-v1.0's shape, for benchmarks with random weights.
    /// Parameters in the network (embeddings, attention, MLP, norms, and an untied head).
    pub(crate) fn n_params(&self) -> u64 {
        let (h, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers as u64 * layer + h + head
    }

    pub fn tinyllama() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 22,
            num_attention_heads: 32,
            num_key_value_heads: 4,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
        }
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }
}
