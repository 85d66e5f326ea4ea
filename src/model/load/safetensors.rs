//! Hugging Face checkpoints: a Llama built from HF-named tensors (safetensors files), and random
//! HF-named tensors for tests and benchmarks.

use crate::error::{ensure, Context, Result};
use crate::model::config::{LlamaConfig, FIX};
use crate::model::llama::{Layer, Linear, Llama};
use crate::model::lora::Projection;
use crate::model::names::{self, Weight};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Every tensor the network reads is among `map` with the shape the config implies (the head
/// may be missing when it is tied to the embeddings), so that a damaged or mismatched checkpoint
/// is refused at load, naming the file and tensor, not at the first forward pass. `file_of`
/// says which weight file each tensor came from; `config` is the config.json read.
pub(crate) fn check_tensors(
    cfg: &LlamaConfig,
    map: &HashMap<String, Tensor>,
    file_of: &HashMap<String, PathBuf>,
    config: &Path,
) -> Result<()> {
    let dir = config.parent().unwrap_or(Path::new("."));
    cfg.each_weight(|w, shape| {
        let name = w.hf();
        let Some(t) = map.get(&name) else {
            ensure!(
                w == Weight::Head && cfg.tie_word_embeddings,
                "{}: no weight file has tensor {name} (the config has {} layers{}); {FIX}",
                dir.display(),
                cfg.num_hidden_layers,
                if w == Weight::Head {
                    ", untied embeddings"
                } else {
                    ""
                }
            );
            return Ok(());
        };
        let found = t.dims();
        ensure!(
            found == shape,
            "{}: tensor {name} has shape {found:?}, but {} implies {shape:?} (rows, columns); {FIX}",
            file_of
                .get(&name)
                .map_or_else(|| dir.display(), |f| f.display()),
            config.display()
        );
        Ok(())
    })
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
