//! The model engine: loading Llama-architecture checkpoints (Hub id, folder, GGUF), the tokenizer
//! and chat template, a batched forward pass, and generation. Generation and DPO training share the
//! same [`llama::Llama`], which carries an optional LoRA `adapter::Adapter` (PEFT's files).

pub(crate) mod adapter;
pub(crate) mod attention;
pub mod chat;
pub mod config;
mod cpu_forward;
pub(crate) mod fused;
pub mod generate;
pub(crate) mod limits;
pub mod llama;
pub mod lora;
mod names;
pub mod prefix;
pub(crate) mod quant;
pub(crate) mod remote;
pub mod source;
pub mod special_text;
mod spin_pool;
pub(crate) mod tokenizer;
pub(crate) mod vexp;

use crate::error::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Tensor};
use config::LlamaConfig;
use llama::{Layer, Linear, Llama};
use lora::Projection;
use serde::{Deserialize, Serialize};
use source::{ModelFiles, ModelMeta, ModelSource};
use std::collections::HashMap;
use std::path::Path;

/// How to hold a GGUF's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsMode {
    /// Quantized matmuls: least memory, fastest for one row at a time.
    Quantized,
    /// The GGUF's own Q4_1 and Q8_0 blocks (others requantized to Q8_0) for decoding steps,
    /// through our SIMD kernels (`quant.rs`, `cpu_forward.rs`), and the same weights
    /// dequantized for prefill, where dense gemm is faster: both copies in memory.
    Mixed,
    /// As `Mixed`, with every projection requantized to Q8_0 (closer to the dense weights).
    Q8,
    /// As `Mixed`, with prefill on the blocks too: every product is llama.cpp's arithmetic
    /// (the file's blocks against 8-bit activations). Where the tiled AVX-512 VNNI kernel runs
    /// (`quant.rs`), prefill goes about twice as fast as dense f32 gemm.
    Blocks,
    /// Dequantized to the compute dtype: fastest for batches, and required for training.
    Dense,
}

impl WeightsMode {
    /// The text may depend on how rows are batched: candle's quantized matmul rounds
    /// differently for one row than for several, and decoding on blocks (each row on its own)
    /// turns the float-level differences of a batched prefill into other 8-bit roundings,
    /// which can change a token at a near-tie. Dense weights give every row its solo text.
    pub(crate) fn batch_dependent(self) -> bool {
        !matches!(self, WeightsMode::Dense)
    }

    /// How a GGUF loaded for one person waiting (`sample`, `serve`) with
    /// `generate.weights = "auto"` is held: on the CPU in f32, on its blocks, prefill included
    /// where the tiled AVX-512 VNNI kernel runs (`Blocks`: faster than dense gemm there), for
    /// decoding only elsewhere (`Mixed`); `None` keeps the batch stages' dense weights.
    pub(crate) fn interactive_auto(dev: &Device, dtype: DType) -> Option<WeightsMode> {
        if !(dev.is_cpu() && dtype == DType::F32) {
            return None;
        }
        Some(if quant::prefill_on_blocks_pays() {
            WeightsMode::Blocks
        } else {
            WeightsMode::Mixed
        })
    }

    /// Only candle's quantized matmuls keep q/k in the GGUF's interleaved-RoPE row order; the
    /// other modes reorder the rows to the Hugging Face layout, where adapters apply.
    pub(crate) fn interleaved_rope(self) -> bool {
        matches!(self, WeightsMode::Quantized)
    }
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
    pub(crate) fn open(self) -> Result<Device> {
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

/// `dtype` settings: what the base weights are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// bf16 on a GPU, f32 on the CPU.
    #[default]
    Auto,
    F32,
    /// What the GPU runs; selectable on the CPU (slowly: candle widens bf16 matmuls to f32
    /// there) to exercise that path where no GPU is at hand.
    Bf16,
}

impl DTypeChoice {
    pub(crate) fn resolve(self, dev: &Device) -> DType {
        match self {
            DTypeChoice::Auto => default_dtype(dev),
            DTypeChoice::F32 => DType::F32,
            DTypeChoice::Bf16 => DType::BF16,
        }
    }
}

/// `generate.weights`: how a GGUF's weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WeightsChoice {
    /// Dense f32 for the batch stages (every row its solo text, at any batch size); `Blocks`
    /// (or `Mixed` without AVX-512 VNNI) for `sample` and `serve` on the CPU
    /// (`Recipe::load_interactive`), several times faster for a few streams (docs/PERF.md).
    #[default]
    Auto,
    Quantized,
    /// The file's blocks for decoding, dense for prefill (see [`WeightsMode::Mixed`]).
    Mixed,
    /// The file's blocks for prefill and decoding (see [`WeightsMode::Blocks`]).
    Blocks,
    /// Requantized to Q8_0 at load (see [`WeightsMode::Q8`]).
    Q8,
    F32,
}

