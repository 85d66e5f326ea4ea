//! The training loop: tokenize, precompute reference log-probs once, then optimizer steps with
//! gradient accumulation and clipping, periodic eval, TRL-named metrics, and checkpoints that a
//! killed run resumes from (same adapter, optimizer state, schedule position and data order).

use super::config::{TrainSettings, TruncationMode};
use super::data::{truncate, Example, RawRow, Truncation, TruncationReport};
use super::logps::sequence_logps;
use super::loss::{chosen_nll, kto_loss, preference_loss, LossParams, PairLogps, PairLoss};
use super::optim::{lr_factor, AdamW};
use crate::error::{bail, Context, Result};
use crate::model::llama::{Checkpoint, Mode, TrainPass};
use crate::model::load::Model;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Stream families of `train.seed`: each epoch's data order, each micro-batch's dropout masks.
const SHUFFLE: u64 = 1;
const DROPOUT: u64 = 2;

pub struct Prepared {
    pub(crate) train: Vec<Example>,
    pub eval: Vec<Example>,
    pub(crate) report: TruncationReport,
}

pub fn prepare(
    model: &Model,
    s: &TrainSettings,
    train: &[RawRow],
    eval: &[RawRow],
) -> Result<Prepared> {
    let t = Truncation {
        max_length: s.max_length,
        max_prompt_length: s.max_prompt_length,
        keep_end: s.truncation_mode == TruncationMode::KeepEnd,
    };
    let mut report = TruncationReport::default();
    let tok = &model.meta.tok;
    let specials = crate::model::load::special_text::special_texts(tok);
    let mut conv = |rows: &[RawRow]| -> Result<Vec<Example>> {
        rows.iter()
            .map(|r| {
                let mut ex =
                    super::data::tokenize(tok, &specials, &r.prompt, &r.chosen, &r.rejected)?;
                ex.label = r.label;
                Ok(truncate(ex, &t, &mut report))
            })
            .collect()
    };
    let train = conv(train)?;
    let eval = conv(eval)?;
    Ok(Prepared {
        train,
        eval,
        report,
    })
}

/// Reference log-probs (adapter off) of every example: (chosen, rejected).
pub fn reference_logps(
    model: &Model,
    exs: &[Example],
    batch: usize,
    average: bool,
) -> Result<Vec<(f32, f32)>> {
    let mode = Mode::Train(TrainPass {
        lora: false,
        dropout_seed: None,
        checkpoint: false,
    });
    let mut out = Vec::with_capacity(exs.len());
    for chunk in exs.chunks(batch.max(1)) {
        let mut seqs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|e| (&e.prompt[..], &e.chosen[..]))
            .collect();
        seqs.extend(chunk.iter().map(|e| (&e.prompt[..], &e.rejected[..])));
        let lp: Vec<f32> = sequence_logps(&model.llama, &seqs, mode, average)?
            .logps
            .to_dtype(DType::F32)?
            .to_vec1()?;
        for i in 0..chunk.len() {
            out.push((lp[i], lp[chunk.len() + i]));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: usize,
    log: Vec<Value>,
    /// The logging window in progress at the checkpoint (steps since the last log line), so a
    /// resumed run logs exactly what an uninterrupted one does. Absent in older checkpoints.
    #[serde(default)]
    window: Option<(Acc, Vec<f32>)>,
}

/// Metrics of the rows seen so far, summed for averaging: every metric is a mean over rows.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Acc {
    n: f64,
    loss: f64,
    chosen: Vec<f32>,
    rejected: Vec<f32>,
    acc: Vec<f32>,
    logps_c: Vec<f32>,
    logps_r: Vec<f32>,
    logits_c: Vec<f32>,
    logits_r: Vec<f32>,
    /// With `rpo_alpha`, SimPO or ORPO: the chosen responses' NLL, summed over batches
    /// weighted by rows.
    nll: Option<f64>,
    /// The loss's own metrics (ORPO's log-odds), summed over batches weighted by rows.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    extra: std::collections::BTreeMap<String, f64>,
}

