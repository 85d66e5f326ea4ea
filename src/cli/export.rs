//! `pipeline export`: the split as a Hugging Face dataset folder (Parquet + dataset card).

use super::{open, Global};
use crate::error::{bail, Result};
use crate::recipe::Network;
use crate::stages::{self, Ctx, Stage};
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
}

pub(crate) fn exec(g: &Global, a: ExportArgs) -> Result<()> {
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
        &a.out,
        a.force,
        &g.workdir,
        &recipe.loaded.settings,
        &manifests,
        a.format,
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
