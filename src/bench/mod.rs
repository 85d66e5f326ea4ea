//! `pipeline bench`: speed and memory of generation and of a DPO training step, on real prompts.
//! Figures go to docs/PERF.md with the command and the machine; tests never time anything.
//! `generate.rs` times generation (this engine, or the `[generate.openai]` servers, through the
//! same backend trait the stages use), `train.rs` a DPO step; this file holds their arguments'
//! shared parts and the helpers.
//!
//! May import every floor below 8 (`stages`, `recipe`, `backend`, `model`, ...); never `cli`.

mod generate;
mod stage;
mod train;

use crate::error::{Context, Result};
use crate::model::generate::Sampling;
use crate::model::load::Model;
use crate::recipe::Recipe;
use crate::stages::{self, Ctx, Plan, Stage};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

/// A random-weight model of TinyLlama-1.1B's proportions instead of the configured model.
#[derive(Args, Debug, Clone, Copy)]
pub(super) struct Shape {
    /// Use a random-weight model of TinyLlama-1.1B's shape (untied, 8:1 grouped attention)
    #[arg(long)]
    pub(super) tinyllama_shape: bool,
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
    pub(super) fn config(&self) -> Option<crate::model::config::LlamaConfig> {
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
    pub(super) fn model(
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
    Generate(generate::GenerateArgs),
    /// Optimizer steps of DPO + LoRA on real pairs (the split, or prompts with pool reviews)
    Train(train::TrainArgs),
    /// A stage as the pipeline runs it, timed (`bench stage generate`: EOS on, the recipe's
    /// batch, weights and sampling, refills; prefill / decode / the rest, batch occupancy)
    #[command(subcommand)]
    Stage(stage::StageWhat),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum BenchBackend {
    Local,
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum BenchWeights {
    F32,
    Quantized,
    /// The file's blocks for decoding, dense for prefill
    Mixed,
    /// Requantized to Q8_0 at load
    Q8,
    /// The file's blocks for prefill and decoding
    Blocks,
}

pub(super) fn peak_rss_mib() -> f64 {
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
pub(super) fn sampling(new_tokens: usize) -> Sampling {
    Sampling {
        temperature: 0.5,
        top_k: 50,
        top_p: 0.95,
        max_new_tokens: new_tokens,
        seed: 1,
        ignore_eos: false,
        penalties: crate::model::generate::Penalties::OFF,
    }
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Run a benchmark on the resolved recipe; scratch files go under `workdir`.
pub(crate) fn run(recipe: &Recipe, workdir: &std::path::Path, a: BenchArgs) -> Result<()> {
    let mut ctx = Ctx::new(recipe, workdir, true);
    match a.what {
        BenchWhat::Generate(g) => generate::run(recipe, &mut ctx, g),
        BenchWhat::Train(t) => train::run(recipe, &mut ctx, workdir, t),
        BenchWhat::Stage(w) => stage::run(recipe, &mut ctx, w),
    }
}

/// The prompts stage's folder, built first if it is not up to date.
pub(super) fn prompts_dir(ctx: &mut Ctx) -> Result<std::path::PathBuf> {
    let r = stages::run(
        ctx,
        &Plan {
            until: Some(Stage::Prompts),
            ..Default::default()
        },
        |_| Ok(()),
    )?;
    Ok(r.dir(Stage::Prompts).to_path_buf())
}

pub(super) fn tempdir_in(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let p = dir.join(format!(".bench-{}", std::process::id()));
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}
