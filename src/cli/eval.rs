//! `pipeline eval`: the eval stage on the train stage's adapter, or on any adapter folder.

use super::{open, Global};
use crate::error::Result;
use crate::recipe::Network;
use crate::stages::{self, Ctx, Stage};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// Adapter folder to evaluate (default: the train stage's output when it is up to date,
    /// else the workdir's latest trained adapter)
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: Option<PathBuf>,
}

pub(crate) fn exec(g: &Global, a: EvalArgs) -> Result<()> {
    let recipe = open(g, Network::Allowed)?;
    let _lock = crate::lock::WorkdirLock::acquire(&g.workdir)?;
    let mut ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    let dir = match a.adapter {
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
