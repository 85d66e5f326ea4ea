//! Stage 3, generate: one review per prompt, written by the model engine.
//!
//! Finished records are flushed to `<key>.partial/chunk-NNNNN.jsonl` (atomically) every
//! `generate.chunk_size` prompts. A killed run resumes from those chunks: prompts already done are
//! skipped, and because each prompt's sampler is seeded from (seed, prompt id) the final artifact
//! equals an uninterrupted run's.
//!
//! Two backends write the reviews: `local`, this binary's engine (`crate::model::generate`), and
//! `openai`, servers that speak the OpenAI API (`crate::backend::openai`). Both go through the same
//! chunks, so resume works the same way for both.

use super::chunks::{self, Chunks};
use super::prompts::PromptRow;
use super::{Built, Ctx};
use crate::backend::local::Local;
use crate::backend::openai::Remote;
use crate::backend::{self, Report};
use crate::cache::KeyMaterial;
use crate::config::{Backend, GenerateSettings};
use crate::error::Result;
use crate::fsutil::{read_jsonl, write_jsonl};
use crate::model::generate::Finish;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct GenRow {
    id: usize,
    pub(crate) title_id: usize,
    title: String,
    pub(crate) polarity: String,
    prompt: String,
    /// Special tokens stripped, trimmed.
    pub(crate) text: String,
    tokens: usize,
    prompt_tokens: usize,
    finish: Finish,
}

