//! `pipeline serve`: the bot over HTTP. An OpenAI-compatible API (`GET /v1/models`,
//! `POST /v1/chat/completions`, `POST /v1/completions`, streaming as server-sent events) that any
//! OpenAI client or chat UI speaks, and a page (`GET /`) to try Reviewer #2 against the base
//! model, browse the dataset and read the run.
//!
//! Owns the HTTP side: parsing and bounding requests (errors in OpenAI's JSON, naming the
//! field), rendering chat messages through the model's template, turning tokens into text
//! (holding back a split character, cutting at a stop string), the API key check, and the page's
//! read-only views of the workdir. Decoding is `engine`'s, on its own thread.

mod engine;
mod site;

use crate::error::{bail, Context, Result};
use crate::model::generate::{Finish, Sampling};
use crate::model::load::chat::Message;
use crate::model::load::source::ModelMeta;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::{Engine, Job, Piece, Refused};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// What `pipeline serve` was asked for, resolved by the CLI.
pub(crate) struct Options {
    pub(crate) addr: SocketAddr,
    /// (model name, adapter folder), served as models 1, 2, ...
    pub(crate) adapters: Vec<(String, PathBuf)>,
    /// The API key, if one is required (read from the variable `--api-key-env` names).
    pub(crate) api_key: Option<String>,
    pub(crate) batch: usize,
    pub(crate) queue: usize,
    pub(crate) max_tokens: usize,
    /// What the page shows: the workdir's latest split, training and eval outputs.
    pub(crate) site: site::Site,
    /// Prints the address once it listens (tests and scripts wait for it).
    pub(crate) quiet: bool,
}

pub(crate) use site::Site;

/// The largest request body: a long chat with few-shot turns is a few KB.
const MAX_BODY: usize = 1 << 20;

struct App {
    engine: Engine,
    meta: Arc<ModelMeta>,
    /// Model names, index = engine model number.
    names: Vec<String>,
    ctx_len: usize,
    max_tokens: usize,
    api_key: Option<String>,
    created: u64,
    site: site::Site,
}

/// Load the model and adapters, start the engine, serve until killed.
pub(crate) fn run(model: crate::model::load::Model, opts: Options) -> Result<()> {
    let meta = Arc::new(crate::model::load::source::load_meta(&model.source)?);
    let ctx_len = model.llama.cfg.max_position_embeddings;
    let mut adapters = Vec::new();
    let mut names = vec!["base".to_string()];
    for (name, dir) in &opts.adapters {
        let a = crate::model::adapter::Adapter::load(dir, &model.llama.device)
            .with_context(|| format!("loading the adapter in {}", dir.display()))?;
        adapters.push(a);
        names.push(name.clone());
    }
    // Check each adapter fits before a request finds out.
    let mut model = model;
    let mut checked = Vec::new();
    for (a, (_, dir)) in adapters.into_iter().zip(&opts.adapters) {
        model
            .llama
            .attach(a)
            .with_context(|| format!("the adapter in {}", dir.display()))?;
        checked.push(model.llama.detach().expect("just attached"));
    }
    let adapters = checked;
    // The pairs are read once, before any request, off the async workers.
    opts.site.preload();
    let app = Arc::new(App {
        engine: Engine::start(model, adapters, opts.batch, opts.queue),
        meta,
        names,
        ctx_len,
        max_tokens: opts.max_tokens,
        api_key: opts.api_key,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        site: opts.site,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let router = Router::new()
            .route("/", get(site::page))
            .route("/api/status", get(status))
            .route("/api/prompt", post(site::prompt))
            .route("/api/pairs", get(site::pairs))
            .route("/api/run", get(site::run_info))
            .route("/api/chart/{name}", get(site::chart))
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(app.clone());
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .with_context(|| format!("binding {}", opts.addr))?;
        let addr = listener.local_addr()?;
        if !opts.quiet {
            eprintln!(
                "{:>12} http://{addr}/ (models: {})",
                "Serving",
                app.names.join(", ")
            );
        }
        // The line scripts wait for, on stdout.
        println!("listening on http://{addr}");
        axum::serve(listener, router).await?;
        Ok::<(), crate::error::Error>(())
    })
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: &'static str,
}

