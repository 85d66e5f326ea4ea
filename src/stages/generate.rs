//! Stage 3, generate: one review per prompt, written by the model engine.
//!
//! Finished records are flushed to `<key>.partial/chunk-NNNNN.jsonl` (atomically) every
//! `generate.chunk_size` prompts. A killed run resumes from those chunks: prompts already done are
//! skipped, and because each prompt's sampler is seeded from (seed, prompt id) the final artifact
//! equals an uninterrupted run's.

use super::prompts::{Polarity, PromptRow};
use super::{Built, Ctx};
use crate::cache::KeyMaterial;
use crate::error::{bail, Context, Result};
use crate::fsutil::{read_jsonl, write_jsonl};
use crate::model::generate::{self as gen, Finish, Request};
use crate::model::WeightsMode;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct GenRow {
    id: usize,
    pub(crate) title_id: usize,
    title: String,
    pub(crate) polarity: Polarity,
    prompt: String,
    /// Special tokens stripped, trimmed.
    pub(crate) text: String,
    tokens: usize,
    prompt_tokens: usize,
    finish: Finish,
}

pub(crate) fn material(ctx: &Ctx, prompts_key: &str) -> Result<KeyMaterial> {
    let g = &ctx.settings().generate;
    let plan = &ctx.recipe.generate;
    let src = ctx.recipe.model(plan)?;
    let mut settings = serde_json::json!({
        "max_new_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "top_k": g.top_k,
        "top_p": g.top_p,
        "seed": g.seed,
        "limit": g.limit,
        // Numerics differ between devices, dtypes, weight formats and engine paths.
        "device": plan.device_name(),
        "weights": format!("{:?}", plan.load.weights).to_lowercase(),
        "attention": g.attention,
        "prefix_sharing": g.prefix_sharing,
    });
    if plan.load.weights == WeightsMode::Quantized {
        // candle's quantized matmul rounds differently for one row than for several, so with
        // quantized weights the text depends on how rows are batched.
        settings["batch_size"] = serde_json::json!(g.batch_size);
    }
    if plan.load.device.is_cuda() || g.dtype != crate::model::DTypeChoice::Auto {
        settings["dtype"] = serde_json::json!(plan.dtype_name());
    }
    Ok(KeyMaterial {
        stage: "generate".into(),
        version: VERSION,
        settings,
        files: BTreeMap::new(),
        model: Some(src.identity.clone()),
        inputs: BTreeMap::from([("prompts".to_string(), prompts_key.to_string())]),
    })
}

