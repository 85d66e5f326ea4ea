//! A loaded model (an adapter merged into it) as a GGUF file that llama.cpp loads as any
//! converted Llama: `general.architecture = "llama"`, the `llama.*` hyper-parameters, llama.cpp's
//! tensor names (`names::gguf`), q and k rows in the converter's order ([`super::permute_qk`]),
//! and the tokenizer's metadata (`tokenizer.rs`). 2-D weights take the asked type; norms stay
//! f32, as llama.cpp's converter and `llama-quantize` leave every 1-D tensor.
//!
//! The container is written a tensor at a time (`gguf_file.rs`). The blocks are candle's
//! quantizers', which are ggml's reference ones (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_1_ref`): a block is the one llama.cpp's tools would write.

use super::gguf_file::TensorInfo;
use crate::error::{bail, Context, Result};
use crate::model::config::LlamaConfig;
use crate::model::llama::Llama;
use crate::model::load::Model;
use crate::model::lora::Projection;
use crate::model::names::Weight;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use std::path::Path;

/// The type of a merged GGUF's 2-D weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    /// 32-bit floats: exactly the merged weights (4 bytes a weight)
    F32,
    /// 16-bit floats, llama.cpp's converter's default (2 bytes a weight)
    F16,
    /// 8-bit blocks of 32 weights and a scale (1.06 bytes a weight)
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with a scale and a minimum (0.63 bytes a weight); the output head
    /// (or the embedding, when the head is tied to it) in q8_0
    #[value(name = "q4_1")]
    Q4_1,
}