impl ApiError {
    fn bad(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
            code: "invalid_value",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            503 => "server_overloaded",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        (
            self.status,
            Json(json!({"error": {
                "message": self.message, "type": kind, "param": self.param, "code": self.code,
            }})),
        )
            .into_response()
    }
}

/// With `--api-key-env`, `Authorization: Bearer <key>`, compared in constant time. Every route
/// but the page's static HTML asks for it.
fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong API key: send Authorization: Bearer <key>".into(),
            param: None,
            code: "invalid_api_key",
        })
    }
}

/// Equal bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

async fn status(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    use std::sync::atomic::Ordering::SeqCst;
    let l = &app.engine.load;
    Json(json!({
        "models": app.names,
        "active": l.active.load(SeqCst),
        "waiting": l.waiting.load(SeqCst),
        "generated_tokens": l.tokens.load(SeqCst),
    }))
    .into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    let data: Vec<Value> = app
        .names
        .iter()
        .map(|n| json!({"id": n, "object": "model", "created": app.created, "owned_by": "reviewer2"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// What both endpoints share once the body is read.
struct Ask {
    model: usize,
    ids: Vec<u32>,
    sampling: Sampling,
    seed: Option<u64>,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completions,
}

async fn chat(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    answer(app, headers, body, Api::Chat).await
}

async fn completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    answer(app, headers, body, Api::Completions).await
}

async fn answer(app: Arc<App>, headers: HeaderMap, body: axum::body::Bytes, api: Api) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    let ask = match parse(&app, &body, api) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let rng = match ask.seed {
        Some(s) => crate::rng::seeded(s),
        None => crate::rng::seeded(rand::random()),
    };
    let prompt_tokens = ask.ids.len();
    let job = Job {
        model: ask.model,
        ids: ask.ids,
        sampling: ask.sampling,
        rng,
        out: tx,
    };
    match app.engine.submit(job) {
        Ok(()) => {}
        Err(Refused::Full(n)) => {
            return ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!("{n} requests are already waiting; try again shortly"),
                param: None,
                code: "queue_full",
            }
            .into_response()
        }
        Err(Refused::Stopped) => {
            return ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: "the engine has stopped".into(),
                param: None,
                code: "engine_stopped",
            }
            .into_response()
        }
    }
    let id = format!(
        "{}-{:016x}",
        if api == Api::Chat { "chatcmpl" } else { "cmpl" },
        rand::random::<u64>()
    );
    let model = app.names[ask.model].clone();
    let text = Text::new(app.clone(), rx, ask.stop);
    let meta = Meta {
        id,
        model,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        api,
        prompt_tokens,
    };
    if ask.stream {
        stream(text, meta, ask.include_usage).into_response()
    } else {
        whole(text, meta).await
    }
}