fn mean(v: &[f32]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64
    }
}

impl Acc {
    fn to_json(&self, prefix: &str) -> Map<String, Value> {
        let mut m = Map::new();
        let k = |s: &str| format!("{prefix}{s}");
        m.insert(k("loss"), json!(self.loss / self.n.max(1.0)));
        m.insert(k("rewards/chosen"), json!(mean(&self.chosen)));
        m.insert(k("rewards/rejected"), json!(mean(&self.rejected)));
        m.insert(k("rewards/accuracies"), json!(mean(&self.acc)));
        m.insert(
            k("rewards/margins"),
            json!(mean(&self.chosen) - mean(&self.rejected)),
        );
        m.insert(k("logps/rejected"), json!(mean(&self.logps_r)));
        m.insert(k("logps/chosen"), json!(mean(&self.logps_c)));
        m.insert(k("logits/rejected"), json!(mean(&self.logits_r)));
        m.insert(k("logits/chosen"), json!(mean(&self.logits_c)));
        if let Some(nll) = self.nll {
            m.insert(k("nll_loss"), json!(nll / self.n.max(1.0)));
        }
        for (name, v) in &self.extra {
            m.insert(k(name), json!(v / self.n.max(1.0)));
        }
        m
    }
}

/// Trains the adapter attached to `model` ([`attach_lora`]).
pub struct Trainer<'a> {
    pub model: &'a Model,
    pub s: &'a TrainSettings,
    pub train: &'a [Example],
    pub eval: &'a [Example],
    pub ref_train: &'a [(f32, f32)],
    pub ref_eval: &'a [(f32, f32)],
    /// Checkpoints live here (persistent across a killed run).
    pub ckpt_dir: PathBuf,
    pub quiet: bool,
}

pub struct Outcome {
    pub log: Vec<Value>,
    pub(crate) steps: usize,
    pub(crate) seconds: f64,
    pub resumed_from: Option<usize>,
}

