//! A request body into what the engine runs, once: deserialized into `crate::protocol`'s types
//! (a wrong type names its field), then validated into an [`Ask`] (every parameter honoured or
//! refused with 400 naming it, none silently ignored), the chat rendered through the model's
//! template and the prompt tokenized. The shape of TGI's router `validation.rs`.
//!
//! This is CPU work that grows with the body (a 1 MiB prompt takes a while to tokenize), so the
//! handlers run it on tokio's blocking pool, never on the async workers that answer everyone else.

use super::response::{Api, ApiError};
use super::App;
use crate::model::generate::{Penalties, Sampling, GREEDY_BELOW};
use crate::model::load::chat::Message;
use crate::protocol::{self, Content, Prompt, Request, Stop};
use axum::http::StatusCode;
use serde_json::Value;

/// A request validated: what both endpoints hand the engine.
#[derive(Debug)]
pub(super) struct Ask {
    pub(super) model: usize,
    pub(super) ids: Vec<u32>,
    pub(super) sampling: Sampling,
    pub(super) seed: Option<u64>,
    pub(super) stop: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
}

/// OpenAI's parameters this server does not act on, each accepted only at the value that asks
/// for nothing (what a client that never heard of it would mean). Any other value is refused by
/// name: a client that asks for log-probs or tools must not get an answer without them.
const NEUTRAL_ONLY: &[(&str, &str)] = &[
    ("logprobs", "false, 0 or null"),
    ("top_logprobs", "0 or null"),
    ("logit_bias", "{} or null"),
    ("tools", "[] or null"),
    ("functions", "[] or null"),
    ("tool_choice", "\"none\", \"auto\" or null"),
    ("function_call", "\"none\", \"auto\" or null"),
    ("parallel_tool_calls", "true, false or null"),
    ("response_format", "{\"type\": \"text\"} or null"),
    ("echo", "false or null"),
    ("best_of", "1 or null"),
    ("suffix", "\"\" or null"),
    ("store", "false or null"),
    ("metadata", "{} or null"),
];

fn is_neutral(name: &str, v: &Value) -> bool {
    let num = |x: f64| v.as_f64() == Some(x);
    v.is_null()
        || match name {
            "logprobs" => v == &Value::Bool(false) || num(0.0),
            "top_logprobs" => num(0.0),
            "best_of" => num(1.0),
            "logit_bias" | "metadata" => v.as_object().is_some_and(|o| o.is_empty()),
            "tools" | "functions" => v.as_array().is_some_and(|a| a.is_empty()),
            "tool_choice" | "function_call" => matches!(v.as_str(), Some("none" | "auto")),
            "parallel_tool_calls" => v.is_boolean(),
            "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
            "echo" | "store" => v == &Value::Bool(false),
            "suffix" => v.as_str() == Some(""),
            _ => false,
        }
}

/// Refuse what the server does not act on: a parameter of [`NEUTRAL_ONLY`] at another value
/// than its neutral one, or one that no type declares (`unknown`, as paths).
fn refuse_unserved(r: &Request, unknown: &[String]) -> Result<(), ApiError> {
    for (k, v) in r.unserved() {
        let Some(v) = v else { continue };
        if !is_neutral(k, v) {
            let neutral = NEUTRAL_ONLY
                .iter()
                .find(|(n, _)| *n == k)
                .map_or("null", |(_, n)| n);
            return Err(ApiError::bad(
                k,
                format!("`{k}` is not supported by this server; send {neutral}, or leave it out"),
            ));
        }
    }
    if let Some(name) = unknown.first() {
        return Err(ApiError::bad(
            name.as_str(),
            format!("unknown parameter `{name}`; this server takes OpenAI's parameters (and top_k, ignore_eos, repetition_penalty)"),
        ));
    }
    Ok(())
}

