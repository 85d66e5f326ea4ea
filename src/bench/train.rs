//! `bench train`: optimizer steps of DPO + LoRA on real prompts paired with the pool's reviews,
//! after one warm-up step.

use super::{peak_rss_mib, prompts_dir, tempdir_in, Shape};
use crate::error::{Context, Result};
use crate::recipe::Recipe;
use crate::stages::{self, Ctx};
use clap::Args;
use std::time::Instant;

#[derive(Args, Debug)]
pub(super) struct TrainArgs {
    /// Pairs per batch
    #[arg(long, default_value_t = 4)]
    pub(super) batch_size: usize,
    #[arg(long, default_value_t = 256)]
    pub(super) max_length: usize,
    #[arg(long, default_value_t = 192)]
    pub(super) max_prompt_length: usize,
    /// Steps to time (after one warm-up step)
    #[arg(long, default_value_t = 5)]
    pub(super) steps: usize,
    #[command(flatten)]
    pub(super) shape: Shape,
    /// One JSON object instead of a table
    #[arg(long)]
    pub(super) json: bool,
}

/// `pipeline bench train`: the data, the timed steps, their memory, and the table.
// Long because it is the benchmark's script: setup, the timed steps, the table and its file.
pub(super) fn run(
    recipe: &Recipe,
    ctx: &mut Ctx,
    workdir: &std::path::Path,
    a: TrainArgs,
) -> Result<()> {
    let TrainArgs {
        batch_size,
        max_length,
        max_prompt_length,
        steps,
        shape,
        json,
    } = a;
    let pairs: Vec<stages::prompts::PairPromptRow> =
        crate::fsutil::read_jsonl(&prompts_dir(ctx)?.join("pair_prompts.jsonl"))?;
    let pool = &recipe.settings().prompts.pool;
    // Only the rows the timed steps use: the reference pass over more would dominate.
    let rows: Vec<crate::dpo::data::RawRow> = pairs
        .iter()
        .take(batch_size * (steps + 1))
        .enumerate()
        .map(|(i, p)| crate::dpo::data::RawRow {
            prompt: p.prompt.clone(),
            chosen: pool[i % pool.len()]
                .review(&recipe.settings().prompts.chosen)
                .to_string(),
            rejected: pool[i % pool.len()]
                .review(&recipe.settings().prompts.rejected)
                .to_string(),
            label: None,
        })
        .collect();
    let mut s = recipe.settings().train.clone();
    s.batch_size = batch_size;
    s.max_length = max_length;
    s.max_prompt_length = max_prompt_length;
    s.max_steps = steps + 1;
    s.save_steps = 0;
    s.eval_steps = 0;
    s.logging_steps = 1;
    let mut model = match shape.config() {
        Some(cfg) => shape.model(&cfg, recipe, &recipe.train)?,
        None => recipe.load(&recipe.train)?,
    };
    let mut prep = crate::dpo::trainer::prepare(&model, &s, &rows, &[])?;
    // A shape model's vocabulary may be smaller than the tokenizer's.
    let vocab = model.llama.cfg.vocab_size as u32;
    for e in &mut prep.train {
        for t in e
            .prompt
            .iter_mut()
            .chain(&mut e.chosen)
            .chain(&mut e.rejected)
        {
            *t %= vocab;
        }
    }
    let refs = crate::dpo::trainer::reference_logps(&model, &prep.train, batch_size, false)?;
    crate::dpo::trainer::attach_lora(&mut model, &s)?;
    let n_params: usize = model
        .llama
        .adapter()
        .context("no adapter attached")?
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    let tokens_per_step: usize = (0..batch_size)
        .map(|i| {
            let e = &prep.train[i % prep.train.len()];
            2 * e.prompt.len() + e.chosen.len() + e.rejected.len()
        })
        .sum();
    let tmp = tempdir_in(workdir)?;
    let tr = crate::dpo::trainer::Trainer {
        model: &model,
        s: &s,
        train: &prep.train,
        eval: &[],
        ref_train: &refs,
        ref_eval: &[],
        ckpt_dir: tmp.clone(),
        quiet: true,
    };
    let t0 = Instant::now();
    tr.run(Some(1))?; // warm-up
    let warm = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let out = tr.run(None)?;
    let secs = t1.elapsed().as_secs_f64() / (out.steps - 1).max(1) as f64;
    std::fs::remove_dir_all(&tmp).ok();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "train", "batch": batch_size, "max_length": max_length,
                "params": model.llama.cfg.n_params(), "trainable": n_params,
                "dtype": format!("{:?}", model.llama.dtype).to_lowercase(),
                "device": format!("{:?}", model.llama.device.location()),
                "step_s": secs, "tokens_per_s": tokens_per_step as f64 / secs,
                "warmup_s": warm, "steps": out.steps - 1, "peak_rss_mib": peak_rss_mib(),
            })
        );
        return Ok(());
    }
    println!(
        "model {}, LoRA r {} on {:?} ({n_params} trainable), batch {batch_size} pairs, max_length {max_length}",
        model.source.spec,
        s.lora.r,
        s.lora.targets.iter().map(|p| p.name()).collect::<Vec<_>>()
    );
    println!("| s/step | tokens/s | warm-up step s | peak RSS MiB |");
    println!("|---|---|---|---|");
    println!(
        "| {secs:.2} | {:.0} | {warm:.2} | {:.0} |",
        tokens_per_step as f64 / secs,
        peak_rss_mib()
    );
    Ok(())
}
