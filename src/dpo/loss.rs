//! Preference losses as TRL defines them. With `x = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r))`:
//! sigmoid `-(1-e) log s(bx) - e log s(-bx)`, hinge `max(0, 1 - bx)`, ipo `(x - 1/(2b))^2`,
//! robust `(-(1-e) log s(bx) + e log s(-bx)) / (1-2e)`. Rewards are `b (log pi - log ref)`.
//! The rest of TRL's `DPOTrainer` losses (exo_pair, nca_pair, bco_pair, sppo_hard, aot,
//! apo_zero, apo_down, discopop, sft, sigmoid_norm), its CPO trainer's SimPO and its ORPO
//! trainer are in [`preference_loss`], checked against TRL's own code (tests/it/losses.rs).
use super::config::{Loss, TrainSettings};
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
    /// The chosen responses' NLL where the loss has that term (SimPO's `cpo_alpha`, ORPO): its
    /// trainer logs it as `nll_loss`.
    pub nll: Option<f64>,
    /// Further metrics the loss's TRL trainer logs (ORPO's `log_odds_ratio`, `log_odds_chosen`).
    pub logs: Vec<(&'static str, f64)>,
}

/// The settings a pairwise loss reads.
#[derive(Debug, Clone)]
pub struct LossParams {
    pub losses: Vec<Loss>,
    /// One per loss; empty = all 1.
    pub weights: Vec<f64>,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    pub cpo_alpha: f64,
    pub discopop_tau: f64,
}

impl LossParams {
    pub fn of(s: &TrainSettings) -> Self {
        Self {
            losses: s.loss.0.clone(),
            weights: s.loss_weights.clone(),
            beta: s.beta,
            label_smoothing: s.label_smoothing,
            simpo_gamma: s.simpo_gamma,
            cpo_alpha: s.cpo_alpha,
            discopop_tau: s.discopop_tau,
        }
    }
}

/// A batch's log-probs: policy `pc`, `pr` and reference `rc`, `rr`, each \[B\]: sums over the
/// response tokens, or per-token means when `averaged`; the responses' token counts.
pub struct PairLogps<'a> {
    pub pc: &'a Tensor,
    pub pr: &'a Tensor,
    pub rc: &'a Tensor,
    pub rr: &'a Tensor,
    pub chosen_tokens: &'a [usize],
    pub rejected_tokens: &'a [usize],
    pub averaged: bool,
}

/// TRL's `nll_loss` (RPO's, SimPO's `cpo_alpha` term, ORPO's and the `sft` loss): the
/// cross-entropy over every chosen token of the batch, so a long response weighs more than a
/// short one. `pc` holds each chosen response's summed log-prob, or its per-token mean when
/// `average` (then each is scaled back by its `counts`).
pub fn chosen_nll(pc: &Tensor, counts: &[usize], average: bool) -> Result<Tensor> {
    let total = counts.iter().sum::<usize>().max(1) as f64;
    let sums = if average {
        (pc * counts_tensor(counts, pc)?)?
    } else {
        pc.clone()
    };
    Ok((sums.sum_all()?.neg()? / total)?)
}

/// The token counts as a tensor like `like`, at least 1 each (TRL's `clamp(min=1)`).
fn counts_tensor(counts: &[usize], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        counts.iter().map(|&c| c.max(1) as f32).collect::<Vec<_>>(),
        counts.len(),
        like.device(),
    )?
    .to_dtype(like.dtype())?)
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.detach().to_dtype(DType::F32)?.to_vec1()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// log(1 - exp(x)) for x < 0, as TRL's ORPO computes it: branching at -ln 2 so neither form
/// cancels (log1p(-exp x) below, log(-expm1 x) above, here written without log1p/expm1).
fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let below = (x.exp()?.neg()? + 1.0)?.log()?;
    // Near 0, 1 - e^x loses its digits: -expm1(x) = -x (1 + x/2 + x^2/6 + x^3/24 + ...).
    let poly = ((((x / 24.0)? + 1.0 / 6.0)? * x)? + 0.5)?;
    let poly = ((poly * x)? + 1.0)?;
    let series = (x.neg()? * poly)?.log()?;
    let near_zero = x.ge(-1e-3)?;
    Ok(near_zero.where_cond(&series, &below)?)
}

