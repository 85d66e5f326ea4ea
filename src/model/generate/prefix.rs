//! Shared-prefix prefill: a batch's prompts as a token trie, each shared run computed once.
//!
//! Reviewer prompts repeat a lot: the system message and the few-shot turns drawn from a small
//! pool, so about two thirds of a batch's prompt tokens are a prefix some other prompt already
//! has. The trie's nodes are runs of tokens that the same set of prompts share. Nodes are computed
//! level by level, one batched forward per level: each node's row is given its ancestors' keys
//! and values as cached past (left-padded), and its own tokens at the positions they have in the
//! prompt. Keys carry their position (RoPE is applied before caching), so a prompt's cache is
//! simply its path's node caches side by side, exactly what a whole-prompt prefill would hold,
//! up to float rounding from the different matrix shapes.

use super::Model;
use crate::error::Result;
use crate::model::llama::{build_mask, build_positions, KvCache, Mode};
use candle_core::{DType, Tensor};

struct Node {
    parent: Option<usize>,
    /// Tokens before this node in every prompt through it.
    start: usize,
    tokens: Vec<u32>,
    level: usize,
    /// Per layer: keys and values of this node's tokens, [nkv, len, hd].
    kv: Vec<(Tensor, Tensor)>,
    /// Logits after the node's last token, when a prompt ends here.
    logits: Option<Vec<f32>>,
    ends_prompt: bool,
}

/// Build the trie: `end[i]` is the node where prompt `i` ends.
fn build(prompts: &[&[u32]]) -> (Vec<Node>, Vec<usize>) {
    let mut nodes = Vec::new();
    let mut end = vec![usize::MAX; prompts.len()];
    let all: Vec<usize> = (0..prompts.len()).collect();
    // Work list: (prompts in this subtree, offset where the subtree starts, parent, level).
    let mut work = vec![(all, 0usize, None::<usize>, 0usize)];
    while let Some((group, off, parent, level)) = work.pop() {
        // Split by the token at `off`; prompts ending at `off` ended at the parent already.
        let mut by_tok: Vec<(u32, Vec<usize>)> = Vec::new();
        for &i in &group {
            if let Some(&t) = prompts[i].get(off) {
                match by_tok.iter_mut().find(|(x, _)| *x == t) {
                    Some((_, v)) => v.push(i),
                    None => by_tok.push((t, vec![i])),
                }
            }
        }
        for (_, sub) in by_tok {
            // The run every prompt of `sub` shares, stopping where the shortest one ends.
            let first = prompts[sub[0]];
            let mut len = 1;
            while sub.iter().all(|&i| {
                let p = prompts[i];
                off + len < p.len() && p[off + len] == first[off + len]
            }) {
                len += 1;
            }
            let id = nodes.len();
            let mut ends = false;
            for &i in &sub {
                if prompts[i].len() == off + len {
                    end[i] = id;
                    ends = true;
                }
            }
            nodes.push(Node {
                parent,
                start: off,
                tokens: first[off..off + len].to_vec(),
                level,
                kv: Vec::new(),
                logits: None,
                ends_prompt: ends,
            });
            let rest: Vec<usize> = sub
                .into_iter()
                .filter(|&i| prompts[i].len() > off + len)
                .collect();
            if !rest.is_empty() {
                work.push((rest, off + len, Some(id), level + 1));
            }
        }
    }
    (nodes, end)
}

/// Root-to-node path.
fn path(nodes: &[Node], mut n: usize) -> Vec<usize> {
    let mut p = vec![n];
    while let Some(up) = nodes[n].parent {
        p.push(up);
        n = up;
    }
    p.reverse();
    p
}