/// Deserialize, validate, render and tokenize one request body.
pub(super) fn validate(app: &App, body: &[u8], api: Api) -> Result<Ask, ApiError> {
    let field_error = |e: protocol::FieldError| {
        let param = e.field.clone().unwrap_or_else(|| "body".into());
        let msg = if e.syntax {
            format!("the body is not JSON: {}", e.message)
        } else {
            format!("{e}")
        };
        ApiError::bad(param, msg)
    };
    let (r, unknown) = protocol::parse_request(body).map_err(field_error)?;
    let prompt = prompt_text(app, &r, api)?;
    let model = r.model.as_str();
    let model = app
        .names
        .iter()
        .position(|n| *n == model)
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model {model:?} does not exist; this server has: {}",
                app.names.join(", ")
            ),
            param: Some("model".into()),
            code: "model_not_found",
        })?;
    refuse_unserved(&r, &unknown)?;
    let p = Checked::new(app, &r)?;
    let what = if api == Api::Chat {
        "messages"
    } else {
        "prompt"
    };
    let ids = app
        .meta
        .tok
        .encode(&prompt, true)
        .map_err(|e| ApiError::bad(what, format!("{e:#}")))?;
    let room = app.ctx_len.saturating_sub(ids.len());
    if room == 0 || p.max_tokens.is_some_and(|m| m > room) {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "the prompt is {} tokens and asks for {} more, beyond the model's context of {}",
                ids.len(),
                p.max_tokens.unwrap_or(1),
                app.ctx_len
            ),
            param: Some(what.into()),
            code: "context_length_exceeded",
        });
    }
    Ok(Ask {
        model,
        ids,
        sampling: Sampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            max_new_tokens: p.max_tokens.unwrap_or(app.max_tokens).min(room),
            seed: 0,
            ignore_eos: p.ignore_eos,
            penalties: p.penalties,
        },
        seed: r.seed,
        stop: p.stop,
        stream: r.stream.unwrap_or(false),
        include_usage: p.include_usage,
    })
}

/// The prompt text of a request: a completion's one prompt, or the chat's messages through
/// the model's template. Each endpoint refuses the other's field by name.
fn prompt_text(app: &App, r: &Request, api: Api) -> Result<String, ApiError> {
    Ok(match api {
        Api::Chat => {
            if r.prompt.is_some() {
                return Err(ApiError::bad(
                    "prompt",
                    "`prompt` is for /v1/completions; a chat takes `messages`",
                ));
            }
            render_chat(app, r.messages.as_deref().unwrap_or_default())?
        }
        Api::Completions => {
            if r.messages.is_some() {
                return Err(ApiError::bad(
                    "messages",
                    "`messages` is for /v1/chat/completions; a completion takes `prompt`",
                ));
            }
            match &r.prompt {
                Some(Prompt::Text(s)) => s.clone(),
                Some(Prompt::Texts(v)) if v.len() == 1 => v[0].clone(),
                _ => return Err(ApiError::bad(
                    "prompt",
                    "`prompt` must be one string (one prompt per request; token ids are not taken)",
                )),
            }
        }
    })
}

/// The parameters past the prompt, checked.
struct Checked {
    temperature: f64,
    top_p: f64,
    top_k: usize,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    ignore_eos: bool,
    include_usage: bool,
    penalties: Penalties,
}