impl GgufType {
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_1 => "q4_1",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` (gguf-py's `LlamaFileType`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_1 => 3,
            GgufType::Q8_0 => 7,
        }
    }

    /// The type of one 2-D weight of `cols` columns; `head` is the output head, or the
    /// embedding when the head is tied to it. Blocks need whole blocks of 32 in a row: a weight
    /// without falls back to f16, as llama.cpp's converter does. `llama-quantize` keeps the
    /// head finer than 4 bits (q6_K, or q8_0 where rows are not whole 256-blocks, as in
    /// SmolLM2's Q4_1 file); q8_0 is what this writer has.
    fn tensor_type(self, cols: usize, head: bool) -> GgmlDType {
        let want = match self {
            GgufType::F32 => return GgmlDType::F32,
            GgufType::F16 => return GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_1 if head => GgmlDType::Q8_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
        };
        if cols.is_multiple_of(want.block_size()) {
            want
        } else {
            GgmlDType::F16
        }
    }
}

/// What was written.
#[derive(Debug)]
pub struct Written {
    pub tensors: usize,
    pub bytes: u64,
    /// Weights written as f16 because their rows are not whole blocks.
    pub fell_back: Vec<String>,
}

/// Write `model` (its adapter already merged) to `path` as a GGUF of `ty` weights, named
/// `name` (`general.name`). Atomic: the file appears whole or not at all.
pub fn write_merged_gguf(model: &Model, path: &Path, ty: GgufType, name: &str) -> Result<Written> {
    let l = &model.llama;
    if l.rope_interleaved {
        bail!(
            "cannot export weights held in the GGUF RoPE layout; load the model with dense weights"
        );
    }
    if l.adapter().is_some() {
        bail!("the model carries an adapter: merge it into the weights before writing them");
    }
    let t0 = std::time::Instant::now();
    let mut md = hyper_parameters(&l.cfg, ty, name);
    md.extend(super::tokenizer::metadata(model)?);
    let (weights, infos) = plan(&l.cfg, ty)?;
    let fell_back: Vec<String> = infos
        .iter()
        .filter(|t| t.dtype == GgmlDType::F16 && t.dims.len() == 2)
        .filter(|_| matches!(ty, GgufType::Q8_0 | GgufType::Q4_1))
        .map(|t| t.name.clone())
        .collect();
    for w in &fell_back {
        tracing::warn!(
            "{w}: its rows are not whole blocks of 32; written as f16 (as llama.cpp's converter does)"
        );
    }
    let bytes = super::gguf_file::write(path, &md, &infos, |i| {
        tensor_bytes(l, weights[i], infos[i].dtype)
    })?;
    tracing::debug!(
        "wrote {} in {:.1}s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Written {
        tensors: infos.len(),
        bytes,
        fell_back,
    })
}

/// `general.*` and the `llama.*` keys llama.cpp's loader reads, typed as its converter
/// writes them (counts u32, epsilon and RoPE base f32: llama.cpp refuses a key of another type).
fn hyper_parameters(cfg: &LlamaConfig, ty: GgufType, name: &str) -> Vec<(String, Value)> {
    let u = |k: &str, v: usize| (k.to_string(), Value::U32(v as u32));
    let s = |k: &str, v: &str| (k.to_string(), Value::String(v.to_string()));
    let mut md = vec![
        s("general.architecture", "llama"),
        s("general.type", "model"),
        s("general.name", name),
        u("general.file_type", ty.file_type() as usize),
        u("general.quantization_version", 2),
        u("llama.context_length", cfg.max_position_embeddings),
        u("llama.embedding_length", cfg.hidden_size),
        u("llama.block_count", cfg.num_hidden_layers),
        u("llama.feed_forward_length", cfg.intermediate_size),
        u("llama.rope.dimension_count", cfg.head_dim),
        u("llama.attention.head_count", cfg.num_attention_heads),
        u("llama.attention.head_count_kv", cfg.num_key_value_heads),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(cfg.rope_theta as f32),
        ),
        u("llama.vocab_size", cfg.vocab_size),
    ];
    // llama.cpp takes the head size as hidden / heads unless told; RoPE must span all of it.
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        md.push(u("llama.attention.key_length", cfg.head_dim));
        md.push(u("llama.attention.value_length", cfg.head_dim));
    }
    md
}

/// Every tensor llama.cpp reads, by its GGUF name, and its type for `ty`. The head is left out
/// when tied to the embeddings (llama.cpp then reuses `token_embd`).
fn plan(cfg: &LlamaConfig, ty: GgufType) -> Result<(Vec<Weight>, Vec<TensorInfo>)> {
    let mut weights = Vec::new();
    let mut infos = Vec::new();
    cfg.each_weight(|w, shape| {
        if w == Weight::Head && cfg.tie_word_embeddings {
            return Ok(());
        }
        let dtype = match shape {
            [_, cols] => {
                let head = w == Weight::Head || (w == Weight::Embed && cfg.tie_word_embeddings);
                ty.tensor_type(*cols, head)
            }
            _ => GgmlDType::F32,
        };
        weights.push(w);
        infos.push(TensorInfo {
            name: w.gguf(),
            dims: shape.to_vec(),
            dtype,
        });
        Ok(())
    })?;
    Ok((weights, infos))
}

/// The data of weight `w` as `dtype`: q and k rows in the converter's order, blocks as ggml's
/// reference quantizers make them (candle's are those).
fn tensor_bytes(l: &Llama, w: Weight, dtype: GgmlDType) -> Result<Vec<u8>> {
    let cfg = &l.cfg;
    let t = match w {
        Weight::Head => l.lm_head.dense_f32()?,
        Weight::Embed => l.embed_tokens.clone(),
        Weight::Norm => l.norm.clone(),
        Weight::InputNorm(i) => l.layers[i].input_layernorm.clone(),
        Weight::PostNorm(i) => l.layers[i].post_attention_layernorm.clone(),
        Weight::Proj(i, p) => {
            let d = l.layers[i].proj(p).dense_f32()?;
            match p {
                Projection::QProj => super::permute_qk(&d, cfg.num_attention_heads)?,
                Projection::KProj => super::permute_qk(&d, cfg.num_key_value_heads)?,
                _ => d,
            }
        }
    };
    let t = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let q = QTensor::quantize(&t, dtype).with_context(|| format!("converting to {dtype:?}"))?;
    Ok(q.data()?.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fall_back_to_f16_where_rows_are_not_whole_blocks() {
        assert_eq!(GgufType::Q8_0.tensor_type(576, false), GgmlDType::Q8_0);
        assert_eq!(GgufType::Q8_0.tensor_type(16, false), GgmlDType::F16);
        assert_eq!(GgufType::Q4_1.tensor_type(576, false), GgmlDType::Q4_1);
        assert_eq!(GgufType::Q4_1.tensor_type(576, true), GgmlDType::Q8_0);
        assert_eq!(GgufType::F32.tensor_type(16, true), GgmlDType::F32);
        assert_eq!(GgufType::F16.tensor_type(576, false), GgmlDType::F16);
    }
}