impl WeightsChoice {
    /// Only GGUF files have quantized weights to keep; everything else is dense.
    pub(crate) fn mode(self, gguf: bool) -> WeightsMode {
        match self {
            WeightsChoice::Quantized if gguf => WeightsMode::Quantized,
            WeightsChoice::Mixed if gguf => WeightsMode::Mixed,
            WeightsChoice::Blocks if gguf => WeightsMode::Blocks,
            WeightsChoice::Q8 if gguf => WeightsMode::Q8,
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
    pub(crate) fn new(device: Device) -> Self {
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
pub(crate) fn default_dtype(dev: &Device) -> DType {
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
                // Buffered: the metadata is tens of thousands of small reads (the vocabulary).
                let mut f = std::io::BufReader::new(std::fs::File::open(p)?);
                let content = gguf_file::Content::read(&mut f).map_err(|e| {
                    crate::error::err!("{}: not a readable GGUF file: {e}", p.display())
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

    /// Read a PEFT adapter folder and attach it (replacing any attached adapter).
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let adapter = adapter::Adapter::load(dir, &self.llama.device)?;
        self.llama
            .attach(adapter)
            .with_context(|| format!("attaching the adapter in {}", dir.display()))
    }

    /// Save the attached adapter as a PEFT folder, naming this model as its base.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        self.llama
            .adapter()
            .context("the model carries no adapter to save")?
            .save(dir, &self.source.spec)
    }

    /// Write the model as a plain HF folder: config.json, model.safetensors, tokenizer files.
    /// An attached adapter is not part of it: merge it first ([`Llama::merge_adapter`]).
    pub fn write_hf_folder(&self, out: &Path) -> Result<()> {
        let l = &self.llama;
        if l.rope_interleaved {
            bail!(
                "cannot export weights held in the GGUF RoPE layout; load the model with dense weights"
            );
        }
        if l.adapter().is_some() {
            bail!("the model carries an adapter: merge it into the weights before writing them");
        }
        std::fs::create_dir_all(out)?;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        map.insert(
            names::EMBED_TOKENS.into(),
            l.embed_tokens.to_dtype(DType::F32)?,
        );
        map.insert(names::NORM.into(), l.norm.to_dtype(DType::F32)?);
        map.insert(names::LM_HEAD.into(), l.lm_head.dense_f32()?);
        for (i, layer) in l.layers.iter().enumerate() {
            for p in Projection::ALL {
                map.insert(names::weight(i, p), layer.proj(p).dense_f32()?);
            }
            map.insert(
                names::input_layernorm(i),
                layer.input_layernorm.to_dtype(DType::F32)?,
            );
            map.insert(
                names::post_attention_layernorm(i),
                layer.post_attention_layernorm.to_dtype(DType::F32)?,
            );
        }
        let mut cfg = l.cfg.clone();
        cfg.tie_word_embeddings = false;
        let st = out.join("model.safetensors");
        crate::fsutil::write_atomic_via(&st, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))?;
        crate::fsutil::write_json_pretty(&out.join("config.json"), &cfg.to_hf_json())?;
        let tok = &self.meta.tok;
        let tj = out.join("tokenizer.json");
        tok.inner
            .save(&tj, true)
            .map_err(|e| crate::error::err!("writing {}: {e}", tj.display()))?;
        let mut tc = serde_json::json!({
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "add_bos_token": tok.add_bos,
            "add_eos_token": false,
        });
        if let Some(c) = &self.meta.chat {
            tc["chat_template"] = serde_json::Value::String(c.source().to_string());
        }
        crate::fsutil::write_json_pretty(&out.join("tokenizer_config.json"), &tc)?;
        Ok(())
    }
}

/// Undo llama.cpp's q/k permutation (interleaved RoPE layout -> HF rotate-half layout).
/// w: [heads * hd, in]
fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

/// The row order [`unpermute_qk`] makes: row `i` of the result is row `order[i]` of the input.
fn unpermute_order(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for t in 0..2 {
            for i in 0..hd / 2 {
                order.push(h * hd + i * 2 + t);
            }
        }
    }
    order
}

/// Reads named tensors from an open GGUF file, as the load options ask for them.
struct GgufTensors<'a> {
    content: &'a gguf_file::Content,
    file: &'a mut std::io::BufReader<std::fs::File>,
    opts: &'a LoadOptions,
}

impl GgufTensors<'_> {
    fn quantized(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(self.file, name, &self.opts.device)
            .map_err(|e| crate::error::err!("tensor {name}: {e}"))
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
            let dims = q.shape().dims2()?;
            return Ok(Linear::quantized(QMatMul::from_qtensor(q)?, dims));
        }
        let mut w = q.dequantize(&self.opts.device)?;
        let (o, i) = w.dims2()?;
        let blocks = matches!(
            self.opts.weights,
            WeightsMode::Mixed | WeightsMode::Q8 | WeightsMode::Blocks
        ) && self.opts.device.is_cpu()
            && i.is_multiple_of(quant::QK);
        let mut packed = if blocks {
            use candle_core::quantized::GgmlDType;
            let raw =
                |f| -> Result<quant::Packed> { Ok(quant::Packed::from_ggml(f, &q.data()?, o, i)) };
            Some(match (self.opts.weights, q.dtype()) {
                (WeightsMode::Mixed | WeightsMode::Blocks, GgmlDType::Q4_1) => {
                    raw(quant::Format::Q4_1)?
                }
                (_, GgmlDType::Q8_0) => raw(quant::Format::Q8_0)?,
                _ => quant::Packed::quantize_q8_0(&w.flatten_all()?.to_vec1()?, o, i),
            })
        } else {
            None
        };
        if let Some(h) = permute_heads {
            w = unpermute_qk(&w, h)?;
            packed = packed.map(|p| p.permute_rows(&unpermute_order(o, h)));
        }
        let w = w.to_dtype(self.opts.dtype)?;
        match packed {
            Some(p) => Linear::both(w, p, self.opts.weights == WeightsMode::Blocks),
            None => Linear::dense(w),
        }
    }

    fn projection(&mut self, name: &str, permute_heads: Option<usize>) -> Result<Linear> {
        let q = self.quantized(name)?;
        self.linear(q, permute_heads)
    }
}

