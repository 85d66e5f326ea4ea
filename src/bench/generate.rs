//! `bench generate`: batched generation over the first N reviewer prompts, every row making
//! exactly `--new-tokens` tokens, on this engine or on the `[generate.openai]` servers.

use super::{median, peak_rss_mib, prompts_dir, sampling, BenchBackend, BenchWeights, Shape};
use crate::backend::local::Local;
use crate::backend::openai::Remote;
use crate::backend::{Backend, Job};
use crate::error::Result;
use crate::model::generate::Sampling;
use crate::model::load::Model;
use crate::model::options::WeightsMode;
use crate::recipe::Recipe;
use crate::stages::{self, Ctx};
use clap::Args;
use std::time::Instant;

#[derive(Args, Debug)]
pub(super) struct GenerateArgs {
    /// Number of prompts
    #[arg(long, default_value_t = 64)]
    pub(super) prompts: usize,
    /// Batch size (repeat or comma-separate to sweep: --batch-size 1,8,16)
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub(super) batch_size: Vec<usize>,
    /// New tokens per prompt (every row generates exactly this many)
    #[arg(long, default_value_t = 64)]
    pub(super) new_tokens: usize,
    /// For GGUF models: quantized or f32 weights
    #[arg(long, value_enum, default_value = "f32")]
    pub(super) weights: BenchWeights,
    #[command(flatten)]
    pub(super) shape: Shape,
    /// Repeat each measurement and report the median
    #[arg(long, default_value_t = 3)]
    pub(super) repeat: usize,
    /// One JSON object per line instead of a table (scripts/gpu-check.sh reads it)
    #[arg(long)]
    pub(super) json: bool,
    /// Where the tokens are made: this binary's engine, or the servers of
    /// `[generate.openai]` (then --batch-size is the requests in flight per endpoint)
    #[arg(long, value_enum, default_value = "local")]
    pub(super) backend: BenchBackend,
}

/// The configured model held as `weights` asks (or a random one of TinyLlama's shape), set
/// never to stop early: every row makes exactly `--new-tokens` tokens.
fn load(recipe: &Recipe, weights: BenchWeights, shape: Shape) -> Result<Model> {
    let plan = &recipe.generate;
    let mut model = if let Some(cfg) = shape.config() {
        shape.model(&cfg, recipe, plan)?
    } else {
        let mut opts = plan.load.clone();
        opts.weights = match weights {
            BenchWeights::Quantized => WeightsMode::Quantized,
            BenchWeights::Mixed => WeightsMode::Mixed,
            BenchWeights::Q8 => WeightsMode::Q8,
            BenchWeights::Blocks => WeightsMode::Blocks,
            BenchWeights::F32 => WeightsMode::Dense,
        };
        Model::load(recipe.model(plan)?, &opts)?
    };
    model.meta.tok.eos_id = u32::MAX;
    model.meta.tok.stop_ids.clear();
    Ok(model)
}

/// `repeat` runs of every job at batch `bs`: each run's prompt tok/s, decode tok/s (NaN with
/// no decoding step) and wall seconds.
fn measure(
    model: &Model,
    bs: usize,
    vocab: u32,
    jobs: &[Job],
    s: &crate::model::generate::Sampling,
    repeat: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let (mut pre, mut dec, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        let engine = Local {
            wrap_vocab: Some(vocab),
            ..Local::new(model, bs)
        };
        let st = engine
            .generate(jobs.to_vec(), s, &mut |_| Ok(()))?
            .engine
            .unwrap_or_default();
        wall.push(t0.elapsed().as_secs_f64());
        pre.push(st.prompt_tokens as f64 / st.prefill_secs);
        dec.push(if st.decode_secs > 0.0 {
            st.generated_tokens as f64 / st.decode_secs
        } else {
            f64::NAN
        });
    }
    Ok((pre, dec, wall))
}

