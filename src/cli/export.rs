//! `pipeline export`: the split, or an on-policy round's pairs (`--round N`), as a Hugging Face
//! dataset folder (Parquet + dataset card).

use super::{open, Global};
use crate::error::{bail, Result};
use crate::recipe::Network;
use crate::stages::{self, rounds, Ctx, Node, Stage};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// Destination folder
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Replace a previous export in that folder (never anything export did not write)
    #[arg(long)]
    pub(crate) force: bool,
    /// `paired` (prompt, chosen, rejected: DPO) or `unpaired` (prompt, completion, label:
    /// KTO, two rows per pair)
    #[arg(long, value_enum, default_value = "paired")]
    pub(crate) format: crate::hub::Format,
    /// Export round N's pairs (`[rounds]`: the bot's own reviews, best = chosen, worst =
    /// rejected; test = the split's test pairs) instead of the split
    #[arg(long, value_name = "N")]
    pub(crate) round: Option<usize>,
}

pub(crate) fn exec(g: &Global, a: ExportArgs) -> Result<()> {
    let recipe = open(g, Network::Never)?;
    let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    let st = stages::status(&ctx);
    let (node, how) = match a.round {
        None => (Node::Stage(Stage::Split), "`pipeline run --until split`".to_string()),
        Some(r) if r == 0 || r > recipe.settings().rounds.count => crate::error::usage!(
            "--round {r}: this recipe has rounds 1 to {} (rounds.count); round 0 is the split itself (export without --round)",
            recipe.settings().rounds.count
        ),
        Some(r) => (
            Node::Round(r, rounds::Step::Label),
            "`pipeline run`".to_string(),
        ),
    };
    let split = st.iter().find(|s| s.node == node).unwrap();
    if split.state != "up to date" {
        bail!(
            "the {} stage is {} ({}); run {how} first",
            split.stage,
            split.state,
            split.reasons.join("; ")
        );
    }
    let manifests: Vec<_> = st
        .iter()
        .filter_map(|s| {
            let key = s.key.as_ref()?;
            match ctx.cache.lookup(&s.stage, key) {
                crate::cache::Lookup::Fresh(m) => Some(*m),
                _ => None,
            }
        })
        .collect();
    let infos = crate::hub::export(
        split.path.as_ref().unwrap(),
        &a.out,
        a.force,
        &g.workdir,
        &recipe.loaded.settings,
        &manifests,
        (a.format, a.round),
    )?;
    ctx.say(
        "Exported",
        format!(
            "{} ({})",
            a.out.display(),
            infos
                .iter()
                .map(|i| format!("{} {}", i.num_examples, i.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok(())
}
