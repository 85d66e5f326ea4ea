//! Log-probabilities of response tokens under the model: the quantity every preference loss uses.
//!
//! Sequences that share a prompt (a pair's chosen and rejected) are packed into one row: the
//! prompt once, then each response after it. Each response's tokens see the prompt and their own
//! earlier tokens only, at the positions they would have alone, so the log-probs are those of
//! separate rows while the prompt (most of every pair's tokens) is computed once, not twice.

use crate::error::Result;
use crate::kernels::attention::MASK_NEG;
use crate::model::llama::{Checkpoint, Llama, Mode};
use candle_core::{DType, Tensor, D};
use std::collections::HashMap;

/// Per-sequence results. `logps` keeps the graph (for the policy); the rest are plain numbers.
pub struct SeqLogps {
    /// \[N\]: summed (or per-token mean) response log-prob.
    pub logps: Tensor,
    /// Mean logit over the response tokens and the vocabulary, per row.
    pub mean_logits: Vec<f32>,
    pub tokens: Vec<usize>,
    /// With `mode.checkpoint()`: carries `logps`' gradient through the layers after
    /// `backward()` (see [`Checkpoint::backward`]); without it LoRA gets no gradient.
    pub ckpt: Option<Checkpoint>,
}

/// `seqs[i] = (prompt ids, response ids)`; sequences with equal prompts share one row.
pub fn sequence_logps(
    model: &Llama,
    seqs: &[(&[u32], &[u32])],
    mode: Mode,
    average: bool,
) -> Result<SeqLogps> {
    sequence_logps_with(model, seqs, mode, average, true)
}

/// As [`sequence_logps`]; `share_prompts = false` gives every sequence a row of its own.
// Long because the packing, the mask and the gather of response positions share one layout.
pub fn sequence_logps_with(
    model: &Llama,
    seqs: &[(&[u32], &[u32])],
    mode: Mode,
    average: bool,
    share_prompts: bool,
) -> Result<SeqLogps> {
    let n = seqs.len();
    // rows[r] = (prompt, the sequences whose responses follow it)
    let mut rows: Vec<(&[u32], Vec<usize>)> = Vec::new();
    let mut by_prompt: HashMap<&[u32], usize> = HashMap::new();
    for (i, (p, _)) in seqs.iter().enumerate() {
        if share_prompts && !p.is_empty() {
            if let Some(&r) = by_prompt.get(p) {
                rows[r].1.push(i);
                continue;
            }
            by_prompt.insert(p, rows.len());
        }
        rows.push((p, vec![i]));
    }
    let row_len = |(p, ix): &(&[u32], Vec<usize>)| -> usize {
        p.len() + ix.iter().map(|&i| seqs[i].1.len()).sum::<usize>()
    };
    let l = rows.iter().map(row_len).max().unwrap_or(1).max(1);
    let nr = rows.len();
    let dev = &model.device;
    let mut ids = vec![0u32; nr * l];
    let mut pos = vec![0u32; nr * l];
    let mut mask = vec![MASK_NEG; nr * l * l];
    let mut gather = Vec::new(); // flat hidden index predicting each response token
    let mut targets = Vec::new();
    let mut owner = Vec::new();
    let mut tokens = vec![0usize; n];
    for (ri, row) in rows.iter().enumerate() {
        let (p, ix) = row;
        let base = ri * l;
        let mut open = |q: usize, keys: std::ops::Range<usize>| {
            mask[(base + q) * l + keys.start..(base + q) * l + keys.end].fill(0.0);
        };
        for (j, &t) in p.iter().enumerate() {
            ids[base + j] = t;
            pos[base + j] = j as u32;
            open(j, 0..j + 1);
        }
        let mut off = p.len();
        for &si in ix {
            let r = seqs[si].1;
            for (j, &t) in r.iter().enumerate() {
                let q = off + j;
                ids[base + q] = t;
                pos[base + q] = (p.len() + j) as u32;
                open(q, 0..p.len());
                open(q, off..q + 1);
                // The last prompt token predicts the first response token.
                let src = if j == 0 {
                    p.len().saturating_sub(1)
                } else {
                    q - 1
                };
                gather.push((base + src) as u32);
                targets.push(t);
                owner.push(si);
            }
            tokens[si] = r.len();
            off += r.len();
        }
        // Padding sees only itself: its output is never read, and no row is fully masked.
        for q in row_len(row)..l {
            open(q, q..q + 1);
        }
    }
    let m = gather.len();
    if m == 0 {
        return Ok(SeqLogps {
            logps: Tensor::zeros(n, DType::F32, dev)?,
            mean_logits: vec![0.0; n],
            tokens,
            ckpt: None,
        });
    }
    let mut seg = vec![0f32; n * m];
    for (k, &i) in owner.iter().enumerate() {
        seg[i * m + k] = if average { 1.0 / tokens[i] as f32 } else { 1.0 };
    }
    let ids = Tensor::from_vec(ids, (nr, l), dev)?;
    let pos = Tensor::from_vec(pos, (nr, l), dev)?;
    let mask = Tensor::from_vec(mask, (nr, 1, l, l), dev)?.to_dtype(model.dtype)?;
    let (h, ckpt) = model.forward_hidden_ckpt(&ids, &pos, &mask, None, mode)?; // [R, L, H]
    let hdim = h.dim(2)?;
    let sel = h
        .reshape((nr * l, hdim))?
        .index_select(&Tensor::from_vec(gather, m, dev)?, 0)?; // [M, H]
    let logits = model.logits(&sel.unsqueeze(0)?, mode)?.squeeze(0)?; // [M, V]
    let tok_lp = if crate::kernels::fused::supported(&logits) {
        crate::kernels::fused::token_logps(&logits, &Tensor::from_vec(targets, m, dev)?)?
    } else {
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        lsm.gather(&Tensor::from_vec(targets, (m, 1), dev)?, 1)?
    }; // [M, 1]
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
        ckpt,
    })
}
