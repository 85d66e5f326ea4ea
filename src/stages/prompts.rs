//! Stage 2, prompts: per title a generation prompt in each of the recipe's two styles
//! (`prompts.chosen`, default negative, and `prompts.rejected`, default positive), plus the
//! neutral pair prompt that interleaves the two styles' examples (what the dataset's `prompt`
//! column holds).
//!
//! Content comes from the minijinja templates in `prompts.templates`; the model's own chat
//! template turns the messages into prompt text.

use super::scrape::TitleRow;
use super::{Built, Ctx};
use crate::cache::KeyMaterial;
use crate::config::PromptSettings;
use crate::config::{PromptStyle, Shot};
use crate::error::{Context, Result};
use crate::fsutil::{read_jsonl, sha256_file, sha256_hex, write_jsonl};
use crate::model::load::chat::{hf_environment, ChatTemplate, Message};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// 2: special-token text inside titles and examples reaches the model as text.
const VERSION: u32 = 2;
const TEMPLATE_FILES: [&str; 2] = ["chat_user.jinja", "plain.jinja"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct PromptRow {
    /// 2 * title id + (0 the chosen style, 1 the rejected one): the generation request id.
    pub(crate) id: usize,
    pub(crate) title_id: usize,
    pub(crate) title: String,
    /// The style's name (`negative` / `positive` in the published recipe, whose rows it keeps).
    pub(crate) polarity: String,
    pub(crate) messages: Vec<Message>,
    pub(crate) prompt: String,
}

impl PromptRow {
    /// The request the `openai` backend sends for this prompt.
    pub(crate) fn job(&self) -> crate::backend::openai::Job {
        crate::backend::openai::Job {
            id: self.id,
            prompt: self.prompt.clone(),
            messages: self.messages.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct PairPromptRow {
    pub(crate) title_id: usize,
    pub(crate) title: String,
    messages: Vec<Message>,
    pub(crate) prompt: String,
}

/// The chat template of the configured model, and a fingerprint of what affects prompt text.
pub(crate) fn chat_template(ctx: &Ctx) -> Result<(ChatTemplate, String)> {
    let src = ctx.recipe.model(&ctx.recipe.generate)?;
    let meta = crate::model::load::source::load_meta(src)?;
    let chat = meta.chat.with_context(|| {
        format!(
            "model {} has no chat template (tokenizer_config.json chat_template or GGUF tokenizer.chat_template)",
            src.spec
        )
    })?;
    let fp = sha256_hex(
        format!(
            "{}\0{}\0{}",
            chat.source_hash(),
            chat.bos_token,
            chat.eos_token
        )
        .as_bytes(),
    );
    Ok((chat, format!("chat-template:{}", &fp[..16])))
}

pub(crate) fn material(ctx: &Ctx, scrape_key: &str) -> Result<KeyMaterial> {
    let p = &ctx.settings().prompts;
    let dir = &ctx.recipe.templates;
    let mut files = BTreeMap::new();
    for f in TEMPLATE_FILES {
        let path = dir.join(f);
        let h = sha256_file(&path).with_context(|| {
            format!(
                "template {} is missing; prompts.templates ({}) must name a folder holding {}",
                path.display(),
                ctx.loaded.origin("prompts.templates"),
                TEMPLATE_FILES.join(", ")
            )
        })?;
        files.insert(f.to_string(), h);
    }
    let (_, chat_id) = chat_template(ctx)?;
    let mut settings = serde_json::to_value(p)?;
    let obj = settings.as_object_mut().unwrap();
    obj.remove("templates");
    // The published styles leave the key as it was before styles were settings.
    if p.default_styles() {
        for k in ["chosen", "rejected", "style_system"] {
            obj.remove(k);
        }
    }
    Ok(KeyMaterial {
        stage: "prompts".into(),
        version: VERSION,
        settings,
        files,
        model: Some(chat_id),
        inputs: BTreeMap::from([("scrape".to_string(), scrape_key.to_string())]),
    })
}

struct Templates {
    env: minijinja::Environment<'static>,
}

impl Templates {
    fn load(dir: &Path) -> Result<Self> {
        let mut env = hf_environment();
        for f in TEMPLATE_FILES {
            let path = dir.join(f);
            let src = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let name = path.display().to_string();
            env.add_template_owned(name.clone(), src)
                .map_err(|e| template_error(&e))?;
        }
        Ok(Self { env })
    }

    fn render(&self, dir: &Path, file: &str, ctx: minijinja::Value) -> Result<String> {
        let name = dir.join(file).display().to_string();
        let t = self
            .env
            .get_template(&name)
            .map_err(|e| template_error(&e))?;
        Ok(t.render(ctx)
            .map_err(|e| template_error(&e))?
            .trim()
            .to_string())
    }
}

/// "templates/plain.jinja:3: undefined value ..." rather than a bare message.
fn template_error(e: &minijinja::Error) -> crate::error::Error {
    let loc = match (e.name(), e.line()) {
        (Some(n), Some(l)) => format!("{n}:{l}: "),
        (Some(n), None) => format!("{n}: "),
        _ => String::new(),
    };
    crate::error::err!(
        "{loc}{}",
        e.detail()
            .map(str::to_string)
            .unwrap_or_else(|| e.kind().to_string())
    )
}

/// Pick `shots` distinct pool entries for a title, reproducibly.
fn pick_shots(pool: &[Shot], shots: usize, seed: u64, title_id: usize) -> (Vec<&Shot>, bool) {
    let mut rng = crate::rng::stream(seed, title_id as u64);
    let idx = crate::rng::draw(pool.len(), shots, &mut rng);
    let chosen_first = rng.random::<bool>();
    (idx.iter().map(|&i| &pool[i]).collect(), chosen_first)
}

pub(crate) fn build(ctx: &Ctx, scrape_dir: &Path, out: &Path) -> Result<Built> {
    let p = &ctx.settings().prompts;
    let titles: Vec<TitleRow> = read_jsonl(&scrape_dir.join("titles.jsonl"))?;
    let dir = &ctx.recipe.templates;
    let tpl = Templates::load(dir)?;
    let (chat, _) = chat_template(ctx)?;
    let mut rows = Vec::with_capacity(titles.len() * 2);
    let mut pairs = Vec::with_capacity(titles.len());
    for t in &titles {
        let (shots, chosen_first) = pick_shots(&p.pool, p.shots, p.seed, t.id);
        for (slot, style) in p.styles().into_iter().enumerate() {
            let examples: Vec<&str> = shots.iter().map(|s| s.review(style)).collect();
            let system = p.style_system.get(style).unwrap_or(&p.system);
            let messages = messages_for(
                &tpl,
                dir,
                p.style,
                system,
                &t.title,
                Some(style),
                &shots,
                &examples,
            )?;
            let prompt = chat.render(&messages, true)?;
            // Neutralized as rendered, so a server applying its own template (the openai
            // backend's chat API) reads the same text as a token stream.
            let messages = chat.neutralized(messages);
            rows.push(PromptRow {
                id: 2 * t.id + slot,
                title_id: t.id,
                title: t.title.clone(),
                polarity: style.to_string(),
                messages,
                prompt,
            });
        }
        // The pair prompt alternates styles so it no longer says which review was asked for.
        let examples = alternating(p, &shots, chosen_first);
        let messages = messages_for(
            &tpl, dir, p.style, &p.system, &t.title, None, &shots, &examples,
        )?;
        let prompt = chat.render(&messages, true)?;
        let messages = chat.neutralized(messages);
        pairs.push(PairPromptRow {
            title_id: t.id,
            title: t.title.clone(),
            messages,
            prompt,
        });
    }
    write_jsonl(&out.join("prompts.jsonl"), &rows)?;
    write_jsonl(&out.join("pair_prompts.jsonl"), &pairs)?;
    Ok(Built::new("prompts", rows.len()).with("pair_prompts", pairs.len()))
}

#[allow(clippy::too_many_arguments)]
fn messages_for(
    tpl: &Templates,
    dir: &Path,
    style: PromptStyle,
    system: &str,
    title: &str,
    polarity: Option<&str>,
    shots: &[&Shot],
    examples: &[&str],
) -> Result<Vec<Message>> {
    Ok(match style {
        PromptStyle::Chat => {
            let mut m = Vec::new();
            if !system.is_empty() {
                m.push(Message::new("system", system));
            }
            for (s, ex) in shots.iter().zip(examples) {
                let user = tpl.render(
                    dir,
                    "chat_user.jinja",
                    minijinja::context! { title => &s.title },
                )?;
                m.push(Message::new("user", user));
                m.push(Message::new("assistant", *ex));
            }
            let user = tpl.render(
                dir,
                "chat_user.jinja",
                minijinja::context! { title => title },
            )?;
            m.push(Message::new("user", user));
            m
        }
        PromptStyle::Plain => {
            let text = tpl.render(
                dir,
                "plain.jinja",
                // `style` is the name for any pair of styles; `polarity` stays for templates
                // written before styles were settings.
                minijinja::context! { title => title, polarity => polarity, style => polarity, examples => examples },
            )?;
            vec![Message::new("user", text)]
        }
    })
}

/// The neutral (pair-style) messages for one title, as `pipeline sample` prompts the bot.
pub(crate) fn neutral_messages(
    recipe: &crate::recipe::Recipe,
    title: &str,
) -> Result<Vec<Message>> {
    neutral_messages_with(&recipe.settings().prompts, &recipe.templates, title)
}

/// [`neutral_messages`] from the prompt settings and the templates folder alone.
pub(crate) fn neutral_messages_with(
    p: &PromptSettings,
    dir: &Path,
    title: &str,
) -> Result<Vec<Message>> {
    let tpl = Templates::load(dir)?;
    let id = u64::from_str_radix(&sha256_hex(title.as_bytes())[..12], 16).unwrap_or(0) as usize;
    let (shots, chosen_first) = pick_shots(&p.pool, p.shots, p.seed, id);
    let examples = alternating(p, &shots, chosen_first);
    messages_for(
        &tpl, dir, p.style, &p.system, title, None, &shots, &examples,
    )
}

/// The pair prompt's examples: the two styles in turn, starting with the chosen one or not.
fn alternating<'a>(p: &PromptSettings, shots: &[&'a Shot], chosen_first: bool) -> Vec<&'a str> {
    shots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let style = if (i % 2 == 0) == chosen_first {
                &p.chosen
            } else {
                &p.rejected
            };
            s.review(style)
        })
        .collect()
}
