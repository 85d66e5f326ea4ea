//! A PEFT LoRA adapter as llama.cpp's GGUF LoRA (what `convert_lora_to_gguf.py` writes and
//! `llama-server --lora FILE` loads over the base GGUF): `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted projection
//! `blk.N.attn_q.weight.lora_a` (A, `[r, in]`) and `.lora_b` (B, `[out, r]`), PEFT's arrays as
//! they are but for B's rows of q and k, put in the converter's order ([`super::permute_qk`]):
//! the base GGUF holds those weights permuted, and `B A` must match them row for row.
//! llama.cpp scales the update by `alpha / r`, as PEFT does.

use super::gguf_file::TensorInfo;
use crate::error::{bail, Context, Result};
use crate::model::adapter::Adapter;
use crate::model::config::LlamaConfig;
use crate::model::lora::Projection;
use crate::model::names;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use std::path::Path;

/// The type of a GGUF LoRA's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraType {
    /// 32-bit floats: the adapter exactly
    F32,
    /// 16-bit floats: half the size
    F16,
}

impl LoraType {
    fn dtype(self) -> GgmlDType {
        match self {
            LoraType::F32 => GgmlDType::F32,
            LoraType::F16 => GgmlDType::F16,
        }
    }
}

/// Write the PEFT adapter in `dir`, trained on a base of shape `cfg`, to `path` as a GGUF LoRA
/// named `name`. Returns the number of tensors written. Atomic. An adapter that does not fit
/// `cfg` is refused, naming the projection and both shapes (llama.cpp would refuse it at load).
pub fn write_lora_gguf(
    dir: &Path,
    cfg: &LlamaConfig,
    path: &Path,
    ty: LoraType,
    name: &str,
) -> Result<usize> {
    let adapter = Adapter::load(dir, &Device::Cpu)?;
    let mut infos = Vec::new();
    let mut data = Vec::new();
    for (li, p, l) in adapter.loras() {
        let (o, i) = l.dims()?;
        let want = cfg.projection_shape(p);
        if li >= cfg.num_hidden_layers || (o, i) != want {
            bail!(
                "{}: layer {li}'s {} LoRA is [{o}, {i}], but the base model {} (its {} layers); \
                 was it trained on another base model?",
                dir.display(),
                p.name(),
                if li >= cfg.num_hidden_layers {
                    "has no such layer".to_string()
                } else {
                    format!("has [{}, {}]", want.0, want.1)
                },
                cfg.num_hidden_layers
            );
        }
        let a = l.a.as_tensor().to_dtype(DType::F32)?.contiguous()?;
        let b = l.b.as_tensor().to_dtype(DType::F32)?;
        let b = match p {
            Projection::QProj => super::permute_qk(&b, cfg.num_attention_heads)?,
            Projection::KProj => super::permute_qk(&b, cfg.num_key_value_heads)?,
            _ => b.contiguous()?,
        };
        for (name, t) in [
            (names::gguf::lora_a(li, p), a),
            (names::gguf::lora_b(li, p), b),
        ] {
            let q =
                QTensor::quantize(&t, ty.dtype()).with_context(|| format!("{name}: converting"))?;
            data.push(q.data()?.into_owned());
            infos.push(TensorInfo {
                name,
                dims: t.dims().to_vec(),
                dtype: ty.dtype(),
            });
        }
    }
    let s = |v: &str| Value::String(v.into());
    let md = [
        ("general.architecture", s("llama")),
        ("general.type", s("adapter")),
        ("general.name", s(name)),
        ("adapter.type", s("lora")),
        (
            "adapter.lora.alpha",
            Value::F32(adapter.spec().alpha as f32),
        ),
    ]
    .map(|(k, v)| (k.to_string(), v));
    super::gguf_file::write(path, &md, &infos, |i| Ok(std::mem::take(&mut data[i])))?;
    Ok(infos.len())
}