/// Read and check a request body; render the prompt; tokenize it.
fn parse(app: &App, body: &[u8], api: Api) -> Result<Ask, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the body is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad("body", "the body must be a JSON object"))?;
    let name = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad("model", "`model` is required: one of GET /v1/models"))?;
    let model = app
        .names
        .iter()
        .position(|n| n == name)
        .ok_or_else(|| ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model {name:?} does not exist; this server has: {}",
                app.names.join(", ")
            ),
            param: Some("model"),
            code: "model_not_found",
        })?;
    let prompt = match api {
        Api::Chat => {
            let msgs = obj
                .get("messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| ApiError::bad("messages", "`messages` must be a non-empty array"))?;
            let mut messages = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                let content = m.get("content").and_then(content_text);
                match (role, content) {
                    (Some(r @ ("system" | "user" | "assistant")), Some(c)) => {
                        messages.push(Message::new(r, c))
                    }
                    _ => {
                        return Err(ApiError::bad(
                            "messages",
                            format!("messages[{i}] needs a role (system, user or assistant) and text content"),
                        ))
                    }
                }
            }
            let chat = app.meta.chat.as_ref().ok_or_else(|| {
                ApiError::bad(
                    "messages",
                    "this model has no chat template; use /v1/completions",
                )
            })?;
            chat.render(&messages, true)
                .map_err(|e| ApiError::bad("messages", format!("{e:#}")))?
        }
        Api::Completions => match obj.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            _ => {
                return Err(ApiError::bad(
                    "prompt",
                    "`prompt` must be a string (one prompt per request)",
                ))
            }
        },
    };
    if obj.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
        return Err(ApiError::bad("n", "only n = 1 is served"));
    }
    let num = |k: &'static str, lo: f64, hi: f64, default: f64| -> Result<f64, ApiError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => match x.as_f64() {
                Some(f) if f >= lo && f <= hi => Ok(f),
                _ => Err(ApiError::bad(
                    k,
                    format!("`{k}` must be a number in [{lo}, {hi}]"),
                )),
            },
        }
    };
    let temperature = num("temperature", 0.0, 2.0, 1.0)?;
    let top_p = num("top_p", 0.0, 1.0, 1.0)?;
    if top_p <= 0.0 {
        return Err(ApiError::bad("top_p", "`top_p` must be above 0"));
    }
    let key = if obj.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(x) => match x.as_u64() {
            Some(n) if n >= 1 && n as usize <= app.max_tokens => Some(n as usize),
            _ => {
                return Err(ApiError::bad(
                    if key == "max_tokens" {
                        "max_tokens"
                    } else {
                        "max_completion_tokens"
                    },
                    format!("`{key}` must be an integer from 1 to {}", app.max_tokens),
                ))
            }
        },
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(x) => Some(
            x.as_u64()
                .ok_or_else(|| ApiError::bad("seed", "`seed` must be a non-negative integer"))?,
        ),
    };
    let stop: Vec<String> = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect(),
        _ => {
            return Err(ApiError::bad(
                "stop",
                "`stop` must be a string or up to 4 strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop", "a stop string must not be empty"));
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        _ => return Err(ApiError::bad("stream", "`stream` must be true or false")),
    };
    // An extension vLLM and llama.cpp share: decode to max_tokens whatever the model says.
    let ignore_eos = match obj.get("ignore_eos") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        _ => {
            return Err(ApiError::bad(
                "ignore_eos",
                "`ignore_eos` must be true or false",
            ))
        }
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ids = app.meta.tok.encode(&prompt, true).map_err(|e| {
        ApiError::bad(
            if api == Api::Chat {
                "messages"
            } else {
                "prompt"
            },
            format!("{e:#}"),
        )
    })?;
    let room = app.ctx_len.saturating_sub(ids.len());
    if room == 0 || max_tokens.is_some_and(|m| m > room) {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "the prompt is {} tokens and asks for {} more, beyond the model's context of {}",
                ids.len(),
                max_tokens.unwrap_or(1),
                app.ctx_len
            ),
            param: Some(if api == Api::Chat {
                "messages"
            } else {
                "prompt"
            }),
            code: "context_length_exceeded",
        });
    }
    Ok(Ask {
        model,
        ids,
        sampling: Sampling {
            temperature,
            top_k: 0,
            top_p,
            max_new_tokens: max_tokens.unwrap_or(app.max_tokens).min(room),
            seed: 0,
            ignore_eos,
        },
        seed,
        stop,
        stream,
        include_usage,
    })
}

/// A message's text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts.
fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| {
                (p.get("type").and_then(Value::as_str) == Some("text"))
                    .then(|| p.get("text").and_then(Value::as_str))
                    .flatten()
            })
            .collect::<Option<Vec<_>>>()
            .map(|t| t.concat()),
        _ => None,
    }
}

/// The engine's tokens as text: a piece at a time, never half a character, cut at a stop string.
struct Text {
    app: Arc<App>,
    rx: Option<mpsc::UnboundedReceiver<Piece>>,
    stop: Vec<String>,
    tokens: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    sent: usize,
    /// A stop string ended the text after the delta just returned.
    pending_end: Option<&'static str>,
}

/// One step of a [`Text`].
enum Chunk {
    Delta(String),
    End(&'static str),
    Failed(String),
}

impl Text {
    fn new(app: Arc<App>, rx: mpsc::UnboundedReceiver<Piece>, stop: Vec<String>) -> Self {
        Text {
            app,
            rx: Some(rx),
            stop,
            tokens: Vec::new(),
            sent: 0,
            pending_end: None,
        }
    }

