//! AdamW (PyTorch semantics: decoupled weight decay, bias correction) with state that can be saved
//! and restored, and the learning-rate schedules of `transformers`.

use super::config::LrScheduler;
use crate::error::{Context, Result};
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub(crate) struct AdamW {
    pub(crate) lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: usize,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub(crate) fn new(
        vars: &[Var],
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    pub(crate) fn update(&mut self, vars: &[Var], grads: &[Tensor]) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mhat = (&m / c1)?;
            let vhat = (&v / c2)?;
            let theta = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
            let upd = (mhat / (vhat.sqrt()? + self.eps)?)?;
            var.set(&(theta - (upd * self.lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            map.insert(format!("m.{i}"), m.clone());
            map.insert(format!("v.{i}"), v.clone());
        }
        crate::fsutil::write_atomic_via(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))
    }

    pub(crate) fn load(&mut self, path: &Path, step: usize) -> Result<()> {
        let dev = self
            .m
            .first()
            .map(|t| t.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("reading {}", path.display()))?;
        for i in 0..self.m.len() {
            self.m[i] = map
                .get(&format!("m.{i}"))
                .context("optimizer state lacks a tensor")?
                .clone();
            self.v[i] = map
                .get(&format!("v.{i}"))
                .context("optimizer state lacks a tensor")?
                .clone();
        }
        self.step = step;
        Ok(())
    }
}

/// Multiplier of the base learning rate for optimizer step `step` (0-based), as `transformers`'
/// `get_{cosine,linear,constant}_schedule_with_warmup` compute it.
pub(crate) fn lr_factor(kind: LrScheduler, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match kind {
        LrScheduler::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        LrScheduler::Linear => ((total as f64 - step as f64) / span).max(0.0),
        LrScheduler::Constant => 1.0,
    }
}
