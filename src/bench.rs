//! `pipeline bench`: speed and memory of generation and of a DPO training step, on real prompts.
//! Figures go to docs/PERF.md with the command and the machine; tests never time anything.

use crate::error::{Context, Result};
use crate::model::generate::{generate, Request, Sampling};
use crate::model::load::Model;
use crate::model::options::WeightsMode;
use crate::recipe::Recipe;
use crate::stages::{self, Ctx, Plan, Stage};
use clap::{Args, Subcommand};
use std::time::Instant;

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

/// A random-weight model of TinyLlama-1.1B's proportions instead of the configured model.
#[derive(Args, Debug, Clone, Copy)]
struct Shape {
    /// Use a random-weight model of TinyLlama-1.1B's shape (untied, 8:1 grouped attention)
    #[arg(long)]
    tinyllama_shape: bool,
    /// With --tinyllama-shape: its width (2048 = TinyLlama; smaller keeps the proportions)
    #[arg(long, default_value_t = 2048, requires = "tinyllama_shape")]
    shape_hidden: usize,
    /// With --tinyllama-shape: its depth (22 = TinyLlama)
    #[arg(long, default_value_t = 22, requires = "tinyllama_shape")]
    shape_layers: usize,
}

impl Shape {
    /// TinyLlama's config scaled to `shape_hidden` (heads of 64, 8 query heads per KV head,
    /// intermediate at 2.75x), or `None` for the configured model.
    fn config(&self) -> Option<crate::model::config::LlamaConfig> {
        if !self.tinyllama_shape {
            return None;
        }
        let full = crate::model::config::LlamaConfig::tinyllama();
        let heads = ((self.shape_hidden / full.head_dim).max(8) / 8) * 8;
        Some(crate::model::config::LlamaConfig {
            hidden_size: self.shape_hidden,
            intermediate_size: full.intermediate_size * self.shape_hidden / full.hidden_size,
            num_hidden_layers: self.shape_layers,
            num_attention_heads: heads,
            num_key_value_heads: heads / 8,
            head_dim: self.shape_hidden / heads,
            ..full
        })
    }

    /// The random model on `plan`'s device and dtype, with the configured model's tokenizer.
    fn model(
        &self,
        cfg: &crate::model::config::LlamaConfig,
        recipe: &Recipe,
        plan: &crate::recipe::ModelPlan,
    ) -> Result<Model> {
        let src = recipe.model(plan)?;
        let meta = crate::model::load::source::load_meta(src)?;
        let dev = &plan.load.device;
        let t = crate::model::load::safetensors::random_hf_tensors(cfg, 0, dev)?;
        Ok(Model {
            llama: crate::model::load::safetensors::from_hf_tensors(cfg, t, dev, plan.load.dtype)?,
            meta,
            source: src.clone(),
            share_prefixes: plan.load.share_prefixes,
        })
    }
}