fn load_gguf(
    content: &gguf_file::Content,
    file: &mut std::io::BufReader<std::fs::File>,
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
        let mut proj = |p: Projection, permute_heads: Option<usize>| {
            t.projection(&names::gguf::weight(i, p), permute_heads)
        };
        layers.push(Layer {
            q_proj: proj(Projection::QProj, Some(nh))?,
            k_proj: proj(Projection::KProj, Some(nkv))?,
            v_proj: proj(Projection::VProj, None)?,
            o_proj: proj(Projection::OProj, None)?,
            gate_proj: proj(Projection::GateProj, None)?,
            up_proj: proj(Projection::UpProj, None)?,
            down_proj: proj(Projection::DownProj, None)?,
            input_layernorm: t.dense(&names::gguf::attn_norm(i))?,
            post_attention_layernorm: t.dense(&names::gguf::ffn_norm(i))?,
        });
    }
    let norm = t.dense(names::gguf::OUTPUT_NORM)?;
    let embed_q = t.quantized(names::gguf::TOKEN_EMBD)?;
    let embed = embed_q.dequantize(&opts.device)?.to_dtype(opts.dtype)?;
    // Tied embeddings: no output.weight, the head reuses token_embd.
    let head_q = if content.tensor_infos.contains_key(names::gguf::OUTPUT) {
        t.quantized(names::gguf::OUTPUT)?
    } else {
        embed_q
    };
    let lm_head = t.linear(head_q, None)?;
    let interleaved_rope = opts.weights.interleaved_rope();
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
        let mut lin =
            |p: Projection| -> Result<Linear> { Linear::dense(take(&names::weight(i, p))?) };
        layers.push(Layer {
            q_proj: lin(Projection::QProj)?,
            k_proj: lin(Projection::KProj)?,
            v_proj: lin(Projection::VProj)?,
            o_proj: lin(Projection::OProj)?,
            gate_proj: lin(Projection::GateProj)?,
            up_proj: lin(Projection::UpProj)?,
            down_proj: lin(Projection::DownProj)?,
            input_layernorm: take(&names::input_layernorm(i))?,
            post_attention_layernorm: take(&names::post_attention_layernorm(i))?,
        });
    }
    let embed = take(names::EMBED_TOKENS)?;
    let norm = take(names::NORM)?;
    let lm_head = if cfg.tie_word_embeddings {
        match map.remove(names::LM_HEAD) {
            Some(t) => Linear::dense(t.to_device(dev)?.to_dtype(dtype)?)?,
            None => Linear::dense(embed.clone())?,
        }
    } else {
        Linear::dense(take(names::LM_HEAD)?)?
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
    m.insert(names::EMBED_TOKENS.into(), mk((cfg.vocab_size, h), 1.0)?);
    for i in 0..cfg.num_hidden_layers {
        // In Projection::ALL order: the draws, and so the weights, depend on it.
        for p in Projection::ALL {
            let (shape, std) = match p {
                Projection::QProj => ((nh * hd, h), s),
                Projection::KProj | Projection::VProj => ((nkv * hd, h), s),
                Projection::OProj => ((h, nh * hd), s),
                Projection::GateProj | Projection::UpProj => ((im, h), s),
                Projection::DownProj => ((h, im), 0.5 / (im as f32).sqrt() * 1.7),
            };
            m.insert(names::weight(i, p), mk(shape, std)?);
        }
        m.insert(names::input_layernorm(i), Tensor::ones(h, DType::F32, dev)?);
        m.insert(
            names::post_attention_layernorm(i),
            Tensor::ones(h, DType::F32, dev)?,
        );
    }
    m.insert(names::NORM.into(), Tensor::ones(h, DType::F32, dev)?);
    if !cfg.tie_word_embeddings {
        m.insert(names::LM_HEAD.into(), mk((cfg.vocab_size, h), s)?);
    }
    Ok(m)
}