/// Left-padded per-layer cache tensors [R, nkv, width, hd] from each row's node path.
fn stack_paths(
    model: &Model,
    nodes: &[Node],
    paths: &[Vec<usize>],
    lens: &[usize],
    width: usize,
    cap: usize,
) -> Result<KvCache> {
    let c = &model.llama.cfg;
    let (nkv, hd) = (c.num_key_value_heads, c.head_dim);
    let mut cache = KvCache::new(&model.llama, paths.len(), cap.max(width).max(1))?;
    if width > 0 {
        for li in 0..c.num_hidden_layers {
            for which in 0..2 {
                let rows = paths
                    .iter()
                    .zip(lens)
                    .map(|(p, &len)| {
                        let mut parts = Vec::with_capacity(p.len() + 1);
                        if len < width {
                            parts.push(Tensor::zeros(
                                (nkv, width - len, hd),
                                model.llama.kv_dtype(),
                                &model.llama.device,
                            )?);
                        }
                        for &n in p {
                            let (k, v) = &nodes[n].kv[li];
                            parts.push(if which == 0 { k.clone() } else { v.clone() });
                        }
                        Ok(Tensor::cat(&parts, 1)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let dst = if which == 0 {
                    &cache.k[li]
                } else {
                    &cache.v[li]
                };
                dst.slice_set(&Tensor::stack(&rows, 0)?, 2, 0)?;
            }
        }
    }
    cache.len = width;
    Ok(cache)
}

/// One batched forward over `rows` (nodes whose ancestors are done): stores each node's keys
/// and values, and the logits where a prompt ends.
// Long because one forward: gathering the rows, the masks and the cache writes share indices.
fn run_nodes(
    model: &Model,
    nodes: &mut [Node],
    rows: &[usize],
    mode: Mode,
    scratch: &mut crate::model::cpu_forward::Scratch,
) -> Result<()> {
    let dev = model.llama.device.clone();
    let pad = model.meta.tok.pad_id;
    // Past of each row: its ancestors, left-padded to the longest.
    let ancestors: Vec<Vec<usize>> = rows
        .iter()
        .map(|&n| {
            let mut p = path(nodes, n);
            p.pop();
            p
        })
        .collect();
    let past_lens: Vec<usize> = rows.iter().map(|&n| nodes[n].start).collect();
    let past = past_lens.iter().copied().max().unwrap_or(0);
    let t = rows
        .iter()
        .map(|&n| nodes[n].tokens.len())
        .max()
        .unwrap_or(1);
    let mut cache = stack_paths(model, nodes, &ancestors, &past_lens, past, past + t)?;
    // New tokens right-padded: padding comes after every real token, so causal masking
    // keeps it out of them, and its keys are never copied out.
    let mut ids = Vec::with_capacity(rows.len() * t);
    for &n in rows {
        let tk = &nodes[n].tokens;
        ids.extend_from_slice(tk);
        ids.extend(std::iter::repeat_n(pad, t - tk.len()));
    }
    let start: Vec<usize> = past_lens.iter().map(|&p| past - p).collect();
    // Logits where prompts end: the head only at those positions.
    let ending: Vec<(usize, usize)> = rows
        .iter()
        .enumerate()
        .filter(|(_, &n)| nodes[n].ends_prompt)
        .map(|(r, &n)| (n, r * t + nodes[n].tokens.len() - 1))
        .collect();
    let at: Vec<usize> = ending.iter().map(|&(_, i)| i).collect();
    let logits = if let Some(w) = model.llama.blocks_for(mode) {
        model
            .llama
            .forward_cpu(w, &ids, t, &start, &mut cache, mode, scratch, &at)?
    } else {
        let ids = Tensor::from_vec(ids, (rows.len(), t), &dev)?;
        let mask = build_mask(&start, past, t, model.llama.dtype, &dev)?;
        let pos = build_positions(&start, past, t, &dev)?;
        let h = model
            .llama
            .forward_hidden(&ids, &pos, &mask, Some(&mut cache), mode)?;
        if at.is_empty() {
            Vec::new()
        } else {
            let hdim = h.dim(2)?;
            let at: Vec<u32> = at.iter().map(|&i| i as u32).collect();
            let sel = h
                .reshape((rows.len() * t, hdim))?
                .index_select(&Tensor::new(at, &dev)?, 0)?;
            model
                .llama
                .logits(&sel.unsqueeze(0)?, mode)?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_vec2()?
        }
    };
    for (r, &n) in rows.iter().enumerate() {
        let len = nodes[n].tokens.len();
        nodes[n].kv = (0..model.llama.cfg.num_hidden_layers)
            .map(|li| -> Result<_> {
                let cut = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.narrow(0, r, 1)?
                        .narrow(2, past, len)?
                        .squeeze(0)?
                        .contiguous()?)
                };
                Ok((cut(&cache.k[li])?, cut(&cache.v[li])?))
            })
            .collect::<Result<_>>()?;
    }
    for ((n, _), lg) in ending.into_iter().zip(logits) {
        nodes[n].logits = Some(lg);
    }
    Ok(())
}

/// Split rows sorted by descending length into contiguous groups, minimising padded tokens plus
/// a fixed cost per forward pass (a small batch runs its matmuls less efficiently).
fn split_by_length(lens: &[usize]) -> Vec<(usize, usize)> {
    const PER_PASS: usize = 48;
    let n = lens.len();
    let mut best = vec![(usize::MAX, 0usize); n + 1];
    best[0] = (0, 0);
    for j in 1..=n {
        for i in 0..j {
            // Sorted descending: the group i..j pads to lens[i].
            let c = best[i].0 + (j - i) * lens[i] + PER_PASS;
            if c < best[j].0 {
                best[j] = (c, i);
            }
        }
    }
    let mut out = Vec::new();
    let mut j = n;
    while j > 0 {
        let i = best[j].1;
        out.push((i, j));
        j = i;
    }
    out.reverse();
    out
}

/// Prefill `prompts` (none empty) sharing their common prefixes. Returns the batch's left-padded
/// cache (room for `cap` columns), each row's first valid column, and each prompt's last logits.
pub fn prefill_shared(
    model: &Model,
    prompts: &[&[u32]],
    cap: usize,
    mode: Mode,
) -> Result<(KvCache, Vec<usize>, Vec<Vec<f32>>)> {
    crate::error::ensure!(
        prompts.iter().all(|p| !p.is_empty()),
        "shared-prefix prefill needs non-empty prompts (prompt {} is empty)",
        prompts.iter().position(|p| p.is_empty()).unwrap_or(0)
    );
    let (mut nodes, end) = build(prompts);
    // Buffers of the plain-Rust forward, reused by every pass.
    let mut scratch = crate::model::cpu_forward::Scratch::default();
    let levels = nodes.iter().map(|n| n.level).max().unwrap_or(0) + 1;
    for level in 0..levels {
        let mut rows: Vec<usize> = (0..nodes.len())
            .filter(|&n| nodes[n].level == level)
            .collect();
        rows.sort_by_key(|&n| std::cmp::Reverse(nodes[n].tokens.len()));
        let lens: Vec<usize> = rows.iter().map(|&n| nodes[n].tokens.len()).collect();
        for (a, b) in split_by_length(&lens) {
            run_nodes(model, &mut nodes, &rows[a..b], mode, &mut scratch)?;
        }
    }
    let paths: Vec<Vec<usize>> = end.iter().map(|&n| path(&nodes, n)).collect();
    let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let width = lens.iter().copied().max().unwrap_or(0);
    let cache = stack_paths(model, &nodes, &paths, &lens, width, cap)?;
    let start = lens.iter().map(|&l| width - l).collect();
    let logits = end
        .iter()
        .map(|&n| {
            nodes[n]
                .logits
                .clone()
                .expect("every prompt end has logits")
        })
        .collect();
    Ok((cache, start, logits))
}

/// Every prompt of a run as one trie, each node computed the first time an admitted prompt needs
/// it and dropped once every prompt through it has been admitted: the system message and the
/// few-shot turns are computed once for the whole run, not once per refill (vLLM's automatic
/// prefix caching, for a run whose prompts are all known at the start). What is kept at any time
/// is the nodes that prompts still waiting share with ones already admitted.
pub(crate) struct PrefixStore {
    nodes: Vec<Node>,
    /// The node each prompt ends at.
    end: Vec<usize>,
    /// Per node, the prompts through it not yet admitted.
    pending: Vec<usize>,
    /// With or without the adapter: the keys and values hold one or the other.
    mode: Mode,
    scratch: crate::model::cpu_forward::Scratch,
}

impl PrefixStore {
    /// The trie of `prompts` (none empty), nothing computed yet.
    pub(crate) fn new(prompts: &[&[u32]], mode: Mode) -> Self {
        let (nodes, end) = build(prompts);
        let mut pending = vec![0usize; nodes.len()];
        for &e in &end {
            for n in path(&nodes, e) {
                pending[n] += 1;
            }
        }
        Self {
            nodes,
            end,
            pending,
            mode,
            scratch: Default::default(),
        }
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// Prefill prompts `which` (indices into the prompts the store was built from, each admitted
    /// once): what [`prefill_shared`] returns for them, computing only the nodes no earlier call
    /// computed.
    pub(crate) fn prefill(
        &mut self,
        model: &Model,
        which: &[usize],
        cap: usize,
    ) -> Result<(KvCache, Vec<usize>, Vec<Vec<f32>>)> {
        crate::error::ensure!(
            which
                .iter()
                .all(|&i| i < self.end.len() && self.pending[self.end[i]] > 0),
            "internal: prompts {which:?} are not waiting in the prefix store"
        );
        let paths: Vec<Vec<usize>> = which
            .iter()
            .map(|&i| path(&self.nodes, self.end[i]))
            .collect();
        let mut todo: Vec<usize> = paths
            .iter()
            .flatten()
            .copied()
            .filter(|&n| self.nodes[n].kv.is_empty())
            .collect();
        todo.sort_unstable();
        todo.dedup();
        let top = todo.iter().map(|&n| self.nodes[n].level).max();
        for level in 0..top.map_or(0, |l| l + 1) {
            let mut rows: Vec<usize> = todo
                .iter()
                .copied()
                .filter(|&n| self.nodes[n].level == level)
                .collect();
            rows.sort_by_key(|&n| std::cmp::Reverse(self.nodes[n].tokens.len()));
            let lens: Vec<usize> = rows.iter().map(|&n| self.nodes[n].tokens.len()).collect();
            for (a, b) in split_by_length(&lens) {
                run_nodes(
                    model,
                    &mut self.nodes,
                    &rows[a..b],
                    self.mode,
                    &mut self.scratch,
                )?;
            }
        }
        let lens: Vec<usize> = which
            .iter()
            .map(|&i| {
                let e = &self.nodes[self.end[i]];
                e.start + e.tokens.len()
            })
            .collect();
        let width = lens.iter().copied().max().unwrap_or(0);
        let cache = stack_paths(model, &self.nodes, &paths, &lens, width, cap)?;
        let start = lens.iter().map(|&l| width - l).collect();
        let logits = which
            .iter()
            .map(|&i| {
                self.nodes[self.end[i]].logits.clone().ok_or_else(|| {
                    crate::error::err!("internal: prompt {i}'s last logits were not kept")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for p in &paths {
            for &n in p {
                self.pending[n] -= 1;
                if self.pending[n] == 0 {
                    self.nodes[n].kv = Vec::new();
                    self.nodes[n].logits = None;
                }
            }
        }
        Ok((cache, start, logits))
    }
}

/// Prompt tokens a trie prefill computes, against the total: what sharing saves.
pub fn unique_tokens(prompts: &[&[u32]]) -> usize {
    build(prompts).0.iter().map(|n| n.tokens.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trie_splits_at_branches_and_prompt_ends() {
        let a: &[u32] = &[1, 2, 3, 4];
        let b: &[u32] = &[1, 2, 3, 9, 9];
        let c: &[u32] = &[1, 2];
        let d: &[u32] = &[7];
        let (nodes, end) = build(&[a, b, c, d]);
        let text = |i: usize| -> Vec<u32> {
            path(&nodes, end[i])
                .iter()
                .flat_map(|&n| nodes[n].tokens.clone())
                .collect()
        };
        for (i, p) in [a, b, c, d].iter().enumerate() {
            assert_eq!(text(i), p.to_vec(), "prompt {i}");
        }
        // [1,2] once, [3] once, [4], [9,9], [7]: 7 tokens computed instead of 12.
        assert_eq!(unique_tokens(&[a, b, c, d]), 7);
        assert_eq!(nodes[end[2]].tokens, vec![1, 2]);
        assert!(nodes[end[2]].ends_prompt);
    }

    /// The run-wide store gives each admitted group exactly what a trie prefill of that group
    /// alone gives (`blocks`: every row's arithmetic its own), though the prefix the groups
    /// share is computed in the first call only; once every prompt is admitted nothing is kept.
    #[test]
    fn the_store_prefills_as_each_group_alone_and_keeps_nothing_after() {
        use crate::model::cpu_forward::tests::{prompt, smollm2};
        use crate::model::options::WeightsMode;
        let m = smollm2(WeightsMode::Blocks);
        let ps: Vec<Vec<u32>> = [
            "Attention Is All You Need",
            "QLoRA",
            "Attention Is Not Enough",
        ]
        .iter()
        .map(|t| prompt(&m, t))
        .collect();
        let all: Vec<&[u32]> = ps.iter().map(|p| &p[..]).collect();
        let mut store = PrefixStore::new(&all, Mode::infer());
        let computed = |st: &PrefixStore| -> usize {
            st.nodes
                .iter()
                .filter(|n| !n.kv.is_empty())
                .map(|n| n.tokens.len())
                .sum()
        };
        for group in [vec![1], vec![0, 2]] {
            let (cache, start, logits) = store.prefill(&m, &group, 64).unwrap();
            let alone: Vec<&[u32]> = group.iter().map(|&i| all[i]).collect();
            let (want, wstart, wlogits) = prefill_shared(&m, &alone, 64, Mode::infer()).unwrap();
            assert_eq!((&start, &logits), (&wstart, &wlogits), "group {group:?}");
            let w = cache.len;
            for li in [0, m.llama.cfg.num_hidden_layers - 1] {
                for (x, y) in [(&cache.k[li], &want.k[li]), (&cache.v[li], &want.v[li])] {
                    let x = x.narrow(2, 0, w).unwrap().flatten_all().unwrap();
                    let y = y.narrow(2, 0, w).unwrap().flatten_all().unwrap();
                    let (x, y) = (
                        x.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                        y.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                    );
                    assert!(x == y, "group {group:?}, layer {li}: other keys or values");
                }
            }
            if group == vec![1] {
                // The prefix prompt 1 shares with 0 and 2 is kept for them.
                assert!(computed(&store) > 0);
            }
        }
        assert_eq!(computed(&store), 0, "every prompt admitted: nothing kept");
    }

    #[test]
    fn rows_split_where_padding_would_cost_more_than_a_pass() {
        // Two long and two short rows: padding the short ones to 100 wastes ~180 tokens.
        assert_eq!(split_by_length(&[100, 99, 10, 9]), vec![(0, 2), (2, 4)]);
        // Similar lengths stay in one pass.
        assert_eq!(split_by_length(&[40, 38, 37, 30]), vec![(0, 4)]);
        assert_eq!(split_by_length(&[]), vec![]);
    }
}
