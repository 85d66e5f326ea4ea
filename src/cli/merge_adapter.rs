//! `pipeline merge-adapter`: a LoRA adapter folded into the base, written as a plain model
//! folder.

use super::{open, Global};
use crate::error::Result;
use crate::recipe::Network;
use crate::stages::Ctx;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct MergeAdapterArgs {
    /// Adapter folder (adapter_config.json + adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: PathBuf,
    /// Destination folder
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
}

pub(crate) fn exec(g: &Global, a: MergeAdapterArgs) -> Result<()> {
    let recipe = open(g, Network::Allowed)?;
    let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    crate::export_guard::refuse_base_folder(&a.out, recipe.model(&recipe.train)?)?;
    let mut model = recipe.load(&recipe.train)?;
    model.load_adapter(&a.adapter)?;
    model.llama.merge_adapter()?;
    model.write_hf_folder(&a.out)?;
    ctx.say(
        "Merged",
        format!("{} into {}", a.adapter.display(), a.out.display()),
    );
    Ok(())
}