impl Trainer<'_> {
    fn is_kto(&self) -> bool {
        self.s.loss.is_unpaired()
    }

    /// The attached adapter's tensors, named as in checkpoints.
    fn vars(&self) -> Result<Vec<(String, Var)>> {
        Ok(self
            .model
            .llama
            .adapter()
            .context("the model carries no adapter to train")?
            .vars())
    }

    fn total_steps(&self) -> usize {
        if self.s.max_steps > 0 {
            return self.s.max_steps;
        }
        let per = self.s.batch_size * self.s.gradient_accumulation_steps;
        self.s.epochs * self.train.len().div_ceil(per)
    }

    /// Example indices of micro-batch `k` of optimizer step `step`: the epochs' seeded
    /// permutations laid end to end, so the order depends on nothing but (seed, step).
    fn batch_indices(&self, step: usize, k: usize) -> (Vec<usize>, f64) {
        let n = self.train.len();
        let bs = self.s.batch_size;
        let first = (step * self.s.gradient_accumulation_steps + k) * bs;
        let mut out = Vec::with_capacity(bs);
        let mut perm_epoch = usize::MAX;
        let mut perm: Vec<usize> = Vec::new();
        for g in first..first + bs {
            let epoch = g / n;
            if epoch != perm_epoch {
                let mut rng =
                    crate::rng::stream(crate::rng::mix(self.s.seed, SHUFFLE), epoch as u64);
                perm = crate::rng::permutation(n, &mut rng);
                perm_epoch = epoch;
            }
            out.push(perm[g % n]);
        }
        (out, (first + bs) as f64 / n as f64)
    }

    /// The loss of one micro-batch and its metrics into `acc`; the checkpoint that carries the
    /// gradient through the layers when the pass checkpoints.
    // Long because the two kinds of data (KTO's unpaired rows, the pairs) build their inputs
    // and metrics differently around the same forward.
    fn batch_loss(
        &self,
        exs: &[&Example],
        refs: &[(f32, f32)],
        mode: Mode,
        acc: &mut Acc,
    ) -> Result<(Tensor, Option<Checkpoint>)> {
        let average = self.s.loss.averages_logps();
        let ckpt;
        let b = exs.len();
        let s = self.s;
        let pl: PairLoss = if self.is_kto() {
            let seqs: Vec<(&[u32], &[u32])> =
                exs.iter().map(|e| (&e.prompt[..], &e.chosen[..])).collect();
            let mut pol = sequence_logps(&self.model.llama, &seqs, mode, false)?;
            ckpt = pol.ckpt.take();
            // KL estimate from mismatched pairs: prompt i+1 with completion i.
            let kl: Vec<(&[u32], &[u32])> = (0..b)
                .map(|i| (&exs[(i + 1) % b].prompt[..], &exs[i].chosen[..]))
                .collect();
            // No backward through these: checkpointing keeps no per-layer graph alive.
            let no_grad = Mode::Train(TrainPass {
                lora: true,
                dropout_seed: None,
                checkpoint: true,
            });
            let pk: Vec<f32> = sequence_logps(&self.model.llama, &kl, no_grad, false)?
                .logps
                .detach()
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let rk: Vec<f32> =
                sequence_logps(&self.model.llama, &kl, no_grad.with_lora(false), false)?
                    .logps
                    .to_dtype(DType::F32)?
                    .to_vec1()?;
            let z = (mean(&pk) - mean(&rk)).max(0.0);
            let r = Tensor::from_vec(
                refs.iter().map(|r| r.0).collect::<Vec<_>>(),
                b,
                &self.model.llama.device,
            )?;
            let labels: Vec<bool> = exs.iter().map(|e| e.label.unwrap_or(true)).collect();
            let lp: Vec<f32> = pol.logps.detach().to_dtype(DType::F32)?.to_vec1()?;
            for (i, &d) in labels.iter().enumerate() {
                if d {
                    acc.logps_c.push(lp[i]);
                    acc.logits_c.push(pol.mean_logits[i]);
                } else {
                    acc.logps_r.push(lp[i]);
                    acc.logits_r.push(pol.mean_logits[i]);
                }
            }
            kto_loss(s.beta, &pol.logps, &r, &labels, z)?
        } else {
            let mut seqs: Vec<(&[u32], &[u32])> =
                exs.iter().map(|e| (&e.prompt[..], &e.chosen[..])).collect();
            seqs.extend(exs.iter().map(|e| (&e.prompt[..], &e.rejected[..])));
            let mut pol = sequence_logps(&self.model.llama, &seqs, mode, average)?;
            ckpt = pol.ckpt.take();
            let pc = pol.logps.narrow(0, 0, b)?;
            let pr = pol.logps.narrow(0, b, b)?;
            let dev = &self.model.llama.device;
            let dt = pol.logps.dtype();
            let rc = Tensor::from_vec(refs.iter().map(|r| r.0).collect::<Vec<_>>(), b, dev)?
                .to_dtype(dt)?;
            let rr = Tensor::from_vec(refs.iter().map(|r| r.1).collect::<Vec<_>>(), b, dev)?
                .to_dtype(dt)?;
            let lp: Vec<f32> = pol.logps.detach().to_dtype(DType::F32)?.to_vec1()?;
            acc.logps_c.extend_from_slice(&lp[..b]);
            acc.logps_r.extend_from_slice(&lp[b..]);
            acc.logits_c.extend_from_slice(&pol.mean_logits[..b]);
            acc.logits_r.extend_from_slice(&pol.mean_logits[b..]);
            let mut l = preference_loss(
                &LossParams::of(s),
                &PairLogps {
                    pc: &pc,
                    pr: &pr,
                    rc: &rc,
                    rr: &rr,
                    chosen_tokens: &pol.tokens[..b],
                    rejected_tokens: &pol.tokens[b..],
                    averaged: average,
                },
            )?;
            if let Some(nll) = l.nll {
                *acc.nll.get_or_insert(0.0) += b as f64 * nll;
            }
            for (k, v) in &l.logs {
                *acc.extra.entry(k.to_string()).or_insert(0.0) += b as f64 * v;
            }
            for (c, r) in l.chosen_rewards.iter().zip(&l.rejected_rewards) {
                acc.acc.push(if c > r { 1.0 } else { 0.0 });
            }
            if s.rpo_alpha > 0.0 {
                let nll = chosen_nll(&pc, &pol.tokens[..b], average)?;
                let v = nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                *acc.nll.get_or_insert(0.0) += b as f64 * v;
                l.loss = (l.loss + (nll * s.rpo_alpha)?)?;
            }
            l
        };
        // Means over rows, as TRL's Trainer weighs them: a short last batch counts for its rows.
        acc.n += b as f64;
        acc.loss += b as f64 * pl.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        acc.chosen.extend(pl.chosen_rewards);
        acc.rejected.extend(pl.rejected_rewards);
        Ok((pl.loss, ckpt))
    }

    pub fn evaluate(&self) -> Result<Map<String, Value>> {
        let mut acc = Acc::default();
        // No backward follows: checkpointing just lets each layer's activations go as soon as
        // the next layer has its input, so evaluation never holds a whole batch's graph.
        let mode = Mode::Train(TrainPass {
            lora: true,
            dropout_seed: None,
            checkpoint: true,
        });
        let bs = self.s.batch_size;
        for (i, chunk) in self.eval.chunks(bs).enumerate() {
            let exs: Vec<&Example> = chunk.iter().collect();
            let refs = &self.ref_eval[i * bs..i * bs + chunk.len()];
            self.batch_loss(&exs, refs, mode, &mut acc)?;
        }
        Ok(acc.to_json("eval_"))
    }

    /// Metrics of the first micro-batch of `step`, without updating anything (tests use it to check step 0).
    pub fn probe(&self, step: usize) -> Result<Map<String, Value>> {
        let mut acc = Acc::default();
        let (idx, _) = self.batch_indices(step, 0);
        let exs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
        let refs: Vec<(f32, f32)> = idx.iter().map(|&i| self.ref_train[i]).collect();
        self.batch_loss(
            &exs,
            &refs,
            Mode::Train(TrainPass {
                lora: true,
                dropout_seed: None,
                checkpoint: false,
            }),
            &mut acc,
        )?;
        Ok(acc.to_json(""))
    }

    /// One optimizer step: accumulate gradients over micro-batches, clip, update.
    // Long because accumulation, clipping and the update share the gradients of one step.
    fn step(&self, opt: &mut AdamW, vars: &[Var], step: usize, acc: &mut Acc) -> Result<f64> {
        let accum = self.s.gradient_accumulation_steps;
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        for k in 0..accum {
            let (idx, _) = self.batch_indices(step, k);
            let exs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
            let refs: Vec<(f32, f32)> = idx.iter().map(|&i| self.ref_train[i]).collect();
            let seed = crate::rng::mix(
                crate::rng::mix(self.s.seed, DROPOUT),
                (step * accum + k) as u64,
            );
            let mode = Mode::Train(TrainPass {
                lora: true,
                dropout_seed: Some(seed),
                checkpoint: self.s.gradient_checkpointing,
            });
            let (loss, ckpt) = self.batch_loss(&exs, &refs, mode, acc)?;
            let mut g = (loss / accum as f64)?.backward()?;
            if let Some(c) = ckpt {
                c.backward(&self.model.llama, &mut g)?;
            }
            for (i, v) in vars.iter().enumerate() {
                let gi = g.get(v.as_tensor()).cloned();
                grads[i] = match (grads[i].take(), gi) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
            }
        }
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(vars)
            .map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.as_tensor().zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        let mut sq = 0f64;
        for g in &grads {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        let lr = self.s.learning_rate
            * lr_factor(
                self.s.lr_scheduler,
                step,
                self.total_steps(),
                self.s.warmup_steps,
            );
        if !acc.loss.is_finite() || !norm.is_finite() {
            let what = if acc.loss.is_finite() {
                format!("the gradient norm is {norm}")
            } else {
                format!("the loss is {}", acc.loss / acc.n.max(1.0))
            };
            return Err(self.diverged(step + 1, &what, lr));
        }
        let grads = if self.s.max_grad_norm > 0.0 && norm > self.s.max_grad_norm {
            let c = self.s.max_grad_norm / (norm + 1e-6);
            grads
                .iter()
                .map(|g| g * c)
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            grads
        };
        opt.lr = lr;
        opt.update(vars, &grads)?;
        for v in vars {
            // 0 * x is 0 for every finite x and NaN for inf or NaN.
            let z = v
                .as_tensor()
                .affine(0.0, 0.0)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if z != 0.0 {
                return Err(self.diverged(step + 1, "the update left non-finite LoRA weights", lr));
            }
        }
        Ok(norm)
    }

    /// The error that stops a diverged run: the step, what went non-finite, the likely causes,
    /// and which checkpoint (written before anything went wrong) is kept.
    fn diverged(&self, step: usize, what: &str, lr: f64) -> crate::error::Error {
        let kept = match self.checkpoints().0.first() {
            Some((n, dir)) => format!("checkpoint-{n} ({}) is kept", dir.display()),
            None => "no checkpoint had been written".to_string(),
        };
        crate::error::Error::Diverged {
            step,
            message: format!(
                "training diverged at step {step}: {what}. The likely cause is a learning rate \
                 too high (train.learning_rate = {:e}, {lr:.3e} at this step); lower it and run \
                 again (a train.beta far from 0.1 or extreme data can do this too). Nothing was \
                 marked built; {kept}",
                self.s.learning_rate,
            ),
        }
    }

    /// Every `checkpoint-N` folder, newest first, and the paths of what else the folder holds
    /// (names this trainer does not write; its own temporary folders are not counted).
    fn checkpoints(&self) -> (Vec<(usize, PathBuf)>, Vec<PathBuf>) {
        let mut v = Vec::new();
        let mut odd = Vec::new();
        for e in std::fs::read_dir(&self.ckpt_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name();
            let name = name.to_string_lossy();
            match checkpoint_step(&name) {
                Some(step) if e.path().is_dir() => v.push((step, e.path())),
                _ if name.starts_with(".tmp-checkpoint-") => {}
                _ => odd.push(e.path()),
            }
        }
        v.sort_by_key(|c| std::cmp::Reverse(c.0));
        (v, odd)
    }

    fn new_optimizer(&self, vars: &[Var]) -> Result<AdamW> {
        let s = self.s;
        AdamW::new(
            vars,
            s.learning_rate,
            s.adam_beta1,
            s.adam_beta2,
            s.adam_epsilon,
            s.weight_decay,
        )
    }

    fn save_checkpoint(
        &self,
        step: usize,
        vars: &[(String, Var)],
        opt: &AdamW,
        log: &[Value],
        window: &(Acc, Vec<f32>),
    ) -> Result<()> {
        std::fs::create_dir_all(&self.ckpt_dir)?;
        let fin = self.ckpt_dir.join(format!("checkpoint-{step}"));
        let tmp = self
            .ckpt_dir
            .join(format!(".tmp-checkpoint-{step}-{}", std::process::id()));
        if tmp.symlink_metadata().is_ok() {
            // This process's own name: left by an earlier process that had the same pid.
            std::fs::remove_dir_all(&tmp)?;
        }
        // create_dir, not create_dir_all: the folder must be a new one, made here.
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let written = self.write_checkpoint(&tmp, &fin, step, vars, opt, log, window);
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written?;
        crate::fsutil::sync_dir(&self.ckpt_dir);
        // Keep the newest two.
        for (old, dir) in self.checkpoints().0.iter().skip(2) {
            std::fs::remove_dir_all(dir)
                .map_err(|e| tracing::warn!("removing checkpoint-{old}: {e}"))
                .ok();
        }
        Ok(())
    }

    /// Fill the new checkpoint folder `tmp` and rename it to `fin`.
    #[allow(clippy::too_many_arguments)]
    fn write_checkpoint(
        &self,
        tmp: &Path,
        fin: &Path,
        step: usize,
        vars: &[(String, Var)],
        opt: &AdamW,
        log: &[Value],
        window: &(Acc, Vec<f32>),
    ) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        crate::fsutil::write_atomic_via(&tmp.join("adapter.safetensors"), |p| {
            Ok(candle_core::safetensors::save(&map, p)?)
        })?;
        opt.save(&tmp.join("optimizer.safetensors"))?;
        crate::fsutil::write_json_pretty(
            &tmp.join("state.json"),
            &State {
                step,
                log: log.to_vec(),
                window: Some(window.clone()),
            },
        )?;
        if fin.exists() {
            std::fs::remove_dir_all(fin)?;
        }
        std::fs::rename(tmp, fin)
            .with_context(|| format!("moving {} into place", fin.display()))?;
        Ok(())
    }

    /// Load checkpoint `step` from `dir`. Everything is read and checked before anything is
    /// changed, so a damaged checkpoint leaves the adapter and `opt` as they were.
    fn restore(
        &self,
        step: usize,
        dir: &Path,
        named: &[(String, Var)],
        opt: &mut AdamW,
    ) -> Result<State> {
        let state: State = serde_json::from_slice(
            &std::fs::read(dir.join("state.json")).context("reading state.json")?,
        )
        .context("unreadable state.json")?;
        if state.step != step {
            bail!("state.json says step {}", state.step);
        }
        let map = candle_core::safetensors::load(
            dir.join("adapter.safetensors"),
            &self.model.llama.device,
        )
        .context("reading adapter.safetensors")?;
        let mut values = Vec::with_capacity(named.len());
        for (n, v) in named {
            let t = map.get(n).with_context(|| format!("no tensor {n}"))?;
            if t.dims() != v.dims() {
                bail!("{n} has shape {:?}, not {:?}", t.dims(), v.dims());
            }
            values.push(t.to_dtype(v.dtype())?);
        }
        let plain: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let mut fresh = self.new_optimizer(&plain)?;
        fresh.load(&dir.join("optimizer.safetensors"), state.step)?;
        for ((_, v), t) in named.iter().zip(&values) {
            v.set(t)?;
        }
        *opt = fresh;
        Ok(state)
    }

    /// Train to the end, resuming from the newest checkpoint if there is one.
    /// `stop_after` ends early after that many steps of this call (tests use it to simulate a kill).
    // Long because it is the training loop: resume, step, log, evaluate, checkpoint, in order.
    pub fn run(&self, stop_after: Option<usize>) -> Result<Outcome> {
        if self.train.is_empty() {
            bail!("no training examples");
        }
        let named = self.vars()?;
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let s = self.s;
        let mut opt = self.new_optimizer(&vars)?;
        let mut log: Vec<Value> = Vec::new();
        let mut start = 0;
        let mut resumed_from = None;
        let mut window = Acc::default();
        let mut norms = Vec::new();
        // The newest checkpoint that reads back whole; a damaged one is passed over, not fatal.
        let (checkpoints, odd) = self.checkpoints();
        for p in &odd {
            tracing::warn!(
                "ignoring {}: not a checkpoint this trainer writes (a checkpoint-N folder)",
                p.display()
            );
        }
        for &(step, ref dir) in &checkpoints {
            if step > self.total_steps() {
                tracing::warn!(
                    "ignoring {}: past this run's {} steps",
                    dir.display(),
                    self.total_steps()
                );
                continue;
            }
            match self.restore(step, dir, &named, &mut opt) {
                Ok(st) => {
                    log = st.log;
                    (window, norms) = st.window.unwrap_or_default();
                    start = step;
                    resumed_from = Some(step);
                    if !self.quiet {
                        eprintln!("{:>12} training from checkpoint-{step}", "Resuming");
                    }
                    break;
                }
                Err(e) => tracing::warn!(
                    "checkpoint-{step} in {} is damaged ({e:#}); falling back to the one before it",
                    self.ckpt_dir.display()
                ),
            }
        }
        if resumed_from.is_none() && !checkpoints.is_empty() {
            tracing::warn!("no checkpoint reads back whole: training starts from step 0");
        }
        let total = self.total_steps();
        let bar = if self.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>12.cyan.bold} [{bar:30}] {pos}/{len} steps, {msg}, ETA {eta}",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            b.set_prefix("Training");
            b.set_position(start as u64);
            b
        };
        let t0 = Instant::now();
        if start == 0 && !self.eval.is_empty() && s.eval_steps > 0 {
            // The baseline before the first update, so every eval curve starts where the
            // reference model stands (a fresh adapter changes nothing: loss ln 2 for DPO).
            let mut m = self.evaluate()?;
            m.insert("step".into(), json!(0));
            log.push(Value::Object(m));
        }
        for (done, step) in (start..total).enumerate() {
            let norm = self.step(&mut opt, &vars, step, &mut window)?;
            norms.push(norm as f32);
            let n = step + 1;
            bar.set_message(format!("loss {:.4}", window.loss / window.n.max(1.0)));
            bar.inc(1);
            if n % s.logging_steps.max(1) == 0 || n == total {
                let mut m = window.to_json("");
                m.insert("grad_norm".into(), json!(mean(&norms)));
                m.insert("learning_rate".into(), json!(opt.lr));
                m.insert(
                    "epoch".into(),
                    json!(
                        self.batch_indices(step, s.gradient_accumulation_steps - 1)
                            .1
                    ),
                );
                m.insert("step".into(), json!(n));
                if !self.quiet && bar.is_hidden() {
                    // No bar off a terminal (a log file, CI): a line per logging step instead.
                    eprintln!(
                        "{:>12} step {n}/{total}, loss {:.4}, {:.1}s",
                        "Training",
                        m["loss"].as_f64().unwrap_or(f64::NAN),
                        t0.elapsed().as_secs_f64()
                    );
                }
                log.push(Value::Object(m));
                window = Acc::default();
                norms.clear();
            }
            if !self.eval.is_empty() && s.eval_steps > 0 && (n % s.eval_steps == 0 || n == total) {
                let mut m = self.evaluate()?;
                m.insert("step".into(), json!(n));
                log.push(Value::Object(m));
            }
            if s.save_steps > 0 && n % s.save_steps == 0 && n < total {
                self.save_checkpoint(n, &named, &opt, &log, &(window.clone(), norms.clone()))?;
            }
            if stop_after.is_some_and(|k| done + 1 >= k) && n < total {
                bar.abandon();
                // Simulated kill: the newest checkpoint is what a restarted run will find.
                return Ok(Outcome {
                    log,
                    steps: n,
                    seconds: t0.elapsed().as_secs_f64(),
                    resumed_from,
                });
            }
        }
        bar.finish_and_clear();
        Ok(Outcome {
            log,
            steps: total,
            seconds: t0.elapsed().as_secs_f64(),
            resumed_from,
        })
    }
}

/// The step of a checkpoint folder's name exactly as [`Trainer::save_checkpoint`] writes it
/// (`checkpoint-12` is 12); `None` for any other name (`checkpoint-012`, `checkpoint-+12`, ...).
fn checkpoint_step(name: &str) -> Option<usize> {
    let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
    (format!("checkpoint-{step}") == name).then_some(step)
}

/// Attach a fresh adapter, drawn from `train.seed`, to a dense model for training.
pub fn attach_lora(model: &mut Model, s: &TrainSettings) -> Result<()> {
    let adapter = model.llama.new_adapter(&s.lora.spec(), s.seed)?;
    model.llama.attach(adapter)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_names_save_checkpoint_writes_are_checkpoints() {
        assert_eq!(super::checkpoint_step("checkpoint-12"), Some(12));
        for odd in [
            "checkpoint-1é",
            "checkpoint-012",
            "checkpoint-+12",
            "checkpoint-",
            "checkpoint-99999999999999999999999",
            ".tmp-checkpoint-4-123",
            "notes",
        ] {
            assert_eq!(super::checkpoint_step(odd), None, "{odd}");
        }
    }
}
