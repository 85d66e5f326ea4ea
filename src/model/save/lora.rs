//! A PEFT LoRA adapter as llama.cpp's GGUF LoRA (what `convert_lora_to_gguf.py` writes and
//! `llama-server --lora FILE` loads over the base GGUF): `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted projection
//! `blk.N.attn_q.weight.lora_a` (A, `[r, in]`) and `.lora_b` (B, `[out, r]`), PEFT's arrays as
//! they are but for B's rows of q and k, put in the converter's order ([`super::permute_qk`]):
//! the base GGUF holds those weights permuted, and `B A` must match them row for row.
//! llama.cpp scales the update by `alpha / r`, as PEFT does.

use crate::error::{bail, Context, Result};
use crate::model::adapter::Adapter;
use crate::model::config::LlamaConfig;
use crate::model::lora::Projection;
use crate::model::names;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use gguf_file::Value;
use std::io::Write;
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
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
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
        for (n, t) in [
            (names::gguf::lora_a(li, p), a),
            (names::gguf::lora_b(li, p), b),
        ] {
            let q =
                QTensor::quantize(&t, ty.dtype()).with_context(|| format!("{n}: converting"))?;
            tensors.push((n, q));
        }
    }
    let md = [
        ("general.architecture", Value::String("llama".into())),
        ("general.type", Value::String("adapter".into())),
        ("general.name", Value::String(name.into())),
        ("adapter.type", Value::String("lora".into())),
        (
            "adapter.lora.alpha",
            Value::F32(adapter.spec().alpha as f32),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    crate::fsutil::write_atomic_with(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        gguf_file::write(&mut w, &md_refs, &t_refs)?;
        w.flush()?;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(tensors.len())
}
