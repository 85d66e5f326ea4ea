//! `pipeline export-adapter`: a trained LoRA adapter (a PEFT folder) as one GGUF file that
//! llama.cpp applies over the base GGUF at run time (`llama-server -m BASE --lora FILE`).
//!
//! A command of its own rather than a flag of `merge-adapter`: nothing is merged, and what it
//! writes is an adapter file to carry beside an unchanged base, not a model folder.

use super::{open, Global};
use crate::error::Result;
use crate::model::load::source::load_meta;
use crate::model::save::LoraType;
use crate::recipe::Network;
use crate::stages::Ctx;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AdapterFormat {
    /// llama.cpp's GGUF LoRA (`convert_lora_to_gguf.py`'s format)
    Gguf,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
pipeline export-adapter --adapter data/cache/train/<key> --out reviewer2-lora.gguf\n  \
llama-server -m models/SmolLM2-135M-Instruct.Q4_1.gguf --lora reviewer2-lora.gguf\n\n\
The base must be the model the adapter was trained on (train.model, else generate.model) as a GGUF: \
its q and k weights are stored permuted, and so are the adapter's B rows for them.")]
pub(crate) struct ExportAdapterArgs {
    /// Adapter folder (adapter_config.json + adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: PathBuf,
    /// The file to write (e.g. reviewer2-lora.gguf); never a file of the base model or the adapter
    #[arg(long, value_name = "FILE")]
    pub(crate) out: PathBuf,
    /// The adapter's format
    #[arg(long, value_enum, default_value = "gguf")]
    pub(crate) format: AdapterFormat,
    /// The tensors' type
    #[arg(long = "type", value_enum, default_value = "f32", value_name = "TYPE")]
    pub(crate) ty: LoraType,
    /// Replace --out if it already exists
    #[arg(long)]
    pub(crate) force: bool,
}

pub(crate) fn exec(g: &Global, a: ExportAdapterArgs) -> Result<()> {
    let AdapterFormat::Gguf = a.format;
    let recipe = open(g, Network::Allowed)?;
    let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    let base = recipe.model(&recipe.train)?;
    crate::export_guard::refuse_model_files(&a.out, base, &a.adapter)?;
    crate::export_guard::refuse_existing(std::slice::from_ref(&a.out), a.force)?;
    // The base's shape (its header or config.json), not its weights.
    let cfg = load_meta(base)?.config;
    let n = crate::model::save::write_lora_gguf(&a.adapter, &cfg, &a.out, a.ty, "reviewer2")?;
    ctx.say(
        "Exported",
        format!(
            "{} as a GGUF LoRA for {} into {} ({n} tensors)",
            a.adapter.display(),
            base.spec,
            a.out.display()
        ),
    );
    Ok(())
}
