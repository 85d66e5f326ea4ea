//! The `openai` generate backend: reviews written by servers that already run (vLLM, TGI, SGLang,
//! llama.cpp's server), over the OpenAI HTTP API, instead of by this binary's engine.
//!
//! Owns the HTTP side only: checking that every endpoint serves the model (`GET /models`),
//! spreading requests over the endpoints (least in flight first, an endpoint that just failed
//! last), retrying what may succeed on a second try (connect errors, timeouts, a connection
//! dropped mid-response, 408, 429, 5xx) with exponential backoff and jitter, honouring
//! `Retry-After`, and refusing answers that cannot be used (another model, an empty completion
//! that did not run out of tokens). Resume, chunking and the cache stay in the generate stage.
//!
//! The API key is read from the environment once and only ever placed in the `Authorization`
//! header: it is never formatted into a message, a log line, a manifest or a cache key.

use crate::error::{bail, Result};
use crate::model::generate::{Finish, Sampling};
use crate::model::load::chat::Message;
use crate::retry::{parse_retry_after, Failure, GiveUp, Policy};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

/// Which OpenAI endpoint the `openai` backend calls.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OpenAiApi {
    /// `POST /completions` with the prompt text the local engine would tokenize (the prompts
    /// stage already rendered the model's chat template), so both backends answer the same text.
    Completions,
    /// `POST /chat/completions` with the messages, for servers that only take chat; the server
    /// applies its own chat template.
    Chat,
}

impl OpenAiApi {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpenAiApi::Completions => "completions",
            OpenAiApi::Chat => "chat",
        }
    }
}

/// `[generate.openai]`: the servers the `openai` backend spreads requests over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OpenAiSettings {
    /// Base URLs, each ending where the OpenAI paths start (`http://10.0.0.5:8000/v1`).
    pub(crate) endpoints: Vec<String>,
    /// The served model's name, as the servers' `GET /v1/models` lists it.
    pub(crate) model: String,
    pub(crate) api: OpenAiApi,
    /// The name of the environment variable holding the API key ("" = send none). The key itself
    /// is never printed, logged, or written into a manifest or cache key.
    pub(crate) api_key_env: String,
    /// Requests in flight per endpoint.
    pub(crate) concurrency: usize,
    /// Per request, connect to last byte.
    pub(crate) timeout_secs: u64,
    /// Retries of one prompt after a connect error, a timeout, 408, 429 or 5xx.
    pub(crate) max_retries: u32,
    /// Send `top_k` (vLLM, TGI, SGLang and llama.cpp take it; api.openai.com refuses it).
    pub(crate) send_top_k: bool,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            model: String::new(),
            api: OpenAiApi::Completions,
            api_key_env: String::new(),
            concurrency: 8,
            timeout_secs: 300,
            max_retries: 6,
            send_top_k: true,
        }
    }
}

/// A URL with any `user:password@` removed, for messages and manifests.
pub(crate) fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// One server, as `GET /models` described it.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    base: String,
    /// The base URL without credentials.
    pub(crate) shown: String,
    /// The model's entry in the server's `GET /models` answer (its `id`, and whatever else the
    /// server says about it: vLLM's `root`, llama.cpp's `meta`).
    pub(crate) served: Value,
    /// The names of that entry (its id and aliases): an answer naming any of them is from the
    /// model asked for (llama.cpp answers under its first alias whichever one was asked).
    names: Vec<String>,
}

/// A prompt to send: the text for `/completions`, the messages for `/chat/completions`.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) id: usize,
    pub(crate) prompt: String,
    pub(crate) messages: Vec<Message>,
}

/// One answered prompt.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) id: usize,
    /// The completion, trimmed.
    pub(crate) text: String,
    pub(crate) prompt_tokens: usize,
    pub(crate) tokens: usize,
    pub(crate) finish: Finish,
    /// Index into [`Remote::endpoints`].
    pub(crate) endpoint: usize,
    /// Tries that failed before this answer.
    pub(crate) retries: u32,
}

/// Servers that speak the OpenAI API, checked to serve one model.
pub(crate) struct Remote {
    http: reqwest::blocking::Client,
    pub(crate) endpoints: Vec<Endpoint>,
    key: Option<String>,
    s: OpenAiSettings,
}

