//! The command line, one file per command (as cargo's `commands/`): each holds its arguments
//! and an `exec` over the library. This file parses the global flags, loads and resolves the
//! recipe once ([`open`]) and dispatches. Nothing below imports the CLI.

mod bench;
mod eval;
mod export;
mod export_adapter;
mod merge_adapter;
mod run;
mod sample;
mod serve;
mod status;

use crate::config::{self, Sources};
use crate::error::Result;
use crate::recipe::{Network, Recipe};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "pipeline",
    version,
    about = "Build the reviewer2-1k-paired preference dataset and train Reviewer #2 with DPO",
    long_about = "Build the reviewer2-1k-paired preference dataset and train the \"Reviewer #2\" bot on it.\n\n\
Stages: scrape -> prompts -> generate -> merge -> split -> train -> eval. Every stage caches its output \
under <workdir>/cache, keyed by its inputs and settings; `pipeline run` rebuilds only what changed.\n\n\
Settings apply in this order, each overriding the one before: built-in defaults, the --config \
file, the --preset, then each --set.",
    after_help = "Examples:\n  pipeline run --preset quick                   the whole pipeline offline in minutes (SmolLM2, 24 titles)\n  \
pipeline run                                  build everything the recipe describes (TinyLlama; a GPU job)\n  \
pipeline run --until split                    the dataset only\n  \
pipeline run --set generate.temperature=0.7   change one setting; only what depends on it reruns\n  \
pipeline status                               what is up to date, stale (and why), or missing\n  \
pipeline export --out reviewer2-1k-paired     a folder ready to upload to the Hub\n  \
pipeline export --out r2-unpaired --format unpaired   the same data for KTO (prompt, completion, label)\n  \
pipeline eval                                 is the trained bot harsher than the base model?\n  \
pipeline eval --adapter DIR                   the same question for any adapter folder\n  \
pipeline merge-adapter --adapter DIR --out OUT --format gguf   the bot for llama.cpp and Ollama\n  \
pipeline sample --title \"Attention Is All You Need\" --adapter data/cache/train/<key>"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The recipe file
    #[arg(
        long,
        global = true,
        default_value = "pipeline.toml",
        value_name = "FILE"
    )]
    pub(crate) config: PathBuf,
    /// Where stage outputs are cached
    #[arg(long, global = true, default_value = "data", value_name = "DIR")]
    pub(crate) workdir: PathBuf,
    /// Override a setting by its dotted name (repeatable), e.g. --set split.seed=7
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// A named recipe on top of the config file: `quick` (offline, minutes on a CPU)
    #[arg(long, global = true, value_name = "NAME")]
    pub(crate) preset: Option<String>,
    /// Print only errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more detail (-vv for debug output)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the stages in order, skipping those that are up to date
    Run(run::RunArgs),
    /// Show each stage: up to date, stale (and why), damaged or missing
    Status(status::StatusArgs),
    /// Write the dataset as a Hugging Face dataset folder (Parquet + dataset card)
    Export(export::ExportArgs),
    /// Judge the base model against an adapter on held-out titles (the eval stage)
    Eval(eval::EvalArgs),
    /// Print a review of a paper title from the configured model
    Sample(sample::SampleArgs),
    /// Serve the bot: a page at / and an OpenAI-compatible API (/v1/chat/completions, ...)
    Serve(serve::ServeArgs),
    /// Merge a trained LoRA adapter into the base model: a safetensors folder, or a GGUF and an Ollama Modelfile
    MergeAdapter(merge_adapter::MergeAdapterArgs),
    /// Write a trained LoRA adapter as a GGUF LoRA that llama.cpp applies over the base GGUF
    ExportAdapter(export_adapter::ExportAdapterArgs),
    /// Measure speed: `bench generate` or `bench train`
    Bench(crate::bench::BenchArgs),
}

/// Load the recipe (file, preset, `--set`) and resolve it once for this command.
fn open(g: &Global, network: Network) -> Result<Recipe> {
    let loaded = config::load(&Sources {
        file: g.config.clone(),
        must_exist: g.config != std::path::Path::new("pipeline.toml"),
        preset: g.preset.clone(),
        overrides: g.set.clone(),
    })?;
    Recipe::resolve(loaded, &g.workdir, network)
}

/// Run the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Run(a) => run::exec(g, a),
        Command::Status(a) => status::exec(g, a),
        Command::Export(a) => export::exec(g, a),
        Command::Eval(a) => eval::exec(g, a),
        Command::Sample(a) => sample::exec(g, a),
        Command::Serve(a) => serve::exec(g, a),
        Command::MergeAdapter(a) => merge_adapter::exec(g, a),
        Command::ExportAdapter(a) => export_adapter::exec(g, a),
        Command::Bench(a) => bench::exec(g, a),
    }
}
