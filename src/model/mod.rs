//! The model engine: loading Llama-architecture checkpoints (Hub id, folder, GGUF), the tokenizer
//! and chat template, a batched forward pass, and generation. Generation and DPO training share the
//! same [`llama::Llama`].

pub mod attention;
pub mod chat;
pub mod config;
pub mod generate;
pub mod llama;
pub mod prefix;
pub mod source;
pub mod tokenizer;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Tensor};
use config::LlamaConfig;
use llama::{Layer, Linear, Llama, Weight};
use serde::{Deserialize, Serialize};
use source::{ModelFiles, ModelMeta, ModelSource};
use std::collections::HashMap;
use std::sync::Arc;

/// How to hold a GGUF's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsMode {
    /// Quantized matmuls: least memory, fastest for one row at a time.
    Quantized,
    /// Dequantized to the compute dtype: fastest for batches, and required for training.
    Dense,
}

/// `device` settings: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when built with `--features cuda` and a GPU answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// Open the device (CUDA only when built with `--features cuda`).
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda => {
                if !cfg!(feature = "cuda") {
                    bail!("device \"cuda\" needs a build with `cargo build --release --features cuda`");
                }
                Ok(Device::new_cuda(0).context("opening CUDA device 0")?)
            }
            DeviceChoice::Auto => {
                if cfg!(feature = "cuda") {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// `generate.weights`: how a GGUF's weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsChoice {
    /// Dense f32: measured faster than candle's Q4_1 matmuls at every batch size on the CPU
    /// (docs/PERF.md), and the same text at any batch size.
    #[default]
    Auto,
    Quantized,
    F32,
}

impl WeightsChoice {
    /// Only GGUF files have quantized weights to keep; everything else is dense.
    pub fn mode(self, gguf: bool) -> WeightsMode {
        match self {
            WeightsChoice::Quantized if gguf => WeightsMode::Quantized,
            _ => WeightsMode::Dense,
        }
    }
}

/// `attention`: which attention implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionChoice {
    /// The fused kernel where it runs (CPU, f32/f64), composed candle ops elsewhere (GPU, bf16).
    #[default]
    Auto,
    /// Our fused CPU kernel (`attention.rs`); refused where it does not run.
    Fused,
    /// Composed candle ops: what the GPU path runs, selectable on the CPU to exercise it.
    Composed,
}

/// Everything that decides how a model is loaded, built once from the resolved recipe.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    pub weights: WeightsMode,
    pub attention: AttentionChoice,
    /// Prefill a batch's shared prompt prefixes once (`model/prefix.rs`).
    pub share_prefixes: bool,
}

impl LoadOptions {
    /// Dense weights in the device's default dtype, default engine switches.
    pub fn new(device: Device) -> Self {
        Self {
            dtype: default_dtype(&device),
            device,
            weights: WeightsMode::Dense,
            attention: AttentionChoice::Auto,
            share_prefixes: true,
        }
    }

    pub fn cpu_f32() -> Self {
        Self::new(Device::Cpu)
    }
}