/// `pipeline bench generate`: the prompts, each batch size in turn, and the table.
// Long because it is the benchmark's script: setup, the timed rounds, the table and its file.
pub(super) fn run(recipe: &Recipe, ctx: &mut Ctx, a: GenerateArgs) -> Result<()> {
    let GenerateArgs {
        prompts,
        batch_size,
        new_tokens,
        weights,
        shape,
        repeat,
        json,
        backend,
    } = a;
    let rows: Vec<stages::prompts::PromptRow> =
        crate::fsutil::read_jsonl(&prompts_dir(ctx)?.join("prompts.jsonl"))?;
    if backend == BenchBackend::Openai {
        let rows = &rows[..prompts.min(rows.len())];
        return remote(recipe, rows, &batch_size, new_tokens, repeat, json);
    }
    let tinyllama_shape = shape.tinyllama_shape;
    let model = load(recipe, weights, shape)?;
    let vocab = model.llama.cfg.vocab_size as u32;
    let jobs: Vec<Job> = rows
        .iter()
        .take(prompts)
        .enumerate()
        .map(|(i, p)| Job { id: i, ..p.job() })
        .collect();
    // The ids as the engine sees them, for the printed prompt counts.
    let reqs: Vec<Vec<u32>> = jobs
        .iter()
        .map(|j| {
            let ids = model.meta.tok.encode(&j.prompt, true)?;
            Ok(ids.into_iter().map(|t| t % vocab).collect())
        })
        .collect::<Result<_>>()?;
    let s = sampling(new_tokens);
    let all: Vec<&[u32]> = reqs.iter().map(|r| &r[..]).collect();
    if !json {
        println!(
            "model {} ({}), {} prompts ({} prompt tokens, {} of them not a prefix another prompt \
         already has), {} new tokens each, device {:?}, dtype {:?}",
            if tinyllama_shape {
                "random TinyLlama-1.1B shape".to_string()
            } else {
                model.source.spec.clone()
            },
            if tinyllama_shape {
                "dense"
            } else {
                match weights {
                    BenchWeights::Quantized => "quantized",
                    BenchWeights::Mixed => "mixed",
                    BenchWeights::Q8 => "q8_0",
                    BenchWeights::Blocks => "blocks",
                    BenchWeights::F32 => "f32",
                }
            },
            reqs.len(),
            all.iter().map(|r| r.len()).sum::<usize>(),
            crate::model::generate::prefix::unique_tokens(&all),
            new_tokens,
            model.llama.device.location(),
            model.llama.dtype
        );
        // Decode tok/s: generated tokens over the decoding steps' time (as in every
        // earlier docs/PERF.md table); end to end: over the wall time, prefill included.
        println!(
            "| batch | prompt tok/s | decode tok/s | end-to-end tok/s | wall s | peak RSS MiB |"
        );
        println!("|---|---|---|---|---|---|");
    }
    for &bs in &batch_size {
        let (pre, dec, wall) = measure(&model, bs, vocab, &jobs, &s, repeat)?;
        if json {
            let generated = (reqs.len() * new_tokens) as f64;
            let w = median(wall.clone());
            println!(
                "{}",
                serde_json::json!({
                    "bench": "generate", "batch": bs, "prompts": reqs.len(),
                    "new_tokens": new_tokens, "params": model.llama.cfg.n_params(),
                    "dtype": format!("{:?}", model.llama.dtype).to_lowercase(),
                    "device": format!("{:?}", model.llama.device.location()),
                    "prompt_tok_s": median(pre.clone()), "decode_tok_s": median(dec.clone()),
                    "end_to_end_tok_s": generated / w, "wall_s": w,
                    "peak_rss_mib": peak_rss_mib(),
                })
            );
            continue;
        }
        let d = median(dec);
        let w = median(wall);
        println!(
            "| {bs} | {:.0} | {} | {:.1} | {w:.1} | {:.0} |",
            median(pre),
            if d.is_nan() {
                "-".to_string()
            } else {
                format!("{d:.1}")
            },
            (reqs.len() * new_tokens) as f64 / w,
            peak_rss_mib()
        );
    }
    Ok(())
}

/// `bench generate --backend openai`: the same prompts and sampling as the local bench, sent to
/// the `[generate.openai]` servers with EOS ignored (`ignore_eos`, which vLLM, SGLang and
/// llama.cpp take), `concurrency` requests in flight per endpoint for each value swept.
pub(super) fn remote(
    recipe: &Recipe,
    rows: &[stages::prompts::PromptRow],
    concurrency: &[usize],
    new_tokens: usize,
    repeat: usize,
    json: bool,
) -> Result<()> {
    let mut o = recipe.settings().generate.openai.clone();
    crate::error::ensure!(
        !o.endpoints.is_empty() && !o.model.is_empty(),
        "bench generate --backend openai sends to the servers of [generate.openai]: set generate.openai.endpoints and generate.openai.model (--set works)"
    );
    let s = Sampling {
        ignore_eos: true,
        ..sampling(new_tokens)
    };
    let jobs: Vec<Job> = rows.iter().map(|p| p.job()).collect();
    if !json {
        println!(
            "model {} on {} ({}), {} prompts, {} new tokens each",
            o.model,
            o.endpoints
                .iter()
                .map(|e| crate::backend::openai::redact(e))
                .collect::<Vec<_>>()
                .join(", "),
            o.api.name(),
            jobs.len(),
            new_tokens
        );
        println!("| in flight per endpoint | prompt tokens | generated tok/s | wall s |");
        println!("|---|---|---|---|");
    }
    for &c in concurrency {
        o.concurrency = c.max(1);
        let servers = Remote::connect(&o)?;
        let (mut wall, mut tok_s, mut prompt_tokens) = (Vec::new(), Vec::new(), 0);
        for _ in 0..repeat.max(1) {
            let (mut generated, mut prompt) = (0usize, 0usize);
            let t0 = Instant::now();
            Backend::generate(&servers, jobs.clone(), &s, &mut |a| {
                generated += a.tokens;
                prompt += a.prompt_tokens;
                Ok(())
            })?;
            let w = t0.elapsed().as_secs_f64();
            wall.push(w);
            tok_s.push(generated as f64 / w);
            prompt_tokens = prompt;
        }
        let (w, t) = (median(wall), median(tok_s));
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "generate", "backend": "openai", "concurrency": c,
                    "endpoints": o.endpoints.len(), "prompts": jobs.len(),
                    "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                    "end_to_end_tok_s": t, "wall_s": w,
                })
            );
        } else {
            println!("| {c} | {prompt_tokens} | {t:.1} | {w:.1} |");
        }
    }
    Ok(())
}
