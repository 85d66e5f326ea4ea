//! The OpenAI HTTP API's wire format: the requests, answers, stream chunks, model lists and
//! errors of `/v1/models`, `/v1/completions` and `/v1/chat/completions`, as serde types.
//! `pipeline serve` reads requests and writes answers with them; the `openai` generate backend
//! writes requests and reads answers with them, so both sides agree on one spelling.
//!
//! Shape only: which values are acceptable is each side's to decide (`serve/request.rs` for the
//! server, `backend/openai.rs` for the client). Fields a side does not know are kept in `extra`
//! rather than dropped, so the server can refuse a parameter it does not honour by name instead
//! of silently ignoring it, and the client tolerates servers that add their own fields.
//!
//! Imports nothing of the crate: floor 0.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A request to `POST /v1/completions` (with `prompt`) or `POST /v1/chat/completions` (with
/// `messages`). No `#[serde(flatten)]` here or below: it would buffer the body and lose the name
/// of a field that has the wrong type. Fields nobody declared are reported by [`parse_request`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Request {
    pub(crate) model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) prompt: Option<Prompt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) messages: Option<Vec<ChatMessage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) top_p: Option<f64>,
    /// Not OpenAI's; vLLM, TGI, SGLang and llama.cpp take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) top_k: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) frequency_penalty: Option<f64>,
    /// Not OpenAI's: transformers' penalty, under the name vLLM and TGI take it by (llama.cpp's
    /// server calls it `repeat_penalty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) repetition_penalty: Option<f64>,
    /// Not OpenAI's; vLLM, SGLang and llama.cpp take it: decode to `max_tokens` whatever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ignore_eos: Option<bool>,
    /// An end user's id, for the provider's records; it changes no output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    // OpenAI's parameters that not every server acts on, kept as sent (see [`Request::unserved`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) logprobs: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) top_logprobs: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) logit_bias: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tools: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) functions: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tool_choice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) function_call: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) parallel_tool_calls: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) response_format: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) echo: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) best_of: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) suffix: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) store: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) metadata: Option<Value>,
}

impl Request {
    /// The parameters kept as sent, by name: a server that does not act on one can still accept
    /// it at the value that asks for nothing, and refuse it otherwise.
    pub(crate) fn unserved(&self) -> [(&'static str, Option<&Value>); 14] {
        [
            ("logprobs", self.logprobs.as_ref()),
            ("top_logprobs", self.top_logprobs.as_ref()),
            ("logit_bias", self.logit_bias.as_ref()),
            ("tools", self.tools.as_ref()),
            ("functions", self.functions.as_ref()),
            ("tool_choice", self.tool_choice.as_ref()),
            ("function_call", self.function_call.as_ref()),
            ("parallel_tool_calls", self.parallel_tool_calls.as_ref()),
            ("response_format", self.response_format.as_ref()),
            ("echo", self.echo.as_ref()),
            ("best_of", self.best_of.as_ref()),
            ("suffix", self.suffix.as_ref()),
            ("store", self.store.as_ref()),
            ("metadata", self.metadata.as_ref()),
        ]
    }
}

/// A completion's `prompt`: OpenAI also takes lists of strings and token ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One chat message as sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChatMessage {
    pub(crate) role: String,
    /// `null` is legal for an assistant turn that only called tools.
    pub(crate) content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
}

/// A message's content: a string, or a list of typed parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message: `{"type": "text", "text": ...}` (or an image, audio, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) text: Option<String>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: bool,
}

/// An answer of either endpoint, whole (`text_completion`, `chat.completion`) or one chunk of a
/// stream (`chat.completion.chunk`). Everything a server may leave out is optional here: the
/// client decides what it cannot do without.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Completion {
    #[serde(default)]
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) object: String,
    #[serde(default)]
    pub(crate) created: u64,
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) system_fingerprint: Option<String>,
    #[serde(default)]
    pub(crate) choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Usage>,
}

/// One choice: `text` (completions), `message` (a whole chat answer) or `delta` (a chat chunk).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Choice {
    #[serde(default)]
    pub(crate) index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<AssistantMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) delta: Option<AssistantMessage>,
    /// Always written (as `null`): OpenAI's clients expect the key.
    #[serde(default)]
    pub(crate) logprobs: Option<Value>,
    /// `null` in every chunk but the last.
    #[serde(default)]
    pub(crate) finish_reason: Option<String>,
}

/// What the assistant said (a whole message, or a chunk's delta).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AssistantMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) content: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Usage {
    #[serde(default)]
    pub(crate) prompt_tokens: u64,
    #[serde(default)]
    pub(crate) completion_tokens: u64,
    #[serde(default)]
    pub(crate) total_tokens: u64,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ModelList {
    #[serde(default)]
    pub(crate) object: String,
    pub(crate) data: Vec<ModelEntry>,
}

/// One served model. llama.cpp adds `aliases`; vLLM `root`; others their own: kept in `extra`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ModelEntry {
    pub(crate) id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) object: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) created: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) owned_by: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) aliases: Vec<String>,
    #[serde(flatten)]
    pub(crate) extra: Map<String, Value>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An error answer: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorDetail {
    pub(crate) message: String,
    #[serde(rename = "type", default)]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) param: Option<String>,
    #[serde(default)]
    pub(crate) code: Option<String>,
}

