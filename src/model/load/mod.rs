//! Loading: model files into a [`Model`] (network, tokenizer, chat template, where it came
//! from). `source.rs` finds the files (Hub id, folder, GGUF) and fingerprints them; `gguf.rs` and
//! `safetensors.rs` read the weights as the load options ask; `tokenizer.rs`, `chat.rs` and
//! `special_text.rs` turn text into token ids, never letting user text become a control token.
//!
//! May import `kernels`, the model's core (`model::{llama, config, lora, adapter, names,
//! options}`) and the base modules; never `model::generate` or anything above.

pub mod chat;
pub(crate) mod gguf;
mod gguf_header;
pub mod safetensors;
pub mod source;
pub mod special_text;
pub(crate) mod tokenizer;

use crate::error::{bail, no_panic, Context, Result};
use crate::kernels::attention;
use crate::model::llama::Llama;
use crate::model::lora::Projection;
use crate::model::names;
use crate::model::options::{AttentionChoice, LoadOptions};
use candle_core::{DType, Tensor};
use source::{ModelFiles, ModelMeta, ModelSource};
use std::collections::HashMap;
use std::path::Path;

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
                let (content, mut f) = gguf::open(p)?;
                let meta = source::meta_from_gguf(&content, p)?;
                let llama = gguf::load_gguf(&content, &mut f, &meta.config, opts)
                    .with_context(|| format!("loading weights from {}", p.display()))?;
                (llama, meta)
            }
            ModelFiles::Hf {
                weights, config, ..
            } => {
                let meta = source::load_meta(src)?;
                let mut map = HashMap::new();
                let mut file_of = HashMap::new();
                for w in weights {
                    let t = no_panic(format!("reading {}", w.display()), || {
                        candle_core::safetensors::load(w, &opts.device)
                            .with_context(|| format!("reading {}", w.display()))
                    })?;
                    file_of.extend(t.keys().map(|k| (k.clone(), w.clone())));
                    map.extend(t);
                }
                safetensors::check_tensors(&meta.config, &map, &file_of, config)?;
                let llama =
                    safetensors::from_hf_tensors(&meta.config, map, &opts.device, opts.dtype)?;
                (llama, meta)
            }
        };
        let mut llama = llama;
        let fused = match opts.attention {
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
        llama.set_fused_attention(fused);
        Ok(Self {
            llama,
            meta,
            source: src.clone(),
            share_prefixes: opts.share_prefixes,
        })
    }

    /// Read a PEFT adapter folder and attach it (replacing any attached adapter).
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let adapter = crate::model::adapter::Adapter::load(dir, &self.llama.device)?;
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
