//! `pipeline merge-adapter`: a LoRA adapter folded into the base, written as a plain model
//! folder: safetensors (what transformers and this engine load), or a GGUF with an Ollama
//! Modelfile beside it (what llama.cpp, Ollama and LM Studio load).
//!
//! One command with a `--format`, not a second one: the inputs (an adapter, the recipe's base),
//! the merge and the guard on `--out` are the same, and only the files written differ.

use super::{open, Global};
use crate::config::PromptStyle;
use crate::error::Result;
use crate::model::save::{GgufType, OllamaParams};
use crate::recipe::{Network, Recipe};
use crate::stages::Ctx;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// The merged GGUF's name inside `--out`, as `model.safetensors` is the other format's.
const GGUF_NAME: &str = "model.gguf";

/// The few-shot turns of a chat prompt are drawn per title; the Modelfile holds one draw, this
/// title's: the one `pipeline sample --title "Attention Is All You Need"` (the README's example)
/// prompts with, so that Ollama and `sample` can be compared on it.
const SHOTS_OF: &str = "Attention Is All You Need";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum MergedFormat {
    /// config.json, model.safetensors (f32) and the tokenizer files: transformers, PEFT, this engine
    Safetensors,
    /// model.gguf and an Ollama Modelfile: llama.cpp, Ollama, LM Studio, this engine
    Gguf,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
pipeline merge-adapter --adapter DIR --out reviewer2-hf\n  \
pipeline merge-adapter --adapter DIR --out reviewer2-gguf --format gguf --type q8_0\n  \
llama-server -m reviewer2-gguf/model.gguf              serve it with llama.cpp\n  \
ollama create reviewer2 -f reviewer2-gguf/Modelfile    or with Ollama\n\n\
DIR is a trained adapter (data/cache/train/<key>; `pipeline status` names it). The base is the \
recipe's train.model, else generate.model. The Modelfile carries the recipe's system message, \
few-shot turns and sampling.")]
pub(crate) struct MergeAdapterArgs {
    /// Adapter folder (adapter_config.json + adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: PathBuf,
    /// Destination folder (created; never the base model's folder)
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// What to write into it
    #[arg(long, value_enum, default_value = "safetensors")]
    pub(crate) format: MergedFormat,
    /// The GGUF's weight type (--format gguf; default f16). Norms stay f32, as llama.cpp keeps them
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub(crate) ty: Option<GgufType>,
    /// Replace the GGUF and Modelfile in --out if they are already there
    #[arg(long)]
    pub(crate) force: bool,
}

pub(crate) fn exec(g: &Global, a: MergeAdapterArgs) -> Result<()> {
    if a.format == MergedFormat::Safetensors && a.ty.is_some() {
        crate::error::usage!(
            "--type chooses the GGUF's weight type: pass --format gguf with it (the safetensors \
             folder is always f32)"
        );
    }
    if a.format == MergedFormat::Gguf
        && a.out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        crate::error::usage!(
            "--out {} looks like a file name, but it is the folder that {GGUF_NAME} and its \
             Modelfile go into: pass a folder, e.g. --out reviewer2-gguf",
            a.out.display()
        );
    }
    let recipe = open(g, Network::Allowed)?;
    let ctx = Ctx::new(&recipe, &g.workdir, g.quiet);
    crate::export_guard::refuse_base_folder(&a.out, recipe.model(&recipe.train)?)?;
    if a.format == MergedFormat::Gguf {
        crate::export_guard::refuse_existing(
            &[a.out.join(GGUF_NAME), a.out.join("Modelfile")],
            a.force,
        )?;
    }
    // Before the slow part: the recipe's prompt must render (its templates are found).
    let params = match a.format {
        MergedFormat::Gguf => Some(ollama_params(&recipe)?),
        MergedFormat::Safetensors => None,
    };
    let mut model = recipe.load(&recipe.train)?;
    model.load_adapter(&a.adapter)?;
    model.llama.merge_adapter()?;
    match a.format {
        MergedFormat::Safetensors => {
            model.write_hf_folder(&a.out)?;
            ctx.say(
                "Merged",
                format!("{} into {}", a.adapter.display(), a.out.display()),
            );
        }
        MergedFormat::Gguf => {
            let params = params.expect("computed above for gguf");
            let ty = a.ty.unwrap_or(GgufType::F16);
            std::fs::create_dir_all(&a.out)?;
            let file = a.out.join(GGUF_NAME);
            let w = crate::model::save::write_merged_gguf(&model, &file, ty, "reviewer2")?;
            let text = crate::model::save::modelfile(GGUF_NAME, &model.meta, &params);
            crate::fsutil::write_atomic(&a.out.join("Modelfile"), text.as_bytes())?;
            ctx.say(
                "Merged",
                format!(
                    "{} into {} ({} tensors, {} weights, {:.1} MiB) and its Ollama Modelfile",
                    a.adapter.display(),
                    file.display(),
                    w.tensors,
                    ty.name(),
                    w.bytes as f64 / (1 << 20) as f64
                ),
            );
        }
    }
    Ok(())
}

/// The recipe's sampling and, for chat prompts, the system message and few-shot turns the bot
/// was trained behind (the pair prompt's, as `pipeline sample` prompts it), for the Modelfile.
fn ollama_params(recipe: &Recipe) -> Result<OllamaParams> {
    let s = recipe.settings();
    let mut messages = Vec::new();
    if s.prompts.style == PromptStyle::Chat {
        messages = crate::stages::prompts::neutral_messages(recipe, SHOTS_OF)?;
        // The last message is the title's own turn: the user's, in Ollama.
        messages.pop();
    }
    let gen = &s.generate;
    Ok(OllamaParams {
        temperature: gen.temperature,
        top_k: gen.top_k,
        top_p: gen.top_p,
        num_predict: gen.max_new_tokens,
        repetition_penalty: gen.repetition_penalty,
        frequency_penalty: gen.frequency_penalty,
        presence_penalty: gen.presence_penalty,
        messages,
    })
}