/// The weighted sum of `p.losses`' batch means, as TRL's `DPOTrainer` combines a `loss_type`
/// list, with the rewards it logs; SimPO and ORPO are used alone, as their trainers use them.
// Long because it is the table of TRL's losses, one arm each, sharing the batch's quantities.
pub fn preference_loss(p: &LossParams, b: &PairLogps) -> Result<PairLoss> {
    let (beta, eps) = (p.beta, p.label_smoothing);
    let (pc, pr, rc, rr) = (b.pc, b.pr, b.rc, b.rr);
    // Sums and per-token means of each, whichever form the batch came in.
    let nc = counts_tensor(b.chosen_tokens, pc)?;
    let nr = counts_tensor(b.rejected_tokens, pr)?;
    let sum = |t: &Tensor, n: &Tensor| -> Result<Tensor> {
        Ok(if b.averaged { (t * n)? } else { t.clone() })
    };
    let avg = |t: &Tensor, n: &Tensor| -> Result<Tensor> {
        Ok(if b.averaged { t.clone() } else { (t / n)? })
    };
    // x as the existing losses always computed it (the default recipe's bytes depend on the
    // order of these operations).
    let x_of = |pc: &Tensor, pr: &Tensor, rc: &Tensor, rr: &Tensor| -> Result<Tensor> {
        Ok(((pc - pr)? - (rc - rr)?)?)
    };
    let smoothed = |z: &Tensor| -> Result<Tensor> {
        let a = (log_sigmoid(z)? * -(1.0 - eps))?;
        Ok(if eps > 0.0 {
            (a - (log_sigmoid(&z.neg()?)? * eps)?)?
        } else {
            a
        })
    };
    let mut total: Option<Tensor> = None;
    let mut nll_logged = None;
    let mut logs = Vec::new();
    let reference_free = !p.losses.iter().any(|l| l.needs_reference());
    for (i, &kind) in p.losses.iter().enumerate() {
        let w = p.weights.get(i).copied().unwrap_or(1.0);
        let mean = match kind {
            Loss::Sigmoid => {
                let (spc, spr, src, srr) =
                    (sum(pc, &nc)?, sum(pr, &nr)?, sum(rc, &nc)?, sum(rr, &nr)?);
                smoothed(&(x_of(&spc, &spr, &src, &srr)? * beta)?)?.mean_all()?
            }
            Loss::Hinge => {
                let (spc, spr, src, srr) =
                    (sum(pc, &nc)?, sum(pr, &nr)?, sum(rc, &nc)?, sum(rr, &nr)?);
                ((x_of(&spc, &spr, &src, &srr)? * beta)?.neg()? + 1.0)?
                    .relu()?
                    .mean_all()?
            }
            Loss::Ipo => {
                let (apc, apr, arc, arr) =
                    (avg(pc, &nc)?, avg(pr, &nr)?, avg(rc, &nc)?, avg(rr, &nr)?);
                (x_of(&apc, &apr, &arc, &arr)? - 1.0 / (2.0 * beta))?
                    .sqr()?
                    .mean_all()?
            }
            Loss::Robust => {
                let (spc, spr, src, srr) =
                    (sum(pc, &nc)?, sum(pr, &nr)?, sum(rc, &nc)?, sum(rr, &nr)?);
                let bx = (x_of(&spc, &spr, &src, &srr)? * beta)?;
                let a = (log_sigmoid(&bx)? * -(1.0 - eps))?;
                let c = (log_sigmoid(&bx.neg()?)? * eps)?;
                ((a + c)? / (1.0 - 2.0 * eps))?.mean_all()?
            }
            Loss::ExoPair => {
                let (spc, spr, src, srr) =
                    (sum(pc, &nc)?, sum(pr, &nr)?, sum(rc, &nc)?, sum(rr, &nr)?);
                let bx = (x_of(&spc, &spr, &src, &srr)? * beta)?;
                let qw = candle_nn::ops::sigmoid(&bx)?;
                let ql = candle_nn::ops::sigmoid(&bx.neg()?)?;
                let a = (qw * (log_sigmoid(&bx)? - (-eps).ln_1p())?)?;
                let c = (ql * (log_sigmoid(&bx.neg()?)? - eps.ln())?)?;
                (a + c)?.mean_all()?
            }
            Loss::NcaPair | Loss::BcoPair | Loss::SppoHard | Loss::ApoZero | Loss::ApoDown => {
                let cl = (sum(pc, &nc)? - sum(rc, &nc)?)?;
                let rl = (sum(pr, &nr)? - sum(rr, &nr)?)?;
                let (cw, rw) = ((&cl * beta)?, (&rl * beta)?);
                let sig = candle_nn::ops::sigmoid;
                let per = match kind {
                    Loss::NcaPair => {
                        ((log_sigmoid(&cw)?.neg()? - (log_sigmoid(&cw.neg()?)? * 0.5)?)?
                            - (log_sigmoid(&rw.neg()?)? * 0.5)?)?
                    }
                    Loss::BcoPair => (log_sigmoid(&cw)?.neg()? - log_sigmoid(&rw.neg()?)?)?,
                    Loss::SppoHard => ((&cl - 0.5 / beta)?.sqr()? + (&rl + 0.5 / beta)?.sqr()?)?,
                    Loss::ApoZero => ((sig(&cw)?.neg()? + 1.0)? + sig(&rw)?)?,
                    _ => (sig(&cw)? + (sig(&((&cl - &rl)? * beta)?)?.neg()? + 1.0)?)?,
                };
                per.mean_all()?
            }
            Loss::Aot => {
                // Both log-ratio vectors sorted across the batch, then paired by rank.
                let lr = (sum(pc, &nc)? - sum(pr, &nr)?)?;
                let order = |v: &[f32]| -> Vec<u32> {
                    let mut ix: Vec<u32> = (0..v.len() as u32).collect();
                    ix.sort_by(|&a, &c| v[a as usize].total_cmp(&v[c as usize]));
                    ix
                };
                let lv = to_vec(&lr)?;
                let ix = Tensor::from_vec(order(&lv), lv.len(), lr.device())?;
                let lr_sorted = lr.index_select(&ix, 0)?;
                // The reference needs no gradient: sorted as plain numbers.
                let mut rv: Vec<f64> = (sum(rc, &nc)? - sum(rr, &nr)?)?
                    .detach()
                    .to_dtype(DType::F64)?
                    .to_vec1()?;
                rv.sort_by(f64::total_cmp);
                let ref_sorted =
                    Tensor::from_vec(rv, lv.len(), lr.device())?.to_dtype(lr.dtype())?;
                let delta = ((lr_sorted - ref_sorted)? * beta)?;
                let a = (log_sigmoid(&delta)? * -(1.0 - eps))?;
                let c = (log_sigmoid(&delta.neg()?)? * eps)?;
                (a - c)?.mean_all()?
            }
            Loss::Discopop => {
                let (spc, spr, src, srr) =
                    (sum(pc, &nc)?, sum(pr, &nr)?, sum(rc, &nc)?, sum(rr, &nr)?);
                let logits = (x_of(&spc, &spr, &src, &srr)? * beta)?;
                let m = candle_nn::ops::sigmoid(&(&logits / p.discopop_tau)?)?;
                let logistic = log_sigmoid(&logits)?.neg()?;
                let expo = logits.neg()?.exp()?;
                ((logistic * (m.neg()? + 1.0)?)? + (expo * m)?)?.mean_all()?
            }
            Loss::Sft => chosen_nll(pc, b.chosen_tokens, b.averaged)?,
            Loss::SigmoidNorm => {
                let d = ((avg(pc, &nc)? - avg(rc, &nc)?)? - (avg(pr, &nr)? - avg(rr, &nr)?)?)?;
                log_sigmoid(&(d * beta)?)?.neg()?.mean_all()?
            }
            Loss::Simpo => {
                let logits = ((avg(pc, &nc)? - avg(pr, &nr)?)? - p.simpo_gamma / beta)?;
                let per = smoothed(&(logits * beta)?)?;
                let nll = chosen_nll(pc, b.chosen_tokens, b.averaged)?;
                nll_logged = Some(scalar(&nll)?);
                if p.cpo_alpha > 0.0 {
                    (per.mean_all()? + (nll * p.cpo_alpha)?)?
                } else {
                    per.mean_all()?
                }
            }
            Loss::Orpo => {
                let (ac, ar) = (avg(pc, &nc)?, avg(pr, &nr)?);
                let log_odds = ((&ac - &ar)? - (log1mexp(&ac)? - log1mexp(&ar)?)?)?;
                let ratio = log_sigmoid(&log_odds)?;
                let nll = chosen_nll(pc, b.chosen_tokens, b.averaged)?;
                nll_logged = Some(scalar(&nll)?);
                logs.push(("log_odds_ratio", scalar(&ratio.mean_all()?)?));
                logs.push(("log_odds_chosen", scalar(&log_odds.mean_all()?)?));
                (nll - (ratio * beta)?.mean_all()?)?
            }
            Loss::Kto => bail!("KTO is not a pairwise loss: it trains on unpaired rows (kto_loss)"),
        };
        let term = if w == 1.0 { mean } else { (mean * w)? };
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    let loss = total.ok_or_else(|| crate::error::err!("no loss to compute"))?;
    // Reference-free trainers (CPO, ORPO) log b times the policy's own log-probs as rewards.
    let (cr, rj) = if reference_free {
        ((pc.detach() * beta)?, (pr.detach() * beta)?)
    } else {
        (((pc - rc)?.detach() * beta)?, ((pr - rr)?.detach() * beta)?)
    };
    Ok(PairLoss {
        loss,
        chosen_rewards: to_vec(&cr)?,
        rejected_rewards: to_vec(&rj)?,
        nll: nll_logged,
        logs,
    })
}

/// One loss with `beta` and label smoothing `eps`. pc, pr: policy log-probs \[B\]; rc, rr:
/// reference log-probs \[B\]; per-token means for a loss that averages, sums otherwise.
pub fn dpo_loss(
    kind: Loss,
    beta: f64,
    eps: f64,
    pc: &Tensor,
    pr: &Tensor,
    rc: &Tensor,
    rr: &Tensor,
) -> Result<PairLoss> {
    let ones = vec![1; pc.dim(0)?];
    let p = LossParams {
        losses: vec![kind],
        weights: Vec::new(),
        beta,
        label_smoothing: eps,
        simpo_gamma: 0.5,
        cpo_alpha: 1.0,
        discopop_tau: 0.05,
    };
    preference_loss(
        &p,
        &PairLogps {
            pc,
            pr,
            rc,
            rr,
            chosen_tokens: &ones,
            rejected_tokens: &ones,
            averaged: kind.averages_logps(),
        },
    )
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
        nll: None,
        logs: Vec::new(),
    })
}
