//! LoRA: `y = W x + (alpha / r) * B A dropout(x)`, A `[r, in]` Kaiming-uniform, B `[out, r]`
//! zero, so an untrained adapter is exactly the base model. Adapters are kept in f32 (f64 on an
//! f64 base) whatever the base dtype.

use crate::error::Result;
use candle_core::{Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One of a decoder layer's seven projections, named as Hugging Face and PEFT name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Projection {
    /// In the order of the layer's forward pass.
    pub const ALL: [Projection; 7] = [
        Projection::QProj,
        Projection::KProj,
        Projection::VProj,
        Projection::OProj,
        Projection::GateProj,
        Projection::UpProj,
        Projection::DownProj,
    ];

    /// `q_proj`, ..., as in `target_modules`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Projection::QProj => "q_proj",
            Projection::KProj => "k_proj",
            Projection::VProj => "v_proj",
            Projection::OProj => "o_proj",
            Projection::GateProj => "gate_proj",
            Projection::UpProj => "up_proj",
            Projection::DownProj => "down_proj",
        }
    }

    /// Position in [`Projection::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// What an adapter is: rank, scaling, dropout, and the projections it adapts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Projection>,
}

/// `n` inverted-dropout factors: `1 / keep` where ChaCha8's uniform f32 from `seed` falls
/// below `keep`, else 0. The words come in bulk and are compared as integers: `random::<f32>()`
/// is `(u >> 8) / 2^24`, so `(u >> 8) < ceil(keep 2^24)` draws exactly its mask, at a fraction
/// of the cost (a per-element float draw was 3% of a DPO step).
fn dropout_mask(seed: u64, n: usize, keep: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut words = vec![0u32; n];
    rng.fill(&mut words[..]);
    let below = keep_below(keep);
    let (on, off) = (1.0 / keep, 0.0);
    words
        .into_iter()
        .map(|u| if (u >> 8) < below { on } else { off })
        .collect()
}

/// The bound `b` with `(u >> 8) < b` exactly when `(u >> 8) / 2^24 < keep`.
fn keep_below(keep: f32) -> u32 {
    (keep as f64 * 16_777_216.0).ceil() as u32
}

/// The adapter of one projection.
pub(crate) struct Lora {
    /// `[r, in]`
    pub(crate) a: Var,
    /// `[out, r]`
    pub(crate) b: Var,
    pub(crate) scale: f64,
    pub(crate) dropout: f64,
}

impl Lora {
    /// x: [N, in] -> [N, out] (the adapter's contribution only).
    pub(crate) fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let dt = x.dtype();
        let mut x = x.to_dtype(self.a.dtype())?;
        if let (Some(seed), true) = (dropout_seed, self.dropout > 0.0) {
            let (n, i) = x.dims2()?;
            let mask = dropout_mask(seed, n * i, 1.0 - self.dropout as f32);
            let mask = Tensor::from_vec(mask, (n, i), x.device())?.to_dtype(x.dtype())?;
            x = (x * mask)?;
        }
        let h = x.matmul(&self.a.as_tensor().t()?)?; // [N, r]
        let y = (h.matmul(&self.b.as_tensor().t()?)? * self.scale)?; // [N, out]
        Ok(y.to_dtype(dt)?)
    }

    /// `(alpha / r) B A`, the update this adapter makes to the weight `[out, in]`.
    pub(crate) fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }

    /// (out, in)
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        let (_, i) = self.a.as_tensor().dims2()?;
        let (o, _) = self.b.as_tensor().dims2()?;
        Ok((o, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_are_the_per_element_float_draws() {
        for (seed, keep) in [(7u64, 0.95f32), (8, 0.5), (9, 0.9)] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let want: Vec<f32> = (0..10_000)
                .map(|_| {
                    if rng.random::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect();
            assert_eq!(
                dropout_mask(seed, 10_000, keep),
                want,
                "seed {seed}, keep {keep}"
            );
        }
    }

    /// A random draw lands on the bound once in 2^24: the words around it, checked directly.
    #[test]
    fn the_integer_bound_is_the_float_comparison_at_its_edge() {
        for keep in [0.95f32, 0.5, 0.9, 0.1, 1.0 - 1e-7] {
            let b = keep_below(keep);
            for v in b.saturating_sub(3)..=(b + 3).min((1 << 24) - 1) {
                let float_keeps = (v as f32) * (1.0 / 16_777_216.0) < keep;
                assert_eq!(v < b, float_keeps, "keep {keep}, v {v}, bound {b}");
            }
        }
    }
}
