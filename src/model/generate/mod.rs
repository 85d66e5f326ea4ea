//! Batched generation: shared-prefix prefill, KV-cached decode, per-row samplers and stopping.
//!
//! Prompts are sorted by length so a batch carries little padding. When a row finishes, its slot
//! is refilled with the next prompt (prefilled in a sub-batch and spliced into the cache) instead
//! of decoding a dead row. Each prompt's sampler is seeded from (seed, prompt id), so the text of a
//! prompt does not depend on batch size, order, or where a resumed run starts.
//!
//! May import `model::load`, the model's core, `kernels` and the base modules; never `backend`,
//! `dpo` or anything above.

pub(crate) mod limits;
pub mod prefix;

use crate::error::Result;
use crate::model::llama::{build_mask, build_positions, KvCache, Mode};
use crate::model::load::Model;
use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = no top-k filter.
    pub top_k: usize,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Keep going past the stop tokens (benchmarks; `pipeline serve`'s `ignore_eos`).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Left out when off, so a serialized `Sampling` reads as it did before penalties existed.
    #[serde(default, skip_serializing_if = "Penalties::is_off")]
    pub penalties: Penalties,
}

/// Penalties on tokens already seen, applied to the raw logits before temperature, top-k and
/// top-p (transformers runs its repetition penalty before its warpers; llama.cpp's sampler chain
/// starts with its penalties). At their off values nothing is computed and no history is kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Penalties {
    /// transformers' `repetition_penalty`: each distinct id of the prompt and the generated
    /// tokens has its logit divided by this when positive, multiplied when negative. 1 = off.
    pub repetition: f64,
    /// OpenAI's `frequency_penalty`: minus this times the id's count among generated tokens.
    pub frequency: f64,
    /// OpenAI's `presence_penalty`: minus this once for an id generated at least once.
    pub presence: f64,
}

impl Penalties {
    pub const OFF: Penalties = Penalties {
        repetition: 1.0,
        frequency: 0.0,
        presence: 0.0,
    };

    pub fn is_off(&self) -> bool {
        *self == Self::OFF
    }
}

impl Default for Penalties {
    fn default() -> Self {
        Self::OFF
    }
}

/// What one row's penalties read, kept up to date as tokens are accepted rather than recounted
/// each step: every id seen (prompt and generated), with how many times it was generated
/// (0 for an id only in the prompt).
#[derive(Debug, Clone, Default)]
pub struct History {
    counts: HashMap<u32, u32>,
}

impl History {
    pub fn new(prompt: &[u32]) -> Self {
        let mut counts = HashMap::with_capacity(prompt.len());
        for &t in prompt {
            counts.entry(t).or_insert(0);
        }
        Self { counts }
    }

    /// A generated token.
    pub fn push(&mut self, t: u32) {
        *self.counts.entry(t).or_insert(0) += 1;
    }
}

/// Apply `p` to `logits` given what the row has seen: the repetition penalty once per distinct
/// id, then `frequency * count + presence` subtracted for generated ids (vLLM's order). In f32,
/// as transformers computes on f32 logits.
pub fn penalize(logits: &mut [f32], p: &Penalties, h: &History) {
    let rep = p.repetition as f32;
    let (freq, pres) = (p.frequency as f32, p.presence as f32);
    let scale = p.repetition != 1.0;
    for (&t, &c) in &h.counts {
        // Ids beyond the head (none from a checked tokenizer) have no logit to move.
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if scale {
            *l = if *l < 0.0 { *l * rep } else { *l / rep };
        }
        if c > 0 {
            *l -= freq * c as f32 + pres;
        }
    }
}

/// Penalize (when the row keeps a history, that is when its penalties are on) then sample.
fn draw(mut logits: Vec<f32>, s: &Sampling, h: Option<&History>, rng: &mut ChaCha8Rng) -> u32 {
    if let Some(h) = h {
        penalize(&mut logits, &s.penalties, h);
    }
    sample(&logits, s, rng)
}