    async fn next(&mut self) -> Option<Chunk> {
        if let Some(e) = self.pending_end.take() {
            return Some(Chunk::End(e));
        }
        loop {
            let rx = self.rx.as_mut()?;
            let piece = rx.recv().await;
            match piece {
                Some(Piece::Token(t)) => {
                    self.tokens.push(t);
                    let full = match self.app.meta.tok.decode(&self.tokens, true) {
                        Ok(s) => s,
                        Err(e) => return self.end(Chunk::Failed(format!("{e:#}"))),
                    };
                    if let Some(cut) = self.stop_at(&full) {
                        // Dropping the receiver cancels the row at the engine's next token.
                        let delta = full.get(self.sent..cut).unwrap_or("").to_string();
                        self.sent = cut;
                        self.rx = None;
                        return Some(if delta.is_empty() {
                            Chunk::End("stop")
                        } else {
                            self.pending_end = Some("stop");
                            Chunk::Delta(delta)
                        });
                    }
                    if full.ends_with('\u{FFFD}') {
                        continue; // half a character: wait for the rest
                    }
                    // Held back: a tail that may be the start of a stop string.
                    let end = full.len() - self.held(&full);
                    let Some(delta) = full.get(self.sent..end).filter(|d| !d.is_empty()) else {
                        continue;
                    };
                    let delta = delta.to_string();
                    self.sent = end;
                    return Some(Chunk::Delta(delta));
                }
                Some(Piece::Done(f)) => {
                    let reason = match f {
                        Finish::Eos => "stop",
                        Finish::Length => "length",
                    };
                    // What was held back (a stop string's start that never completed, a last
                    // partial character) is part of the text after all.
                    self.rx = None;
                    let full = self
                        .app
                        .meta
                        .tok
                        .decode(&self.tokens, true)
                        .unwrap_or_default();
                    if let Some(rest) = full.get(self.sent..).filter(|r| !r.is_empty()) {
                        let rest = rest.to_string();
                        self.sent = full.len();
                        self.pending_end = Some(reason);
                        return Some(Chunk::Delta(rest));
                    }
                    return Some(Chunk::End(reason));
                }
                Some(Piece::Error(e)) => return self.end(Chunk::Failed(e)),
                None => return self.end(Chunk::Failed("the engine stopped".into())),
            }
        }
    }

    fn end(&mut self, c: Chunk) -> Option<Chunk> {
        self.rx = None;
        Some(c)
    }

    fn held(&self, full: &str) -> usize {
        held_back(&self.stop, full)
    }

    /// Where the first stop string starts, if one has appeared.
    fn stop_at(&self, full: &str) -> Option<usize> {
        let from = self
            .sent
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let from = (0..=from)
            .rev()
            .find(|&i| full.is_char_boundary(i))
            .unwrap_or(0);
        self.stop
            .iter()
            .filter_map(|s| full[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }
}

/// What every chunk of one answer repeats.
struct Meta {
    id: String,
    model: String,
    created: u64,
    api: Api,
    prompt_tokens: usize,
}

impl Meta {
    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn object(&self, stream: bool) -> &'static str {
        match (self.api, stream) {
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Chat, false) => "chat.completion",
            (Api::Completions, _) => "text_completion",
        }
    }

    /// One choice: the text as a chat message (or delta) or as completion text.
    fn choice(&self, text: Option<&str>, finish: Option<&str>, stream: bool, first: bool) -> Value {
        match self.api {
            Api::Chat if stream => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Api::Chat => json!({"index": 0, "logprobs": null, "finish_reason": finish,
                                "message": {"role": "assistant", "content": text.unwrap_or("")}}),
            Api::Completions => json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                                       "finish_reason": finish}),
        }
    }

    fn body(&self, choice: Value, stream: bool) -> Value {
        json!({
            "id": self.id, "object": self.object(stream), "created": self.created,
            "model": self.model, "system_fingerprint": null, "choices": [choice],
        })
    }
}

