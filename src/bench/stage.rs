//! `bench stage generate`: the generate stage as a user runs it, timed. The recipe's own prompts
//! (the prompts stage, built if needed), its backend, model loading (`weights = "auto"` resolves
//! as the stage resolves it), batch size and sampling, EOS on: rows end when the model stops,
//! and freed slots are refilled. Nothing is written to the stage's cache.
//!
//! What `bench generate` cannot show: prefill of long few-shot prompts for short reviews, and a
//! batch that empties unevenly. So besides prompts/s it reports where the time went (prefill,
//! decoding steps, the rest: refills' cache splicing and sampling) and the batch's occupancy.

use super::{median, peak_rss_mib, prompts_dir};
use crate::backend::local::Local;
use crate::backend::openai::Remote;
use crate::backend::{Backend, Job};
use crate::config::Backend as BackendKind;
use crate::error::Result;
use crate::model::generate::Stats;
use crate::recipe::Recipe;
use crate::stages::{self, Ctx};
use clap::{Args, Subcommand};
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub(super) enum StageWhat {
    /// The generate stage on the recipe's first N prompts (set the recipe with --config,
    /// --preset and --set as for `run`: e.g. --set generate.weights=blocks)
    Generate(StageArgs),
}

#[derive(Args, Debug)]
pub(super) struct StageArgs {
    /// Number of prompts (the recipe's first N; 0 = all of them)
    #[arg(long, default_value_t = 300)]
    prompts: usize,
    /// Run the stage this many times and report the median wall time
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// One JSON object instead of the table
    #[arg(long)]
    json: bool,
}

/// One timed pass: wall seconds, generated tokens, prompt tokens, EOS-ended rows, the engine's
/// counters (local backend only).
struct Pass {
    wall: f64,
    generated: usize,
    prompt_tokens: usize,
    eos: usize,
    engine: Option<Stats>,
}

fn pass(backend: &dyn Backend, jobs: &[Job], recipe: &Recipe) -> Result<Pass> {
    let s = recipe.settings().generate.sampling();
    let (mut generated, mut prompt_tokens, mut eos) = (0, 0, 0);
    let t0 = Instant::now();
    let report = backend.generate(jobs.to_vec(), &s, &mut |a| {
        generated += a.tokens;
        prompt_tokens += a.prompt_tokens;
        eos += usize::from(a.finish == crate::model::generate::Finish::Eos);
        Ok(())
    })?;
    Ok(Pass {
        wall: t0.elapsed().as_secs_f64(),
        generated,
        prompt_tokens,
        eos,
        engine: report.engine,
    })
}

/// Mean live rows per decoding step in each tenth of the steps, as a fraction of the batch.
fn occupancy_by_tenth(occ: &[u32], batch: usize) -> Vec<f64> {
    if occ.is_empty() {
        return Vec::new();
    }
    (0..10)
        .map(|d| {
            let (a, b) = (
                occ.len() * d / 10,
                (occ.len() * (d + 1) / 10).max(occ.len() * d / 10 + 1),
            );
            let part = &occ[a..b.min(occ.len())];
            part.iter().map(|&x| x as f64).sum::<f64>() / (part.len().max(1) * batch) as f64
        })
        .collect()
}