#[derive(Subcommand, Debug)]
enum BenchWhat {
    /// Batched generation over the first N reviewer prompts (builds scrape + prompts if needed)
    Generate {
        /// Number of prompts
        #[arg(long, default_value_t = 64)]
        prompts: usize,
        /// Batch size (repeat or comma-separate to sweep: --batch-size 1,8,16)
        #[arg(long, value_delimiter = ',', default_value = "16")]
        batch_size: Vec<usize>,
        /// New tokens per prompt (every row generates exactly this many)
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// For GGUF models: quantized or f32 weights
        #[arg(long, value_enum, default_value = "f32")]
        weights: BenchWeights,
        #[command(flatten)]
        shape: Shape,
        /// Repeat each measurement and report the median
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// One JSON object per line instead of a table (scripts/gpu-check.sh reads it)
        #[arg(long)]
        json: bool,
        /// Where the tokens are made: this binary's engine, or the servers of
        /// `[generate.openai]` (then --batch-size is the requests in flight per endpoint)
        #[arg(long, value_enum, default_value = "local")]
        backend: BenchBackend,
    },
    /// Optimizer steps of DPO + LoRA on real pairs (the split, or prompts with pool reviews)
    Train {
        /// Pairs per batch
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        #[arg(long, default_value_t = 256)]
        max_length: usize,
        #[arg(long, default_value_t = 192)]
        max_prompt_length: usize,
        /// Steps to time (after one warm-up step)
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[command(flatten)]
        shape: Shape,
        /// One JSON object instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchBackend {
    Local,
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchWeights {
    F32,
    Quantized,
    /// The file's blocks for decoding, dense for prefill
    Mixed,
    /// Requantized to Q8_0 at load
    Q8,
    /// The file's blocks for prefill and decoding
    Blocks,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The demo Space's sampling, every row making `new_tokens` tokens.
fn sampling(new_tokens: usize) -> Sampling {
    Sampling {
        temperature: 0.5,
        top_k: 50,
        top_p: 0.95,
        max_new_tokens: new_tokens,
        seed: 1,
        ignore_eos: false,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Run a benchmark on the resolved recipe; scratch files go under `workdir`.
pub(crate) fn run(recipe: &Recipe, workdir: &std::path::Path, a: BenchArgs) -> Result<()> {
    let mut ctx = Ctx::new(recipe, workdir, true);
    match a.what {
        BenchWhat::Generate {
            prompts,
            batch_size,
            new_tokens,
            weights,
            shape,
            repeat,
            json,
            backend,
        } => {
            let r = stages::run(
                &mut ctx,
                &Plan {
                    until: Some(Stage::Prompts),
                    ..Default::default()
                },
                |_| Ok(()),
            )?;
            let rows: Vec<stages::prompts::PromptRow> =
                crate::fsutil::read_jsonl(&r.dir(Stage::Prompts).join("prompts.jsonl"))?;
            if backend == BenchBackend::Openai {
                let rows = &rows[..prompts.min(rows.len())];
                return remote(recipe, rows, &batch_size, new_tokens, repeat, json);
            }
            let plan = &recipe.generate;
            let device = plan.load.device.clone();
            let src = recipe.model(plan)?;
            let tinyllama_shape = shape.tinyllama_shape;
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
                Model::load(src, &opts)?
            };
            // Never stop early: every row makes exactly new_tokens tokens.
            model.meta.tok.eos_id = u32::MAX;
            model.meta.tok.stop_ids.clear();
            let vocab = model.llama.cfg.vocab_size as u32;
            let reqs: Vec<Request> = rows
                .iter()
                .take(prompts)
                .enumerate()
                .map(|(i, p)| {
                    let ids = model.meta.tok.encode(&p.prompt, true)?;
                    Ok(Request {
                        id: i,
                        ids: ids.into_iter().map(|t| t % vocab).collect(),
                    })
                })
                .collect::<Result<_>>()?;
            let s = sampling(new_tokens);
            let all: Vec<&[u32]> = reqs.iter().map(|r| &r.ids[..]).collect();
            let _ = &device;
            if !json {
                println!(
                "model {} ({}), {} prompts ({} prompt tokens, {} of them not a prefix another prompt \
                 already has), {} new tokens each, device {:?}, dtype {:?}",
                if tinyllama_shape { "random TinyLlama-1.1B shape".to_string() } else { model.source.spec.clone() },
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
                let mut pre = Vec::new();
                let mut dec = Vec::new();
                let mut wall = Vec::new();
                for _ in 0..repeat.max(1) {
                    let t0 = Instant::now();
                    let st = generate(&model, reqs.clone(), &s, bs, |_, _| Ok(()))?;
                    wall.push(t0.elapsed().as_secs_f64());
                    pre.push(st.prompt_tokens as f64 / st.prefill_secs);
                    // No decoding step (one new token a prompt): no decode rate.
                    dec.push(if st.decode_secs > 0.0 {
                        st.generated_tokens as f64 / st.decode_secs
                    } else {
                        f64::NAN
                    });
                }
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
        BenchWhat::Train {
            batch_size,
            max_length,
            max_prompt_length,
            steps,
            shape,
            json,
        } => {
            let r = stages::run(
                &mut ctx,
                &Plan {
                    until: Some(Stage::Prompts),
                    ..Default::default()
                },
                |_| Ok(()),
            )?;
            let pairs: Vec<stages::prompts::PairPromptRow> =
                crate::fsutil::read_jsonl(&r.dir(Stage::Prompts).join("pair_prompts.jsonl"))?;
            let pool = &recipe.settings().prompts.pool;
            // Only the rows the timed steps use: the reference pass over more would dominate.
            let rows: Vec<crate::dpo::data::RawRow> = pairs
                .iter()
                .take(batch_size * (steps + 1))
                .enumerate()
                .map(|(i, p)| crate::dpo::data::RawRow {
                    prompt: p.prompt.clone(),
                    chosen: pool[i % pool.len()].negative.clone(),
                    rejected: pool[i % pool.len()].positive.clone(),
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
            let refs =
                crate::dpo::trainer::reference_logps(&model, &prep.train, batch_size, false)?;
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
    }
}

/// `bench generate --backend openai`: the same prompts and sampling as the local bench, sent to
/// the `[generate.openai]` servers with EOS ignored (`ignore_eos`, which vLLM, SGLang and
/// llama.cpp take), `concurrency` requests in flight per endpoint for each value swept.
fn remote(
    recipe: &Recipe,
    rows: &[stages::prompts::PromptRow],
    concurrency: &[usize],
    new_tokens: usize,
    repeat: usize,
    json: bool,
) -> Result<()> {
    use crate::backend::openai::{Job, Remote};
    let mut o = recipe.settings().generate.openai.clone();
    crate::error::ensure!(
        !o.endpoints.is_empty() && !o.model.is_empty(),
        "bench generate --backend openai sends to the servers of [generate.openai]: set generate.openai.endpoints and generate.openai.model (--set works)"
    );
    let s = sampling(new_tokens);
    let extra = serde_json::Map::from_iter([("ignore_eos".to_string(), serde_json::json!(true))]);
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
            servers.generate(jobs.clone(), &s, &extra, |a| {
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

fn tempdir_in(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let p = dir.join(format!(".bench-{}", std::process::id()));
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}
