//! `pipeline serve`: the bot over HTTP. An OpenAI-compatible API (`GET /v1/models`,
//! `POST /v1/chat/completions`, `POST /v1/completions`, streaming as server-sent events) that any
//! OpenAI client or chat UI speaks, and a page (`GET /`) to try Reviewer #2 against the base
//! model, browse the dataset and read the run.
//!
//! The files: `router.rs` (routes; the connection cap, timeouts, Host allow-list, origin and
//! content-type checks), `auth.rs` (the key, before any body is read), `request.rs` (a body
//! validated once into what the engine runs), `response.rs` (answers and errors in OpenAI's
//! shape, text out of tokens), `engine.rs` (continuous batching on its own thread), `site.rs`
//! (the page and its read-only views of the workdir). The wire types are `crate::protocol`'s.
//!
//! May import every floor below 8 (`stages`, `recipe`, `model`, `protocol`, ...); only `cli`
//! imports it.

mod auth;
mod engine;
mod request;
mod response;
mod router;
mod site;

use crate::error::{bail, Context, Result};
use crate::model::load::source::ModelMeta;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::{Engine, Job, Refused};
use request::Ask;
use response::{Api, ApiError, Meta, Text};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

pub(crate) use router::{Limits, Origins};

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
    /// Timeouts and the connection cap.
    pub(crate) limits: Limits,
    /// `--allowed-host`, `--cors-origin`.
    pub(crate) origins: Origins,
    /// What the page shows: the workdir's latest split, training and eval outputs.
    pub(crate) site: site::Site,
    /// Prints the address once it listens (tests and scripts wait for it).
    pub(crate) quiet: bool,
}

pub(crate) use site::Site;

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
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .with_context(|| format!("binding {}", opts.addr))?;
        let addr = listener.local_addr()?;
        let router = router::router(app.clone(), addr, opts.origins, &opts.limits);
        if !opts.quiet {
            eprintln!(
                "{:>12} http://{addr}/ (models: {})",
                "Serving",
                app.names.join(", ")
            );
        }
        // The line scripts wait for, on stdout.
        println!("listening on http://{addr}");
        router::serve(listener, router, opts.limits).await?;
        Ok::<(), crate::error::Error>(())
    })
}

async fn status(State(app): State<Arc<App>>) -> Response {
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

/// Whether the engine is up (200) or down (503), and how often it restarted after a panic.
/// Open without the key, for load balancers and supervisors.
async fn health(State(app): State<Arc<App>>) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    let l = &app.engine.load;
    let up = l.up.load(SeqCst);
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if up { "ok" } else { "down" },
        "engine": if up { "up" } else { "down" },
        "restarts": l.restarts.load(SeqCst),
    });
    (status, Json(body)).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let data = app
        .names
        .iter()
        .map(|n| crate::protocol::ModelEntry {
            id: n.clone(),
            object: "model".into(),
            created: app.created,
            owned_by: "reviewer2".into(),
            aliases: Vec::new(),
            extra: Default::default(),
        })
        .collect();
    Json(crate::protocol::ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

async fn chat(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    answer(app, body, Api::Chat).await
}

async fn completions(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    answer(app, body, Api::Completions).await
}

async fn answer(app: Arc<App>, body: axum::body::Bytes, api: Api) -> Response {
    // Parsing, the chat template and tokenizing grow with the body: off the async workers.
    let a = app.clone();
    let ask = match tokio::task::spawn_blocking(move || request::validate(&a, &body, api)).await {
        Ok(Ok(ask)) => ask,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => {
            return ApiError::status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                format!("reading the request failed: {e}"),
            )
            .into_response()
        }
    };
    submit(app, ask, api).await
}

/// Hand a validated request to the engine and answer from its tokens.
async fn submit(app: Arc<App>, ask: Ask, api: Api) -> Response {
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
            return ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                format!("{n} requests are already waiting; try again shortly"),
            )
            .into_response()
        }
        Err(Refused::Stopped) => {
            return ApiError::status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "engine_stopped",
                "the engine has stopped; restart the server (GET /health)",
            )
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
        response::stream(text, meta, ask.include_usage).into_response()
    } else {
        response::whole(text, meta).await
    }
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
