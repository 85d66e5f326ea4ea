//! An [`Adapter`]: a [`Lora`] on each targeted projection of every layer, kept apart from the base
//! weights, so a `Llama` attaches and detaches it and one model in memory serves as both base and
//! adapted model.
//!
//! Its files are PEFT's: `adapter_config.json` (exactly PEFT 0.10's keys) and
//! `adapter_model.safetensors` with `base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight`.
//! The engine loads GGUF q/k weights back into the HF layout, so adapters need no permutation.

use super::lora::{Lora, LoraSpec, Projection};
use super::names;
use crate::error::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// LoRAs for the targeted projections of every layer, with the spec they were made with.
pub struct Adapter {
    spec: LoraSpec,
    /// Per layer, per projection (indexed by [`Projection::index`]).
    pub(crate) layers: Vec<[Option<Lora>; 7]>,
}

impl Adapter {
    /// Fresh adapters as PEFT initialises them, drawn from `seed` layer by layer in
    /// [`Projection::ALL`] order. `dims(layer, p)` is the projection's `(out, in)`; `dtype` is
    /// the adapter's own.
    pub(crate) fn fresh(
        spec: &LoraSpec,
        n_layers: usize,
        dims: impl Fn(usize, Projection) -> (usize, usize),
        device: &Device,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(n_layers);
        for li in 0..n_layers {
            let mut loras: [Option<Lora>; 7] = Default::default();
            for p in Projection::ALL {
                if !spec.targets.contains(&p) {
                    continue;
                }
                let (out_f, in_f) = dims(li, p);
                // PEFT: kaiming_uniform_(a=sqrt(5)) gives a bound of 1/sqrt(fan_in).
                let bound = 1.0 / (in_f as f32).sqrt();
                let a: Vec<f32> = (0..spec.r * in_f)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                    .collect();
                let a = Var::from_tensor(
                    &Tensor::from_vec(a, (spec.r, in_f), device)?.to_dtype(dtype)?,
                )?;
                let b = Var::zeros((out_f, spec.r), dtype, device)?;
                loras[p.index()] = Some(Lora {
                    a,
                    b,
                    scale: spec.alpha / spec.r as f64,
                    dropout: spec.dropout,
                });
            }
            layers.push(loras);
        }
        Ok(Self {
            spec: spec.clone(),
            layers,
        })
    }

    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    pub(crate) fn get(&self, layer: usize, p: Projection) -> Option<&Lora> {
        self.layers.get(layer)?[p.index()].as_ref()
    }

    /// Every LoRA with its layer and projection, layer by layer in [`Projection::ALL`] order.
    pub(crate) fn loras(&self) -> impl Iterator<Item = (usize, Projection, &Lora)> {
        self.layers.iter().enumerate().flat_map(|(li, l)| {
            Projection::ALL
                .into_iter()
                .filter_map(move |p| l[p.index()].as_ref().map(|lo| (li, p, lo)))
        })
    }

