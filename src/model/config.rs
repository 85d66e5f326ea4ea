//! Llama hyper-parameters, read from a HF `config.json` or a GGUF header.

use super::lora::Projection;
use super::names::Weight;
use crate::error::{bail, ensure, Context, Error, Result};
use candle_core::quantized::gguf_file;
use serde::Deserialize;
use std::path::Path;

/// What to do about a model file that cannot be used, said after what is wrong with it.
pub(crate) const FIX: &str =
    "the file is damaged or was not written for this engine: re-download or re-convert the model";

/// The longest context accepted: RoPE's tables hold a row per position (half a GiB at this
/// many positions and head dim 128), beyond every Llama model there is.
const MAX_CONTEXT: usize = 1 << 22;

/// What a file format calls each hyper-parameter, for error messages.
struct Keys {
    vocab: &'static str,
    hidden: &'static str,
    intermediate: &'static str,
    layers: &'static str,
    heads: &'static str,
    kv_heads: &'static str,
    head_dim: &'static str,
    eps: &'static str,
    theta: &'static str,
    context: &'static str,
}

const HF_KEYS: Keys = Keys {
    vocab: "vocab_size",
    hidden: "hidden_size",
    intermediate: "intermediate_size",
    layers: "num_hidden_layers",
    heads: "num_attention_heads",
    kv_heads: "num_key_value_heads",
    head_dim: "head_dim",
    eps: "rms_norm_eps",
    theta: "rope_theta",
    context: "max_position_embeddings",
};

const GGUF_KEYS: Keys = Keys {
    vocab: "llama.vocab_size",
    hidden: "llama.embedding_length",
    intermediate: "llama.feed_forward_length",
    layers: "llama.block_count",
    heads: "llama.attention.head_count",
    kv_heads: "llama.attention.head_count_kv",
    head_dim: "llama.rope.dimension_count",
    eps: "llama.attention.layer_norm_rms_epsilon",
    theta: "llama.rope.freq_base",
    context: "llama.context_length",
};