// Long because it is the benchmark's script: the recipe's prompts, the passes, the table.
pub(super) fn run(recipe: &Recipe, ctx: &mut Ctx, what: StageWhat) -> Result<()> {
    let StageWhat::Generate(a) = what;
    let rows: Vec<stages::prompts::PromptRow> =
        crate::fsutil::read_jsonl(&prompts_dir(ctx)?.join("prompts.jsonl"))?;
    let n = if a.prompts == 0 {
        rows.len()
    } else {
        a.prompts.min(rows.len())
    };
    let jobs: Vec<Job> = rows[..n].iter().map(|p| p.job()).collect();
    let g = &recipe.settings().generate;
    let mut passes = Vec::new();
    let described;
    match g.backend {
        BackendKind::Local => {
            let t0 = Instant::now();
            let model = recipe.load(&recipe.generate)?;
            let load_s = t0.elapsed().as_secs_f64();
            described = format!(
                "{} ({:?} weights, {:?}, {:?}), batch {}, loaded in {load_s:.1}s",
                model.source.spec,
                recipe.generate.load.weights,
                model.llama.device.location(),
                model.llama.dtype,
                g.batch_size
            );
            let engine = Local::new(&model, g.batch_size);
            for _ in 0..a.repeat.max(1) {
                passes.push(pass(&engine, &jobs, recipe)?);
            }
        }
        BackendKind::Openai => {
            let o = &g.openai;
            let servers = Remote::connect(o)?;
            described = format!(
                "{} on {} endpoint(s), {} in flight each",
                o.model,
                servers.endpoints.len(),
                o.concurrency
            );
            for _ in 0..a.repeat.max(1) {
                passes.push(pass(&servers, &jobs, recipe)?);
            }
        }
    }
    let walls: Vec<f64> = passes.iter().map(|p| p.wall).collect();
    let w = median(walls.clone());
    let p = passes
        .iter()
        .min_by(|x, y| (x.wall - w).abs().total_cmp(&(y.wall - w).abs()))
        .expect("at least one pass");
    let e = p.engine.clone().unwrap_or_default();
    let steps = e.occupancy.len();
    let mean_occ = if steps > 0 {
        e.occupancy.iter().map(|&x| x as f64).sum::<f64>() / (steps * g.batch_size) as f64
    } else {
        f64::NAN
    };
    let tenths = occupancy_by_tenth(&e.occupancy, g.batch_size);
    let other = w - e.prefill_secs - e.decode_secs;
    if a.json {
        let mut j = serde_json::json!({
            "bench": "stage generate", "what": described, "prompts": n,
            "wall_s": w, "walls_s": walls, "prompts_per_s": n as f64 / w,
            "generated_tokens": p.generated, "generated_tok_s": p.generated as f64 / w,
            "prompt_tokens": p.prompt_tokens, "finished_eos": p.eos,
            "peak_rss_mib": peak_rss_mib(),
        });
        // The engine's own counters exist only for the local backend.
        if p.engine.is_some() {
            j["prefill_s"] = e.prefill_secs.into();
            j["decode_s"] = e.decode_secs.into();
            j["decode_steps"] = steps.into();
            j["admits"] = e.admits.into();
            j["mean_occupancy"] = mean_occ.into();
            j["occupancy_by_tenth"] = tenths.into();
        }
        println!("{j}");
        return Ok(());
    }
    println!("{described}");
    println!(
        "{n} prompts ({} prompt tokens), {} generated tokens ({:.1} a review, {} ended at EOS)",
        p.prompt_tokens,
        p.generated,
        p.generated as f64 / n.max(1) as f64,
        p.eos
    );
    println!("| prompts/s | generated tok/s | wall s | peak RSS MiB |");
    println!("|---|---|---|---|");
    println!(
        "| {:.2} | {:.1} | {w:.1} | {:.0} |",
        n as f64 / w,
        p.generated as f64 / w,
        peak_rss_mib()
    );
    if p.engine.is_some() {
        println!(
            "time: prefill {:.1}s ({} admits, {:.0} prompt tok/s), decoding steps {:.1}s ({steps} \
             steps, {:.1} tok/s), the rest {other:.1}s",
            e.prefill_secs,
            e.admits,
            p.prompt_tokens as f64 / e.prefill_secs.max(1e-9),
            e.decode_secs,
            p.generated as f64 / e.decode_secs.max(1e-9),
        );
        println!(
            "batch occupancy: mean {:.0}%; by tenth of the steps: {}",
            mean_occ * 100.0,
            tenths
                .iter()
                .map(|x| format!("{:.0}%", x * 100.0))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}