pub(crate) fn material(ctx: &Ctx, prompts_key: &str) -> Result<KeyMaterial> {
    let g = &ctx.settings().generate;
    if g.backend == Backend::Openai {
        return Ok(remote_material(g, prompts_key));
    }
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
    add_penalties(&mut settings, g);
    if plan.load.weights.batch_dependent() {
        // candle's quantized matmul rounds differently for one row than for several, so with
        // quantized weights the text depends on how rows are batched.
        settings["batch_size"] = serde_json::json!(g.batch_size);
    }
    if plan.load.device.is_cuda() || g.dtype != crate::model::options::DTypeChoice::Auto {
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

/// The penalties that are on, into a key's settings. One left at its off value adds nothing, so
/// every key from before penalties existed is unchanged.
pub(super) fn add_penalties(settings: &mut serde_json::Value, g: &GenerateSettings) {
    let p = g.penalties();
    let off = crate::model::generate::Penalties::OFF;
    for (name, v, o) in [
        ("repetition_penalty", p.repetition, off.repetition),
        ("frequency_penalty", p.frequency, off.frequency),
        ("presence_penalty", p.presence, off.presence),
    ] {
        if v != o {
            settings[name] = serde_json::json!(v);
        }
    }
}

/// The key of a generation on servers: the backend, the API, the served model's name and the
/// sampling settings. Not the URLs (moving to other hosts serving the same model reuses the
/// work) and never the API key.
fn remote_material(g: &GenerateSettings, prompts_key: &str) -> KeyMaterial {
    let o = &g.openai;
    let mut settings = serde_json::json!({
        "backend": "openai",
        "api": o.api.name(),
        "served_model": o.model,
        "max_new_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "seed": g.seed,
        "limit": g.limit,
    });
    if o.send_top_k {
        settings["top_k"] = serde_json::json!(g.top_k);
    }
    add_penalties(&mut settings, g);
    KeyMaterial {
        stage: "generate".into(),
        version: VERSION,
        settings,
        files: BTreeMap::new(),
        model: None,
        inputs: BTreeMap::from([("prompts".to_string(), prompts_key.to_string())]),
    }
}

pub(crate) fn build(ctx: &Ctx, prompts_dir: &Path, key: &str, out: &Path) -> Result<Built> {
    let g = &ctx.settings().generate;
    let mut prompts: Vec<PromptRow> = read_jsonl(&prompts_dir.join("prompts.jsonl"))?;
    if g.limit > 0 {
        prompts.truncate(g.limit);
    }
    let partial = ctx.cache.partial_dir("generate", key);
    let mut w = Chunks::<GenRow>::open(
        ctx,
        ("generate", "prompts"),
        partial,
        g.chunk_size,
        prompts.len(),
    )?;
    let resumed = w.done.len();
    let done_ids = w.done_ids();
    let todo: Vec<&PromptRow> = prompts
        .iter()
        .filter(|p| !done_ids.contains(&p.id))
        .collect();
    let mut info = serde_json::Value::Null;
    if !todo.is_empty() {
        match g.backend {
            Backend::Local => local(ctx, &todo, &mut w)?,
            Backend::Openai => info = remote(ctx, &todo, &mut w, resumed)?,
        }
    }
    let mut want: Vec<usize> = prompts.iter().map(|p| p.id).collect();
    want.sort();
    let done = w.finish(&want)?;
    write_jsonl(&out.join("generations.jsonl"), &done)?;
    let eos = done.iter().filter(|r| r.finish == Finish::Eos).count();
    let empty = done.iter().filter(|r| r.text.is_empty()).count();
    Ok(Built::new("generations", done.len())
        .with("finished_eos", eos)
        .with("finished_length", done.len() - eos)
        .with("empty", empty)
        .with("tokens", done.iter().map(|r| r.tokens).sum())
        .info(info))
}

impl chunks::Row for GenRow {
    fn id(&self) -> usize {
        self.id
    }
    fn tokens(&self) -> usize {
        self.tokens
    }
}

fn row(p: &PromptRow, text: String, tokens: usize, prompt_tokens: usize, finish: Finish) -> GenRow {
    GenRow {
        id: p.id,
        title_id: p.title_id,
        title: p.title.clone(),
        polarity: p.polarity.clone(),
        prompt: p.prompt.clone(),
        text,
        tokens,
        prompt_tokens,
        finish,
    }
}

/// The reviews from this binary's engine.
fn local(ctx: &Ctx, todo: &[&PromptRow], w: &mut Chunks<GenRow>) -> Result<()> {
    let g = &ctx.settings().generate;
    let model = ctx.recipe.load(&ctx.recipe.generate)?;
    let by_id: BTreeMap<usize, &PromptRow> = todo.iter().map(|p| (p.id, *p)).collect();
    let label = |id: usize| format!("prompt {id} ({:?})", by_id[&id].title);
    let engine = Local {
        label: Some(&label),
        ..Local::new(&model, g.batch_size)
    };
    let (report, _) = write_reviews(ctx, &engine, todo, w)?;
    let stats = report.engine.unwrap_or_default();
    let secs = w.t0.elapsed().as_secs_f64();
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
    Ok(())
}

/// The reviews from OpenAI-compatible servers. Returns what the manifest records: the served
/// model as each endpoint describes it, and each endpoint's answers in this run.
fn remote(
    ctx: &Ctx,
    todo: &[&PromptRow],
    w: &mut Chunks<GenRow>,
    resumed: usize,
) -> Result<serde_json::Value> {
    let g = &ctx.settings().generate;
    let o = &g.openai;
    let servers = Remote::connect(o)?;
    ctx.say(
        "Serving",
        format!(
            "{} on {} ({}, {} in flight each)",
            o.model,
            servers
                .endpoints
                .iter()
                .map(|e| e.shown.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            o.api.name(),
            o.concurrency
        ),
    );
    let (_, tally) = write_reviews(ctx, &servers, todo, w)?;
    let secs = w.t0.elapsed().as_secs_f64();
    ctx.say(
        "Generated",
        format!(
            "{} reviews, {} tokens in {secs:.1}s ({:.1} tok/s over {} endpoints, {} retries)",
            todo.len(),
            w.tokens,
            w.tokens as f64 / secs.max(1e-9),
            servers.endpoints.len(),
            tally.retries
        ),
    );
    if !tally.unexpected.is_empty() {
        ctx.say(
            "Refused",
            format!(
                "answers that ended with another finish_reason than stop or length, asked again: {}",
                tally
                    .unexpected
                    .iter()
                    .map(|(r, n)| format!("{n} \"{r}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    let mut answers = tally.answers;
    answers.resize(servers.endpoints.len(), 0);
    Ok(serde_json::json!({
        "backend": "openai",
        "api": o.api.name(),
        "model": o.model,
        "resumed": resumed,
        "retries": tally.retries,
        "unexpected_finish": tally.unexpected,
        "endpoints": servers.endpoints.iter().zip(&answers).map(|(e, n)| serde_json::json!({
            "url": e.shown,
            "served": e.served,
            "answers": n,
        })).collect::<Vec<_>>(),
    }))
}

/// Answers per endpoint, retries, and answers refused for their `finish_reason`, counted as
/// rows arrive.
#[derive(Default)]
struct Tally {
    answers: Vec<usize>,
    retries: u64,
    unexpected: BTreeMap<String, u64>,
}

/// `todo`'s reviews from `backend` into the chunks. Whatever was written before a failure is
/// flushed, so the next run does not ask for it again.
fn write_reviews(
    ctx: &Ctx,
    backend: &dyn backend::Backend,
    todo: &[&PromptRow],
    w: &mut Chunks<GenRow>,
) -> Result<(Report, Tally)> {
    let g = &ctx.settings().generate;
    let by_id: BTreeMap<usize, &PromptRow> = todo.iter().map(|p| (p.id, *p)).collect();
    let jobs = todo.iter().map(|p| p.job()).collect();
    let mut tally = Tally::default();
    w.t0 = Instant::now();
    let r = backend.generate(jobs, &g.sampling(), &mut |a| {
        if tally.answers.len() <= a.endpoint {
            tally.answers.resize(a.endpoint + 1, 0);
        }
        tally.answers[a.endpoint] += 1;
        tally.retries += u64::from(a.retries);
        for r in &a.unexpected {
            *tally.unexpected.entry(r.clone()).or_default() += 1;
        }
        w.push(row(
            by_id[&a.id],
            a.text,
            a.tokens,
            a.prompt_tokens,
            a.finish,
        ))
    });
    w.flush()?;
    w.bar.finish_and_clear();
    Ok((r?, tally))
}