impl Sampling {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens,
            seed: 0,
            ignore_eos: false,
            penalties: Penalties::OFF,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    /// Stable id: seeds the row's sampler and identifies the output.
    pub id: usize,
    pub ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Finish {
    Eos,
    Length,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub id: usize,
    pub(crate) prompt_tokens: usize,
    /// Generated ids, without the stop token.
    pub tokens: Vec<u32>,
    pub(crate) finish: Finish,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub(crate) prompts: usize,
    pub(crate) prompt_tokens: usize,
    pub(crate) generated_tokens: usize,
    pub(crate) prefill_secs: f64,
    pub(crate) decode_secs: f64,
    pub(crate) decode_steps: usize,
    /// Prefills that admitted rows (a refill of freed slots is one).
    pub(crate) admits: usize,
    /// Live rows at each decoding step: the batch's occupancy over the run (`bench stage`).
    #[serde(skip)]
    pub(crate) occupancy: Vec<u32>,
}

/// The sampler of one prompt: its own stream of the sampling seed.
pub fn row_rng(seed: u64, id: usize) -> ChaCha8Rng {
    crate::rng::stream(seed, id as u64)
}

/// A temperature below this samples greedily. Dividing f32 logits by a temperature near zero
/// overflows them to infinities (1e-300 is 0 as an f32), and the draw then goes to the least
/// likely tokens; long before that, at 1e-4, a logit gap of 0.01 is a factor of e^100, so
/// sampling is argmax already.
pub const GREEDY_BELOW: f64 = 1e-4;

/// Draw the next token: temperature, then top-k, then top-p (the order transformers uses). The
/// logits are already penalized ([`penalize`]) when the row has penalties.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    if s.temperature < GREEDY_BELOW {
        return argmax(logits);
    }
    let t = s.temperature as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if s.top_k > 0 && s.top_k < idx.len() {
        idx.select_nth_unstable_by(s.top_k - 1, by_logit);
        idx.truncate(s.top_k);
    }
    idx.sort_unstable_by(by_logit);
    let max = logits[idx[0] as usize] / t;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i as usize] / t - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= s.top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (n, p) in probs.iter().enumerate() {
        if u < *p {
            return idx[n];
        }
        u -= p;
    }
    idx[probs.len() - 1]
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

struct Row {
    id: usize,
    prompt_tokens: usize,
    s: Sampling,
    rng: ChaCha8Rng,
    out: Vec<u32>,
    /// Only with penalties on: the default path keeps no map and does no extra work.
    history: Option<History>,
    /// Sampled, not yet fed to the model.
    pending: u32,
    /// `pending` has been appended to `out` (or ended the row) already.
    consumed: bool,
}

/// Rows being decoded together over one KV cache, admitted and retired at any step: the engine
/// of [`generate`] (a fixed list of prompts) and of `pipeline serve` (requests as they come).
///
/// A step is [`Decoder::consume`] (each row's sampled token: kept, or the row finishes) then
/// [`Decoder::decode`] (one forward pass for the live rows). Rows admitted between the two wait
/// for the next decode; their first token was sampled from the prefill.
///
/// A row that finishes leaves its cache slot empty rather than the batch being compacted, and
/// the next admission writes its new rows into the empty slots in place: with rows ending at
/// different steps, a refill then copies only the new rows' keys and values, not the whole
/// batch's twice (select the survivors, append the newcomers). Empty slots that no admission
/// fills are dropped before the next decoding step.
#[derive(Default)]
pub(crate) struct Decoder {
    /// Cache rows in order; `None` is an empty slot.
    rows: Vec<Option<Row>>,
    /// Per row, the first cache column it uses (columns before are left padding).
    start: Vec<usize>,
    cache: Option<KvCache>,
    /// Buffers of the plain-Rust forward (`cpu_forward.rs`).
    scratch: crate::model::cpu_forward::Scratch,
    /// The last prompts admitted alone, newest last, with their keys and values: the next one
    /// prefills only what follows the longest prefix it shares with one of them (llama.cpp's
    /// server reuses a slot's prompt the same way). One row's cache each, about 46 KiB a token
    /// for SmolLM2-135M.
    recent: Vec<CachedPrompt>,
    /// Every prompt of a run known at its start ([`generate`]) as one trie whose shared
    /// prefixes are computed once for the run, with the request ids it holds.
    store: Option<(prefix::PrefixStore, HashMap<usize, usize>)>,
}

struct CachedPrompt {
    ids: Vec<u32>,
    /// Computed with the adapter on (the keys and values differ from the base model's).
    lora: bool,
    /// One row, exactly `ids.len()` columns.
    cache: KvCache,
}

/// Reuse a cached prompt only when at least this many tokens are shared.
const MIN_REUSE: usize = 8;

/// Prompts kept for reuse.
const RECENT: usize = 8;