/// The head dim a file leaves out: the hidden size split evenly over the heads.
fn derived_head_dim(hidden: usize, heads: usize, keys: &Keys) -> Result<usize> {
    ensure!(heads > 0, "{} is 0; it must be positive", keys.heads);
    ensure!(
        hidden.is_multiple_of(heads),
        "{} {hidden} is not a multiple of {} {heads}",
        keys.hidden,
        keys.heads
    );
    Ok(hidden / heads)
}

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
        let at = |e: Error| Error::Invalid(format!("{}: {e}; {FIX}", path.display()));
        let kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        let head_dim = match c.head_dim {
            Some(d) => d,
            None => derived_head_dim(c.hidden_size, c.num_attention_heads, &HF_KEYS).map_err(at)?,
        };
        let cfg = Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        cfg.check(&HF_KEYS).map_err(at)?;
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
        let at = |e: Error| Error::Invalid(format!("{}: {e}; {FIX}", path.display()));
        let get = |k: &str| -> Result<&gguf_file::Value> {
            md.get(k)
                .with_context(|| format!("{}: GGUF metadata lacks {k}; {FIX}", path.display()))
        };
        // A key of the wrong type is named with the type found (never its value: it may be the
        // whole vocabulary).
        let typed = |k: &str, v: &gguf_file::Value, want: &str| {
            Error::Invalid(format!(
                "{}: GGUF metadata {k} is a {:?}, expected {want}; {FIX}",
                path.display(),
                v.value_type()
            ))
        };
        let opt_u = |k: &str| -> Result<Option<usize>> {
            md.get(k)
                .map(|v| {
                    v.to_u32()
                        .map(|x| x as usize)
                        .map_err(|_| typed(k, v, "u32"))
                })
                .transpose()
        };
        let u = |k: &str| -> Result<usize> {
            opt_u(k)?.with_context(|| format!("{}: GGUF metadata lacks {k}; {FIX}", path.display()))
        };
        let opt_f = |k: &str| -> Result<Option<f64>> {
            md.get(k)
                .map(|v| v.to_f32().map(|x| x as f64).map_err(|_| typed(k, v, "f32")))
                .transpose()
        };
        let heads = u(GGUF_KEYS.heads)?;
        let hidden = u(GGUF_KEYS.hidden)?;
        let vocab = match opt_u(GGUF_KEYS.vocab)? {
            Some(v) => v,
            None => {
                let k = "tokenizer.ggml.tokens";
                let v = get(k)?;
                v.to_vec().map_err(|_| typed(k, v, "an array"))?.len()
            }
        };
        let head_dim = match opt_u(GGUF_KEYS.head_dim)? {
            Some(d) => d,
            None => derived_head_dim(hidden, heads, &GGUF_KEYS).map_err(at)?,
        };
        let eps_key = GGUF_KEYS.eps;
        let cfg = Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u(GGUF_KEYS.intermediate)?,
            num_hidden_layers: u(GGUF_KEYS.layers)?,
            num_attention_heads: heads,
            num_key_value_heads: opt_u(GGUF_KEYS.kv_heads)?.unwrap_or(heads),
            head_dim,
            rms_norm_eps: opt_f(eps_key)?.with_context(|| {
                format!("{}: GGUF metadata lacks {eps_key}; {FIX}", path.display())
            })?,
            rope_theta: opt_f(GGUF_KEYS.theta)?.unwrap_or(10000.0),
            max_position_embeddings: opt_u(GGUF_KEYS.context)?.unwrap_or(2048),
            tie_word_embeddings: !content
                .tensor_infos
                .contains_key(super::names::gguf::OUTPUT),
        };
        cfg.check(&GGUF_KEYS).map_err(at)?;
        Ok(cfg)
    }

    /// What the network needs of these numbers: every count positive, the heads in whole
    /// groups, every weight's size within `usize`, RoPE's numbers usable. Messages name the key
    /// as `keys` (the file's format) calls it.
    fn check(&self, keys: &Keys) -> Result<()> {
        for (key, n) in [
            (keys.vocab, self.vocab_size),
            (keys.hidden, self.hidden_size),
            (keys.intermediate, self.intermediate_size),
            (keys.layers, self.num_hidden_layers),
            (keys.heads, self.num_attention_heads),
            (keys.kv_heads, self.num_key_value_heads),
            (keys.head_dim, self.head_dim),
            (keys.context, self.max_position_embeddings),
        ] {
            ensure!(n > 0, "{key} is 0; it must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "{} {} is not a multiple of {} {}",
                keys.heads,
                self.num_attention_heads,
                keys.kv_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("{} {} must be even for RoPE", keys.head_dim, self.head_dim);
        }
        // The RoPE tables hold a row per position, built at load: a context no model has must
        // not size an allocation.
        ensure!(
            self.max_position_embeddings <= MAX_CONTEXT,
            "{} {} is beyond the {MAX_CONTEXT} positions this engine supports",
            keys.context,
            self.max_position_embeddings
        );
        ensure!(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0,
            "{} is {}; it must be a finite number, zero or more",
            keys.eps,
            self.rms_norm_eps
        );
        ensure!(
            self.rope_theta.is_finite() && self.rope_theta > 0.0,
            "{} is {}; it must be a positive finite number",
            keys.theta,
            self.rope_theta
        );
        let mul = |a: (&str, usize), b: (&str, usize)| -> Result<usize> {
            a.1.checked_mul(b.1)
                .with_context(|| format!("{} {} x {} {} overflows", a.0, a.1, b.0, b.1))
        };
        let (h, v, i) = (
            (keys.hidden, self.hidden_size),
            (keys.vocab, self.vocab_size),
            (keys.intermediate, self.intermediate_size),
        );
        let q = mul(
            (keys.heads, self.num_attention_heads),
            (keys.head_dim, self.head_dim),
        )?;
        let kv = mul(
            (keys.kv_heads, self.num_key_value_heads),
            (keys.head_dim, self.head_dim),
        )?;
        mul(v, h)?;
        mul(i, h)?;
        mul(("the query width", q), h)?;
        mul(("the key/value width", kv), h)?;
        Ok(())
    }

    /// Every weight the network reads, with the shape this config implies for it (rows first,
    /// as candle and Hugging Face hold it), in load order. `f` ends the walk at its first error,
    /// so a config claiming billions of layers costs one look-up, not a list.
    pub(crate) fn each_weight(
        &self,
        mut f: impl FnMut(Weight, &[usize]) -> Result<()>,
    ) -> Result<()> {
        let mul = |a: usize, b: usize| -> Result<usize> {
            a.checked_mul(b)
                .with_context(|| format!("the weight size {a} x {b} overflows"))
        };
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = mul(self.num_attention_heads, self.head_dim)?;
        let kv = mul(self.num_key_value_heads, self.head_dim)?;
        for (r, c) in [(v, h), (q, h), (kv, h), (i, h)] {
            mul(r, c)?;
        }
        f(Weight::Embed, &[v, h])?;
        for l in 0..self.num_hidden_layers {
            for p in Projection::ALL {
                let (rows, cols) = self.projection_shape(p);
                f(Weight::Proj(l, p), &[rows, cols])?;
            }
            f(Weight::InputNorm(l), &[h])?;
            f(Weight::PostNorm(l), &[h])?;
        }
        f(Weight::Norm, &[h])?;
        f(Weight::Head, &[v, h])
    }

    /// `(out, in)` of a layer's projection `p` (after [`LlamaConfig::each_weight`] or
    /// `check` made sure the products fit).
    pub(crate) fn projection_shape(&self, p: Projection) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match p {
            Projection::QProj => (q, h),
            Projection::KProj | Projection::VProj => (kv, h),
            Projection::OProj => (h, q),
            Projection::GateProj | Projection::UpProj => (i, h),
            Projection::DownProj => (h, i),
        }
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
