//! The page `pipeline serve` shows at `/`, and the read-only views of the workdir it reads: the
//! prompt the bot is asked with for a title, the current split's pairs (searchable, paged), and
//! the current run (training metrics and charts, the eval report). Plain HTML, CSS and a little
//! JavaScript compiled into the binary: no build step, no CDN.

use super::App;
use crate::dpo::data::RawRow;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// What the page can show, found by the CLI in the workdir's cache.
pub(crate) struct Site {
    /// How the bot is asked about a title: `[prompts]` and the templates folder.
    pub(crate) prompts: crate::config::PromptSettings,
    pub(crate) templates: PathBuf,
    /// The latest split stage's folder (train.parquet, test.parquet).
    pub(crate) split: Option<PathBuf>,
    /// The latest train stage's folder (metrics.jsonl, summary.json, charts).
    pub(crate) train: Option<PathBuf>,
    /// The latest eval stage's folder (report.json).
    pub(crate) eval: Option<PathBuf>,
    pairs: OnceLock<Result<Pairs, String>>,
}

/// The split's train and test pairs.
type Pairs = (Vec<RawRow>, Vec<RawRow>);

impl Site {
    pub(crate) fn new(
        recipe: &crate::recipe::Recipe,
        split: Option<PathBuf>,
        train: Option<PathBuf>,
        eval: Option<PathBuf>,
    ) -> Self {
        Site {
            prompts: recipe.settings().prompts.clone(),
            templates: recipe.templates.clone(),
            split,
            train,
            eval,
            pairs: OnceLock::new(),
        }
    }

    /// Read the split's pairs now (a missing split is said when the page asks).
    pub(crate) fn preload(&self) {
        let _ = self.pairs();
    }

    fn pairs(&self) -> Result<&Pairs, String> {
        self.pairs
            .get_or_init(|| {
                let dir = self
                    .split
                    .as_ref()
                    .ok_or("no split in this workdir yet: run `pipeline run --until split`")?;
                let d = crate::dpo::data::load_dataset(dir).map_err(|e| format!("{e:#}"))?;
                Ok((d.train, d.test))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

pub(super) async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

fn not_found(msg: impl Into<String>) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"message": msg.into(), "type": "not_found_error"}})),
    )
        .into_response()
}

#[derive(Deserialize)]
pub(super) struct PromptReq {
    title: String,
}

/// The messages the bot is asked with for a title: the neutral few-shot prompt it was trained on
/// (as `pipeline sample` asks it).
pub(super) async fn prompt(State(app): State<Arc<App>>, Json(r): Json<PromptReq>) -> Response {
    let title = r.title.trim();
    if title.is_empty() || title.len() > 500 {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "`title` must be 1 to 500 characters", "param": "title"}})),
        )
            .into_response();
    }
    // The template is rendered off the async workers, like a chat request's.
    let (a, title) = (app.clone(), title.to_string());
    let messages = tokio::task::spawn_blocking(move || {
        crate::stages::prompts::neutral_messages_with(&a.site.prompts, &a.site.templates, &title)
    })
    .await
    .unwrap_or_else(|e| Err(crate::error::err!("rendering the prompt: {e}")));
    match messages {
        Ok(m) => Json(json!({"messages": m})).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": format!("{e:#}")}})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
pub(super) struct PairsQuery {
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    offset: Option<usize>,
    #[serde(default)]
    limit: Option<usize>,
}

/// A page of the current split's pairs whose prompt, chosen or rejected text holds `q`
/// (case-insensitive).
pub(super) async fn pairs(State(app): State<Arc<App>>, Query(q): Query<PairsQuery>) -> Response {
    let (train, test) = match app.site.pairs() {
        Ok(p) => p,
        Err(e) => return not_found(e),
    };
    let rows = match q.split.as_deref().unwrap_or("train") {
        "train" => train,
        "test" => test,
        other => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"message": format!("split {other:?}: choose train or test"), "param": "split"}})),
            )
                .into_response()
        }
    };
    let needle = q.q.unwrap_or_default().to_lowercase();
    let hits: Vec<&RawRow> = rows
        .iter()
        .filter(|r| {
            needle.is_empty()
                || [&r.prompt, &r.chosen, &r.rejected]
                    .iter()
                    .any(|t| t.to_lowercase().contains(&needle))
        })
        .collect();
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(10).clamp(1, 100);
    let page: Vec<Value> = hits
        .iter()
        .skip(offset)
        .take(limit)
        .map(|r| json!({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}))
        .collect();
    Json(json!({"total": hits.len(), "offset": offset, "rows": page})).into_response()
}

/// The current run: the training summary, its metrics, the charts there are, and the eval report.
pub(super) async fn run_info(State(app): State<Arc<App>>) -> Response {
    let s = &app.site;
    let read_json = |p: PathBuf| -> Value {
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    let train = s.train.as_ref().map(|d| {
        let metrics: Vec<Value> = std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        json!({
            "summary": read_json(d.join("summary.json")),
            "metrics": metrics,
            "charts": charts(d),
        })
    });
    let eval = s.eval.as_ref().map(|d| read_json(d.join("report.json")));
    Json(json!({"train": train, "eval": eval, "models": app.names})).into_response()
}

fn charts(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".png"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A chart of the current training run, by file name (only the PNGs that are there).
pub(super) async fn chart(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> Response {
    let Some(dir) = &app.site.train else {
        return not_found("no training run in this workdir");
    };
    if !charts(dir).contains(&name) {
        return not_found(format!("no chart {name:?}"));
    }
    match std::fs::read(dir.join(&name)) {
        Ok(b) => ([(header::CONTENT_TYPE, "image/png")], b).into_response(),
        Err(e) => not_found(format!("{name}: {e}")),
    }
}
