//! The generate stage on the `openai` backend, against llama.cpp's real server (PyPI `xllamacpp`,
//! serving the SmolLM2 GGUF on 127.0.0.1): two servers as two endpoints; a fault-injecting proxy
//! in front of one (500s, 429 with Retry-After, connections dropped mid-response, stalls past the
//! timeout) after which every prompt is still answered exactly once; a run killed mid-stage that
//! resumes with only the missing prompts; answers that must fail at once; and bad settings.

use crate::support::http::{free_port, parse_head, read_message, FakeServer, Reply, Request};
use crate::support::llama_server::LlamaServer;
use crate::support::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does with the n-th completion request (model listings always pass).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Pass,
    /// This status, an OpenAI error body.
    Status(u16),
    /// 429 with `Retry-After: 1`.
    TooMany,
    /// The server's headers and half its body, then the connection closed.
    Drop,
    /// Nothing for this many seconds, then the connection closed.
    Stall(u64),
    /// 400 with a message, as a server refusing a parameter answers.
    Refuse,
    /// The server's answer with another model's name in it.
    WrongModel,
    /// The server's answer, this many milliseconds late.
    Delay(u64),
}

/// A loopback HTTP proxy in front of `upstream` (host:port) that injects faults. With `key`,
/// a request without `Authorization: Bearer <key>` gets 401.
struct Proxy {
    server: FakeServer,
    /// The fault applied to each completion request, in arrival order.
    log: Arc<Mutex<Vec<Fault>>>,
    posts: Arc<AtomicUsize>,
    /// Each completion request's body, in arrival order.
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Proxy {
    fn url(&self) -> String {
        self.server.url("/v1")
    }
}

fn proxy(
    upstream: u16,
    key: Option<&str>,
    plan: impl Fn(usize) -> Fault + Send + Sync + 'static,
) -> Proxy {
    let log: Arc<Mutex<Vec<Fault>>> = Default::default();
    let posts = Arc::new(AtomicUsize::new(0));
    let bodies: Arc<Mutex<Vec<Value>>> = Default::default();
    let (log2, posts2, bodies2) = (log.clone(), posts.clone(), bodies.clone());
    let key = key.map(|k| format!("bearer {}", k.to_lowercase()));
    let server = FakeServer::start(move |req, _| {
        if req.method == "POST" {
            let b = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            bodies2.lock().unwrap().push(b);
        }
        handle(req, upstream, key.as_deref(), &plan, &log2, &posts2)
    });
    Proxy {
        server,
        log,
        posts,
        bodies,
    }
}

fn handle(
    req: &Request,
    upstream: u16,
    key: Option<&str>,
    plan: &dyn Fn(usize) -> Fault,
    log: &Mutex<Vec<Fault>>,
    posts: &AtomicUsize,
) -> Reply {
    if let Some(k) = key {
        if req
            .header("authorization")
            .map(str::to_lowercase)
            .as_deref()
            != Some(k)
        {
            return Reply::json(401, r#"{"error":{"message":"invalid api key"}}"#);
        }
    }
    let fault = if req.method == "POST" {
        let n = posts.fetch_add(1, Ordering::SeqCst);
        let f = plan(n);
        log.lock().unwrap().push(f);
        f
    } else {
        Fault::Pass
    };
    match fault {
        Fault::Status(c) => return Reply::json(c, r#"{"error":{"message":"injected"}}"#),
        Fault::TooMany => {
            return Reply::json(429, r#"{"error":{"message":"slow down"}}"#)
                .header("Retry-After", 1)
        }
        Fault::Stall(secs) => return Reply::silence(Duration::from_secs(secs)),
        Fault::Refuse => {
            return Reply::json(
                400,
                r#"{"error":{"message":"top_k is not supported by this server"}}"#,
            )
        }
        Fault::Delay(ms) => std::thread::sleep(Duration::from_millis(ms)),
        _ => {}
    }
    let Ok((rhead, rbody)) = forward(req, upstream) else {
        // The connection closed, unanswered.
        return Reply::silence(Duration::ZERO);
    };
    let (line, headers) = parse_head(&rhead);
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    match fault {
        // The server's headers and half its body, then the connection closed.
        Fault::Drop => {
            let half = rbody.len() / 2;
            let mut r = Reply::status(status).body(rbody);
            for (k, v) in headers {
                r = r.header(&k, v);
            }
            r.cut_after(half)
        }
        Fault::WrongModel => {
            let b = String::from_utf8_lossy(&rbody).replace("\"smollm2\"", "\"other-model\"");
            Reply::json(status, &b)
        }
        _ => Reply::json(status, &String::from_utf8_lossy(&rbody)),
    }
}

/// `req` sent on to `upstream`, one request per connection; the answer's head and body.
fn forward(req: &Request, upstream: u16) -> std::io::Result<(String, Vec<u8>)> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut head = format!("{}\r\n", req.line);
    for (k, v) in &req.headers {
        if !k.eq_ignore_ascii_case("connection") {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    up.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())?;
    up.write_all(&req.body)?;
    read_message(&mut up, false)
}

/// A small recipe whose generate stage runs on `endpoints`.
fn recipe(dir: &Path, endpoints: &[String], openai: &str) {
    let list = endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    small_recipe(
        dir,
        8,
        4,
        2,
        12,
        &format!("\n[generate.openai]\nendpoints = [{list}]\nmodel = \"smollm2\"\n{openai}\n"),
    );
}

const OPENAI: &[&str] = &[
    "run",
    "--until",
    "generate",
    "--set",
    "generate.backend=openai",
];

fn generations(dir: &Path) -> Vec<Value> {
    read_jsonl(&only_build(&dir.join("data/cache/generate")).join("generations.jsonl"))
}

fn manifest(dir: &Path) -> Value {
    read_json(&only_build(&dir.join("data/cache/generate")).join("manifest.json"))
}

/// Every prompt of the recipe (limit 8 of the 16 prompts) answered exactly once.
fn assert_each_prompt_once(rows: &[Value], n: usize) {
    let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    let set: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(set.len(), ids.len(), "a prompt answered twice: {ids:?}");
    assert_eq!(ids.len(), n, "{ids:?}");
    for r in rows {
        assert!(
            !r["text"].as_str().unwrap().is_empty() && r["tokens"].as_u64().unwrap() > 0,
            "{r}"
        );
    }
}

#[test]
fn two_servers_share_the_prompts_and_the_key_ignores_their_urls() {
    let (a, b) = (LlamaServer::start(2), LlamaServer::start(2));
    let t = tempdir();
    recipe(t.path(), &[a.url(), b.url()], "concurrency = 2");
    let out = pipeline_ok(t.path(), &[OPENAI, &["--set", "generate.limit=8"]].concat());
    assert!(out.contains("Serving"), "{out}");
    assert_each_prompt_once(&generations(t.path()), 8);
    let m = manifest(t.path());
    assert_eq!(m["material"]["settings"]["backend"], "openai");
    assert_eq!(m["material"]["settings"]["served_model"], "smollm2");
    let key_text = m["material"].to_string();
    assert!(
        !key_text.contains("127.0.0.1"),
        "URLs are not part of the key: {key_text}"
    );
    let eps = m["info"]["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    let answers: Vec<u64> = eps.iter().map(|e| e["answers"].as_u64().unwrap()).collect();
    assert_eq!(answers.iter().sum::<u64>(), 8, "{eps:?}");
    assert!(
        answers.iter().all(|&n| n > 0),
        "both servers answered: {answers:?}"
    );
    assert_eq!(eps[0]["served"]["id"], "smollm2");
    assert_eq!(eps[0]["served"]["owned_by"], "llamacpp");

    // The same model on other URLs (one server, as a different list) is the same work.
    recipe(t.path(), &[b.url()], "concurrency = 2");
    let out = pipeline_ok(t.path(), &[OPENAI, &["--set", "generate.limit=8"]].concat());
    assert!(out.contains("Fresh generate"), "{out}");
    // Sampling settings are: another temperature is another build.
    let out = pipeline_ok(
        t.path(),
        &[
            OPENAI,
            &[
                "--set",
                "generate.limit=2",
                "--set",
                "generate.temperature=0",
            ],
        ]
        .concat(),
    );
    assert!(out.contains("Building generate"), "{out}");
}

#[test]
fn faults_are_retried_until_every_prompt_is_answered_once_and_the_key_stays_secret() {
    let server = LlamaServer::start(2);
    let key = "sk-test-6f1d2c9e8b7a";
    let p = proxy(server.port, Some(key), |n| match n {
        0 => Fault::Status(500),
        1 => Fault::TooMany,
        2 => Fault::Drop,
        3 => Fault::Stall(8),
        4 => Fault::Status(503),
        _ => Fault::Pass,
    });
    let t = tempdir();
    recipe(
        t.path(),
        &[p.url()],
        "concurrency = 2\ntimeout_secs = 4\napi_key_env = \"R2_TEST_API_KEY\"",
    );
    let o = pipeline_cmd(t.path())
        .args([OPENAI, &["--set", "generate.limit=6"]].concat())
        .env("R2_TEST_API_KEY", key)
        .env("REVIEWER2_LOG", "info")
        .output()
        .unwrap();
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert_each_prompt_once(&generations(t.path()), 6);
    let log = p.log.lock().unwrap().clone();
    for f in [
        Fault::Status(500),
        Fault::TooMany,
        Fault::Drop,
        Fault::Stall(8),
    ] {
        assert!(log.contains(&f), "{f:?} was not injected: {log:?}");
    }
    // Every request beyond one per prompt was a retry (a slow machine may add timeouts of its own).
    assert_eq!(
        manifest(t.path())["info"]["retries"],
        log.len() as u64 - 6,
        "{log:?}\n{err}"
    );
    for (what, msg) in [
        ("500", "500"),
        ("429", "429"),
        ("drop", "dropped mid-response"),
        ("stall", "4 s"),
    ] {
        assert!(err.contains(msg), "no retry message for {what}:\n{err}");
    }
    // The key went to the server (else 401, a failure) and nowhere else.
    assert!(!err.contains(key), "{err}");
    for f in walk(t.path()) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(key),
            "{} holds the API key",
            f.display()
        );
    }
    // Without the key the server refuses, and that is not retried.
    let o = pipeline(t.path(), &[OPENAI, &["--set", "generate.limit=7"]].concat());
    let err = stderr_of(&o);
    assert!(!o.status.success());
    assert!(err.contains("R2_TEST_API_KEY"), "{err}");
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_run_killed_mid_stage_resumes_with_only_the_missing_prompts() {
    let server = LlamaServer::start(1);
    let slow = proxy(server.port, None, |_| Fault::Delay(700));
    let t = tempdir();
    recipe(t.path(), &[slow.url()], "concurrency = 1");
    let mut child = pipeline_cmd(t.path())
        .args([OPENAI, &["--set", "generate.limit=8"]].concat())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cache = t.path().join("data/cache/generate");
    let t0 = Instant::now();
    let chunks = loop {
        let n = std::fs::read_dir(&cache)
            .ok()
            .into_iter()
            .flat_map(|d| d.flatten())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .flat_map(|e| walk(&e.path()))
            // Committed chunks only: a chunk being written is a `.chunk-*.tmp-*` sibling until
            // its rename, and a kill before the rename loses it (as it should).
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.starts_with("chunk-") && name.ends_with(".jsonl")
            })
            .count();
        if n >= 2 {
            break n;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no chunk written");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let before = slow.posts.load(Ordering::SeqCst);
    assert!(before < 8, "killed too late: {before} requests");

    let fast = proxy(server.port, None, |_| Fault::Pass);
    recipe(t.path(), &[fast.url()], "concurrency = 1");
    let out = pipeline_ok(t.path(), &[OPENAI, &["--set", "generate.limit=8"]].concat());
    let done = 2 * chunks; // chunk_size = 2
    assert!(
        out.contains(&format!("{done} of 8 prompts already done")),
        "{out}"
    );
    assert_eq!(
        fast.posts.load(Ordering::SeqCst),
        8 - done,
        "only the missing prompts are asked for"
    );
    assert_each_prompt_once(&generations(t.path()), 8);
    assert_eq!(manifest(t.path())["info"]["resumed"], done as u64);
}

#[test]
fn answers_that_cannot_be_used_fail_at_once_naming_the_cause() {
    let server = LlamaServer::start(1);
    let t = tempdir();

    // A refusal: the server's message and the prompt id, no retries.
    let p = proxy(server.port, None, |_| Fault::Refuse);
    recipe(t.path(), &[p.url()], "concurrency = 1");
    let o = pipeline(t.path(), &[OPENAI, &["--set", "generate.limit=4"]].concat());
    let err = stderr_of(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("top_k is not supported by this server") && err.contains("prompt 0"),
        "{err}"
    );
    assert!(err.contains("400"), "{err}");
    assert_eq!(p.posts.load(Ordering::SeqCst), 1, "a 400 is not retried");

    // Another model in the answer.
    let p = proxy(server.port, None, |_| Fault::WrongModel);
    recipe(t.path(), &[p.url()], "concurrency = 1");
    let o = pipeline(t.path(), &[OPENAI, &["--set", "generate.limit=4"]].concat());
    let err = stderr_of(&o);
    assert!(!o.status.success());
    assert!(err.contains("\"other-model\""), "{err}");

    // A model the server does not serve: refused before any prompt is sent, naming what it does.
    let o = pipeline(
        t.path(),
        &[
            OPENAI,
            &[
                "--set",
                "generate.limit=4",
                "--set",
                "generate.openai.model=nosuch",
            ],
        ]
        .concat(),
    );
    let err = stderr_of(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("\"nosuch\"") && err.contains("serves: smollm2"),
        "{err}"
    );

    // Nobody listening: retried, then an error naming the endpoint.
    let gone = format!("http://127.0.0.1:{}/v1", free_port());
    recipe(
        t.path(),
        std::slice::from_ref(&gone),
        "max_retries = 1\ntimeout_secs = 2",
    );
    let o = pipeline(t.path(), &[OPENAI, &["--set", "generate.limit=4"]].concat());
    let err = stderr_of(&o);
    assert!(!o.status.success());
    assert!(
        err.contains(&gone) && err.contains("cannot connect") && err.contains("2 tries"),
        "{err}"
    );
}

#[test]
fn bad_backend_settings_are_refused_by_name() {
    let t = tempdir();
    small_recipe(t.path(), 8, 4, 2, 8, "");
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--set", "generate.backend=openai"],
            &["generate.openai.endpoints", "is empty"],
        ),
        (
            &[
                "--set",
                "generate.backend=openai",
                "--set",
                "generate.openai.endpoints=[\"localhost:8000/v1\"]",
            ],
            &["generate.openai.endpoints", "localhost:8000/v1", "http://"],
        ),
        (
            &[
                "--set",
                "generate.backend=openai",
                "--set",
                "generate.openai.endpoints=[\"http://h:1/v1\"]",
                "--set",
                "generate.openai.api=responses",
            ],
            &["generate.openai.api", "completions", "chat"],
        ),
        (
            &["--set", "generate.backend=vllm"],
            &["generate.backend", "local", "openai"],
        ),
        (
            &["--set", "eval.backend=openai"],
            &["eval.backend", "generate.openai.endpoints is empty"],
        ),
    ];
    for (args, want) in cases {
        let o = pipeline(t.path(), &[&["status"], args].concat());
        let err = stderr_of(&o);
        assert!(!o.status.success(), "{args:?}");
        for w in want {
            assert!(err.contains(w), "{args:?}: {w:?} missing in\n{err}");
        }
    }
    // An endpoint with credentials in it is never echoed with them.
    let o = pipeline(
        t.path(),
        &[
            "status",
            "--set",
            "generate.openai.endpoints=[\"ftp://user:hunter2@h/v1\"]",
        ],
    );
    let err = stderr_of(&o);
    assert!(!o.status.success() && !err.contains("hunter2"), "{err}");
}

#[test]
fn the_chat_api_sends_messages_and_gets_reviews() {
    let server = LlamaServer::start(2);
    let t = tempdir();
    recipe(t.path(), &[server.url()], "api = \"chat\"\nconcurrency = 2");
    pipeline_ok(t.path(), &[OPENAI, &["--set", "generate.limit=4"]].concat());
    let rows = generations(t.path());
    assert_each_prompt_once(&rows, 4);
    assert_eq!(manifest(t.path())["material"]["settings"]["api"], "chat");
    // The chat template was the server's: prompt token counts are its own.
    assert!(rows
        .iter()
        .all(|r| r["prompt_tokens"].as_u64().unwrap() > 50));
}

#[test]
fn the_eval_stage_reviews_on_the_servers_as_the_two_served_models() {
    // One model under two names stands in for a server with the base and a LoRA adapter (vLLM's
    // --lora-modules): what is checked is the plumbing, the same prompts and per-sample seeds to
    // both names, and the report built from their answers.
    let server = LlamaServer::start_named(1, "smollm2,reviewer2");
    let t = tempdir();
    recipe(
        t.path(),
        &[server.url()],
        "concurrency = 1\n\n[train]\nmax_steps = 1\nbatch_size = 2\neval_steps = 1\n\n[eval]\nsamples = 2\nbackend = \"openai\"\nserved_base = \"smollm2\"\nserved_adapter = \"reviewer2\"\n",
    );
    pipeline_ok(t.path(), &["run"]);
    let eval = only_build(&t.path().join("data/cache/eval"));
    let m: Value = read_json(&eval.join("manifest.json"));
    assert_eq!(m["material"]["settings"]["eval"]["backend"], "openai");
    let rows = read_jsonl(&eval.join("samples.jsonl"));
    assert_eq!(rows.len(), 4, "2 test titles x 2 samples");
    for r in &rows {
        assert!(
            !r["base"].as_str().unwrap().is_empty() && !r["adapter"].as_str().unwrap().is_empty()
        );
    }
    // The same model, prompt and seed under both names: the same review, for most samples.
    let same = rows.iter().filter(|r| r["base"] == r["adapter"]).count();
    assert!(same >= 2, "{rows:?}");
    let report: Value = read_json(&eval.join("report.json"));
    assert_eq!(report["n"], 4);

    // Servers that do not serve a name are refused before anything is sent.
    let o = pipeline(
        t.path(),
        &[
            "run",
            "--force",
            "eval",
            "--set",
            "eval.served_adapter=lora-x",
        ],
    );
    let err = stderr_of(&o);
    assert!(!o.status.success() && err.contains("\"lora-x\""), "{err}");
}

/// The penalties reach llama.cpp's server, an independent implementation of OpenAI's frequency
/// and presence penalties: off, the bodies carry no penalty at all (a server that knows none
/// gets what it always got); on, each body carries them as set (and no `repetition_penalty`,
/// left at 1), llama.cpp answers them, and its greedy reviews change.
#[test]
fn penalties_are_sent_only_when_on_and_llama_cpp_acts_on_them() {
    let server = LlamaServer::start(2);
    let p = proxy(server.port, None, |_| Fault::Pass);
    let t = tempdir();
    recipe(t.path(), &[p.url()], "concurrency = 2");
    let greedy = [
        "--set",
        "generate.limit=8",
        "--set",
        "generate.temperature=0",
    ];
    let texts = |dir: &Path| -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> =
            read_jsonl(&latest_build(&dir.join("data"), "generate").join("generations.jsonl"))
                .iter()
                .map(|r| {
                    (
                        r["id"].as_u64().unwrap(),
                        r["text"].as_str().unwrap().into(),
                    )
                })
                .collect();
        v.sort();
        v
    };
    pipeline_ok(t.path(), &[OPENAI, &greedy].concat());
    let off = texts(t.path());
    let sent: Vec<Value> = std::mem::take(&mut *p.bodies.lock().unwrap());
    assert_eq!(sent.len(), 8);
    for b in &sent {
        let keys: Vec<&String> = b.as_object().unwrap().keys().collect();
        assert!(
            keys.iter().all(|k| !k.contains("penalty")),
            "penalties off, yet sent: {b}"
        );
    }

    let on = [
        "--set",
        "generate.frequency_penalty=1.5",
        "--set",
        "generate.presence_penalty=1",
    ];
    let out = pipeline_ok(t.path(), &[OPENAI, &greedy, &on].concat());
    assert!(out.contains("Building generate"), "a new key: {out}");
    let sent: Vec<Value> = std::mem::take(&mut *p.bodies.lock().unwrap());
    assert_eq!(sent.len(), 8);
    for b in &sent {
        assert_eq!(b["frequency_penalty"], 1.5, "{b}");
        assert_eq!(b["presence_penalty"], 1.0, "{b}");
        assert!(b.get("repetition_penalty").is_none(), "{b}");
    }
    let pen = texts(t.path());
    assert_eq!(pen.len(), 8);
    let changed = off.iter().zip(&pen).filter(|(a, b)| a != b).count();
    assert!(
        changed > 0,
        "llama.cpp wrote the same greedy reviews with the penalties:\n{off:?}"
    );

    // The transformers-style one goes under vLLM's and TGI's name (llama.cpp's server reads
    // `repeat_penalty` and leaves this one be: the run still completes there).
    let rep = ["--set", "generate.repetition_penalty=1.2"];
    pipeline_ok(t.path(), &[OPENAI, &greedy, &rep].concat());
    let sent: Vec<Value> = std::mem::take(&mut *p.bodies.lock().unwrap());
    assert_eq!(sent.len(), 8);
    for b in &sent {
        assert_eq!(b["repetition_penalty"], 1.2, "{b}");
        assert!(b.get("frequency_penalty").is_none(), "{b}");
    }
}