/// bf16 on a GPU, f32 on the CPU (no fast bf16 matmul there).
pub fn default_dtype(dev: &Device) -> DType {
    if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// A loaded model: network, tokenizer, chat template and where it came from.
pub struct Model {
    pub llama: Llama,
    pub meta: ModelMeta,
    pub source: ModelSource,
    /// Generation prefills a batch's shared prompt prefixes once (a load option).
    pub share_prefixes: bool,
}

impl Model {
    pub fn load(src: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let (llama, meta) = match &src.files {
            ModelFiles::Gguf(p) => {
                let mut f = std::fs::File::open(p)?;
                let content = gguf_file::Content::read(&mut f).map_err(|e| {
                    anyhow::anyhow!("{}: not a readable GGUF file: {e}", p.display())
                })?;
                let meta = source::meta_from_gguf(&content, p)?;
                let llama = load_gguf(&content, &mut f, &meta.config, opts)
                    .with_context(|| format!("loading weights from {}", p.display()))?;
                (llama, meta)
            }
            ModelFiles::Hf { weights, .. } => {
                let meta = source::load_meta(src)?;
                let mut map = HashMap::new();
                for w in weights {
                    let t = candle_core::safetensors::load(w, &opts.device)
                        .with_context(|| format!("reading {}", w.display()))?;
                    map.extend(t);
                }
                let llama = from_hf_tensors(&meta.config, map, &opts.device, opts.dtype)?;
                (llama, meta)
            }
        };
        let mut llama = llama;
        llama.fused_attention = match opts.attention {
            AttentionChoice::Composed => false,
            AttentionChoice::Auto => attention::supported(&opts.device, opts.dtype),
            AttentionChoice::Fused => {
                if !attention::supported(&opts.device, opts.dtype) {
                    bail!(
                        "attention = \"fused\" runs on the CPU in f32/f64 only; use \"auto\" or \"composed\""
                    );
                }
                true
            }
        };
        Ok(Self {
            llama,
            meta,
            source: src.clone(),
            share_prefixes: opts.share_prefixes,
        })
    }
}

/// Undo llama.cpp's q/k permutation (interleaved RoPE layout -> HF rotate-half layout).
/// w: [heads * hd, in]
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

/// The inverse: HF layout -> llama.cpp's interleaved layout.
pub fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, 2, hd / 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

/// Reads named tensors from an open GGUF file, as the load options ask for them.
struct GgufTensors<'a> {
    content: &'a gguf_file::Content,
    file: &'a mut std::fs::File,
    opts: &'a LoadOptions,
}

impl GgufTensors<'_> {
    fn quantized(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(self.file, name, &self.opts.device)
            .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))
    }

    /// A small tensor (norm weights, embeddings), always dequantized.
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self
            .quantized(name)?
            .dequantize(&self.opts.device)?
            .to_dtype(self.opts.dtype)?)
    }

    /// A projection; q/k (`permute_heads`) are un-permuted when dequantized to the HF layout.
    fn linear(
        &mut self,
        q: candle_core::quantized::QTensor,
        permute_heads: Option<usize>,
    ) -> Result<Linear> {
        if self.opts.weights == WeightsMode::Quantized {
            let (o, i) = q.shape().dims2()?;
            return Ok(Linear {
                weight: Weight::Quant(Arc::new(QMatMul::from_qtensor(q)?)),
                lora: None,
                out_features: o,
                in_features: i,
            });
        }
        let mut w = q.dequantize(&self.opts.device)?;
        if let Some(h) = permute_heads {
            w = unpermute_qk(&w, h)?;
        }
        Linear::dense(w.to_dtype(self.opts.dtype)?)
    }

    fn projection(&mut self, name: &str, permute_heads: Option<usize>) -> Result<Linear> {
        let q = self.quantized(name)?;
        self.linear(q, permute_heads)
    }
}

fn load_gguf(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
    cfg: &LlamaConfig,
    opts: &LoadOptions,
) -> Result<Llama> {
    let mut t = GgufTensors {
        content,
        file,
        opts,
    };
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("blk.{i}");
        layers.push(Layer {
            q_proj: t.projection(&format!("{p}.attn_q.weight"), Some(nh))?,
            k_proj: t.projection(&format!("{p}.attn_k.weight"), Some(nkv))?,
            v_proj: t.projection(&format!("{p}.attn_v.weight"), None)?,
            o_proj: t.projection(&format!("{p}.attn_output.weight"), None)?,
            gate_proj: t.projection(&format!("{p}.ffn_gate.weight"), None)?,
            up_proj: t.projection(&format!("{p}.ffn_up.weight"), None)?,
            down_proj: t.projection(&format!("{p}.ffn_down.weight"), None)?,
            input_layernorm: t.dense(&format!("{p}.attn_norm.weight"))?,
            post_attention_layernorm: t.dense(&format!("{p}.ffn_norm.weight"))?,
        });
    }
    let norm = t.dense("output_norm.weight")?;
    let embed_q = t.quantized("token_embd.weight")?;
    let embed = embed_q.dequantize(&opts.device)?.to_dtype(opts.dtype)?;
    // Tied embeddings: no output.weight, the head reuses token_embd.
    let head_q = if content.tensor_infos.contains_key("output.weight") {
        t.quantized("output.weight")?
    } else {
        embed_q
    };
    let lm_head = t.linear(head_q, None)?;
    let interleaved_rope = opts.weights == WeightsMode::Quantized;
    Llama::new(
        cfg.clone(),
        embed,
        layers,
        norm,
        lm_head,
        interleaved_rope,
        &opts.device,
        opts.dtype,
    )
}

