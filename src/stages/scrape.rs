//! Stage 1, scrape: the accepted-paper page -> a reproducible sample of titles.
//!
//! The page comes from `scrape.snapshot` (a saved copy, or the bundled compact NeurIPS 2023
//! snapshot) or from `scrape.url` over HTTP, with timeouts, retries with backoff on timeouts and
//! 5xx answers, and gzip. A fetched page is kept in `<workdir>/cache/pages/` so later runs need no
//! network; when it cannot be fetched, `scrape.fallback` uses the bundled snapshot with a warning.
//! A page is read up to `scrape.max_page_bytes` (after gzip decoding) and no further.

use super::{Built, Ctx};
use crate::cache::KeyMaterial;
use crate::config::{ItemFormat, ScrapeSettings};
use crate::error::{bail, Context, Error, Result};
use crate::fsutil::{sha256_hex, write_atomic, write_jsonl};
use crate::recipe::PageSource;
use crate::retry::{parse_retry_after, read_limited, Failure, GiveUp, Policy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// 2: the key holds the page's hash and where it came from.
const VERSION: u32 = 2;
const USER_AGENT: &str = concat!(
    "reviewer2-pipeline/",
    env!("CARGO_PKG_VERSION"),
    " (dataset builder; +https://huggingface.co/datasets/shionhonda/reviewer2-1k-paired)"
);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct TitleRow {
    /// Position in the sample (0-based); later stages key their rows by it.
    pub(crate) id: usize,
    pub(crate) title: String,
}

/// The compact NeurIPS 2023 snapshot (`data/neurips-2023-posters.html`), compiled in so the quick
/// preset and the offline fallback work from any folder.
pub const BUNDLED: &[u8] = include_bytes!("../../data/neurips-2023-posters.html");
const BUNDLED_NAME: &str = "bundled NeurIPS 2023 snapshot";

/// The page scrape reads, with where it came from.
pub(crate) struct Page {
    bytes: Vec<u8>,
    /// "url", "snapshot" or "bundled": recorded in the key and the manifest.
    kind: &'static str,
    /// For messages: the URL, the file, or the bundled snapshot's name.
    label: String,
}

/// The page as the recipe says. With `fetch`, a URL not in the page cache is fetched (and, if
/// that fails and `scrape.fallback` is on, the bundled snapshot is used with a warning);
/// without it (`status`), `None` means "not fetched yet".
pub(crate) fn page(ctx: &Ctx, fetch: bool) -> Result<Option<Page>> {
    let s = &ctx.settings().scrape;
    Ok(Some(match &ctx.recipe.page {
        PageSource::Bundled => Page {
            bytes: BUNDLED.to_vec(),
            kind: "bundled",
            label: BUNDLED_NAME.into(),
        },
        PageSource::Snapshot(p) => Page {
            bytes: std::fs::read(p).with_context(|| {
                format!(
                    "{}: scrape.snapshot {} cannot be read; fix the path, use \"bundled\", or set scrape.snapshot = \"\" to fetch scrape.url",
                    ctx.loaded.origin("scrape.snapshot"),
                    p.display()
                )
            })?,
            kind: "snapshot",
            label: p.display().to_string(),
        },
        PageSource::File(p) => Page {
            bytes: super::items::read_bounded(p, s.max_file_bytes)
                .with_context(|| ctx.loaded.origin("scrape.file"))?,
            kind: "file",
            label: p.display().to_string(),
        },
        PageSource::Url { url, fallback } => {
            let path = page_path(ctx, url);
            if path.exists() && !ctx.refetch {
                tracing::info!("using cached page {}", path.display());
                Page {
                    bytes: std::fs::read(&path)?,
                    kind: "url",
                    label: url.clone(),
                }
            } else if !fetch {
                return Ok(None);
            } else {
                match fetch_into_cache(s, &path) {
                    Ok(bytes) => Page {
                        bytes,
                        kind: "url",
                        label: url.clone(),
                    },
                    Err(e) if *fallback => {
                        if !ctx.quiet {
                            eprintln!(
                                "{:>12} {e}\n{:>12} using the {BUNDLED_NAME} instead (set scrape.fallback = false to fail)",
                                "Warning", ""
                            );
                        }
                        Page {
                            bytes: BUNDLED.to_vec(),
                            kind: "bundled",
                            label: BUNDLED_NAME.into(),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }))
}

/// The key covers the page's bytes, so a refetched page that changed, or a fallback to the
/// bundled snapshot, gives new titles a new key and everything downstream reruns. How the page
/// is fetched (`timeout_secs`, `retries`, `max_page_bytes`) is not in it: that decides whether a
/// fetch succeeds, never what a page that was read holds.
pub(crate) fn material(ctx: &Ctx, page: &Page) -> Result<KeyMaterial> {
    let s = &ctx.settings().scrape;
    if page.kind == "file" {
        // The file's bytes, not its path or mtime: a moved file keeps its key, an edited one
        // rebuilds.
        return Ok(KeyMaterial {
            stage: "scrape".into(),
            version: VERSION,
            settings: serde_json::json!({
                "source": "file",
                "format": ItemFormat::of(&s.file).map(ItemFormat::name),
                "column": s.column,
                "count": s.count,
                "seed": s.seed,
            }),
            files: BTreeMap::from([("items".to_string(), sha256_hex(&page.bytes))]),
            model: None,
            inputs: BTreeMap::new(),
        });
    }
    Ok(KeyMaterial {
        stage: "scrape".into(),
        version: VERSION,
        settings: serde_json::json!({
            "source": page.kind,
            "url": if page.kind == "url" { s.url.as_str() } else { "" },
            "selector": s.selector,
            "count": s.count,
            "seed": s.seed,
        }),
        files: BTreeMap::from([("page".to_string(), sha256_hex(&page.bytes))]),
        model: None,
        inputs: BTreeMap::new(),
    })
}

pub(crate) fn build(ctx: &Ctx, page: &Page, out: &Path) -> Result<Built> {
    let s = &ctx.settings().scrape;
    let source = &page.label;
    let parsed = if page.kind == "file" {
        let format = ItemFormat::of(&s.file).context("scrape.file's format was validated")?;
        let items = super::items::parse_items(&page.bytes, format, &s.column, source)
            .with_context(|| ctx.loaded.origin("scrape.file"))?;
        Parsed {
            titles: items.items,
            duplicates: items.duplicates,
            empty: items.empty,
        }
    } else {
        let html = String::from_utf8_lossy(&page.bytes);
        parse_titles(&html, &s.selector).map_err(|e| {
            crate::error::err!(
                "{e}\n  (selector set at {})",
                ctx.loaded.origin("scrape.selector")
            )
        })?
    };
    if parsed.titles.is_empty() {
        bail!(
            "no element of {source} matches scrape.selector `{}` ({}).\n  \
             For neurips.cc/virtual/2023 pages use a[href^=\"/virtual/2023/poster/\"]; for papers.nips.cc \
             use ul.paper-list li a[title=\"paper title\"]; for the 2020 accepted-papers page use p > b",
            s.selector,
            ctx.loaded.origin("scrape.selector")
        );
    }
    let sample = sample_titles(&parsed.titles, s.count, s.seed).map_err(|e| {
        crate::error::err!(
            "{e} (distinct, non-empty) in {source}; lower scrape.count ({})",
            ctx.loaded.origin("scrape.count")
        )
    })?;
    let rows: Vec<TitleRow> = sample
        .into_iter()
        .enumerate()
        .map(|(id, title)| TitleRow { id, title })
        .collect();
    write_jsonl(&out.join("titles.jsonl"), &rows)?;
    let mut all = parsed.titles.join("\n");
    all.push('\n');
    write_atomic(&out.join("all_titles.txt"), all.as_bytes())?;
    Ok(Built::new("titles", rows.len())
        .with("found", parsed.titles.len())
        .with("duplicates_dropped", parsed.duplicates)
        .with("empty_dropped", parsed.empty))
}

#[derive(Debug)]
pub struct Parsed {
    pub titles: Vec<String>,
    pub duplicates: usize,
    pub empty: usize,
}

/// Titles from the text of the elements `selector` matches: entities decoded (by the HTML
/// parser), whitespace folded, empties and duplicates dropped, page order kept.
pub fn parse_titles(html: &str, selector: &str) -> Result<Parsed> {
    let sel = scraper::Selector::parse(selector).map_err(|e| {
        crate::error::err!("scrape.selector `{selector}` is not a valid CSS selector: {e}")
    })?;
    let doc = scraper::Html::parse_document(html);
    let mut seen = HashSet::new();
    let (mut titles, mut duplicates, mut empty) = (Vec::new(), 0, 0);
    for el in doc.select(&sel) {
        let text: String = el.text().collect::<Vec<_>>().join(" ");
        let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if folded.is_empty() {
            empty += 1;
        } else if seen.insert(folded.clone()) {
            titles.push(folded);
        } else {
            duplicates += 1;
        }
    }
    Ok(Parsed {
        titles,
        duplicates,
        empty,
    })
}

/// `count` titles drawn without replacement, in draw order, the same on every machine.
pub fn sample_titles(titles: &[String], count: usize, seed: u64) -> Result<Vec<String>> {
    if titles.len() < count {
        bail!("asked for {count} titles but found only {}", titles.len());
    }
    let idx = crate::rng::draw(titles.len(), count, &mut crate::rng::seeded(seed));
    Ok(idx.into_iter().map(|i| titles[i].clone()).collect())
}

fn page_path(ctx: &Ctx, url: &str) -> PathBuf {
    ctx.cache
        .root
        .join("pages")
        .join(&sha256_hex(url.as_bytes())[..16])
        .join("page.html")
}

/// Fetch `scrape.url` into the page cache (`--force scrape` refetches it).
fn fetch_into_cache(s: &ScrapeSettings, path: &Path) -> Result<Vec<u8>> {
    let body = fetch(
        &s.url,
        Duration::from_secs(s.timeout_secs),
        s.retries,
        s.max_page_bytes,
    )?;
    write_atomic(path, &body)?;
    let meta = serde_json::json!({
        "url": s.url,
        "fetched_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "bytes": body.len(),
    });
    write_atomic(
        &path.with_file_name("meta.json"),
        meta.to_string().as_bytes(),
    )?;
    Ok(body)
}

/// GET `url` and return an HTML body, under the shared retry policy (`retry.rs`): timeouts,
/// connection failures, truncated bodies, 408, 429 and 5xx answers are retried with backoff
/// (`Retry-After` honoured); other 4xx, non-HTML bodies and bodies over `max_bytes`
/// (`scrape.max_page_bytes`, counted after gzip decoding) fail at once.
pub fn fetch(url: &str, timeout: Duration, retries: u32, max_bytes: u64) -> Result<Vec<u8>> {
    let client = reqwest::blocking::Client::builder()
        .user_agent(USER_AGENT)
        .timeout(timeout)
        .connect_timeout(timeout)
        .gzip(true)
        .build()?;
    let policy = Policy::new(retries);
    let r = policy.run(&format!("GET {url}"), &|| false, |_| {
        fetch_once(&client, url, &policy, max_bytes)
    });
    let remote = |status, message| Error::Remote {
        endpoint: url.to_string(),
        status,
        message,
    };
    match r {
        Ok((body, _)) => Ok(body),
        Err(GiveUp::Fatal(f)) => Err(remote(f.status(), f.why().to_string())),
        Err(GiveUp::Exhausted { tries, last }) => Err(remote(
            last.status(),
            format!(
                "GET {url} failed after {tries} attempts: {}. Check the network, raise scrape.retries / scrape.timeout_secs, or set scrape.snapshot to a saved copy of the page",
                last.why()
            ),
        )),
        Err(GiveUp::Stopped) => Err(remote(None, format!("GET {url}: stopped"))),
    }
}

/// One try of [`fetch`].
fn fetch_once(
    client: &reqwest::blocking::Client,
    url: &str,
    policy: &Policy,
    max_bytes: u64,
) -> std::result::Result<Vec<u8>, Failure> {
    let resp = client
        .get(url)
        .send()
        .map_err(|e| Failure::retry(describe(&e)))?;
    let status = resp.status();
    if !status.is_success() {
        let after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, policy.max_wait));
        let why = if crate::retry::retryable_status(status.as_u16()) {
            format!("server answered {status}")
        } else {
            format!("GET {url} answered {status}; check scrape.url, or set scrape.snapshot to a saved copy of the page")
        };
        return Err(Failure::from_status(status.as_u16(), why, after));
    }
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = read_limited(
        resp,
        max_bytes,
        &format!("GET {url}"),
        "scrape.max_page_bytes",
    )?;
    let head = String::from_utf8_lossy(&body[..body.len().min(512)]).to_ascii_lowercase();
    let looks_html = head.trim_start().starts_with('<') && head.contains("<html")
        || head.contains("<!doctype html");
    if !(ctype.contains("html") || looks_html) {
        return Err(Failure::fatal(format!(
            "GET {url} returned {} ({} bytes), not an HTML page; check scrape.url",
            if ctype.is_empty() {
                "no content type"
            } else {
                &ctype
            },
            body.len()
        )));
    }
    Ok(body)
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s = format!("{s}: {inner}");
            src = inner.source();
        }
        s
    }
}