/// A request body as a [`Request`], and the fields it carried that no type here declares, as
/// paths (`made_up`, `messages[0].name_x`), for the server to refuse by name.
pub(crate) fn parse_request(body: &[u8]) -> Result<(Request, Vec<String>), FieldError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| FieldError {
        field: None,
        message: strip_position(&e.to_string()),
        syntax: true,
    })?;
    if !v.is_object() {
        return Err(FieldError {
            field: None,
            message: "the body must be a JSON object".into(),
            syntax: false,
        });
    }
    let mut unknown = Vec::new();
    let mut note = |p: serde_ignored::Path| unknown.push(path(&p));
    let de = serde_ignored::Deserializer::new(&v, &mut note);
    let r = serde_path_to_error::deserialize(de).map_err(field_error)?;
    Ok((r, unknown))
}

/// `messages[0].name` from serde_ignored's path.
fn path(p: &serde_ignored::Path) -> String {
    use serde_ignored::Path as P;
    match p {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", path(parent)),
        P::Map { parent, key } => {
            let head = path(parent);
            if head.is_empty() {
                key.clone()
            } else {
                format!("{head}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            path(parent)
        }
    }
}

fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    FieldError {
        // "." is the whole body (a syntax error, or not an object).
        field: (path != ".").then_some(path),
        message: strip_position(&inner.to_string()),
        syntax: inner.is_syntax() || inner.is_eof(),
    }
}

/// `body` as `T`, or why not, naming the field that is wrong (`messages[2].content`, `n`):
/// serde's own messages give a line and column but not the field.
pub(crate) fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FieldError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(field_error)
}

/// Why a body is not the type asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldError {
    /// The field's path, when one field is at fault.
    pub(crate) field: Option<String>,
    pub(crate) message: String,
    /// Not JSON at all (or cut short), rather than JSON of the wrong shape.
    pub(crate) syntax: bool,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(p) => write!(f, "`{p}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// serde_json's " at line 1 column 17": noise once the field is named.
fn strip_position(m: &str) -> String {
    match m.rfind(" at line ") {
        Some(i) if m[i..].contains(" column ") => m[..i].to_string(),
        _ => m.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_name_what_they_do_not_declare() {
        let body = br#"{"model": "m", "messages": [{"role": "user", "content": "hi", "nam": 1}],
                        "temperature": 0.5, "stop": ["a", "b"], "tools": [], "made_up": {"x": 1},
                        "stream_options": {"include_usage": true, "other": 2}}"#;
        let (r, unknown) = parse_request(body).unwrap();
        assert_eq!(r.temperature, Some(0.5));
        assert!(matches!(r.stop, Some(Stop::Many(ref s)) if s.len() == 2));
        assert_eq!(r.tools, Some(Value::Array(vec![])));
        assert_eq!(
            unknown,
            ["made_up", "messages[0].nam", "stream_options.other"]
        );
        // What the client sends carries no nulls for what it did not set.
        let c = Request {
            model: "m".into(),
            prompt: Some(Prompt::Text("p".into())),
            max_tokens: Some(3),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"model":"m","prompt":"p","max_tokens":3}"#
        );
    }

    #[test]
    fn a_wrong_field_is_named() {
        let named = |b: &[u8]| parse_request(b).unwrap_err();
        let e = named(br#"{"model": "m", "prompt": "p", "n": "2"}"#);
        assert_eq!(e.field.as_deref(), Some("n"), "{e}");
        assert!(!e.syntax);
        let e = named(br#"{"model": "m", "messages": [{"role": 1}]}"#);
        assert_eq!(e.field.as_deref(), Some("messages[0].role"), "{e}");
        let e = named(br#"{"model": "m", "seed": -4}"#);
        assert_eq!(e.field.as_deref(), Some("seed"), "{e}");
        let e = named(br#"{"model": "m""#);
        assert!(e.syntax && e.field.is_none(), "{e:?}");
        let e = named(br#"{"messages": []}"#);
        assert!(e.message.contains("`model`"), "{e}");
        assert!(!e.message.contains("line"), "{e}");
        let e = named(b"[1]");
        assert!(e.field.is_none() && !e.syntax, "{e:?}");
    }

    #[test]
    fn answers_parse_with_what_servers_leave_out() {
        let a: Completion =
            parse(br#"{"choices": [{"text": "x", "finish_reason": "length"}]}"#).unwrap();
        assert_eq!(a.model, None);
        assert_eq!(a.choices[0].finish_reason.as_deref(), Some("length"));
        // A usage count no server could mean still parses: the client judges it.
        let a: Completion = parse(
            br#"{"model": "m", "choices": [], "usage": {"completion_tokens": 18446744073709551615}}"#,
        )
        .unwrap();
        assert_eq!(a.usage.unwrap().completion_tokens, u64::MAX);
        assert!(parse::<Completion>(br#"{"usage": {"completion_tokens": -1}}"#).is_err());
    }
}
