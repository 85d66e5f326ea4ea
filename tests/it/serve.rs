//! `pipeline serve` with the real SmolLM2 and an adapter trained by the pipeline itself: the
//! official `openai` Python client (whole and streamed answers from both models, a completion
//! with a stop string, the errors it raises), 64 concurrent streaming clients, and the page
//! driven in headless Chromium. Then the server's edges: the API key, a full queue, a client
//! that leaves mid-stream.

use crate::support::serve::Server;
use crate::support::*;
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn openai_clients_a_crowd_and_a_browser_get_reviews_from_both_models() {
    let t = tempdir();
    small_recipe(
        t.path(),
        6,
        4,
        2,
        8,
        // Trained hard enough that the adapter changes the greedy review.
        "[train]\nmax_steps = 4\nbatch_size = 2\neval_steps = 2\nlogging_steps = 1\nlearning_rate = 1e-2\n\n[eval]\nsamples = 1\n",
    );
    // The whole run: the page below shows the eval's report.
    pipeline_ok(t.path(), &["run"]);

    // `sample` takes the latest trained adapter by default too.
    let out = pipeline_ok(t.path(), &["sample", "--title", "Graph Neural Networks"]);
    assert!(out.contains("the latest trained"), "{out}");

    let py = python_with(&[("openai", "openai")]);
    let s = Server::start(t.path(), &["--batch-size", "64"], &[]);
    let v1 = format!("{}/v1", s.url);

    let r = py_json(&py, "openai_client.py", &[&v1]);
    assert_eq!(r["models"], serde_json::json!(["base", "reviewer2"]));
    for m in ["base", "reviewer2"] {
        let c = &r["chat"][m];
        assert!(!c["text"].as_str().unwrap().is_empty(), "{c}");
        assert_eq!(c["model"], m);
        assert_eq!(c["same_seed_same_text"], true, "a seed reproduces: {c}");
        let u = &c["usage"];
        assert_eq!(
            u["total_tokens"].as_u64(),
            Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
        );
        let st = &r["stream"][m];
        assert!(st["pieces"].as_u64().unwrap() >= 1, "{st}");
        assert!(["stop", "length"].contains(&st["finish"].as_str().unwrap()));
        assert!(
            st["usage"]["completion_tokens"].as_u64().unwrap() >= st["pieces"].as_u64().unwrap(),
            "{st}"
        );
    }
    assert_eq!(r["adapter_changes_greedy"], true, "{r}");
    assert_eq!(r["base_unchanged_by_adapter"], true, "{r}");
    let comp = &r["completion"];
    assert!(
        !comp["text"].as_str().unwrap().contains('.'),
        "the stop string ends the text: {comp}"
    );
    let e = &r["errors"];
    assert_eq!(e["unknown_model"]["status"], 404, "{e}");
    assert_eq!(e["bad_max_tokens"]["status"], 400, "{e}");
    assert_eq!(e["bad_max_tokens"]["param"], "max_tokens", "{e}");
    assert_eq!(e["too_long"]["code"], "context_length_exceeded", "{e}");
    for p in ["logit_bias", "logprobs", "n", "response_format", "tools"] {
        assert_eq!(e[p]["status"], 400, "{p} is refused, not ignored: {e}");
        assert_eq!(e[p]["param"], p, "{e}");
    }

    // 64 concurrent streams, all answered in full, decoded together.
    let load = py_json(&py, "load_test.py", &[&v1, "reviewer2", "64", "16"]);
    let rows = load["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 64);
    for r in rows {
        assert!(
            ["stop", "length"].contains(&r["finish"].as_str().unwrap()),
            "{r}"
        );
        assert!(
            r["tokens"].as_u64().unwrap() > 0 && r["chars"].as_u64().unwrap() > 0,
            "{r}"
        );
    }
    eprintln!(
        "64 streaming clients: {:.1} generated tok/s aggregate, median time to first token {:.2} s",
        load["tok_s"].as_f64().unwrap(),
        load["ttft_median"].as_f64().unwrap_or(f64::NAN)
    );
    assert_eq!(s.get("/api/status")["active"], 0);

    // The page, in a real browser.
    let py = python_with(&[("selenium", "selenium")]);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-page.png");
    let page = py_json(
        &py,
        "page_check.py",
        &[
            &format!("{}/", s.url),
            "Attention Is All You Need",
            shot.to_str().unwrap(),
        ],
    );
    for m in ["base", "reviewer2"] {
        let text = page["reviews"][m].as_str().unwrap();
        assert!(!text.is_empty() && !text.starts_with("Error"), "{page}");
    }
    assert!(
        page["pairs"].as_u64().unwrap() >= 1,
        "the dataset browser shows pairs: {page}"
    );
    assert!(
        page["charts"].as_u64().unwrap() >= 1,
        "training charts: {page}"
    );
    assert!(
        page["eval"].as_str().unwrap().contains("judged harsher"),
        "the eval report: {page}"
    );
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}

#[test]
fn the_key_a_full_queue_and_a_client_that_leaves() {
    let t = tempdir();
    small_recipe(t.path(), 6, 4, 2, 8, "");
    let key = "r2-serve-key-93c1f0";
    let s = Server::start(
        t.path(),
        &[
            "--no-adapter",
            "--api-key-env",
            "R2_SERVE_KEY",
            "--batch-size",
            "1",
            "--queue",
            "1",
            "--max-tokens",
            "400",
        ],
        &[("R2_SERVE_KEY", key)],
    );
    let http = reqwest::blocking::Client::new();
    let models = |k: Option<&str>| {
        let mut r = http.get(format!("{}/v1/models", s.url));
        if let Some(k) = k {
            r = r.bearer_auth(k);
        }
        r.send().unwrap()
    };
    assert_eq!(models(None).status(), 401);
    // The page's data too (only its static HTML is public).
    for path in ["/api/status", "/api/run", "/api/pairs"] {
        let r = http.get(format!("{}{path}", s.url)).send().unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let page = http.get(format!("{}/", s.url)).send().unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(models(Some("wrong")).status(), 401);
    let ok = models(Some(key));
    assert_eq!(ok.status(), 200);
    let ids: Value = ok.json().unwrap();
    assert_eq!(ids["data"][0]["id"], "base");

    let ask = |max_tokens: u32, stream: bool| {
        http.post(format!("{}/v1/chat/completions", s.url))
            .bearer_auth(key)
            .json(&serde_json::json!({
                "model": "base", "max_tokens": max_tokens, "stream": stream, "seed": 1,
                "ignore_eos": true,
                "messages": [{"role": "user", "content": "Write a long review of a paper about graphs."}],
            }))
            .send()
            .unwrap()
    };

    // A streaming client that reads one event and leaves: its row is stopped, its slot freed.
    let mut r = ask(400, true);
    assert_eq!(r.status(), 200);
    let mut first = [0u8; 64];
    let _ = r.read(&mut first).unwrap();
    drop(r);
    let t0 = Instant::now();
    loop {
        let st = s.get("/api/status");
        if st["active"] == 0 && st["waiting"] == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the abandoned row still runs: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ignore_eos: only the client's leaving can have ended it before 400 tokens.
    let generated = s.get("/api/status")["generated_tokens"].as_u64().unwrap();
    assert!(generated < 400, "stopped early: {generated} tokens");

    // One slot, one place in the queue: of three at once, at least one is turned away with 503.
    let codes: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                sc.spawn(|| {
                    let r = ask(150, false);
                    (r.status().as_u16(), r.json::<Value>().unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let busy: Vec<_> = codes.iter().filter(|(c, _)| *c == 503).collect();
    assert!(!busy.is_empty(), "{codes:?}");
    assert_eq!(busy[0].1["error"]["code"], "queue_full");
    assert!(codes.iter().any(|(c, _)| *c == 200), "{codes:?}");

    // A body that is not JSON names itself; one not sent as JSON is refused before it is read;
    // the key is never in the server's output.
    let post = |ctype: Option<&str>| {
        let mut r = http
            .post(format!("{}/v1/completions", s.url))
            .bearer_auth(key)
            .body("{not json");
        if let Some(c) = ctype {
            r = r.header("Content-Type", c);
        }
        r.send().unwrap()
    };
    assert_eq!(post(None).status(), 415);
    let r = post(Some("application/json"));
    assert_eq!(r.status(), 400);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["param"], "body");
    assert!(!s.stderr.lock().unwrap().contains(key));
}

/// The penalties are served (200), per request: greedy on a prompt that makes the model loop,
/// `presence_penalty: 0.5` changes the text and 0 does not; requests with and without them
/// decoded in one batch each get their solo text (f32 weights, whose rows do not depend on
/// the batch), so each row is penalized by its own history. Out of range is 400 naming the
/// parameter, in OpenAI's error shape.
#[test]
fn penalties_are_served_per_request_and_out_of_range_ones_refused_by_name() {
    let t = tempdir();
    small_recipe(t.path(), 6, 4, 2, 8, "");
    let s = Server::start(
        t.path(),
        &[
            "--no-adapter",
            "--batch-size",
            "4",
            "--set",
            "generate.weights=f32",
        ],
        &[],
    );
    let http = reqwest::blocking::Client::new();
    let ask = |extra: Value| {
        let mut b = serde_json::json!({
            "model": "base", "prompt": "I like apples. I like apples. I like",
            "max_tokens": 32, "temperature": 0,
        });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = http
            .post(format!("{}/v1/completions", s.url))
            .json(&b)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let text = |extra: Value| {
        let (c, v) = ask(extra.clone());
        assert_eq!(c, 200, "{extra}: {v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let plain = text(serde_json::json!({}));
    let pres = text(serde_json::json!({"presence_penalty": 0.5}));
    assert_ne!(
        plain, pres,
        "presence_penalty 0.5 changed nothing: {plain:?}"
    );
    assert_eq!(text(serde_json::json!({"presence_penalty": 0})), plain);
    assert_eq!(text(serde_json::json!({"frequency_penalty": null})), plain);
    let rep = text(serde_json::json!({"repetition_penalty": 1.3}));
    assert_ne!(rep, plain);

    // Together in one batch: each as alone.
    let extras = [
        serde_json::json!({}),
        serde_json::json!({"presence_penalty": 0.5}),
        serde_json::json!({"repetition_penalty": 1.3}),
        serde_json::json!({}),
    ];
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = extras
            .iter()
            .map(|e| sc.spawn(|| text(e.clone())))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, vec![plain.clone(), pres, rep, plain]);

    for (extra, param) in [
        (
            serde_json::json!({"frequency_penalty": 3}),
            "frequency_penalty",
        ),
        (
            serde_json::json!({"presence_penalty": -2.5}),
            "presence_penalty",
        ),
        (
            serde_json::json!({"repetition_penalty": 0}),
            "repetition_penalty",
        ),
        (
            serde_json::json!({"repetition_penalty": -1.1}),
            "repetition_penalty",
        ),
        (
            serde_json::json!({"frequency_penalty": "x"}),
            "frequency_penalty",
        ),
    ] {
        let (c, e) = ask(extra.clone());
        assert_eq!(c, 400, "{extra}: {e}");
        assert_eq!(e["error"]["param"], param, "{extra}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(param),
            "{e}"
        );
    }
}
