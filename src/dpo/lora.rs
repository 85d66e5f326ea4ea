//! LoRA adapters: `y = W x + (alpha / r) * B A dropout(x)`, A `[r, in]` Kaiming-uniform, B
//! `[out, r]` zero, so an untrained adapter is exactly the base model. Kept in f32 whatever the
//! base dtype.

use crate::config::LoraSettings;
use crate::model::llama::Llama;
use anyhow::Result;
use candle_core::{Tensor, Var};
use rand::{Rng, SeedableRng};

pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl Lora {
    /// x: [N, in] -> [N, out] (the adapter's contribution only).
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let dt = x.dtype();
        let mut x = x.to_dtype(self.a.dtype())?;
        if let (Some(seed), true) = (dropout_seed, self.dropout > 0.0) {
            let (n, i) = x.dims2()?;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let keep = 1.0 - self.dropout as f32;
            let mask: Vec<f32> = (0..n * i)
                .map(|_| {
                    if rng.random::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n, i), x.device())?.to_dtype(x.dtype())?;
            x = (x * mask)?;
        }
        let h = x.matmul(&self.a.as_tensor().t()?)?; // [N, r]
        let y = (h.matmul(&self.b.as_tensor().t()?)? * self.scale)?; // [N, out]
        Ok(y.to_dtype(dt)?)
    }
}

/// Put fresh adapters on the targeted projections of every layer.
pub fn attach(model: &mut Llama, s: &LoraSettings, seed: u64) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dev = model.device.clone();
    // f32 adapters on f32 / bf16 bases; f64 on f64 (gradient checks).
    let dt = crate::model::llama::accum_dtype(model.dtype);
    for layer in model.layers.iter_mut() {
        for (name, lin) in layer.named_mut() {
            let short = name.rsplit('.').next().unwrap();
            if !s.targets.iter().any(|t| t == short) {
                continue;
            }
            // PEFT: kaiming_uniform_(a=sqrt(5)) gives a bound of 1/sqrt(fan_in).
            let bound = 1.0 / (lin.in_features as f32).sqrt();
            let a: Vec<f32> = (0..s.r * lin.in_features)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                .collect();
            let a = Var::from_tensor(
                &Tensor::from_vec(a, (s.r, lin.in_features), &dev)?.to_dtype(dt)?,
            )?;
            let b = Var::zeros((lin.out_features, s.r), dt, &dev)?;
            lin.lora = Some(Lora {
                a,
                b,
                scale: s.alpha / s.r as f64,
                dropout: s.dropout,
            });
        }
    }
    Ok(())
}

/// Every trainable tensor, in a stable order (layer, module, A then B).
pub fn vars(model: &Llama) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (path, l) in model.loras() {
        out.push((format!("{path}.lora_A.weight"), l.a.clone()));
        out.push((format!("{path}.lora_B.weight"), l.b.clone()));
    }
    out
}