impl Remote {
    /// Read the API key, and ask every endpoint which models it serves: each must list
    /// `s.model`. Endpoints that cannot be reached are retried like any request.
    pub(crate) fn connect(s: &OpenAiSettings) -> Result<Remote> {
        let key = if s.api_key_env.is_empty() {
            None
        } else {
            match std::env::var(&s.api_key_env) {
                Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
                _ => bail!(
                    "generate.openai.api_key_env names the environment variable {}, which is not set (or empty); export it, or set generate.openai.api_key_env = \"\" for servers without a key",
                    s.api_key_env
                ),
            }
        };
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(s.timeout_secs))
            .connect_timeout(Duration::from_secs(s.timeout_secs.min(10)))
            .user_agent(concat!("reviewer2/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut remote = Remote {
            http,
            endpoints: Vec::new(),
            key,
            s: s.clone(),
        };
        for url in &s.endpoints {
            let base = url.trim_end_matches('/').to_string();
            let shown = redact(&base);
            let served = remote.with_retries(&format!("GET {shown}/models"), &shown, || {
                remote.models(&base)
            })?;
            let ids: Vec<&str> = served
                .iter()
                .filter_map(|m| m.get("id").and_then(Value::as_str))
                .collect();
            let Some(entry) = served.iter().find(|m| names_model(m, &s.model)) else {
                bail!(
                    "{shown} does not serve the model {:?} (generate.openai.model); it serves: {}",
                    s.model,
                    if ids.is_empty() {
                        "nothing".to_string()
                    } else {
                        ids.join(", ")
                    }
                );
            };
            remote.endpoints.push(Endpoint {
                base,
                shown,
                served: entry.clone(),
                names: entry_names(entry),
            });
        }
        Ok(remote)
    }