    /// Every trainable tensor, in a stable order (layer, projection, A then B), named
    /// `model.layers.{i}.self_attn.q_proj.lora_A.weight` and so on.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (li, p, l) in self.loras() {
            out.push((names::lora_a(li, p), l.a.clone()));
            out.push((names::lora_b(li, p), l.b.clone()));
        }
        out
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors` into `dir` (each atomically).
    /// `base_model` is what PEFT records as `base_model_name_or_path`.
    pub(crate) fn save(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (li, p, l) in self.loras() {
            let a = format!("{}{}", names::PEFT_PREFIX, names::lora_a(li, p));
            let b = format!("{}{}", names::PEFT_PREFIX, names::lora_b(li, p));
            map.insert(a, l.a.as_tensor().to_dtype(DType::F32)?);
            map.insert(b, l.b.as_tensor().to_dtype(DType::F32)?);
        }
        if map.is_empty() {
            bail!("the adapter adapts no projection: nothing to save");
        }
        let path = dir.join("adapter_model.safetensors");
        crate::fsutil::write_atomic_via(&path, |tmp| {
            Ok(candle_core::safetensors::save(&map, tmp)?)
        })?;
        crate::fsutil::write_json_pretty(
            &dir.join("adapter_config.json"),
            &peft_config(&self.spec, base_model),
        )?;
        Ok(())
    }

    /// Read a PEFT adapter folder (f32 tensors on `device`). Shapes are checked against a model
    /// when it is attached.
    pub(crate) fn load(dir: &Path, device: &Device) -> Result<Self> {
        let spec = read_peft_config(dir)?;
        let path = dir.join("adapter_model.safetensors");
        let map = candle_core::safetensors::load(&path, device)
            .with_context(|| format!("reading {}", path.display()))?;
        // Per layer, per projection: (A, B).
        let mut halves: Vec<[(Option<Tensor>, Option<Tensor>); 7]> = Vec::new();
        for (name, t) in map {
            let Some((li, p, is_b)) = names::parse_peft(&name) else {
                bail!(
                    "{}: {name} is not the LoRA of a Llama layer's projection ({}); LoRAs on \
                     the embeddings or the output head, and PEFT's modules_to_save, are not \
                     supported: train the adapter on the projections only",
                    path.display(),
                    Projection::ALL.map(|p| p.name()).join(", ")
                );
            };
            if halves.len() <= li {
                halves.resize_with(li + 1, Default::default);
            }
            let h = &mut halves[li][p.index()];
            *(if is_b { &mut h.1 } else { &mut h.0 }) = Some(t.to_dtype(DType::F32)?);
        }
        if halves.is_empty() {
            bail!("{}: holds no LoRA tensors", path.display());
        }
        let mut layers = Vec::with_capacity(halves.len());
        for (li, hs) in halves.into_iter().enumerate() {
            let mut loras: [Option<Lora>; 7] = Default::default();
            for (p, h) in Projection::ALL.into_iter().zip(hs) {
                let name = names::lora_a(li, p);
                let (a, b) = match h {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (a, b),
                    _ => bail!("{}: {name} lacks its A or B half", path.display()),
                };
                let (r, _) = a.dims2()?;
                let (_, r2) = b.dims2()?;
                if r != r2 {
                    bail!(
                        "{}: {name} has shapes {:?} / {:?}, whose ranks differ",
                        path.display(),
                        a.dims(),
                        b.dims()
                    );
                }
                loras[p.index()] = Some(Lora {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scale: spec.alpha / r as f64,
                    dropout: spec.dropout,
                });
            }
            layers.push(loras);
        }
        Ok(Self { spec, layers })
    }
}

/// `adapter_config.json`, with exactly PEFT 0.10's keys.
fn peft_config(s: &LoraSpec, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
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

fn read_peft_config(dir: &Path) -> Result<LoraSpec> {
    let p = dir.join("adapter_config.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).with_context(|| {
        format!(
            "{} has no adapter_config.json; point --adapter at a trained adapter folder",
            dir.display()
        )
    })?)
    .with_context(|| format!("{}: invalid JSON", p.display()))?;
    // PEFT variants whose update is not `(alpha / r) B A` on every projection alike: applied
    // as if they were, they would give another model without a word.
    for (key, plain) in [
        ("use_dora", serde_json::json!(false)),
        ("use_rslora", serde_json::json!(false)),
    ] {
        if v.get(key).is_some_and(|x| !x.is_null() && *x != plain) {
            bail!(
                "{}: {key} is {}; only plain LoRA (W + (alpha / r) B A) is supported",
                p.display(),
                v[key]
            );
        }
    }
    // Each tensor's own rank sets its scale (`rank_pattern` works); one alpha must do for all.
    if v.get("alpha_pattern")
        .is_some_and(|x| x.as_object().is_some_and(|o| !o.is_empty()))
    {
        bail!(
            "{}: alpha_pattern is {}; adapters with one lora_alpha for every projection are \
             supported",
            p.display(),
            v["alpha_pattern"]
        );
    }
    if v.get("modules_to_save").is_some_and(|x| !x.is_null()) {
        bail!(
            "{}: modules_to_save is {}; an adapter that replaces whole modules is not supported \
             (LoRA on the projections only)",
            p.display(),
            v["modules_to_save"]
        );
    }
    if v["peft_type"] != "LORA" {
        bail!(
            "{}: peft_type is {}, only LORA is supported",
            p.display(),
            v["peft_type"]
        );
    }
    Ok(LoraSpec {
        r: v["r"].as_u64().context("adapter_config.json lacks r")? as usize,
        alpha: v["lora_alpha"]
            .as_f64()
            .context("adapter_config.json lacks lora_alpha")?,
        dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
        targets: serde_json::from_value(v["target_modules"].clone()).with_context(|| {
            format!(
                "{}: target_modules must list Llama projections ({})",
                p.display(),
                Projection::ALL.map(|p| p.name()).join(", ")
            )
        })?,
    })
}
