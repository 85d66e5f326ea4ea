//! Preference losses as TRL defines them. With `x = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))`:
//! sigmoid `-(1-e) log s(bx) - e log s(-bx)`, hinge `max(0, 1 - bx)`, ipo `(x - 1/(2b))^2`,
//! robust `(-(1-e) log s(bx) + e log s(-bx)) / (1-2e)`. Rewards are `b (log pi - log ref)`.

use super::config::Loss;
use crate::error::{bail, Result};
use candle_core::{DType, Tensor};

/// log(sigmoid(z)) = min(z, 0) - log(1 + exp(-|z|)), stable for any z.
fn log_sigmoid(z: &Tensor) -> Result<Tensor> {
    let neg_abs = z.abs()?.neg()?;
    Ok((z.minimum(0f64)? - (neg_abs.exp()? + 1.0)?.log()?)?)
}

pub struct PairLoss {
    /// Scalar mean loss (keeps the graph).
    pub loss: Tensor,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
}

/// pc, pr: policy log-probs \[B\]; rc, rr: reference log-probs \[B\].
pub fn dpo_loss(
    kind: Loss,
    beta: f64,
    eps: f64,
    pc: &Tensor,
    pr: &Tensor,
    rc: &Tensor,
    rr: &Tensor,
) -> Result<PairLoss> {
    let x = ((pc - pr)? - (rc - rr)?)?;
    let bx = (&x * beta)?;
    let per = match kind {
        Loss::Sigmoid => {
            let a = (log_sigmoid(&bx)? * -(1.0 - eps))?;
            if eps > 0.0 {
                (a - (log_sigmoid(&bx.neg()?)? * eps)?)?
            } else {
                a
            }
        }
        Loss::Hinge => (bx.neg()? + 1.0)?.relu()?,
        Loss::Ipo => (x - 1.0 / (2.0 * beta))?.sqr()?,
        Loss::Robust => {
            let a = (log_sigmoid(&bx)? * -(1.0 - eps))?;
            let b = (log_sigmoid(&bx.neg()?)? * eps)?;
            ((a + b)? / (1.0 - 2.0 * eps))?
        }
        Loss::Kto => bail!("KTO is not a pairwise loss: it trains on unpaired rows (kto_loss)"),
    };
    Ok(PairLoss {
        loss: per.mean_all()?,
        chosen_rewards: ((pc - rc)?.detach() * beta)?
            .to_dtype(DType::F32)?
            .to_vec1()?,
        rejected_rewards: ((pr - rr)?.detach() * beta)?
            .to_dtype(DType::F32)?
            .to_vec1()?,
    })
}

/// KTO: `z` is the detached, clamped KL estimate. Desirable rows lose `1 - s(b(lr - z))`,
/// undesirable ones `1 - s(b(z - lr))`, where `lr = log pi - log ref`.
pub fn kto_loss(beta: f64, p: &Tensor, r: &Tensor, labels: &[bool], z: f64) -> Result<PairLoss> {
    let lr = (p - r)?;
    let sign: Vec<f32> = labels.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
    let sign = Tensor::from_vec(sign, labels.len(), p.device())?.to_dtype(p.dtype())?;
    let arg = (((&lr - z)? * &sign)? * beta)?;
    let per = (candle_nn::ops::sigmoid(&arg)?.neg()? + 1.0)?;
    let rewards: Vec<f32> = (lr.detach() * beta)?.to_dtype(DType::F32)?.to_vec1()?;
    let (mut c, mut rj) = (Vec::new(), Vec::new());
    for (rw, &d) in rewards.iter().zip(labels) {
        if d {
            c.push(*rw)
        } else {
            rj.push(*rw)
        }
    }
    Ok(PairLoss {
        loss: per.mean_all()?,
        chosen_rewards: c,
        rejected_rewards: rj,
    })
}