    /// The `data` of `GET {base}/models`.
    fn models(&self, base: &str) -> Result<Vec<Value>, Failure> {
        let req = self.authorized(self.http.get(format!("{base}/models")));
        let body = self.send(req, base)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| {
            Failure::fatal(format!(
                "{}/models answered with something other than JSON ({e}); is the URL the API's base (ending in /v1)?",
                redact(base)
            ))
        })?;
        match v.get("data").and_then(Value::as_array) {
            Some(d) => Ok(d.clone()),
            None => Err(Failure::fatal(format!(
                "{}/models answered without a `data` list; is the URL the API's base (ending in /v1)?",
                redact(base)
            ))),
        }
    }

    fn authorized(
        &self,
        req: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    /// Send and read the whole body; sort failures into retryable and not.
    fn send(&self, req: reqwest::blocking::RequestBuilder, base: &str) -> Result<String, Failure> {
        let shown = redact(base);
        let resp = req.send().map_err(|e| {
            Failure::retry(if e.is_timeout() {
                format!("{shown}: no answer within {} s", self.s.timeout_secs)
            } else if e.is_connect() {
                format!("{shown}: cannot connect ({})", root_cause(&e))
            } else {
                format!("{shown}: request failed ({})", root_cause(&e))
            })
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Policy::new(0).max_wait));
        let body = resp.text().map_err(|e| {
            Failure::retry(if e.is_timeout() {
                format!("{shown}: the answer stalled past {} s", self.s.timeout_secs)
            } else {
                format!(
                    "{shown}: the connection dropped mid-response ({})",
                    root_cause(&e)
                )
            })
        })?;
        if status.is_success() {
            return Ok(body);
        }
        let msg = format!("{shown} answered {status}: {}", server_message(&body));
        Err(Failure::from_status(status.as_u16(), msg, retry_after))
    }

    /// `f` under the retry policy (`generate.openai.max_retries`).
    fn with_retries<T>(
        &self,
        what: &str,
        endpoint: &str,
        f: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T> {
        let mut f = f;
        Policy::new(self.s.max_retries)
            .run(what, &|| false, |_| f())
            .map(|(v, _)| v)
            .map_err(|g| self.gave_up(what, endpoint, g))
    }

    /// The error for a request the retry policy gave up on.
    fn gave_up(&self, what: &str, endpoint: &str, g: GiveUp) -> crate::error::Error {
        let (status, message) = match g {
            GiveUp::Fatal(f) => (f.status(), format!("{what}: {}", f.why())),
            GiveUp::Exhausted { tries, last } => (
                last.status(),
                format!(
                    "{what}: gave up after {tries} tries (generate.openai.max_retries = {}); last: {}",
                    self.s.max_retries,
                    last.why()
                ),
            ),
            GiveUp::Stopped => (None, format!("{what}: abandoned after another prompt failed")),
        };
        crate::error::Error::Remote {
            endpoint: endpoint.to_string(),
            status,
            message,
        }
    }

    /// The request body for one prompt. `seed` is derived per prompt from the sampling seed, so
    /// a rerun against the same server and model sends the same seeds.
    fn body(&self, job: &Job, s: &Sampling, extra: &serde_json::Map<String, Value>) -> Value {
        let mut b = json!({
            "model": self.s.model,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            // 31 bits: some servers keep the seed in a signed 32-bit integer.
            "seed": crate::rng::mix(s.seed, job.id as u64) >> 33,
            "n": 1,
            "stream": false,
        });
        match self.s.api {
            OpenAiApi::Completions => b["prompt"] = json!(job.prompt),
            OpenAiApi::Chat => b["messages"] = json!(job.messages),
        }
        if self.s.send_top_k && s.top_k > 0 {
            b["top_k"] = json!(s.top_k);
        }
        for (k, v) in extra {
            b[k] = v.clone();
        }
        b
    }

    /// One try of one prompt at endpoint `e`.
    fn ask(&self, e: usize, body: &Value, id: usize) -> Result<Answer, Failure> {
        let ep = &self.endpoints[e];
        let path = match self.s.api {
            OpenAiApi::Completions => "completions",
            OpenAiApi::Chat => "chat/completions",
        };
        let req = self.authorized(
            self.http
                .post(format!("{}/{path}", ep.base))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string()),
        );
        let text = self.send(req, &ep.base)?;
        // A 200 whose body is not the JSON it should be was cut short or garbled on the way.
        let v: Value = serde_json::from_str(&text).map_err(|err| {
            Failure::retry(format!("{}: the answer is not JSON ({err})", ep.shown))
        })?;
        parse_answer(&v, self.s.api, &self.s.model, &ep.names)
            .map(|mut a| {
                a.id = id;
                a.endpoint = e;
                a
            })
            .map_err(|m| Failure::fatal(format!("{}: {m}", ep.shown)))
    }

    /// Answer every job, `concurrency` requests in flight per endpoint, calling `each` on the
    /// caller's thread as answers arrive (in no particular order). On an error that retries
    /// cannot fix, no new request starts, the ones in flight finish (and reach `each`), and the
    /// first error is returned.
    pub(crate) fn generate(
        &self,
        jobs: Vec<Job>,
        s: &Sampling,
        extra: &serde_json::Map<String, Value>,
        mut each: impl FnMut(Answer) -> Result<()>,
    ) -> Result<()> {
        let workers = (self.endpoints.len() * self.s.concurrency).min(jobs.len());
        let queue = Mutex::new(jobs.into_iter().collect::<VecDeque<_>>());
        let load = Mutex::new(vec![Load::default(); self.endpoints.len()]);
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<Result<Answer>>();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let tx = tx.clone();
                let (queue, load, stop) = (&queue, &load, &stop);
                scope.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(job) = queue.lock().expect("queue").pop_front() else {
                            break;
                        };
                        let r = self.one(&job, s, extra, load, stop);
                        if r.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        if tx.send(r).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            // After a failed prompt, the answers still in flight are kept (the next run need
            // not ask again); after `each` itself failed, nothing more is handed to it.
            let mut first: Option<crate::error::Error> = None;
            let mut each_failed = false;
            for r in rx {
                let r = match r {
                    Ok(a) if !each_failed => each(a).inspect_err(|_| each_failed = true),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    stop.store(true, Ordering::Relaxed);
                    first.get_or_insert(e);
                }
            }
            match first {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
    }

    /// One prompt, with its retries, each try at the least busy endpoint.
    fn one(
        &self,
        job: &Job,
        s: &Sampling,
        extra: &serde_json::Map<String, Value>,
        load: &Mutex<Vec<Load>>,
        stop: &AtomicBool,
    ) -> Result<Answer> {
        let body = self.body(job, s, extra);
        let last = std::cell::Cell::new(0usize);
        let what = format!("prompt {}", job.id);
        let r =
            Policy::new(self.s.max_retries).run(&what, &|| stop.load(Ordering::Relaxed), |_| {
                let e = pick(&mut load.lock().expect("load"));
                last.set(e);
                let r = self.ask(e, &body, job.id);
                let mut l = load.lock().expect("load");
                l[e].in_flight -= 1;
                l[e].failing = matches!(r, Err(Failure::Retry { .. }));
                r
            });
        match r {
            Ok((mut a, retries)) => {
                a.retries = retries;
                Ok(a)
            }
            Err(g) => Err(self.gave_up(&what, &self.endpoints[last.get()].shown, g)),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Load {
    in_flight: usize,
    sent: usize,
    /// The last try here failed in a way worth retrying (down, overloaded): others go first.
    failing: bool,
}

/// The endpoint the next try goes to: healthy before failing, then least in flight, then least
/// sent so far (so a fresh run spreads evenly). Counts it as in flight.
fn pick(load: &mut [Load]) -> usize {
    let e = (0..load.len())
        .min_by_key(|&i| (load[i].failing, load[i].in_flight, load[i].sent))
        .expect("at least one endpoint");
    load[e].in_flight += 1;
    load[e].sent += 1;
    e
}

/// Whether a `GET /models` entry is the model asked for (llama.cpp also lists aliases).
fn names_model(entry: &Value, model: &str) -> bool {
    entry_names(entry).iter().any(|n| n == model)
}

/// A `GET /models` entry's id and aliases.
fn entry_names(entry: &Value) -> Vec<String> {
    let id = entry.get("id").and_then(Value::as_str);
    let aliases = entry
        .get("aliases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    id.into_iter().chain(aliases).map(String::from).collect()
}

/// The message an error body carries (OpenAI's `{"error": {"message"}}`, vLLM's `{"message"}`,
/// TGI's `{"error": "..."}`), or the body itself, shortened.
fn server_message(body: &str) -> String {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let m = v.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error"))
            .or_else(|| v.get("detail"))
            .and_then(Value::as_str)
    });
    let m = m.unwrap_or(body).trim();
    if m.is_empty() {
        return "(no message)".into();
    }
    let mut out: String = m.chars().take(300).collect();
    if out.len() < m.len() {
        out.push('…');
    }
    out
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The answer in a successful response, or why it cannot be used.
fn parse_answer(
    v: &Value,
    api: OpenAiApi,
    model: &str,
    names: &[String],
) -> Result<Answer, String> {
    if let Some(m) = v.get("model").and_then(Value::as_str) {
        if m != model && !names.iter().any(|n| n == m) {
            return Err(format!(
                "answered with the model {m:?}, not {model:?} as asked (generate.openai.model); is another model loaded there?"
            ));
        }
    }
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| {
            format!(
                "the answer has no choices: {}",
                server_message(&v.to_string())
            )
        })?;
    let text = match api {
        OpenAiApi::Completions => choice.get("text"),
        OpenAiApi::Chat => choice.pointer("/message/content"),
    }
    .and_then(Value::as_str)
    .unwrap_or("")
    .trim()
    .to_string();
    let reason = choice.get("finish_reason").and_then(Value::as_str);
    let finish = if reason == Some("length") {
        Finish::Length
    } else {
        Finish::Eos
    };
    if text.is_empty() && finish != Finish::Length {
        return Err(format!(
            "an empty completion with finish_reason {}; the server stopped without writing anything (a prompt beyond its context, a filter, or an overloaded server answering early)",
            reason.map_or("null".to_string(), |r| format!("{r:?}"))
        ));
    }
    let usage = |k: &str| {
        v.pointer(&format!("/usage/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize
    };
    Ok(Answer {
        id: 0,
        text,
        prompt_tokens: usage("prompt_tokens"),
        tokens: usage("completion_tokens"),
        finish,
        endpoint: 0,
        retries: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_least_busy_healthy_endpoint() {
        let mut l = vec![Load::default(); 3];
        let firsts: Vec<usize> = (0..3).map(|_| pick(&mut l)).collect();
        assert_eq!(firsts, [0, 1, 2]);
        l[1].in_flight -= 1;
        assert_eq!(pick(&mut l), 1);
        l[0].in_flight = 0;
        l[0].failing = true;
        assert_eq!(pick(&mut l), 2, "a failing endpoint goes last");
    }

    #[test]
    fn answers_are_checked() {
        let ok = json!({"model": "m", "choices": [{"text": " hi ", "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 2}});
        let a = parse_answer(&ok, OpenAiApi::Completions, "m", &[]).unwrap();
        assert_eq!((a.text.as_str(), a.prompt_tokens, a.tokens), ("hi", 7, 2));
        assert_eq!(a.finish, Finish::Eos);
        let e = parse_answer(&ok, OpenAiApi::Completions, "other", &[]).unwrap_err();
        assert!(e.contains("\"m\"") && e.contains("\"other\""), "{e}");
        // An alias of the entry asked for is the same model.
        let aliases = ["other".to_string(), "m".to_string()];
        assert!(parse_answer(&ok, OpenAiApi::Completions, "other", &aliases).is_ok());
        let empty = json!({"choices": [{"text": "", "finish_reason": "stop"}]});
        let e = parse_answer(&empty, OpenAiApi::Completions, "m", &[]).unwrap_err();
        assert!(
            e.contains("empty completion") && e.contains("\"stop\""),
            "{e}"
        );
        let cut = json!({"choices": [{"message": {"content": ""}, "finish_reason": "length"}]});
        assert_eq!(
            parse_answer(&cut, OpenAiApi::Chat, "m", &[])
                .unwrap()
                .finish,
            Finish::Length
        );
        assert!(parse_answer(&json!({"choices": []}), OpenAiApi::Chat, "m", &[]).is_err());
        assert_eq!(
            server_message(r#"{"error": {"message": "bad top_k"}}"#),
            "bad top_k"
        );
        assert_eq!(
            redact("http://u:secret@h:1/v1"),
            "http://h:1/v1",
            "credentials in a URL never reach a message"
        );
    }
}