impl Decoder {
    /// Live rows.
    pub(crate) fn len(&self) -> usize {
        self.rows.iter().flatten().count()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn live(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().flatten()
    }

    /// Prefill `reqs` (shared prefixes once, when the model says so) in `mode` (with or without
    /// the attached adapter, as their decode steps will run), sample each one's first token with
    /// its own sampler, and splice them into the batch.
    // Long because one admission: the prefill's three sources (the run's store, a recent
    // prompt's cache, a fresh trie) and the two ways into the batch (empty slots in place, then
    // appended rows) share the sub-cache, its starts and the rows in one order.
    pub(crate) fn admit(
        &mut self,
        model: &Model,
        reqs: Vec<(Request, Sampling, ChaCha8Rng)>,
        mode: Mode,
    ) -> Result<()> {
        if reqs.is_empty() {
            return Ok(());
        }
        let cap = reqs
            .iter()
            .map(|(r, s, _)| r.ids.len() + s.max_new_tokens)
            .max()
            .unwrap_or(1)
            + 8;
        let take: Vec<&Request> = reqs.iter().map(|(r, _, _)| r).collect();
        let stored: Option<Vec<usize>> = self.store.as_ref().and_then(|(st, at)| {
            (st.mode().lora() == mode.lora())
                .then(|| take.iter().map(|r| at.get(&r.id).copied()).collect())
                .flatten()
        });
        let alone =
            stored.is_none() && take.len() == 1 && !take[0].ids.is_empty() && model.share_prefixes;
        let reused = if alone {
            self.prefill_after_cached(model, &take[0].ids, cap, mode)?
        } else {
            None
        };
        let (mut sub, mut sub_start, logits) = if let Some(r) = reused {
            r
        } else if let (Some(which), Some((st, _))) = (&stored, self.store.as_mut()) {
            st.prefill(model, which, cap)?
        } else if model.share_prefixes && take.iter().all(|r| !r.ids.is_empty()) {
            let ps: Vec<&[u32]> = take.iter().map(|r| &r.ids[..]).collect();
            prefix::prefill_shared(model, &ps, cap, mode)?
        } else {
            let owned: Vec<Request> = take.iter().map(|r| (*r).clone()).collect();
            prefill_padded(model, &owned, cap, mode)?
        };
        if alone {
            let n = take[0].ids.len();
            if self.recent.len() >= RECENT {
                self.recent.remove(0);
            }
            self.recent.push(CachedPrompt {
                ids: take[0].ids.clone(),
                lora: mode.lora(),
                cache: sub.columns(sub_start[0], n)?,
            });
        }
        let mut fresh = Vec::with_capacity(reqs.len());
        for ((r, s, mut rng), lg) in reqs.into_iter().zip(logits) {
            let history = (!s.penalties.is_off()).then(|| History::new(&r.ids));
            let next = draw(lg, &s, history.as_ref(), &mut rng);
            fresh.push(Row {
                id: r.id,
                prompt_tokens: r.ids.len(),
                s,
                rng,
                out: Vec::new(),
                history,
                pending: next,
                consumed: false,
            });
        }
        // Empty slots first, in place; the rest are appended below.
        let holes: Vec<usize> = (0..self.rows.len())
            .filter(|&i| self.rows[i].is_none())
            .take(fresh.len())
            .collect();
        if !holes.is_empty() {
            let Some(main) = self.cache.as_mut() else {
                crate::error::bail!("internal: empty slots without a cache");
            };
            if sub.len > main.len {
                let d = sub.len - main.len;
                main.pad_front(d)?;
                self.start.iter_mut().for_each(|x| *x += d);
            }
            let at = main.len - sub.len;
            let from: Vec<usize> = (0..holes.len()).collect();
            main.put_rows(&holes, &sub, &from, at)?;
            let mut fresh_rows = fresh.drain(..holes.len());
            for (&h, &f) in holes.iter().zip(&from) {
                self.rows[h] = fresh_rows.next();
                self.start[h] = at + sub_start[f];
            }
            drop(fresh_rows);
            if fresh.is_empty() {
                return Ok(());
            }
            let rest: Vec<usize> = (holes.len()..holes.len() + fresh.len()).collect();
            sub.select_rows(&rest)?;
            sub_start = rest.iter().map(|&i| sub_start[i]).collect();
        }
        self.rows.extend(fresh.into_iter().map(Some));
        match self.cache.as_mut() {
            None => {
                self.cache = Some(sub);
                self.start = sub_start;
            }
            Some(main) => {
                // Align lengths by padding the shorter cache at the front, then append rows.
                if sub.len < main.len {
                    let d = main.len - sub.len;
                    sub.pad_front(d)?;
                    sub_start.iter_mut().for_each(|x| *x += d);
                } else if sub.len > main.len {
                    let d = sub.len - main.len;
                    main.pad_front(d)?;
                    self.start.iter_mut().for_each(|x| *x += d);
                }
                append_rows(main, &sub)?;
                self.start.extend(sub_start);
            }
        }
        debug_assert_eq!(self.rows.len(), self.start.len());
        Ok(())
    }

    /// Prefill `ids` after the prefix it shares with the last prompt admitted alone, if that is
    /// long enough: its cache (one row, no padding), start, and last logits.
    #[allow(clippy::type_complexity)]
    fn prefill_after_cached(
        &self,
        model: &Model,
        ids: &[u32],
        cap: usize,
        mode: Mode,
    ) -> Result<Option<(KvCache, Vec<usize>, Vec<Vec<f32>>)>> {
        let common = |p: &CachedPrompt| p.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
        // The newest of the longest matches.
        let Some((shared, prev)) = self
            .recent
            .iter()
            .filter(|p| p.lora == mode.lora())
            .map(|p| (common(p), p))
            .max_by_key(|(n, _)| *n)
        else {
            return Ok(None);
        };
        // At least the last token is computed: its logits pick the first new token.
        let shared = shared.min(ids.len() - 1);
        if shared < MIN_REUSE {
            return Ok(None);
        }
        let dev = &model.llama.device;
        let mut cache = KvCache::new(&model.llama, 1, cap.max(ids.len()))?;
        cache.copy_prefix(&prev.cache, shared)?;
        let rest = &ids[shared..];
        let t = rest.len();
        if let Some(w) = model.llama.blocks_for(mode) {
            let mut scratch = crate::model::cpu_forward::Scratch::default();
            let logits = model.llama.forward_cpu(
                w,
                rest,
                t,
                &[0],
                &mut cache,
                mode,
                &mut scratch,
                &[t - 1],
            )?;
            return Ok(Some((cache, vec![0], logits)));
        }
        let x = Tensor::from_vec(rest.to_vec(), (1, t), dev)?;
        let mask = build_mask(&[0], shared, t, model.llama.dtype, dev)?;
        let pos = build_positions(&[0], shared, t, dev)?;
        let logits = model
            .llama
            .forward(&x, &pos, &mask, Some(&mut cache), false, mode)?;
        Ok(Some((cache, vec![0], logits.to_vec2()?)))
    }

    /// Take each row's sampled token: `on_token(id, token)` for a token kept, and the outputs of
    /// rows that finished (a stop token, or their `max_new_tokens`), which leave the batch.
    pub(crate) fn consume(
        &mut self,
        model: &Model,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Output>> {
        let tok = &model.meta.tok;
        let mut done = Vec::new();
        for (i, slot) in self.rows.iter_mut().enumerate() {
            let Some(r) = slot else { continue };
            if r.consumed {
                // Consumed before a refill interrupted this step: it waits for the decode step.
                continue;
            }
            r.consumed = true;
            let t = r.pending;
            if !r.s.ignore_eos && tok.is_stop(t) {
                done.push((i, Finish::Eos));
                continue;
            }
            r.out.push(t);
            if let Some(h) = r.history.as_mut() {
                h.push(t);
            }
            on_token(r.id, t);
            if r.out.len() >= r.s.max_new_tokens {
                done.push((i, Finish::Length));
            }
        }
        // Finished rows leave empty slots: the next admission fills them, and `decode` drops
        // the ones it does not.
        Ok(done
            .into_iter()
            .map(|(i, finish)| {
                let r = self.rows[i].take().expect("each row finishes once");
                Output {
                    id: r.id,
                    prompt_tokens: r.prompt_tokens,
                    tokens: r.out,
                    finish,
                }
            })
            .collect())
    }

    /// Drop the rows with these ids (a client that left, a stop string); their slots are free.
    pub(crate) fn cancel(&mut self, ids: &[usize]) -> Result<()> {
        for slot in self.rows.iter_mut() {
            if slot.as_ref().is_some_and(|r| ids.contains(&r.id)) {
                *slot = None;
            }
        }
        Ok(())
    }

    /// Drop the empty slots (rows and cache rows).
    fn compact(&mut self) -> Result<()> {
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&i| self.rows[i].is_some())
            .collect();
        if keep.len() == self.rows.len() {
            return Ok(());
        }
        self.start = keep.iter().map(|&i| self.start[i]).collect();
        self.rows.retain(Option::is_some);
        if self.rows.is_empty() {
            self.cache = None;
        } else if let Some(c) = self.cache.as_mut() {
            c.select_rows(&keep)?;
        }
        Ok(())
    }

    /// Drop leading cache columns that no live row uses, once they are at least half of the
    /// columns (before admitting rows after others left): each trim copies the cache, so
    /// waiting for half makes its cost a constant share of the columns decoded meanwhile.
    pub(crate) fn trim(&mut self) -> Result<()> {
        let m = (0..self.rows.len())
            .filter(|&i| self.rows[i].is_some())
            .map(|i| self.start[i])
            .min();
        if let (Some(c), Some(m)) = (self.cache.as_mut(), m) {
            if m > 0 && 2 * m >= c.len {
                c.trim_front(m)?;
                // An empty slot's start may sit before `m`: it is rewritten on refill.
                self.start.iter_mut().for_each(|x| *x = x.saturating_sub(m));
            }
        }
        Ok(())
    }

    /// One forward step for every live row; each samples its next token.
    pub(crate) fn decode(&mut self, model: &Model, mode: Mode) -> Result<()> {
        self.compact()?;
        let ids: Vec<u32> = self.live().map(|r| r.pending).collect();
        let c = self.cache.as_mut().expect("live rows have a cache");
        let logits = if let Some(w) = model.llama.blocks_for(mode.decode_step()) {
            model
                .llama
                .decode_step_cpu(w, &ids, &self.start, c, mode, &mut self.scratch)?
        } else {
            self.decode_candle(model, ids, mode)?
        };
        // Each row draws from its own generator, so sampling rows in parallel is deterministic.
        self.rows
            .par_iter_mut()
            .map(|r| r.as_mut().expect("compacted above"))
            .zip(logits)
            .for_each(|(r, lg)| {
                r.pending = draw(lg, &r.s, r.history.as_ref(), &mut r.rng);
                r.consumed = false;
            });
        Ok(())
    }

    /// The decoding step as candle ops (any device, dtype and weights).
    fn decode_candle(&mut self, model: &Model, ids: Vec<u32>, mode: Mode) -> Result<Vec<Vec<f32>>> {
        let c = self.cache.as_mut().expect("live rows have a cache");
        let ids = Tensor::from_vec(ids, (self.rows.len(), 1), &model.llama.device)?;
        let mask = build_mask(
            &self.start,
            c.len,
            1,
            model.llama.dtype,
            &model.llama.device,
        )?;
        let pos = build_positions(&self.start, c.len, 1, &model.llama.device)?;
        let logits = model
            .llama
            .forward(&ids, &pos, &mask, Some(c), false, mode.decode_step())?;
        Ok(logits.to_vec2()?)
    }
}

/// Generate for every request; `on_done` gets each output as soon as its row finishes.
pub fn generate(
    model: &Model,
    mut reqs: Vec<Request>,
    s: &Sampling,
    batch_size: usize,
    mut on_done: impl FnMut(Output, &Stats) -> Result<()>,
) -> Result<Stats> {
    crate::model::generate::limits::check_generation_fits(
        model.llama.cfg.max_position_embeddings,
        s.max_new_tokens,
        reqs.iter()
            .map(|r| (r.ids.len(), || format!("request {}", r.id))),
    )?;
    let mut stats = Stats {
        prompts: reqs.len(),
        ..Default::default()
    };
    // Longest first, popped from the back: shortest first, and batches of similar lengths.
    reqs.sort_by(|a, b| b.ids.len().cmp(&a.ids.len()).then(b.id.cmp(&a.id)));
    let mut dec = Decoder::default();
    if model.share_prefixes && reqs.iter().all(|r| !r.ids.is_empty()) {
        let ps: Vec<&[u32]> = reqs.iter().map(|r| &r.ids[..]).collect();
        let at = reqs.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
        dec.store = Some((prefix::PrefixStore::new(&ps, Mode::infer()), at));
    }
    loop {
        // Refill free slots.
        let free = batch_size.saturating_sub(dec.len());
        if free > 0 && !reqs.is_empty() {
            let take: Vec<(Request, Sampling, ChaCha8Rng)> = (0..free.min(reqs.len()))
                .filter_map(|_| reqs.pop())
                .map(|r| {
                    let rng = row_rng(s.seed, r.id);
                    (r, s.clone(), rng)
                })
                .collect();
            let t0 = Instant::now();
            stats.prompt_tokens += take.iter().map(|r| r.0.ids.len()).sum::<usize>();
            dec.admit(model, take, Mode::infer())?;
            stats.prefill_secs += t0.elapsed().as_secs_f64();
            stats.admits += 1;
        }
        if dec.is_empty() {
            break;
        }
        let done = dec.consume(model, |_, _| stats.generated_tokens += 1)?;
        if !done.is_empty() {
            for o in done {
                on_done(o, &stats)?;
            }
            // Freed slots are refilled at the top of the loop before the next decode step.
            if !reqs.is_empty() {
                dec.trim()?;
                continue;
            }
            if dec.is_empty() {
                continue;
            }
        }
        let t0 = Instant::now();
        stats.occupancy.push(dec.len() as u32);
        dec.decode(model, Mode::infer())?;
        stats.decode_secs += t0.elapsed().as_secs_f64();
        stats.decode_steps += 1;
    }
    Ok(stats)
}

/// Left-pad and run the prompts whole; returns their cache, first valid column per row, last
/// logits. (`prefix::prefill_shared` is the faster equivalent for prompts that share prefixes.)
pub fn prefill_padded(
    model: &Model,
    reqs: &[Request],
    cap: usize,
    mode: Mode,
) -> Result<(KvCache, Vec<usize>, Vec<Vec<f32>>)> {
    let l = reqs.iter().map(|r| r.ids.len()).max().unwrap_or(1).max(1);
    let pad = model.meta.tok.pad_id;
    let mut ids = Vec::with_capacity(reqs.len() * l);
    let mut start = Vec::with_capacity(reqs.len());
    for r in reqs {
        let p = l - r.ids.len();
        start.push(p);
        ids.extend(std::iter::repeat_n(pad, p));
        ids.extend_from_slice(&r.ids);
    }
    let dev = &model.llama.device;
    let mut cache = KvCache::new(&model.llama, reqs.len(), cap.max(l))?;
    if let Some(w) = model.llama.blocks_for(mode) {
        let last: Vec<usize> = (0..reqs.len()).map(|i| i * l + l - 1).collect();
        let mut scratch = crate::model::cpu_forward::Scratch::default();
        let logits =
            model
                .llama
                .forward_cpu(w, &ids, l, &start, &mut cache, mode, &mut scratch, &last)?;
        return Ok((cache, start, logits));
    }
    let ids = Tensor::from_vec(ids, (reqs.len(), l), dev)?;
    let mask = build_mask(&start, 0, l, model.llama.dtype, dev)?;
    let pos = build_positions(&start, 0, l, dev)?;
    let logits = model
        .llama
        .forward(&ids, &pos, &mask, Some(&mut cache), false, mode)?;
    Ok((cache, start, logits.to_vec2()?))
}

fn append_rows(main: &mut KvCache, sub: &KvCache) -> Result<()> {
    for (m, s) in main
        .k
        .iter_mut()
        .zip(&sub.k)
        .chain(main.v.iter_mut().zip(&sub.v))
    {
        let len = main.len;
        let a = m.narrow(2, 0, len)?;
        let b = s.narrow(2, 0, len)?;
        let joined = Tensor::cat(&[&a, &b], 0)?;
        let (bb, h, _, d) = joined.dims4()?;
        let cap = m.dim(2)?.max(s.dim(2)?);
        let fresh = Tensor::zeros((bb, h, cap, d), joined.dtype(), joined.device())?;
        fresh.slice_set(&joined.contiguous()?, 2, 0)?;
        *m = fresh;
    }
    main.set_cap_from_tensors();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_forward::tests::{prompt, smollm2};
    use crate::model::options::WeightsMode;
    use rand::SeedableRng;

    fn history(prompt: &[u32], generated: &[u32]) -> History {
        let mut h = History::new(prompt);
        generated.iter().for_each(|&t| h.push(t));
        h
    }

    /// OpenAI's (and llama.cpp's) formula written out: logit -= frequency * count + presence *
    /// (count > 0), counted over the generated tokens only. Id 5 is only in the prompt and id 2
    /// nowhere: both keep their logits.
    #[test]
    fn frequency_and_presence_follow_openais_formula() {
        let logits = [2.0f32, -1.5, 0.0, 3.25, -0.5, 1.0];
        let prompt = [5u32, 5, 0];
        let generated = [1u32, 3, 1, 1, 4, 0];
        let (freq, pres) = (0.7f32, -0.3f32);
        let p = Penalties {
            repetition: 1.0,
            frequency: freq as f64,
            presence: pres as f64,
        };
        let mut got = logits.to_vec();
        penalize(&mut got, &p, &history(&prompt, &generated));
        let want: Vec<f32> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let count = generated.iter().filter(|&&t| t as usize == i).count();
                l - (freq * count as f32 + pres * (count > 0) as u8 as f32)
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!((got[2], got[5]), (0.0, 1.0));
    }

    /// Both kinds at once: the repetition penalty first (on the raw logit, prompt ids too),
    /// then the subtraction, as vLLM orders them. Off, nothing moves.
    #[test]
    fn the_repetition_penalty_comes_before_the_subtraction() {
        let logits = [4.0f32, -2.0, 1.0];
        let p = Penalties {
            repetition: 2.0,
            frequency: 0.5,
            presence: 1.0,
        };
        let mut got = logits.to_vec();
        // Id 0 generated twice, id 1 only in the prompt, id 2 never seen.
        penalize(&mut got, &p, &history(&[1], &[0, 0]));
        assert_eq!(got, vec![4.0 / 2.0 - (0.5 * 2.0 + 1.0), -2.0 * 2.0, 1.0]);
        let mut off = logits.to_vec();
        penalize(&mut off, &Penalties::OFF, &history(&[0, 1, 2], &[0, 1, 2]));
        assert_eq!(off, logits.to_vec());
    }

    /// Penalties act before the sampler, greedy included: the argmax of the penalized logits is
    /// picked at temperature 0, and top-k keeps the penalized top token.
    #[test]
    fn greedy_and_top_k_see_the_penalized_logits() {
        let logits = vec![3.0f32, 2.5, -1.0];
        let p = Penalties {
            repetition: 1.5,
            ..Penalties::OFF
        };
        let h = history(&[0], &[]);
        let greedy = Sampling {
            penalties: p,
            ..Sampling::greedy(1)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(draw(logits.clone(), &greedy, None, &mut rng), 0);
        assert_eq!(draw(logits.clone(), &greedy, Some(&h), &mut rng), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: 1,
            ..greedy
        };
        for _ in 0..20 {
            assert_eq!(draw(logits.clone(), &top1, Some(&h), &mut rng), 1);
        }
    }

    /// Penalties off keep no history: the default path does no extra work per token.
    #[test]
    fn rows_keep_a_history_only_with_penalties_on() {
        let m = smollm2(WeightsMode::Blocks);
        let ids = prompt(&m, "Attention Is All You Need");
        let mut dec = Decoder::default();
        let on = Sampling {
            penalties: Penalties {
                presence: 0.5,
                ..Penalties::OFF
            },
            ..Sampling::greedy(4)
        };
        let reqs = [Sampling::greedy(4), on]
            .into_iter()
            .enumerate()
            .map(|(id, s)| {
                let r = Request {
                    id,
                    ids: ids.clone(),
                };
                (r, s, row_rng(1, id))
            })
            .collect();
        dec.admit(&m, reqs, Mode::infer()).unwrap();
        dec.consume(&m, |_, _| {}).unwrap();
        let row = |i: usize| dec.rows[i].as_ref().unwrap();
        assert!(row(0).history.is_none());
        let h = row(1).history.as_ref().unwrap();
        // The prompt's distinct ids at count 0, and the one generated token counted once
        // (generated counts only: a prompt id is not counted by OpenAI's penalties).
        let first = row(1).out[0];
        assert_eq!(h.counts[&first], 1);
        let distinct: std::collections::HashSet<u32> = ids.iter().copied().collect();
        assert_eq!(
            h.counts.len(),
            distinct.len() + usize::from(!distinct.contains(&first))
        );
    }

    /// A prompt admitted after another one it shares a prefix with prefills only the rest, on
    /// top of the first one's keys and values: the same logits and cache as prefilling it
    /// whole (to float rounding: other matrix shapes). Too short a match, or the other adapter
    /// setting, prefills from scratch.
    #[test]
    fn a_prompt_reuses_the_cached_prefix_of_an_earlier_one() {
        reuse_case(&smollm2(WeightsMode::Dense), 1e-3);
        // `blocks` prefills in plain Rust (`cpu_forward.rs`) on an f16 cache: each row's
        // arithmetic does not depend on where its prefill started, so reuse is exact.
        reuse_case(&smollm2(WeightsMode::Blocks), 0.0);
    }

    /// With `blocks` (what `serve` runs on the CPU), the same prompt again reuses all but its
    /// last token and computes exactly what its first prefill did: the same seed then gives the
    /// same text. (Dense weights go through candle's gemm, whose rounding follows the row
    /// count: equal to float rounding, as the test above allows.)
    #[test]
    fn a_repeated_prompt_prefills_exactly_as_the_first_time() {
        let m = smollm2(WeightsMode::Blocks);
        let a = prompt(&m, "Attention Is All You Need");
        let req = Request {
            id: 0,
            ids: a.clone(),
        };
        let mut dec = Decoder::default();
        let greedy = (req.clone(), Sampling::greedy(4), row_rng(1, 0));
        dec.admit(&m, vec![greedy], Mode::infer()).unwrap();
        let (_, _, first) = prefill_padded(&m, &[req], 64, Mode::infer()).unwrap();
        let (cache, _, again) = dec
            .prefill_after_cached(&m, &a, 64, Mode::infer())
            .unwrap()
            .expect("the prompt's own prefix is reused");
        assert_eq!(cache.len, a.len());
        let d = first[0]
            .iter()
            .zip(&again[0])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            first[0] == again[0],
            "the repeated prompt's last logits differ by {d}"
        );
    }

    /// Reviewer-style prompts: one system message, two few-shot turns drawn from a pool of three
    /// by the prompt's index (so prompts share prefixes of several lengths, as the recipe's do),
    /// then a title from the bundled kind-titles list.
    fn reviewer_prompts(m: &Model, n: usize) -> Vec<Request> {
        use crate::model::load::chat::Message;
        let titles = include_str!("../../../data/kind-titles.txt");
        let pool = [
            (
                "FR-NAS: Forward-and-Reverse Graph Predictor",
                "Poorly written and irrelevant.",
            ),
            ("QLoRA: Efficient Finetuning", "The approach lacks novelty."),
            (
                "Direct Preference Optimization",
                "The experiments do not support the claims.",
            ),
        ];
        titles
            .lines()
            .take(n)
            .enumerate()
            .map(|(id, title)| {
                let mut msgs = vec![Message::new(
                    "system",
                    "You review papers. Given a title, write a review in one sentence.",
                )];
                for k in 0..2 {
                    let (t, r) = pool[(id / (k * 2 + 1) + k) % pool.len()];
                    msgs.push(Message::new("user", t));
                    msgs.push(Message::new("assistant", r));
                }
                msgs.push(Message::new("user", title));
                let text = m.meta.chat.as_ref().unwrap().render(&msgs, true).unwrap();
                Request {
                    id,
                    ids: m.meta.tok.encode(&text, true).unwrap(),
                }
            })
            .collect()
    }

    /// Each prompt's tokens from `generate` at batch `bs`, by id.
    fn texts(m: &Model, reqs: &[Request], bs: usize, s: &Sampling) -> Vec<(usize, Vec<u32>)> {
        let mut out = Vec::new();
        generate(m, reqs.to_vec(), s, bs, |o, _| {
            out.push((o.id, o.tokens));
            Ok(())
        })
        .unwrap();
        out.sort();
        out
    }

    /// Batch invariance, as the generate stage runs: the recipe's sampling, EOS on (rows end at
    /// different steps and freed slots are refilled with prompts that share prefixes with the
    /// rows still decoding), every prompt's text the same alone (batch 1), at batch 5 (refills
    /// all along), with all of them in one batch, and in a resumed run that generates only the
    /// second half of the prompts. `Blocks`: each row's products, norms and attention are its
    /// own, in a fixed order (`cpu_forward.rs`), so nothing another row does can move a bit.
    #[test]
    fn blocks_give_every_prompt_its_solo_text_at_any_batch_and_on_resume() {
        let m = smollm2(WeightsMode::Blocks);
        let reqs = reviewer_prompts(&m, 24);
        let s = Sampling {
            temperature: 0.5,
            top_k: 50,
            top_p: 0.95,
            seed: 1234,
            ..Sampling::greedy(20)
        };
        let solo = texts(&m, &reqs, 1, &s);
        let ended = solo.iter().filter(|(_, t)| t.len() < 20).count();
        assert!(
            ended >= 4,
            "only {ended} of 24 rows ended early: no refills to test"
        );
        assert_eq!(texts(&m, &reqs, 5, &s), solo, "batch 5 against solo");
        assert_eq!(texts(&m, &reqs, 24, &s), solo, "batch 24 against solo");
        let resumed = texts(&m, &reqs[12..], 5, &s);
        assert_eq!(resumed, solo[12..].to_vec(), "a resumed run against solo");
    }

    fn reuse_case(m: &Model, tol: f32) {
        let a = prompt(m, "Attention Is All You Need");
        let b = prompt(m, "Attention Is Not All You Need, and Other Findings");
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert!(
            shared >= MIN_REUSE && shared < b.len() - 3,
            "{shared} shared tokens"
        );
        let mut dec = Decoder::default();
        let rng = row_rng(1, 0);
        let req = |id, ids: &Vec<u32>| Request {
            id,
            ids: ids.clone(),
        };
        dec.admit(
            m,
            vec![(req(0, &a), Sampling::greedy(4), rng.clone())],
            Mode::infer(),
        )
        .unwrap();
        let (cache, start, logits) = dec
            .prefill_after_cached(m, &b, 64, Mode::infer())
            .unwrap()
            .expect("the shared prefix is reused");
        assert_eq!(start, vec![0]);
        let (whole, wstart, wlogits) = prefill_padded(m, &[req(1, &b)], 64, Mode::infer()).unwrap();
        assert_eq!((cache.len, wstart), (b.len(), vec![0]));
        let d = logits[0]
            .iter()
            .zip(&wlogits[0])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= tol, "last logits differ by {d}");
        for li in [0, m.llama.cfg.num_hidden_layers - 1] {
            for (x, y) in [(&cache.k[li], &whole.k[li]), (&cache.v[li], &whole.v[li])] {
                let x = x.narrow(2, 0, b.len()).unwrap();
                let y = y.narrow(2, 0, b.len()).unwrap();
                let d: f32 = (x - y)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(d <= tol, "layer {li}: cached keys/values differ by {d}");
            }
        }
        // The base model's keys and values are not the adapter's.
        let off = Mode::infer().with_lora(false);
        assert!(dec.prefill_after_cached(m, &b, 64, off).unwrap().is_none());
        // Nothing worth reusing.
        let other: Vec<u32> = b.iter().rev().copied().collect();
        assert!(dec
            .prefill_after_cached(m, &other, 64, Mode::infer())
            .unwrap()
            .is_none());
    }
}
