//! The `openai` generate backend: reviews written by servers that already run (vLLM, TGI, SGLang,
//! llama.cpp's server), over the OpenAI HTTP API, instead of by this binary's engine.
//!
//! Owns the HTTP side only: checking that every endpoint serves the model (`GET /models`),
//! spreading requests over the endpoints (least in flight first, an endpoint that just failed
//! last), retrying what may succeed on a second try (connect errors, timeouts, a connection
//! dropped mid-response, 408, 429, 5xx) with exponential backoff and jitter, honouring
//! `Retry-After`, and refusing answers that cannot be used. An answer is read through a byte
//! limit on its decoded size (`max_answer_bytes`) and must be a well-formed completion of the
//! model asked for: `model` present and the one asked for, `finish_reason` `stop` or `length`
//! (anything else, `content_filter` say, is retried or fails by `unexpected_finish`, and counted),
//! token counts that fit the request, and no more text than `max_tokens` tokens can spell. The
//! wire format is `crate::protocol`'s. Resume, chunking and the cache stay in the generate stage.
//!
//! The API key is read from the environment once and only ever placed in the `Authorization`
//! header: it is never formatted into a message, a log line, a manifest or a cache key.

use crate::error::{bail, Result};
use crate::model::generate::{Finish, Sampling};
use crate::model::load::chat::Message;
use crate::protocol::{self, Prompt, Request};
use crate::retry::{parse_retry_after, read_limited, Failure, GiveUp, Policy};
use serde::{Deserialize, Serialize};
use serde_json::Value;
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
    /// The largest answer read, in bytes after decoding (gzip included).
    pub(crate) max_answer_bytes: u64,
    /// An answer that ended other than by `stop` or `length` (`content_filter`, `tool_calls`,
    /// none at all): ask again (`retry`, within `max_retries`) or stop the stage (`fail`).
    pub(crate) unexpected_finish: UnexpectedFinish,
}

/// `generate.openai.unexpected_finish`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UnexpectedFinish {
    Retry,
    Fail,
}

