//! `pipeline run`: print the plan with its estimate, then build the stages in order.

use super::{open, Global};
use crate::error::Result;
use crate::recipe::{Network, Recipe};
use crate::stages::{self, Ctx, Node, Plan, Stage};
use clap::Args;
use std::io::IsTerminal;

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// Stop after this stage (the on-policy rounds of `[rounds]` come after eval and run only
    /// in a run without --until or --only)
    #[arg(long, value_enum, conflicts_with = "only")]
    pub(crate) until: Option<Stage>,
    /// Run only this stage (its inputs must be up to date)
    #[arg(long, value_enum)]
    pub(crate) only: Option<Stage>,
    /// Rebuild this stage even if it is up to date (repeatable; `--force scrape` refetches the page)
    #[arg(long, value_enum)]
    pub(crate) force: Vec<Stage>,
    /// Start long work without asking (a run estimated at over an hour asks on a terminal)
    #[arg(long, short = 'y')]
    pub(crate) yes: bool,
}

pub(crate) fn exec(g: &Global, a: RunArgs) -> Result<()> {
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

/// Print the plan before the first build: the stages, a time estimate on this device, and on a
/// terminal a question when it is long, so nobody starts a multi-day CPU run by accident.
fn announce(recipe: &Recipe, todo: &[Node], quiet: bool, yes: bool) -> Result<()> {
    let params = |plan: &crate::recipe::ModelPlan| -> Option<u64> {
        let src = recipe.model(plan).ok()?;
        Some(
            crate::model::load::source::load_meta(src)
                .ok()?
                .config
                .n_params(),
        )
    };
    let needs = |s: Stage| todo.contains(&Node::Stage(s));
    let p = (
        needs(Stage::Generate)
            .then(|| params(&recipe.generate))
            .flatten(),
        (needs(Stage::Train) || needs(Stage::Eval) || todo.iter().any(|n| n.round().is_some()))
            .then(|| params(&recipe.train))
            .flatten(),
    );
    let cuda = recipe.generate.load.device.is_cuda() || recipe.train.load.device.is_cuda();
    let blocks = recipe.generate.load.weights == crate::model::options::WeightsMode::Blocks;
    let e = crate::estimate::estimate(recipe.settings(), todo, p, cuda, blocks);
    if !quiet {
        eprintln!(
            "{:>12} {} on the {} (estimate{}: {})",
            "Plan",
            todo.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
            e.device,
            if e.measured { "" } else { ", a guess" },
            crate::estimate::human(e.total)
        );
        let t = &recipe.settings().train;
        if needs(Stage::Train) && !t.loss.needs_reference() {
            eprintln!(
                "{:>12} train without reference log-probs (train-ref): train.loss = {} needs none",
                "",
                t.loss.describe()
            );
        }
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
                return Err(crate::error::Error::Cancelled(
                    "stopped before building anything (pass --yes to skip this question)".into(),
                ));
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
