//! `pipeline sample`: reviews of one title from the base model, an adapter, or both side by
//! side.

use super::{open, Global};
use crate::error::{Context, Result};
use crate::recipe::Network;
use crate::stages::{self, Ctx};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct SampleArgs {
    /// Paper title to review
    #[arg(long)]
    pub(crate) title: String,
    /// LoRA adapter folder to apply (default: the workdir's latest trained adapter)
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: Option<PathBuf>,
    /// The base model alone, even when the workdir has a trained adapter
    #[arg(long, conflicts_with_all = ["adapter", "compare"])]
    pub(crate) no_adapter: bool,
    /// Print the base model's and the adapter's reviews side by side
    #[arg(long)]
    pub(crate) compare: bool,
    /// Number of reviews to draw
    #[arg(long, default_value_t = 1)]
    pub(crate) n: usize,
    /// Sampling seed (default: generate.seed)
    #[arg(long)]
    pub(crate) seed: Option<u64>,
}

pub(crate) fn exec(g: &Global, a: SampleArgs) -> Result<()> {
    use crate::model::generate::{generate, Request};
    let recipe = open(g, Network::Allowed)?;
    let mut a = a;
    if a.adapter.is_none() && !a.no_adapter {
        let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
        a.adapter = stages::latest_adapter(&ctx);
        match &a.adapter {
            Some(d) => ctx.say(
                "Adapter",
                format!(
                    "the latest trained, {} (--no-adapter for the base model)",
                    d.display()
                ),
            ),
            None if a.compare => crate::error::usage!(
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
    let draw = |m: &crate::model::load::Model| -> Result<Vec<String>> {
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
