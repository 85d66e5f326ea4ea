//! The model's own chat template (Jinja, from tokenizer_config.json or GGUF metadata), rendered with
//! minijinja the way Hugging Face renders it: `trim_blocks` and `lstrip_blocks` on, Python string
//! methods available, `raise_exception` and `strftime_now` registered.

use super::special_text;
use crate::error::{Context, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub(crate) role: String,
    pub(crate) content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    pub(crate) bos_token: String,
    pub(crate) eos_token: String,
    /// Where the template came from, for error messages.
    origin: String,
    source: String,
    /// Special tokens' texts, neutralized in message contents (see [`crate::model::load::special_text`]).
    specials: Vec<String>,
}

pub(crate) fn hf_environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("the chat template raised: {msg}"),
            ))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        // Dates only matter to templates that print "today"; keep it deterministic per day.
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let date = &now[..10];
        fmt.replace("%Y", &date[..4])
            .replace("%m", &date[5..7])
            .replace("%d", &date[8..10])
    });
    env
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str, origin: &str) -> Result<Self> {
        let mut env = hf_environment();
        env.add_template_owned("chat_template", source.to_string())
            .map_err(|e| crate::error::err!("chat template from {origin}: {e:#}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            origin: origin.into(),
            source: source.to_string(),
            specials: Vec::new(),
        })
    }

    /// Keep these special tokens' texts out of rendered message contents.
    pub(crate) fn with_special_texts(mut self, specials: Vec<String>) -> Self {
        self.specials = specials;
        self
    }

    /// `messages` as [`ChatTemplate::render`] sees them: special-token text in their contents
    /// neutralized. What a server that applies its own template should be sent.
    pub(crate) fn neutralized(&self, messages: Vec<Message>) -> Vec<Message> {
        match neutralize_messages(&messages, &self.specials) {
            Cow::Borrowed(_) => messages,
            Cow::Owned(m) => m,
        }
    }

    /// The special tokens' texts this template keeps out of message contents.
    pub(crate) fn special_texts(&self) -> &[String] {
        &self.specials
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub(crate) fn source_hash(&self) -> String {
        crate::fsutil::sha256_hex(self.source.as_bytes())
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat_template")?;
        let messages = neutralize_messages(messages, &self.specials);
        t.render(minijinja::context! {
            messages => messages.as_ref(),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| crate::error::err!("rendering the chat template from {}: {e:#}", self.origin))
        .context("chat template")
    }
}

/// Messages whose contents are neutralized (roles are the template's business and left alone).
fn neutralize_messages<'a>(messages: &'a [Message], specials: &[String]) -> Cow<'a, [Message]> {
    if specials.is_empty()
        || !messages.iter().any(|m| {
            matches!(
                special_text::neutralize(&m.content, specials),
                Cow::Owned(_)
            )
        })
    {
        return Cow::Borrowed(messages);
    }
    Cow::Owned(
        messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: special_text::neutralize(&m.content, specials).into_owned(),
            })
            .collect(),
    )
}
