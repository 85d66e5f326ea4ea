//! Log-probabilities of response tokens under the model: the quantity every preference loss uses.

use crate::model::llama::{build_mask, build_positions, Llama, Mode};
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// Per-sequence results. `logps` keeps the graph (for the policy); the rest are plain numbers.
pub struct SeqLogps {
    /// [N]: summed (or per-token mean) response log-prob.
    pub logps: Tensor,
    /// Mean logit over the response tokens and the vocabulary, per row.
    pub mean_logits: Vec<f32>,
    pub tokens: Vec<usize>,
}

/// `seqs[i] = (prompt ids, response ids)`. Rows are right-padded: with a causal mask a real token
/// never sees the padding after it, so no padding mask is needed.
pub fn sequence_logps(
    model: &Llama,
    seqs: &[(&[u32], &[u32])],
    mode: Mode,
    average: bool,
) -> Result<SeqLogps> {
    let n = seqs.len();
    let l = seqs
        .iter()
        .map(|(p, r)| p.len() + r.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let dev = &model.device;
    let mut ids = vec![0u32; n * l];
    let mut gather = Vec::new(); // flat hidden index predicting each response token
    let mut targets = Vec::new();
    let mut seg = vec![0f32; 0];
    let mut tokens = vec![0usize; n];
    let mut owner = Vec::new();
    for (i, (p, r)) in seqs.iter().enumerate() {
        for (j, t) in p.iter().chain(r.iter()).enumerate() {
            ids[i * l + j] = *t;
        }
        for (j, t) in r.iter().enumerate() {
            // Position p.len()+j-1 predicts the response's j-th token.
            let pos = (p.len() + j).saturating_sub(1);
            gather.push((i * l + pos) as u32);
            targets.push(*t);
            owner.push(i);
        }
        tokens[i] = r.len();
    }
    let m = gather.len();
    if m == 0 {
        return Ok(SeqLogps {
            logps: Tensor::zeros(n, DType::F32, dev)?,
            mean_logits: vec![0.0; n],
            tokens,
        });
    }
    seg.resize(n * m, 0.0);
    for (k, &i) in owner.iter().enumerate() {
        seg[i * m + k] = if average { 1.0 / tokens[i] as f32 } else { 1.0 };
    }
    let ids = Tensor::from_vec(ids, (n, l), dev)?;
    let start = vec![0; n];
    let mask = build_mask(&start, 0, l, model.dtype, dev)?;
    let pos = build_positions(&start, 0, l, dev)?;
    let h = model.forward_hidden(&ids, &pos, &mask, None, mode)?; // [N, L, H]
    let hdim = h.dim(2)?;
    let sel = h
        .reshape((n * l, hdim))?
        .index_select(&Tensor::from_vec(gather, m, dev)?, 0)?; // [M, H]
    let logits = model
        .lm_head
        .forward(&sel.unsqueeze(0)?, mode, 0xffff)?
        .squeeze(0)?
        .to_dtype(crate::model::llama::accum_dtype(model.dtype))?; // [M, V]
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let tgt = Tensor::from_vec(targets, (m, 1), dev)?;
    let tok_lp = lsm.gather(&tgt, 1)?; // [M, 1]
    let dt = crate::model::llama::accum_dtype(model.dtype);
    let seg = Tensor::from_vec(seg, (n, m), dev)?.to_dtype(dt)?;
    let logps = seg.matmul(&tok_lp)?.squeeze(1)?; // [N]
    let per_tok_mean: Vec<f32> = logits
        .detach()
        .mean(D::Minus1)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let mut mean_logits = vec![0f32; n];
    for (k, &i) in owner.iter().enumerate() {
        mean_logits[i] += per_tok_mean[k] / tokens[i] as f32;
    }
    Ok(SeqLogps {
        logps,
        mean_logits,
        tokens,
    })
}