/// Build from HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...).
pub fn from_hf_tensors(
    cfg: &LlamaConfig,
    mut map: HashMap<String, Tensor>,
    dev: &Device,
    dtype: DType,
) -> Result<Llama> {
    let mut take = |name: &str| -> Result<Tensor> {
        let t = map
            .remove(name)
            .with_context(|| format!("checkpoint lacks tensor {name}"))?;
        Ok(t.to_device(dev)?.to_dtype(dtype)?)
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut lin =
            |n: &str| -> Result<Linear> { Linear::dense(take(&format!("{p}.{n}.weight"))?) };
        layers.push(Layer {
            q_proj: lin("self_attn.q_proj")?,
            k_proj: lin("self_attn.k_proj")?,
            v_proj: lin("self_attn.v_proj")?,
            o_proj: lin("self_attn.o_proj")?,
            gate_proj: lin("mlp.gate_proj")?,
            up_proj: lin("mlp.up_proj")?,
            down_proj: lin("mlp.down_proj")?,
            input_layernorm: take(&format!("{p}.input_layernorm.weight"))?,
            post_attention_layernorm: take(&format!("{p}.post_attention_layernorm.weight"))?,
        });
    }
    let embed = take("model.embed_tokens.weight")?;
    let norm = take("model.norm.weight")?;
    let lm_head = if cfg.tie_word_embeddings {
        match map.remove("lm_head.weight") {
            Some(t) => Linear::dense(t.to_device(dev)?.to_dtype(dtype)?)?,
            None => Linear::dense(embed.clone())?,
        }
    } else {
        Linear::dense(take("lm_head.weight")?)?
    };
    Llama::new(cfg.clone(), embed, layers, norm, lm_head, false, dev, dtype)
}

/// HF-named tensors of a random Llama (tests and speed benchmarks).
pub fn random_hf_tensors(
    cfg: &LlamaConfig,
    seed: u64,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut mk = |shape: (usize, usize), std: f32| -> Result<Tensor> {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std)
            .collect();
        Ok(Tensor::from_vec(v, shape, dev)?)
    };
    let (h, im, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let s = 0.5 / (h as f32).sqrt() * 1.7;
    let mut m = HashMap::new();
    m.insert(
        "model.embed_tokens.weight".into(),
        mk((cfg.vocab_size, h), 1.0)?,
    );
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        m.insert(format!("{p}.self_attn.q_proj.weight"), mk((nh * hd, h), s)?);
        m.insert(
            format!("{p}.self_attn.k_proj.weight"),
            mk((nkv * hd, h), s)?,
        );
        m.insert(
            format!("{p}.self_attn.v_proj.weight"),
            mk((nkv * hd, h), s)?,
        );
        m.insert(format!("{p}.self_attn.o_proj.weight"), mk((h, nh * hd), s)?);
        m.insert(format!("{p}.mlp.gate_proj.weight"), mk((im, h), s)?);
        m.insert(format!("{p}.mlp.up_proj.weight"), mk((im, h), s)?);
        m.insert(
            format!("{p}.mlp.down_proj.weight"),
            mk((h, im), 0.5 / (im as f32).sqrt() * 1.7)?,
        );
        m.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(h, DType::F32, dev)?,
        );
        m.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(h, DType::F32, dev)?,
        );
    }
    m.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, DType::F32, dev)?,
    );
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".into(), mk((cfg.vocab_size, h), s)?);
    }
    Ok(m)
}