/// The whole answer at once.
async fn whole(mut text: Text, meta: Meta) -> Response {
    let mut out = String::new();
    let finish = loop {
        match text.next().await {
            Some(Chunk::Delta(d)) => out.push_str(&d),
            Some(Chunk::End(f)) => break f,
            other => {
                let e = match other {
                    Some(Chunk::Failed(e)) => e,
                    _ => "the answer ended early".to_string(),
                };
                return ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!("generation failed: {e}"),
                    param: None,
                    code: "generation_failed",
                }
                .into_response();
            }
        }
    };
    let mut body = meta.body(meta.choice(Some(&out), Some(finish), false, true), false);
    body["usage"] = meta.usage(text.tokens.len());
    Json(body).into_response()
}

/// The answer as server-sent events in OpenAI's chunk format, ending with `[DONE]`. When the
/// client leaves, the stream is dropped, and with it the engine's channel: the row stops.
fn stream(
    text: Text,
    meta: Meta,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = std::result::Result<Event, Infallible>>> {
    struct St {
        text: Text,
        meta: Meta,
        first: bool,
        done: bool,
        tail: Vec<Event>,
        include_usage: bool,
    }
    let st = St {
        text,
        meta,
        first: true,
        done: false,
        tail: Vec::new(),
        include_usage,
    };
    let s = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(e) = st.tail.pop() {
            return Some((Ok(e), st));
        }
        if st.done {
            return None;
        }
        let ev = match st.text.next().await {
            Some(Chunk::Delta(d)) => {
                let c = st.meta.choice(Some(&d), None, true, st.first);
                st.first = false;
                Event::default().data(st.meta.body(c, true).to_string())
            }
            Some(Chunk::End(f)) => {
                st.done = true;
                let c = st.meta.choice(None, Some(f), true, st.first);
                // Popped from the back: usage (when asked for), then [DONE].
                st.tail.push(Event::default().data("[DONE]"));
                if st.include_usage {
                    let mut u = st.meta.body(json!(null), true);
                    u["choices"] = json!([]);
                    u["usage"] = st.meta.usage(st.text.tokens.len());
                    st.tail.push(Event::default().data(u.to_string()));
                }
                Event::default().data(st.meta.body(c, true).to_string())
            }
            other => {
                let e = match other {
                    Some(Chunk::Failed(e)) => e,
                    _ => "the answer ended early".to_string(),
                };
                st.done = true;
                st.tail.push(Event::default().data("[DONE]"));
                Event::default().data(
                    json!({"error": {"message": format!("generation failed: {e}"), "type": "server_error"}})
                        .to_string(),
                )
            }
        };
        Some((Ok(ev), st))
    });
    Sse::new(s).keep_alive(KeepAlive::default())
}

/// Resolve `--adapter` (or the latest trained adapter) into served names.
pub(crate) fn adapter_names(dirs: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        if !d.join("adapter_config.json").is_file() {
            bail!(
                "{} is not an adapter folder (no adapter_config.json); pass a folder the train stage wrote",
                d.display()
            );
        }
        let name = if i == 0 {
            "reviewer2".to_string()
        } else {
            d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| n != "base" && !out.iter().any(|(o, _)| o == n))
                .unwrap_or_else(|| format!("reviewer2-{}", i + 1))
        };
        out.push((name, d.clone()));
    }
    Ok(out)
}

/// The length of the longest tail of `full` that is the start of a stop string (and so may still
/// become one): text the client must not see yet.
fn held_back(stop: &[String], full: &str) -> usize {
    stop.iter()
        .flat_map(|s| {
            (1..s.len())
                .rev()
                .filter(|&k| s.is_char_boundary(k) && full.ends_with(&s[..k]))
                .take(1)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_of_a_stop_string_is_held_back_and_keys_compare_whole() {
        let stops = vec!["\n\nUser".to_string(), "é!".to_string()];
        assert_eq!(held_back(&stops, "a review\n\n"), 2);
        assert_eq!(held_back(&stops, "a review\n\nUs"), 4);
        assert_eq!(held_back(&stops, "a review\n"), 1);
        assert_eq!(held_back(&stops, "a review."), 0);
        assert_eq!(held_back(&stops, "café"), "é".len());
        assert_eq!(held_back(&[], "anything"), 0);
        assert!(constant_time_eq(b"key", b"key"));
        assert!(!constant_time_eq(b"key", b"kex") && !constant_time_eq(b"key", b"key2"));
        assert!(!constant_time_eq(b"", b"k"));
    }
}