/// More bytes than any token of a common vocabulary spells (Llama's longest are 16, GPT-4's
/// 128): an answer longer than `max_tokens` times this cannot be `max_tokens` tokens.
const MAX_TOKEN_BYTES: usize = 128;

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
            max_answer_bytes: 8 << 20,
            unexpected_finish: UnexpectedFinish::Retry,
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
    /// The `finish_reason` of each answer refused and asked again (`content_filter`, ...).
    pub(crate) unexpected: Vec<String>,
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
            let Some(entry) = served.iter().find(|m| entry_names(m).any(|n| n == s.model)) else {
                let ids: Vec<&str> = served.iter().map(|m| m.id.as_str()).collect();
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
                served: serde_json::to_value(entry).unwrap_or(Value::Null),
                names: entry_names(entry).map(String::from).collect(),
            });
        }
        Ok(remote)
    }

    /// The `data` of `GET {base}/models`.
    fn models(&self, base: &str) -> Result<Vec<protocol::ModelEntry>, Failure> {
        let req = self.authorized(self.http.get(format!("{base}/models")));
        let body = self.send(req, base)?;
        protocol::parse::<protocol::ModelList>(&body)
            .map(|l| l.data)
            .map_err(|e| {
                Failure::fatal(format!(
                    "{}/models did not answer with a model list ({e}); is the URL the API's base (ending in /v1)?",
                    redact(base)
                ))
            })
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

    /// Send and read the body (at most `max_answer_bytes` of it, decoded); sort failures into
    /// retryable and not.
    fn send(&self, req: reqwest::blocking::RequestBuilder, base: &str) -> Result<Vec<u8>, Failure> {
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
        let body = read_limited(
            resp,
            self.s.max_answer_bytes,
            &shown,
            "generate.openai.max_answer_bytes",
        )?;
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
    fn body(&self, job: &Job, s: &Sampling) -> Vec<u8> {
        let p = &s.penalties;
        let mut r = Request {
            model: self.s.model.clone(),
            max_tokens: Some(s.max_new_tokens as u64),
            temperature: Some(s.temperature),
            top_p: Some(s.top_p),
            top_k: (self.s.send_top_k && s.top_k > 0).then_some(s.top_k as u64),
            // 31 bits: some servers keep the seed in a signed 32-bit integer.
            seed: Some(crate::rng::mix(s.seed, job.id as u64) >> 33),
            n: Some(1),
            stream: Some(false),
            ignore_eos: s.ignore_eos.then_some(true),
            // Each only when on: a server that does not know `repetition_penalty` (OpenAI's own
            // API) still gets exactly the body it got before penalties existed.
            frequency_penalty: (p.frequency != 0.0).then_some(p.frequency),
            presence_penalty: (p.presence != 0.0).then_some(p.presence),
            repetition_penalty: (p.repetition != 1.0).then_some(p.repetition),
            ..Request::default()
        };
        match self.s.api {
            OpenAiApi::Completions => r.prompt = Some(Prompt::Text(job.prompt.clone())),
            OpenAiApi::Chat => {
                r.messages = Some(
                    job.messages
                        .iter()
                        .map(|m| protocol::ChatMessage {
                            role: m.role.clone(),
                            content: Some(protocol::Content::Text(m.content.clone())),
                            name: None,
                        })
                        .collect(),
                )
            }
        }
        serde_json::to_vec(&r).expect("a request of strings and numbers serializes")
    }

    /// One try of one prompt at endpoint `e`.
    fn ask(&self, e: usize, body: &[u8], job: &Job, s: &Sampling) -> Result<Answer, Failure> {
        let ep = &self.endpoints[e];
        let path = match self.s.api {
            OpenAiApi::Completions => "completions",
            OpenAiApi::Chat => "chat/completions",
        };
        let req = self.authorized(
            self.http
                .post(format!("{}/{path}", ep.base))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec()),
        );
        let text = self.send(req, &ep.base)?;
        // A 200 whose body is not even JSON was cut short or garbled on the way: worth a retry.
        // JSON of the wrong shape is the server's answer, and asking again brings the same.
        let answer = protocol::parse::<protocol::Completion>(&text).map_err(|err| {
            let m = format!("{}: the answer is not a completion ({err})", ep.shown);
            if err.syntax {
                Failure::retry(m)
            } else {
                Failure::fatal(m)
            }
        })?;
        let sent = Sent {
            api: self.s.api,
            model: &self.s.model,
            names: &ep.names,
            max_tokens: s.max_new_tokens,
            prompt_bytes: job.prompt.len()
                + job.messages.iter().map(|m| m.content.len()).sum::<usize>(),
        };
        match check_answer(&answer, &sent) {
            Ok(mut a) => {
                a.id = job.id;
                a.endpoint = e;
                Ok(a)
            }
            Err(Unusable::Finish(reason)) => {
                let m = format!(
                    "{}: the answer ended with finish_reason {reason:?}, not \"stop\" or \"length\" (generate.openai.unexpected_finish = \"{}\")",
                    ep.shown,
                    match self.s.unexpected_finish {
                        UnexpectedFinish::Retry => "retry",
                        UnexpectedFinish::Fail => "fail",
                    }
                );
                Err(match self.s.unexpected_finish {
                    UnexpectedFinish::Retry => Failure::retry(m),
                    UnexpectedFinish::Fail => Failure::fatal(m),
                })
            }
            Err(Unusable::Malformed(m)) => Err(Failure::fatal(format!("{}: {m}", ep.shown))),
        }
    }

    /// Answer every job, `concurrency` requests in flight per endpoint, calling `each` on the
    /// caller's thread as answers arrive (in no particular order). On an error that retries
    /// cannot fix, no new request starts, the ones in flight finish (and reach `each`), and the
    /// first error is returned.
    pub(crate) fn generate(
        &self,
        jobs: Vec<Job>,
        s: &Sampling,
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
                        let r = self.one(&job, s, load, stop);
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
        load: &Mutex<Vec<Load>>,
        stop: &AtomicBool,
    ) -> Result<Answer> {
        let body = self.body(job, s);
        let last = std::cell::Cell::new(0usize);
        let unexpected = std::cell::RefCell::new(Vec::new());
        let what = format!("prompt {}", job.id);
        let r =
            Policy::new(self.s.max_retries).run(&what, &|| stop.load(Ordering::Relaxed), |_| {
                let e = pick(&mut load.lock().expect("load"));
                last.set(e);
                let r = self.ask(e, &body, job, s);
                let mut l = load.lock().expect("load");
                l[e].in_flight -= 1;
                l[e].failing = matches!(r, Err(Failure::Retry { .. }));
                if let Err(f) = &r {
                    if let Some(reason) = unexpected_reason(f.why()) {
                        unexpected.borrow_mut().push(reason);
                    }
                }
                r
            });
        match r {
            Ok((mut a, retries)) => {
                a.retries = retries;
                a.unexpected = unexpected.into_inner();
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

/// A `GET /models` entry's id and aliases (llama.cpp answers under its first alias whichever
/// one was asked).
fn entry_names(entry: &protocol::ModelEntry) -> impl Iterator<Item = &str> {
    std::iter::once(entry.id.as_str()).chain(entry.aliases.iter().map(String::as_str))
}

/// The message an error body carries (OpenAI's `{"error": {"message"}}`, vLLM's `{"message"}`,
/// TGI's `{"error": "..."}`), or the body itself, shortened.
fn server_message(body: &[u8]) -> String {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let m = v.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error"))
            .or_else(|| v.get("detail"))
            .and_then(Value::as_str)
    });
    let lossy = String::from_utf8_lossy(body);
    let m = m.unwrap_or(&lossy).trim();
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

/// What was asked, for judging the answer.
struct Sent<'a> {
    api: OpenAiApi,
    model: &'a str,
    /// The served entry's id and aliases.
    names: &'a [String],
    max_tokens: usize,
    /// The prompt's (or the messages') text, in bytes.
    prompt_bytes: usize,
}

/// Why an answer cannot be used.
#[derive(Debug, PartialEq)]
enum Unusable {
    /// A well-formed answer that ended other than by `stop` or `length`.
    Finish(String),
    /// An answer no server should give: a missing or other model, impossible counts, too much
    /// text, no choice.
    Malformed(String),
}

/// The prefix [`Remote::ask`] gives an unexpected finish's message, and the reason back from it
/// (the retry policy carries only the message).
fn unexpected_reason(why: &str) -> Option<String> {
    let rest = why.split_once("ended with finish_reason \"")?.1;
    Some(rest.split_once('"')?.0.to_string())
}

/// Slack for the tokens a server's chat template adds around the messages.
const TEMPLATE_TOKENS: u64 = 4096;

/// The answer in a successful response, or why it cannot be used.
fn check_answer(v: &protocol::Completion, sent: &Sent) -> Result<Answer, Unusable> {
    let bad = |m: String| Err(Unusable::Malformed(m));
    match v.model.as_deref() {
        None => {
            return bad(format!(
                "the answer names no model (asked for {:?}); is this an OpenAI-compatible server?",
                sent.model
            ))
        }
        Some(m) if m != sent.model && !sent.names.iter().any(|n| n == m) => {
            return bad(format!(
                "answered with the model {m:?}, not {:?} as asked (generate.openai.model); is another model loaded there?",
                sent.model
            ))
        }
        Some(_) => {}
    }
    let Some(choice) = v.choices.first() else {
        return bad("the answer has no choices".into());
    };
    let text = match sent.api {
        OpenAiApi::Completions => choice.text.as_deref(),
        OpenAiApi::Chat => choice.message.as_ref().and_then(|m| m.content.as_deref()),
    }
    .unwrap_or("")
    .trim()
    .to_string();
    let finish = match choice.finish_reason.as_deref() {
        Some("stop") => Finish::Eos,
        Some("length") => Finish::Length,
        other => return Err(Unusable::Finish(other.unwrap_or("null").to_string())),
    };
    if text.is_empty() && finish != Finish::Length {
        return bad(
            "an empty completion with finish_reason \"stop\"; the server stopped without writing anything (a prompt beyond its context, or an overloaded server answering early)".into(),
        );
    }
    if text.len() > sent.max_tokens.saturating_mul(MAX_TOKEN_BYTES) {
        return bad(format!(
            "the answer is {} bytes, more than {} tokens (max_tokens) can spell",
            text.len(),
            sent.max_tokens
        ));
    }
    let u = v.usage.unwrap_or_default();
    if u.completion_tokens > sent.max_tokens as u64 {
        return bad(format!(
            "usage.completion_tokens is {}, over the max_tokens of {} asked for",
            u.completion_tokens, sent.max_tokens
        ));
    }
    // A token spells at least one byte of the prompt, but for the BOS and the template's own.
    if u.prompt_tokens > sent.prompt_bytes as u64 + TEMPLATE_TOKENS {
        return bad(format!(
            "usage.prompt_tokens is {}, more than a prompt of {} bytes can be",
            u.prompt_tokens, sent.prompt_bytes
        ));
    }
    if u.total_tokens != 0 && u.total_tokens != u.prompt_tokens + u.completion_tokens {
        return bad(format!(
            "usage.total_tokens is {}, not prompt_tokens + completion_tokens ({} + {})",
            u.total_tokens, u.prompt_tokens, u.completion_tokens
        ));
    }
    Ok(Answer {
        id: 0,
        text,
        prompt_tokens: u.prompt_tokens as usize,
        tokens: u.completion_tokens as usize,
        finish,
        endpoint: 0,
        retries: 0,
        unexpected: Vec::new(),
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

    fn answer(json: &str) -> protocol::Completion {
        protocol::parse(json.as_bytes()).unwrap()
    }

    fn sent<'a>(api: OpenAiApi, model: &'a str, names: &'a [String]) -> Sent<'a> {
        Sent {
            api,
            model,
            names,
            max_tokens: 16,
            prompt_bytes: 40,
        }
    }

    #[test]
    fn answers_are_checked() {
        let ok = answer(
            r#"{"model": "m", "choices": [{"text": " hi ", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}"#,
        );
        let c = OpenAiApi::Completions;
        let a = check_answer(&ok, &sent(c, "m", &[])).unwrap();
        assert_eq!((a.text.as_str(), a.prompt_tokens, a.tokens), ("hi", 7, 2));
        assert_eq!(a.finish, Finish::Eos);
        let Err(Unusable::Malformed(e)) = check_answer(&ok, &sent(c, "other", &[])) else {
            panic!("another model must be refused")
        };
        assert!(e.contains("\"m\"") && e.contains("\"other\""), "{e}");
        // An alias of the entry asked for is the same model.
        let aliases = ["other".to_string(), "m".to_string()];
        assert!(check_answer(&ok, &sent(c, "other", &aliases)).is_ok());
        let empty = answer(r#"{"model": "m", "choices": [{"text": "", "finish_reason": "stop"}]}"#);
        let e = format!("{:?}", check_answer(&empty, &sent(c, "m", &[])));
        assert!(e.contains("empty completion"), "{e}");
        let cut = answer(
            r#"{"model": "m", "choices": [{"message": {"content": ""}, "finish_reason": "length"}]}"#,
        );
        let chat = OpenAiApi::Chat;
        assert_eq!(
            check_answer(&cut, &sent(chat, "m", &[])).unwrap().finish,
            Finish::Length
        );
        assert!(check_answer(
            &answer(r#"{"model": "m", "choices": []}"#),
            &sent(chat, "m", &[])
        )
        .is_err());
        assert_eq!(
            server_message(br#"{"error": {"message": "bad top_k"}}"#),
            "bad top_k"
        );
        assert_eq!(
            redact("http://u:secret@h:1/v1"),
            "http://h:1/v1",
            "credentials in a URL never reach a message"
        );
    }

    #[test]
    fn lying_answers_are_refused() {
        let c = OpenAiApi::Completions;
        let s = sent(c, "m", &[]);
        let refused = |json: &str| check_answer(&answer(json), &s).unwrap_err();
        assert_eq!(
            refused(
                r#"{"model": "m", "choices": [{"text": "x", "finish_reason": "content_filter"}]}"#
            ),
            Unusable::Finish("content_filter".into())
        );
        assert_eq!(
            refused(r#"{"model": "m", "choices": [{"text": "x"}]}"#),
            Unusable::Finish("null".into())
        );
        for (json, says) in [
            (
                r#"{"choices": [{"text": "x", "finish_reason": "stop"}]}"#,
                "names no model",
            ),
            (
                r#"{"model": "m", "choices": [{"text": "x", "finish_reason": "stop"}],
                   "usage": {"completion_tokens": 18446744073709551615}}"#,
                "completion_tokens",
            ),
            (
                r#"{"model": "m", "choices": [{"text": "x", "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 99999999}}"#,
                "prompt_tokens",
            ),
            (
                r#"{"model": "m", "choices": [{"text": "x", "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 5}}"#,
                "total_tokens",
            ),
        ] {
            let Unusable::Malformed(m) = refused(json) else {
                panic!("{json} must be refused as malformed")
            };
            assert!(m.contains(says), "{m}");
        }
        let long = format!(
            r#"{{"model": "m", "choices": [{{"text": "{}", "finish_reason": "length"}}]}}"#,
            "a".repeat(16 * MAX_TOKEN_BYTES + 1)
        );
        assert!(matches!(refused(&long), Unusable::Malformed(m) if m.contains("can spell")));
        let why = "h: the answer ended with finish_reason \"content_filter\", not \"stop\"";
        assert_eq!(unexpected_reason(why).as_deref(), Some("content_filter"));
        assert_eq!(unexpected_reason("h: cannot connect"), None);
    }
}