pub(crate) fn build(ctx: &Ctx, prompts_dir: &Path, key: &str, out: &Path) -> Result<Built> {
    let g = &ctx.settings().generate;
    let mut prompts: Vec<PromptRow> = read_jsonl(&prompts_dir.join("prompts.jsonl"))?;
    if g.limit > 0 {
        prompts.truncate(g.limit);
    }
    let partial = ctx.cache.partial_dir("generate", key);
    std::fs::create_dir_all(&partial)?;
    let (mut done, mut n_chunks) = read_chunks(&partial)?;
    let done_ids: BTreeSet<usize> = done.iter().map(|r| r.id).collect();
    let todo: Vec<&PromptRow> = prompts
        .iter()
        .filter(|p| !done_ids.contains(&p.id))
        .collect();
    if !done.is_empty() {
        ctx.say(
            "Resuming",
            format!(
                "generate: {} of {} prompts already done",
                done.len(),
                prompts.len()
            ),
        );
    }
    if !todo.is_empty() {
        let model = ctx.recipe.load(&ctx.recipe.generate)?;
        let tok = &model.meta.tok;
        let by_id: BTreeMap<usize, &PromptRow> = todo.iter().map(|p| (p.id, *p)).collect();
        let reqs = todo
            .iter()
            .map(|p| {
                Ok(Request {
                    id: p.id,
                    ids: tok.encode(&p.prompt, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        crate::model::limits::check_generation_fits(
            model.llama.cfg.max_position_embeddings,
            g.max_new_tokens,
            reqs.iter().map(|r| {
                (r.ids.len(), || {
                    format!("prompt {} ({:?})", r.id, by_id[&r.id].title)
                })
            }),
        )?;
        let bar = progress_bar(ctx, prompts.len() as u64, done.len() as u64);
        let t0 = Instant::now();
        let mut buf: Vec<GenRow> = Vec::new();
        let s = g.sampling();
        let stats = gen::generate(&model, reqs, &s, g.batch_size, |o, st| {
            let p = by_id[&o.id];
            let text = tok.decode(&o.tokens, true)?.trim().to_string();
            buf.push(GenRow {
                id: o.id,
                title_id: p.title_id,
                title: p.title.clone(),
                polarity: p.polarity,
                prompt: p.prompt.clone(),
                text,
                tokens: o.tokens.len(),
                prompt_tokens: o.prompt_tokens,
                finish: o.finish,
            });
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{:.1} tok/s", st.generated_tokens as f64 / secs));
            bar.inc(1);
            if buf.len() >= g.chunk_size {
                n_chunks += 1;
                write_jsonl(&partial.join(format!("chunk-{n_chunks:05}.jsonl")), &buf)?;
                done.append(&mut buf);
                if !ctx.quiet && bar.is_hidden() {
                    // No bar off a terminal (a log file, CI): a line per flushed chunk instead.
                    eprintln!(
                        "{:>12} {}/{} prompts, {:.1} tok/s",
                        "Generating",
                        bar.position(),
                        bar.length().unwrap_or(0),
                        st.generated_tokens as f64 / secs
                    );
                }
            }
            Ok(())
        })?;
        if !buf.is_empty() {
            n_chunks += 1;
            write_jsonl(&partial.join(format!("chunk-{n_chunks:05}.jsonl")), &buf)?;
            done.append(&mut buf);
        }
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        ctx.say(
            "Generated",
            format!(
                "{} reviews, {} tokens in {secs:.1}s ({:.1} tok/s; prompt {:.0} tok/s)",
                stats.prompts,
                stats.generated_tokens,
                stats.generated_tokens as f64 / stats.decode_secs.max(1e-9),
                stats.prompt_tokens as f64 / stats.prefill_secs.max(1e-9),
            ),
        );
    }
    done.sort_by_key(|r| r.id);
    let ids: Vec<usize> = done.iter().map(|r| r.id).collect();
    let want: Vec<usize> = {
        let mut w: Vec<usize> = prompts.iter().map(|p| p.id).collect();
        w.sort();
        w
    };
    if ids != want {
        bail!(
            "generate: chunks in {} do not cover the prompts exactly ({} records for {} prompts); delete that folder to start over",
            partial.display(),
            ids.len(),
            want.len()
        );
    }
    write_jsonl(&out.join("generations.jsonl"), &done)?;
    let eos = done.iter().filter(|r| r.finish == Finish::Eos).count();
    let empty = done.iter().filter(|r| r.text.is_empty()).count();
    Ok(Built::new("generations", done.len())
        .with("finished_eos", eos)
        .with("finished_length", done.len() - eos)
        .with("empty", empty)
        .with("tokens", done.iter().map(|r| r.tokens).sum()))
}

/// Finished records from earlier runs. Chunks are written atomically, but a disk can still lose
/// the end of one (a crash before the data reached it): a chunk that does not read back whole is
/// discarded with a warning, and its prompts are generated again.
fn read_chunks(dir: &Path) -> Result<(Vec<GenRow>, usize)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("chunk-") && n.ends_with(".jsonl"))
        .collect();
    names.sort();
    let mut rows = Vec::new();
    let mut seen = BTreeSet::new();
    let mut max = 0;
    for n in &names {
        let idx: usize = n[6..11]
            .parse()
            .with_context(|| format!("odd chunk name {n}"))?;
        max = max.max(idx);
        let chunk = match read_jsonl::<GenRow>(&dir.join(n)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "generate: discarding the damaged chunk {} ({e:#}); its prompts are generated again",
                    dir.join(n).display()
                );
                std::fs::remove_file(dir.join(n))
                    .with_context(|| format!("removing {}", dir.join(n).display()))?;
                continue;
            }
        };
        for r in chunk {
            if seen.insert(r.id) {
                rows.push(r);
            }
        }
    }
    Ok((rows, max))
}

fn progress_bar(ctx: &Ctx, len: u64, pos: u64) -> indicatif::ProgressBar {
    if ctx.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>12.cyan.bold} [{bar:30}] {pos}/{len} prompts, {msg}, ETA {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_prefix("Generating");
    bar.set_position(pos);
    bar
}
