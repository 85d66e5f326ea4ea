//! PEFT's LoRA adapter format: `adapter_config.json` (exactly PEFT 0.10's keys) and
//! `adapter_model.safetensors` with `base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight`.
//! The engine loads GGUF q/k weights back into the HF layout, so adapters need no permutation.

use crate::config::LoraSettings;
use crate::model::llama::{Linear, Llama};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub const PREFIX: &str = "base_model.model.";

pub fn config_json(s: &LoraSettings, base: &str) -> serde_json::Value {
    serde_json::json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": s.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": s.targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    })
}

/// Write the adapter files into `dir` (each atomically).
pub fn save(model: &Llama, s: &LoraSettings, base: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (path, l) in model.loras() {
        map.insert(
            format!("{PREFIX}{path}.lora_A.weight"),
            l.a.as_tensor().to_dtype(DType::F32)?,
        );
        map.insert(
            format!("{PREFIX}{path}.lora_B.weight"),
            l.b.as_tensor().to_dtype(DType::F32)?,
        );
    }
    if map.is_empty() {
        bail!("the model carries no LoRA adapter to save");
    }
    let path = dir.join("adapter_model.safetensors");
    let tmp = crate::fsutil::tmp_sibling(&path);
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, &path)?;
    crate::fsutil::write_json_pretty(&dir.join("adapter_config.json"), &config_json(s, base))?;
    Ok(())
}

/// Read an adapter folder's settings.
pub fn read_config(dir: &Path) -> Result<LoraSettings> {
    let p = dir.join("adapter_config.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).with_context(|| {
        format!(
            "{} has no adapter_config.json; point --adapter at a trained adapter folder",
            dir.display()
        )
    })?)
    .with_context(|| format!("{}: invalid JSON", p.display()))?;
    if v["peft_type"] != "LORA" {
        bail!(
            "{}: peft_type is {}, only LORA is supported",
            p.display(),
            v["peft_type"]
        );
    }
    Ok(LoraSettings {
        r: v["r"].as_u64().context("adapter_config.json lacks r")? as usize,
        alpha: v["lora_alpha"]
            .as_f64()
            .context("adapter_config.json lacks lora_alpha")?,
        dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
        targets: serde_json::from_value(v["target_modules"].clone()).context("target_modules")?,
    })
}

/// Load an adapter folder onto a model (replacing any adapter it has).
pub fn load(model: &mut Llama, dir: &Path) -> Result<LoraSettings> {
    let s = read_config(dir)?;
    let p = dir.join("adapter_model.safetensors");
    let map = candle_core::safetensors::load(&p, &model.device)
        .with_context(|| format!("reading {}", p.display()))?;
    let mut used = 0;
    let nl = model.layers.len();
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (name, lin) in layer.named_mut() {
            let base = format!("{PREFIX}model.layers.{i}.{name}");
            let (Some(a), Some(b)) = (
                map.get(&format!("{base}.lora_A.weight")),
                map.get(&format!("{base}.lora_B.weight")),
            ) else {
                continue;
            };
            let (r, inf) = a.dims2()?;
            let (outf, r2) = b.dims2()?;
            if r != r2 || inf != lin.in_features || outf != lin.out_features {
                bail!(
                    "{}: {base} has shapes {:?} / {:?}, the model's layer is [{}, {}]; was it trained on another base model?",
                    p.display(),
                    a.dims(),
                    b.dims(),
                    lin.out_features,
                    lin.in_features
                );
            }
            lin.lora = Some(super::lora::Lora {
                a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
                b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
                scale: s.alpha / r as f64,
                dropout: 0.0,
            });
            used += 2;
        }
    }
    if used == 0 || used != map.len() {
        bail!(
            "{}: {} of {} tensors match a layer of this {nl}-layer model",
            p.display(),
            used,
            map.len()
        );
    }
    Ok(s)
}

/// Fold every adapter into its base weight: `W' = W + (alpha/r) B A`.
pub fn merge_into(model: &mut Llama) -> Result<()> {
    for layer in model.layers.iter_mut() {
        for (_, lin) in layer.named_mut() {
            if let Some(l) = lin.lora.take() {
                let w = lin.dense_f32()?;
                let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
                *lin = Linear::dense((w + delta)?.to_dtype(model.dtype)?)?;
            }
        }
    }
    Ok(())
}

/// Write a merged model as a plain HF folder: config.json, model.safetensors, tokenizer files.
pub fn write_hf_folder(model: &Model, out: &Path) -> Result<()> {
    let l = &model.llama;
    if l.rope_interleaved {
        bail!(
            "cannot export weights held in the GGUF RoPE layout; load the model with dense weights"
        );
    }
    std::fs::create_dir_all(out)?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    map.insert(
        "model.embed_tokens.weight".into(),
        l.embed_tokens.to_dtype(DType::F32)?,
    );
    map.insert("model.norm.weight".into(), l.norm.to_dtype(DType::F32)?);
    map.insert("lm_head.weight".into(), l.lm_head.dense_f32()?);
    for (i, layer) in l.layers.iter().enumerate() {
        for (name, lin) in layer.named() {
            map.insert(format!("model.layers.{i}.{name}.weight"), lin.dense_f32()?);
        }
        map.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            layer.input_layernorm.to_dtype(DType::F32)?,
        );
        map.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.to_dtype(DType::F32)?,
        );
    }
    let mut cfg = l.cfg.clone();
    cfg.tie_word_embeddings = false;
    let st = out.join("model.safetensors");
    let tmp = crate::fsutil::tmp_sibling(&st);
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, &st)?;
    crate::fsutil::write_json_pretty(&out.join("config.json"), &cfg.to_hf_json())?;
    let tok = &model.meta.tok;
    let tj = out.join("tokenizer.json");
    tok.inner
        .save(&tj, true)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tj.display()))?;
    let mut tc = serde_json::json!({
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "add_bos_token": tok.add_bos,
        "add_eos_token": false,
    });
    if let Some(c) = &model.meta.chat {
        tc["chat_template"] = serde_json::Value::String(c.source().to_string());
    }
    crate::fsutil::write_json_pretty(&out.join("tokenizer_config.json"), &tc)?;
    Ok(())
}