impl Checked {
    fn new(app: &App, p: &Request) -> Result<Self, ApiError> {
        let range = |k: &str, v: Option<f64>, lo: f64, hi: f64, default: f64| match v {
            None => Ok(default),
            Some(f) if (lo..=hi).contains(&f) => Ok(f),
            Some(_) => Err(ApiError::bad(
                k,
                format!("`{k}` must be a number in [{lo}, {hi}]"),
            )),
        };
        let mut temperature = range("temperature", p.temperature, 0.0, 2.0, 1.0)?;
        if temperature < GREEDY_BELOW {
            temperature = 0.0;
        }
        let top_p = range("top_p", p.top_p, 0.0, 1.0, 1.0)?;
        let penalties = Penalties {
            // OpenAI's range.
            frequency: range("frequency_penalty", p.frequency_penalty, -2.0, 2.0, 0.0)?,
            presence: range("presence_penalty", p.presence_penalty, -2.0, 2.0, 0.0)?,
            repetition: match p.repetition_penalty {
                None => 1.0,
                // transformers refuses a penalty that is not above 0.
                Some(f) if f > 0.0 && f.is_finite() => f,
                Some(_) => {
                    return Err(ApiError::bad(
                        "repetition_penalty",
                        "`repetition_penalty` must be a number above 0 (1 = off)",
                    ))
                }
            },
        };
        if top_p <= 0.0 {
            return Err(ApiError::bad("top_p", "`top_p` must be above 0"));
        }
        if p.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n", "only n = 1 is served"));
        }
        let (key, max) = match (p.max_completion_tokens, p.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match max {
            None => None,
            Some(n) if n >= 1 && n <= app.max_tokens as u64 => Some(n as usize),
            Some(_) => {
                return Err(ApiError::bad(
                    key,
                    format!("`{key}` must be an integer from 1 to {}", app.max_tokens),
                ))
            }
        };
        let top_k = match p.top_k {
            None => 0,
            Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
        };
        let stop = match &p.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
            Some(Stop::Many(_)) => {
                return Err(ApiError::bad(
                    "stop",
                    "`stop` must be a string or up to 4 strings",
                ))
            }
        };
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::bad("stop", "a stop string must not be empty"));
        }
        let include_usage = p.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(Checked {
            temperature,
            top_p,
            top_k,
            max_tokens,
            stop,
            // An extension vLLM and llama.cpp share: decode to max_tokens whatever the model says.
            ignore_eos: p.ignore_eos.unwrap_or(false),
            include_usage,
            penalties,
        })
    }
}

/// The messages through the model's chat template.
fn render_chat(app: &App, msgs: &[protocol::ChatMessage]) -> Result<String, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "`messages` must be a non-empty array",
        ));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}]");
        // "developer" is the newer name OpenAI gives the system turn.
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            r @ ("user" | "assistant") => r,
            other => {
                return Err(ApiError::bad(
                    format!("{at}.role"),
                    format!("{at}.role is {other:?}; this server takes system, developer, user or assistant"),
                ))
            }
        };
        let content = match &m.content {
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad(
                                format!("{at}.content[{j}]"),
                                format!("{at}.content[{j}] must be {{\"type\": \"text\", \"text\": ...}}: this model reads text only"),
                            ))
                        }
                    }
                }
                text
            }
            None => {
                return Err(ApiError::bad(
                    format!("{at}.content"),
                    format!("{at} needs text content"),
                ))
            }
        };
        if m.name.is_some() {
            return Err(ApiError::bad(
                format!("{at}.name"),
                format!("{at}.name is not supported: the chat template has no place for it"),
            ));
        }
        messages.push(Message::new(role, content));
    }
    let chat = app.meta.chat.as_ref().ok_or_else(|| {
        ApiError::bad(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    chat.render(&messages, true)
        .map_err(|e| ApiError::bad("messages", format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_neutral_values_of_unserved_parameters_pass() {
        let parse =
            |v: serde_json::Value| protocol::parse_request(v.to_string().as_bytes()).unwrap();
        let (ok, unknown) = parse(
            serde_json::json!({"model": "m", "logprobs": false, "tools": [],
            "logit_bias": {}, "response_format": {"type": "text"},
            "tool_choice": "none", "user": "u"}),
        );
        assert!(refuse_unserved(&ok, &unknown).is_ok());
        for (k, v) in [
            ("logprobs", serde_json::json!(true)),
            ("logprobs", serde_json::json!(3)),
            ("logit_bias", serde_json::json!({"50256": -100})),
            ("tools", serde_json::json!([{"type": "function"}])),
            (
                "response_format",
                serde_json::json!({"type": "json_object"}),
            ),
            ("echo", serde_json::json!(true)),
            ("best_of", serde_json::json!(2)),
            ("made_up", serde_json::json!(1)),
        ] {
            let (r, unknown) = parse(serde_json::json!({"model": "m", k: v}));
            let e = refuse_unserved(&r, &unknown).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(k), "{k}: {}", e.message);
            assert!(e.message.contains(k), "{}", e.message);
        }
        // Every parameter kept as sent has its neutral value written down.
        let r = Request::default();
        for (k, _) in r.unserved() {
            assert!(NEUTRAL_ONLY.iter().any(|(n, _)| *n == k), "{k}");
        }
    }
}
