//! The command line: arguments parsed once, the recipe resolved once (`open`), then each
//! command is a few lines over the library.

use crate::config::{self, Sources};
use crate::error::{bail, Context, Result};
use crate::recipe::{Network, Recipe};
use crate::stages::{self, Ctx, Plan, Stage};
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
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
    config: PathBuf,
    /// Where stage outputs are cached
    #[arg(long, global = true, default_value = "data", value_name = "DIR")]
    workdir: PathBuf,
    /// Override a setting by its dotted name (repeatable), e.g. --set split.seed=7
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A named recipe on top of the config file: `quick` (offline, minutes on a CPU)
    #[arg(long, global = true, value_name = "NAME")]
    preset: Option<String>,
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
    Run(RunArgs),
    /// Show each stage: up to date, stale (and why), damaged or missing
    Status {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Write the dataset as a Hugging Face dataset folder (Parquet + dataset card)
    Export {
        /// Destination folder
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace a previous export in that folder (never anything export did not write)
        #[arg(long)]
        force: bool,
        /// `paired` (prompt, chosen, rejected: DPO) or `unpaired` (prompt, completion, label:
        /// KTO, two rows per pair)
        #[arg(long, value_enum, default_value = "paired")]
        format: crate::hub::Format,
    },
    /// Judge the base model against an adapter on held-out titles (the eval stage)
    Eval {
        /// Adapter folder to evaluate (default: the train stage's output when it is up to date,
        /// else the workdir's latest trained adapter)
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
    },
    /// Print a review of a paper title from the configured model
    Sample(SampleArgs),
    /// Serve the bot: a page at / and an OpenAI-compatible API (/v1/chat/completions, ...)
    Serve(ServeArgs),
    /// Merge a trained LoRA adapter into the base model and write a plain safetensors folder
    MergeAdapter {
        /// Adapter folder (adapter_config.json + adapter_model.safetensors)
        #[arg(long, value_name = "DIR")]
        adapter: PathBuf,
        /// Destination folder
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Measure speed: `bench generate` or `bench train`
    Bench(crate::bench::BenchArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Stop after this stage
    #[arg(long, value_enum, conflicts_with = "only")]
    until: Option<Stage>,
    /// Run only this stage (its inputs must be up to date)
    #[arg(long, value_enum)]
    only: Option<Stage>,
    /// Rebuild this stage even if it is up to date (repeatable; `--force scrape` refetches the page)
    #[arg(long, value_enum)]
    force: Vec<Stage>,
    /// Start long work without asking (a run estimated at over an hour asks on a terminal)
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(Args, Debug)]
struct SampleArgs {
    /// Paper title to review
    #[arg(long)]
    title: String,
    /// LoRA adapter folder to apply (default: the workdir's latest trained adapter)
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// The base model alone, even when the workdir has a trained adapter
    #[arg(long, conflicts_with_all = ["adapter", "compare"])]
    no_adapter: bool,
    /// Print the base model's and the adapter's reviews side by side
    #[arg(long)]
    compare: bool,
    /// Number of reviews to draw
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Sampling seed (default: generate.seed)
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Adapter folder to serve (repeat for more; default: the workdir's latest trained
    /// adapter). The first is the model `reviewer2`, others are named by their folder
    #[arg(long, value_name = "DIR")]
    adapter: Vec<PathBuf>,
    /// Serve the base model alone
    #[arg(long, conflicts_with = "adapter")]
    no_adapter: bool,
    /// Address to listen on (anything but loopback is reachable from other machines)
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0 = any free port; the address is printed)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer <key>`, the key read from this environment variable
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,
    /// Requests decoded together per model (default: generate.batch_size)
    #[arg(long)]
    batch_size: Option<usize>,
    /// Requests that may wait for a slot; beyond that, 503
    #[arg(long, default_value_t = 256)]
    queue: usize,
    /// The most new tokens a request may ask for (and what it gets without max_tokens)
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
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

pub fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Run(a) => {
            let recipe = open(g, Network::Allowed)?;
            let _lock = crate::lock::WorkdirLock::acquire(&g.workdir)?;
            let mut ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
            let plan = Plan {
                until: a.until,
                only: a.only,
                force: a.force,
                asked_as: None,
            };
            let t0 = std::time::Instant::now();
            let quiet = g.quiet;
            stages::run(&mut ctx, &plan, |todo| {
                announce(&recipe, todo, quiet, a.yes)
            })?;
            ctx.say("Finished", format!("in {:.2}s", t0.elapsed().as_secs_f64()));
            Ok(())
        }
        Command::Status { json } => {
            let recipe = open(g, Network::Never)?;
            let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
            let st = stages::status(&ctx);
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                for s in &st {
                    let counts = s
                        .counts
                        .iter()
                        .map(|(k, v)| format!("{v} {k}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    println!(
                        "{:<9} {:<11} {}",
                        s.stage.name(),
                        s.state,
                        s.key.as_deref().unwrap_or("-")
                    );
                    for r in &s.reasons {
                        println!("            because {r}");
                    }
                    if let Some(p) = &s.path {
                        println!("            at {}", p.display());
                    }
                    if !counts.is_empty() {
                        println!("            {counts}");
                    }
                    if let (Some(f), Some(sec)) = (&s.finished_at, s.seconds) {
                        println!("            built {f} in {sec:.1}s");
                    }
                }
            }
            Ok(())
        }
        Command::Export { out, force, format } => {
            let recipe = open(g, Network::Never)?;
            let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
            let st = stages::status(&ctx);
            let split = st.iter().find(|s| s.stage == Stage::Split).unwrap();
            if split.state != "up to date" {
                bail!(
                    "the split stage is {} ({}); run `pipeline run --until split` first",
                    split.state,
                    split.reasons.join("; ")
                );
            }
            let manifests: Vec<_> = st
                .iter()
                .filter_map(|s| {
                    let key = s.key.as_ref()?;
                    match ctx.cache.lookup(s.stage.name(), key) {
                        crate::cache::Lookup::Fresh(m) => Some(*m),
                        _ => None,
                    }
                })
                .collect();
            let infos = crate::hub::export(
                split.path.as_ref().unwrap(),
                &out,
                force,
                &g.workdir,
                &recipe.loaded.settings,
                &manifests,
                format,
            )?;
            ctx.say(
                "Exported",
                format!(
                    "{} ({})",
                    out.display(),
                    infos
                        .iter()
                        .map(|i| format!("{} {}", i.num_examples, i.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            Ok(())
        }
        Command::Eval { adapter } => {
            let recipe = open(g, Network::Allowed)?;
            let _lock = crate::lock::WorkdirLock::acquire(&g.workdir)?;
            let mut ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
            let dir = match adapter {
                Some(a) => stages::eval_adapter(&mut ctx, Some(&a))?,
                // The train stage's output when it is up to date with the recipe (cached under
                // its key), else the latest adapter trained in this workdir.
                // Only a train stage that is not up to date falls back: an error of the eval itself
                // is never retried on another adapter.
                None => match stages::latest_output(&ctx, Stage::Train) {
                    Some(a) if !stages::is_fresh(&ctx, Stage::Train)? => {
                        ctx.say(
                            "Evaluating",
                            format!("the latest trained adapter, {}", a.display()),
                        );
                        stages::eval_adapter(&mut ctx, Some(&a))?
                    }
                    _ => stages::eval_adapter(&mut ctx, None)?,
                },
            };
            if !g.quiet {
                let report = std::fs::read_to_string(dir.join("report.json"))?;
                println!("{report}");
            }
            ctx.say("Report", dir.join("eval.md").display().to_string());
            Ok(())
        }
        Command::Sample(a) => sample(g, a),
        Command::Serve(a) => serve(g, a),
        Command::MergeAdapter { adapter, out } => {
            let recipe = open(g, Network::Allowed)?;
            let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
            crate::export_guard::refuse_base_folder(&out, recipe.model(&recipe.train)?)?;
            let mut model = recipe.load(&recipe.train)?;
            model.load_adapter(&adapter)?;
            model.llama.merge_adapter()?;
            model.write_hf_folder(&out)?;
            ctx.say(
                "Merged",
                format!("{} into {}", adapter.display(), out.display()),
            );
            Ok(())
        }
        Command::Bench(a) => {
            // `bench generate` builds the prompts stage and `bench train` stages in the workdir.
            let _lock = crate::lock::WorkdirLock::acquire(&g.workdir)?;
            crate::bench::run(&open(g, Network::Allowed)?, &g.workdir, a)
        }
    }
}

/// Print the plan before the first build: the stages, a time estimate on this device, and on a
/// terminal a question when it is long, so nobody starts a multi-day CPU run by accident.
fn announce(recipe: &Recipe, todo: &[Stage], quiet: bool, yes: bool) -> Result<()> {
    let params = |plan: &crate::recipe::ModelPlan| -> Option<u64> {
        let src = recipe.model(plan).ok()?;
        Some(crate::model::source::load_meta(src).ok()?.config.n_params())
    };
    let needs = |s: Stage| todo.contains(&s);
    let p = (
        needs(Stage::Generate)
            .then(|| params(&recipe.generate))
            .flatten(),
        (needs(Stage::Train) || needs(Stage::Eval))
            .then(|| params(&recipe.train))
            .flatten(),
    );
    let cuda = recipe.generate.load.device.is_cuda() || recipe.train.load.device.is_cuda();
    let e = crate::estimate::estimate(recipe.settings(), todo, p, cuda);
    if !quiet {
        eprintln!(
            "{:>12} {} on the {} (estimate{}: {})",
            "Plan",
            todo.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
            e.device,
            if e.measured { "" } else { ", a guess" },
            crate::estimate::human(e.total)
        );
        for s in e
            .stages
            .iter()
            .filter(|s| s.seconds >= 60.0 || !s.seconds.is_finite())
        {
            eprintln!(
                "{:>12} {}: {} ({})",
                "",
                s.stage.name(),
                crate::estimate::human(s.seconds),
                s.what
            );
        }
    }
    if e.total > 3600.0 && !yes {
        if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
            eprint!(
                "{:>12} this is long work on the {}; `--preset quick` runs the whole pipeline in minutes. Continue? [y/N] ",
                "Confirm", e.device
            );
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            if !matches!(line.trim(), "y" | "Y" | "yes") {
                bail!("stopped before building anything (pass --yes to skip this question)");
            }
        } else if !quiet {
            eprintln!(
                "{:>12} long work ahead; not a terminal, so not asking (--yes silences this)",
                "Note"
            );
        }
    }
    Ok(())
}

fn sample(g: &Global, a: SampleArgs) -> Result<()> {
    use crate::model::generate::{generate, Request};
    let recipe = open(g, Network::Allowed)?;
    let mut a = a;
    if a.adapter.is_none() && !a.no_adapter {
        let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
        a.adapter = stages::latest_output(&ctx, Stage::Train);
        match &a.adapter {
            Some(d) => ctx.say(
                "Adapter",
                format!(
                    "the latest trained, {} (--no-adapter for the base model)",
                    d.display()
                ),
            ),
            None if a.compare => bail!(
                "--compare needs an adapter: pass --adapter DIR, or train one with `pipeline run`"
            ),
            None => {}
        }
    }
    let messages = stages::prompts::neutral_messages(&recipe, &a.title)?;
    // Loaded once; the adapter is attached to the same model for --compare.
    let mut base = recipe.load_interactive(a.adapter.is_some())?;
    let chat = base
        .meta
        .chat
        .as_ref()
        .context("the model has no chat template")?;
    let prompt = chat.render(&messages, true)?;
    let ids = base.meta.tok.encode(&prompt, true)?;
    let mut s = recipe.settings().generate.sampling();
    if let Some(seed) = a.seed {
        s.seed = seed;
    }
    let reqs: Vec<Request> = (0..a.n)
        .map(|i| Request {
            id: i,
            ids: ids.clone(),
        })
        .collect();
    let draw = |m: &crate::model::Model| -> Result<Vec<String>> {
        let mut out = vec![String::new(); a.n];
        generate(m, reqs.clone(), &s, a.n.min(8), |o, _| {
            out[o.id] = m.meta.tok.decode(&o.tokens, true)?.trim().to_string();
            Ok(())
        })?;
        Ok(out)
    };
    if a.compare {
        let before = draw(&base)?;
        base.load_adapter(a.adapter.as_ref().unwrap())?;
        let after = draw(&base)?;
        for (i, (b, x)) in before.iter().zip(&after).enumerate() {
            println!("[{}] base:    {b}\n[{}] adapter: {x}", i + 1, i + 1);
        }
    } else {
        if let Some(ad) = &a.adapter {
            base.load_adapter(ad)?;
        }
        for t in draw(&base)? {
            println!("{t}");
        }
    }
    Ok(())
}

fn serve(g: &Global, a: ServeArgs) -> Result<()> {
    let recipe = open(g, Network::Allowed)?;
    let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    let mut dirs = a.adapter.clone();
    if dirs.is_empty() && !a.no_adapter {
        match stages::latest_output(&ctx, Stage::Train) {
            Some(d) => dirs.push(d),
            None => ctx.say(
                "Note",
                "no trained adapter in this workdir: serving the base model alone (train one with `pipeline run`, or pass --adapter DIR)",
            ),
        }
    }
    let adapters = crate::serve::adapter_names(&dirs)?;
    let api_key = match &a.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
            _ => bail!(
                "--api-key-env names {var}, which is not set (or empty); export the key in it"
            ),
        },
    };
    if !a.host.is_loopback() {
        tracing::warn!(
            "serving on {}: reachable from other machines{}",
            a.host,
            if api_key.is_none() {
                ", with no API key (--api-key-env VAR)"
            } else {
                ""
            }
        );
    }
    crate::error::ensure!(a.queue > 0, "--queue must be at least 1");
    crate::error::ensure!(a.max_tokens > 0, "--max-tokens must be at least 1");
    let batch = a
        .batch_size
        .unwrap_or(recipe.settings().generate.batch_size)
        .max(1);
    let model = recipe.load_interactive(!adapters.is_empty())?;
    for (name, dir) in &adapters {
        ctx.say("Adapter", format!("{name}: {}", dir.display()));
    }
    let site = crate::serve::Site::new(
        &recipe,
        stages::latest_output(&ctx, Stage::Split),
        stages::latest_output(&ctx, Stage::Train),
        stages::latest_output(&ctx, Stage::Eval),
    );
    crate::serve::run(
        model,
        crate::serve::Options {
            addr: std::net::SocketAddr::new(a.host, a.port),
            adapters,
            api_key,
            batch,
            queue: a.queue,
            max_tokens: a.max_tokens,
            site,
            quiet: g.quiet,
        },
    )
}
