//! The bot for llama.cpp and Ollama: `merge-adapter --format gguf` (the base with the adapter
//! folded in, plus an Ollama Modelfile) and `export-adapter` (a GGUF LoRA over the base GGUF),
//! checked against llama.cpp's real server (PyPI `xllamacpp`) on 127.0.0.1, read back with
//! llama.cpp's `gguf` package, and loaded back by this engine.
//!
//! The adapters are made here, not trained (training takes the whole pipeline): a LoRA on all
//! seven projections of SmolLM2 with random, non-zero B, which the tests check changes the
//! answers. Prompts go to llama.cpp as token ids, so what is compared is the network; the
//! tokenizer metadata has tests of its own (`/tokenize`, and a chat request through the GGUF's
//! chat template).

use crate::support::llama_server::LlamaServer;
use crate::support::*;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use reviewer2::model::generate::{generate, Request, Sampling};
use reviewer2::model::llama::Mode;
use reviewer2::model::load::chat::Message;
use reviewer2::model::load::source::resolve;
use reviewer2::model::load::Model;
use reviewer2::model::lora::{LoraSpec, Projection};
use reviewer2::model::options::LoadOptions;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Tokens generated per answer.
const N: usize = 16;

const SYSTEM: &str = "You are an experienced researcher and a reviewer of scientific papers. \
                      Given a title of the paper, write a review about it in one sentence.";

const TITLES: [&str; 4] = [
    "Attention Is All You Need",
    "Low-Rank Adaptation of Large Language Models",
    "Proving Test Set Contamination in Black-Box Language Models",
    "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
];

/// A random LoRA on `targets` of `m` (rank 8, alpha 16) whose B is drawn uniformly from
/// ±`scale` (a fresh adapter's B is zero: it would change nothing), attached, and saved as a
/// PEFT folder `dir/adapter`.
fn attach_random_adapter(m: &mut Model, dir: &Path, targets: &[Projection], scale: f32) -> PathBuf {
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: targets.to_vec(),
    };
    let adapter = m.llama.new_adapter(&spec, 11).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for (name, v) in adapter.vars() {
        if name.ends_with("lora_B.weight") {
            let n = v.as_tensor().elem_count();
            let vals: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
                .collect();
            let b = Tensor::from_vec(vals, v.as_tensor().shape(), &Device::Cpu).unwrap();
            v.set(&b.to_dtype(v.as_tensor().dtype()).unwrap()).unwrap();
        }
    }
    m.llama.attach(adapter).unwrap();
    let out = dir.join("adapter");
    m.save_adapter(&out).unwrap();
    out
}

/// Messages through `m`'s chat template, as token ids.
fn chat_ids(m: &Model, msgs: &[Message]) -> Vec<u32> {
    let text = m.meta.chat.as_ref().unwrap().render(msgs, true).unwrap();
    m.meta.tok.encode(&text, true).unwrap()
}

/// Each title as the bot is asked: the system message, then the title.
fn prompts(m: &Model) -> Vec<Vec<u32>> {
    TITLES
        .iter()
        .map(|t| {
            chat_ids(
                m,
                &[Message::new("system", SYSTEM), Message::new("user", *t)],
            )
        })
        .collect()
}

/// This engine's greedy continuations of `prompts` (the stop token left out).
fn engine_greedy(m: &Model, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); prompts.len()];
    let reqs = prompts
        .iter()
        .enumerate()
        .map(|(id, ids)| Request {
            id,
            ids: ids.clone(),
        })
        .collect();
    generate(m, reqs, &Sampling::greedy(N), prompts.len(), |o, _| {
        out[o.id] = o.tokens;
        Ok(())
    })
    .unwrap();
    out
}

/// This engine's log-probs of the token after `prompt`, with the adapter on or off.
fn engine_logprobs(m: &Model, prompt: &[u32], lora: bool) -> Vec<f32> {
    use reviewer2::model::llama::{build_mask, build_positions};
    let l = &m.llama;
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = prompt.len();
    let mask = build_mask(&[0], 0, t, DType::F32, &Device::Cpu).unwrap();
    let pos = build_positions(&[0], 0, t, &Device::Cpu).unwrap();
    let mode = Mode::infer().with_lora(lora);
    let last = l.forward(&ids, &pos, &mask, None, false, mode).unwrap();
    let last = last.squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
    candle_nn::ops::log_softmax(&last, 0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// llama.cpp's greedy continuation of `prompt` (token ids, sent as they are), its
/// end-of-generation token left out, and the log-prob it gave its first token.
fn llama_greedy(s: &LlamaServer, m: &Model, prompt: &[u32]) -> (Vec<u32>, f64) {
    llama_greedy_with(s, m, prompt, json!({}))
}

/// [`llama_greedy`] with more fields in the request (`lora`).
fn llama_greedy_with(s: &LlamaServer, m: &Model, prompt: &[u32], extra: Value) -> (Vec<u32>, f64) {
    let mut body = json!({"prompt": prompt, "n_predict": N, "temperature": 0.0, "top_k": 1,
                          "n_probs": 1, "cache_prompt": false, "return_tokens": true});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let v = s.post_ok("/completion", &body);
    let mut toks: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens in {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    if toks.last().is_some_and(|&t| m.meta.tok.is_stop(t)) {
        toks.pop();
    }
    let lp = v["completion_probabilities"][0]["logprob"]
        .as_f64()
        .unwrap_or_else(|| panic!("no log-prob in {v}"));
    (toks, lp)
}

/// `tests/fixtures/gguf_read.py` (llama.cpp's `gguf` package) on `file`, with its arguments.
fn gguf_read(file: &Path, args: &[&str]) -> Value {
    let py = python_with(&[("gguf", "gguf"), ("numpy", "numpy")]);
    py_json(
        &py,
        "gguf_read.py",
        &[&[file.to_str().unwrap()][..], args].concat(),
    )
}

/// The tensors of two GGUF files are the same, type and bytes (read by candle's reader).
fn same_blocks(a: &Path, b: &Path) {
    let read = |p: &Path| {
        let mut f = std::fs::File::open(p).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        (c, f)
    };
    let ((ca, mut fa), (cb, mut fb)) = (read(a), read(b));
    let sorted = |c: &candle_core::quantized::gguf_file::Content| {
        let mut v: Vec<String> = c.tensor_infos.keys().cloned().collect();
        v.sort();
        v
    };
    let names = sorted(&ca);
    assert_eq!(
        names,
        sorted(&cb),
        "{} and {} hold other tensors",
        a.display(),
        b.display()
    );
    for n in &names {
        let ta = ca.tensor(&mut fa, n, &Device::Cpu).unwrap();
        let tb = cb.tensor(&mut fb, n, &Device::Cpu).unwrap();
        assert_eq!(ta.dtype(), tb.dtype(), "{n}");
        assert!(ta.data().unwrap() == tb.data().unwrap(), "{n}: other bytes");
    }
}

/// `pipeline merge-adapter --format gguf --type TY` in `dir` (which holds the recipe); the folder.
fn merge_gguf(dir: &Path, adapter: &Path, ty: &str, set: &[&str]) -> PathBuf {
    let out = dir.join(format!("merged-{ty}"));
    let mut args: Vec<&str> = set.to_vec();
    args.extend([
        "merge-adapter",
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "gguf",
        "--type",
        ty,
    ]);
    pipeline_ok(dir, &args);
    out
}

/// The metadata the merged SmolLM2 GGUF must hold for llama.cpp, with their GGUF types.
fn check_llama_metadata(g: &Value, file_type: u64) {
    let md = &g["metadata"];
    let want = [
        ("general.architecture", "STRING", json!("llama")),
        ("general.file_type", "UINT32", json!(file_type)),
        ("llama.context_length", "UINT32", json!(8192)),
        ("llama.embedding_length", "UINT32", json!(576)),
        ("llama.block_count", "UINT32", json!(30)),
        ("llama.feed_forward_length", "UINT32", json!(1536)),
        ("llama.rope.dimension_count", "UINT32", json!(64)),
        ("llama.attention.head_count", "UINT32", json!(9)),
        ("llama.attention.head_count_kv", "UINT32", json!(3)),
        ("llama.rope.freq_base", "FLOAT32", json!(100000.0)),
        ("llama.vocab_size", "UINT32", json!(49152)),
        ("tokenizer.ggml.model", "STRING", json!("gpt2")),
        ("tokenizer.ggml.pre", "STRING", json!("smollm")),
        ("tokenizer.ggml.bos_token_id", "UINT32", json!(1)),
        ("tokenizer.ggml.eos_token_id", "UINT32", json!(2)),
        ("tokenizer.ggml.add_bos_token", "BOOL", json!(false)),
    ];
    for (k, ty, v) in want {
        assert_eq!(md[k]["types"], json!([ty]), "{k}: {}", md[k]);
        assert_eq!(md[k]["value"], v, "{k}: {}", md[k]);
    }
    let eps = &md["llama.attention.layer_norm_rms_epsilon"];
    assert_eq!(eps["types"], json!(["FLOAT32"]));
    assert!(
        (eps["value"].as_f64().unwrap() - 1e-5).abs() < 1e-9,
        "{eps}"
    );
    // The base's vocabulary, verbatim.
    assert_eq!(md["tokenizer.ggml.tokens"]["len"], 49152);
    assert_eq!(
        md["tokenizer.ggml.tokens"]["types"],
        json!(["ARRAY", "STRING"])
    );
    assert_eq!(
        md["tokenizer.ggml.token_type"]["types"],
        json!(["ARRAY", "INT32"])
    );
    assert_eq!(md["tokenizer.ggml.merges"]["len"], 48900);
    let tpl = md["tokenizer.chat_template"]["value"].as_str().unwrap();
    assert!(tpl.contains("<|im_start|>"), "{tpl}");
}

/// Every tensor of SmolLM2 (tied head: no `output.weight`), in ggml's order (columns first), of
/// `ty` but the norms (f32) and, for q4_1, the tied embedding (q8_0).
fn check_tensors(g: &Value, ty: &str) {
    let tensors = g["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 1 + 30 * 9 + 1, "{:?}", tensors.len());
    let find = |n: &str| {
        tensors
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("no tensor {n}"))
    };
    assert!(tensors.iter().all(|t| t["name"] != "output.weight"));
    let embd_ty = if ty == "Q4_1" { "Q8_0" } else { ty };
    for (name, shape, want) in [
        ("token_embd.weight", [576, 49152], embd_ty),
        ("blk.0.attn_q.weight", [576, 576], ty),
        ("blk.0.attn_k.weight", [576, 192], ty),
        ("blk.7.attn_v.weight", [576, 192], ty),
        ("blk.29.attn_output.weight", [576, 576], ty),
        ("blk.3.ffn_gate.weight", [576, 1536], ty),
        ("blk.3.ffn_up.weight", [576, 1536], ty),
        ("blk.29.ffn_down.weight", [1536, 576], ty),
    ] {
        assert_eq!(find(name)["shape"], json!(shape), "{name}");
        assert_eq!(find(name)["type"], want, "{name}");
    }
    for name in [
        "blk.0.attn_norm.weight",
        "blk.29.ffn_norm.weight",
        "output_norm.weight",
    ] {
        assert_eq!(find(name)["shape"], json!([576]), "{name}");
        assert_eq!(find(name)["type"], "F32", "{name}");
    }
}

/// The Modelfile's SYSTEM and MESSAGE lines as chat messages (each is one line here).
fn modelfile_messages(text: &str) -> Vec<Message> {
    let unquote = |s: &str| s.trim().trim_matches('"').to_string();
    text.lines()
        .filter_map(|l| {
            if let Some(c) = l.strip_prefix("SYSTEM ") {
                Some(Message::new("system", unquote(c)))
            } else {
                let (role, c) = l.strip_prefix("MESSAGE ")?.split_once(' ')?;
                Some(Message::new(role, unquote(c)))
            }
        })
        .collect()
}

/// The merged GGUF of an adapter on SmolLM2, in f32 and q8_0, read back by the `gguf` package
/// and served by llama.cpp. f32: llama.cpp's greedy answers are this engine's with the adapter
/// attached, and its first token's log-prob is within 5e-3 (llama.cpp's KV cache is f16; an
/// export without the q/k permutation moved it by 0.35). q8_0: its blocks are those ggml makes of
/// the f32 file's weights, byte for byte, so the two files hold one network; served, the same
/// first tokens, their log-probs within 0.35 of f32's (q8_0 and llama.cpp's 8-bit activations:
/// a bound too loose to catch a missing permutation by itself, which is the f32 check's and the
/// bytes' job). The Modelfile's conversation and a title, sent as a chat request (llama.cpp applies the GGUF's chat template
/// and vocabulary), are answered as this engine answers them, and as `pipeline sample` answers
/// on the exported file.
#[test]
fn the_merged_gguf_answers_in_llama_cpp_as_the_engine_with_the_adapter() {
    let d = tempdir();
    small_recipe(d.path(), 4, 2, 2, N, "");
    let mut m = smollm2_model();
    let adapter = attach_random_adapter(&mut m, d.path(), &Projection::ALL, 0.05);
    let ps = prompts(&m);
    let ours = engine_greedy(&m, &ps);
    let mut first_lp = Vec::new();
    for (p, o) in ps.iter().zip(&ours) {
        let lp = engine_logprobs(&m, p, true);
        let moved = engine_logprobs(&m, p, false)
            .iter()
            .zip(&lp)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 0.3,
            "the adapter moves the next token's log-probs by only {moved}"
        );
        first_lp.push(lp[o[0] as usize] as f64);
    }

    let f32_dir = merge_gguf(d.path(), &adapter, "f32", &[]);
    let q8_dir = merge_gguf(d.path(), &adapter, "q8_0", &[]);
    let (f32_file, q8_file) = (f32_dir.join("model.gguf"), q8_dir.join("model.gguf"));
    let names = [
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.29.ffn_down.weight",
    ];
    let g = gguf_read(
        &q8_file,
        &[&["--requant", f32_file.to_str().unwrap()][..], &names].concat(),
    );
    check_llama_metadata(&g, 7);
    check_tensors(&g, "Q8_0");
    for n in names {
        let r = &g["requant"][n];
        assert_eq!(
            r["same_bytes"], true,
            "{n}: our q8_0 blocks are not ggml's: {r}"
        );
    }
    let modelfile = std::fs::read_to_string(f32_dir.join("Modelfile")).unwrap();
    for want in [
        "FROM ./model.gguf",
        "PARAMETER stop \"<|im_end|>\"",
        "PARAMETER temperature 0.5",
        &format!("PARAMETER num_predict {N}"),
        "PARAMETER repeat_penalty 1",
        "TEMPLATE \"\"\"{{ range .Messages }}",
    ] {
        assert!(
            modelfile.contains(want),
            "no {want:?} in the Modelfile:\n{modelfile}"
        );
    }

    let s = LlamaServer::serve(&f32_file, &["--parallel", "1"]);
    let mut llama = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        let (toks, lp) = llama_greedy(&s, &m, p);
        let want = first_lp[i];
        assert!(
            (lp - want).abs() < 5e-3,
            "f32, {:?}: llama.cpp's first token has log-prob {lp}, this engine's {want}",
            TITLES[i]
        );
        llama.push(toks);
    }
    assert_eq!(
        llama, ours,
        "f32: llama.cpp's greedy answers differ from this engine's"
    );
    // The Modelfile's conversation, then the title its few-shot turns were drawn for.
    let mut msgs = modelfile_messages(&modelfile);
    assert_eq!(
        serde_json::to_value(&msgs[0]).unwrap()["role"],
        "system",
        "{msgs:?}"
    );
    assert!(msgs.len() >= 3, "{msgs:?}");
    msgs.push(Message::new("user", TITLES[0]));
    let ids = chat_ids(&m, &msgs);
    let want = m
        .meta
        .tok
        .decode(&engine_greedy(&m, &[ids])[0], true)
        .unwrap();
    let v = s.post_ok(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": N, "temperature": 0.0, "top_k": 1}),
    );
    assert_eq!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::trim),
        Some(want.trim()),
        "{v}"
    );
    drop(s);

    // q8_0's rounding moves the first token's log-prob by up to 0.1 from the f32 model's here
    // (measured: this engine reading the file back, dequantized), and llama.cpp, multiplying the
    // blocks by 8-bit activations, by up to 0.22 (on the base's own Q4_1 file, with no export
    // involved, llama.cpp and this engine differ by up to 0.07).
    let s = LlamaServer::serve(&q8_file, &["--parallel", "1"]);
    for (i, p) in ps.iter().enumerate() {
        let (toks, lp) = llama_greedy(&s, &m, p);
        let (t, want) = (TITLES[i], first_lp[i]);
        assert_eq!(toks[0], ours[i][0], "q8_0, {t:?}: another first token");
        assert!(
            (lp - want).abs() < 0.35,
            "q8_0, {t:?}: llama.cpp's first token has log-prob {lp}, {want} in f32"
        );
    }
    drop(s);

    // This engine loads its own export.
    let o = pipeline(
        d.path(),
        &[
            "--set",
            &format!("generate.model={}", f32_file.display()),
            "--set",
            "generate.weights=f32",
            "--set",
            "generate.temperature=0",
            "sample",
            "--no-adapter",
            "--title",
            TITLES[0],
        ],
    );
    assert!(o.status.success(), "sample: {}", stderr_of(&o));
    assert_eq!(String::from_utf8(o.stdout).unwrap().trim(), want.trim());
}

/// The GGUF LoRA of an adapter on SmolLM2, read back by the `gguf` package (llama.cpp's names,
/// ggml shapes `[in, r]` and `[r, out]`, the adapter keys and none of a model's), applied by
/// llama.cpp (`--lora`, and the per-request `lora` scale). Over the base as an f32 GGUF (the
/// merge of an all-zero adapter), llama.cpp's greedy answers are this engine's with the adapter
/// attached (first token's log-prob within 5e-3, as for the merged file), and at scale 0 its
/// next token is the base's (within 5e-3 too, where the adapter moves log-probs by more than
/// 0.3). The zero adapter merged to q4_1 is the base's Q4_1 file, block for
/// block. Over the base's own Q4_1 file, where llama.cpp's Q4_1 arithmetic moves
/// log-probs by a tenth of a nat from this engine's f32 even without an adapter, its answers
/// start with the same token as this engine's and differ from the base's.
#[test]
fn the_gguf_lora_over_the_base_gguf_answers_in_llama_cpp_as_the_engine() {
    let d = tempdir();
    small_recipe(d.path(), 4, 2, 2, N, "");
    let mut m = smollm2_model();
    let zero = attach_random_adapter(&mut m, &d.path().join("zero"), &Projection::ALL, 0.0);
    let adapter = attach_random_adapter(&mut m, d.path(), &Projection::ALL, 0.05);
    let ps = prompts(&m);
    let ours = engine_greedy(&m, &ps);
    // The next token's log-probs with the adapter and without.
    let lps: Vec<(Vec<f32>, Vec<f32>)> = ps
        .iter()
        .map(|p| (engine_logprobs(&m, p, true), engine_logprobs(&m, p, false)))
        .collect();

    let lora = d.path().join("reviewer2-lora.gguf");
    pipeline_ok(
        d.path(),
        &[
            "export-adapter",
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            lora.to_str().unwrap(),
        ],
    );
    check_lora_file(&gguf_read(&lora, &[]));
    let base_f32 = merge_gguf(d.path(), &zero, "f32", &[]).join("model.gguf");
    // Requantized to q4_1, weights no adapter changed come back as the base file's own blocks.
    let base_q4 = merge_gguf(d.path(), &zero, "q4_1", &[]).join("model.gguf");
    same_blocks(&base_q4, &smollm2());

    let off = json!({"lora": [{"id": 0, "scale": 0.0}]});
    let s = LlamaServer::serve(
        &base_f32,
        &["--parallel", "1", "--lora", lora.to_str().unwrap()],
    );
    for (i, p) in ps.iter().enumerate() {
        let (t, (with, without)) = (TITLES[i], &lps[i]);
        let (toks, lp) = llama_greedy(&s, &m, p);
        let want = with[toks[0] as usize] as f64;
        assert!(
            (lp - want).abs() < 5e-3,
            "{t:?}: llama.cpp's first token has log-prob {lp} with the LoRA, this engine's {want}"
        );
        assert_eq!(toks, ours[i], "{t:?} with the LoRA");
        // Scale 0 in the request: the base's next token.
        let once = json!({"lora": [{"id": 0, "scale": 0.0}], "n_predict": 1});
        let (toks, lp) = llama_greedy_with(&s, &m, p, once);
        let want = without[toks[0] as usize] as f64;
        assert!(
            (lp - want).abs() < 5e-3,
            "{t:?}: llama.cpp's first token has log-prob {lp} at scale 0, this engine's base {want}"
        );
        let moved = with
            .iter()
            .zip(without)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 0.3,
            "{t:?}: the adapter moves the log-probs by only {moved}"
        );
    }
    drop(s);

    let s = LlamaServer::serve(
        &smollm2(),
        &["--parallel", "1", "--lora", lora.to_str().unwrap()],
    );
    let mut differ = 0;
    for (i, p) in ps.iter().enumerate() {
        let (toks, _) = llama_greedy(&s, &m, p);
        assert_eq!(
            toks[0], ours[i][0],
            "{:?}, Q4_1 base with the LoRA",
            TITLES[i]
        );
        differ += (toks != llama_greedy_with(&s, &m, p, off.clone()).0) as usize;
    }
    assert!(
        differ >= 3,
        "over the Q4_1 base, the LoRA changes {differ} of 4 answers"
    );
}

/// The GGUF LoRA of [`attach_random_adapter`] on all of SmolLM2's projections.
fn check_lora_file(g: &Value) {
    let md = &g["metadata"];
    for (k, ty, v) in [
        ("general.architecture", "STRING", json!("llama")),
        ("general.type", "STRING", json!("adapter")),
        ("adapter.type", "STRING", json!("lora")),
        ("adapter.lora.alpha", "FLOAT32", json!(16.0)),
    ] {
        assert_eq!(md[k]["types"], json!([ty]), "{k}: {}", md[k]);
        assert_eq!(md[k]["value"], v, "{k}");
    }
    let keys: Vec<&String> = md.as_object().unwrap().keys().collect();
    assert!(
        keys.iter()
            .all(|k| !k.starts_with("llama.") && !k.starts_with("tokenizer.")),
        "{keys:?}"
    );
    let tensors = g["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 30 * 7 * 2);
    let find = |n: &str| {
        tensors
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("no {n}"))
    };
    for (n, shape) in [
        ("blk.0.attn_q.weight.lora_a", [576, 8]),
        ("blk.0.attn_q.weight.lora_b", [8, 576]),
        ("blk.0.attn_k.weight.lora_b", [8, 192]),
        ("blk.29.attn_output.weight.lora_a", [576, 8]),
        ("blk.29.ffn_down.weight.lora_a", [1536, 8]),
        ("blk.29.ffn_down.weight.lora_b", [8, 576]),
        ("blk.3.ffn_gate.weight.lora_b", [8, 1536]),
    ] {
        assert_eq!(find(n)["shape"], json!(shape), "{n}");
        assert_eq!(find(n)["type"], "F32", "{n}");
    }
}

/// A tiny random Llama with TinyLlama's SentencePiece tokenizer and chat template, as an HF
/// folder `dir`.
fn tinyllama_folder(dir: &Path) {
    use std::io::Read;
    std::fs::create_dir_all(dir).unwrap();
    let cfg = reviewer2::model::config::LlamaConfig {
        vocab_size: 32000,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
    };
    let t = reviewer2::model::load::safetensors::random_hf_tensors(&cfg, 3, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_hf_json().to_string()).unwrap();
    let mut json = Vec::new();
    let gz = std::fs::read(fixture("tinyllama-tokenizer/tokenizer.json.gz")).unwrap();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .unwrap();
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    std::fs::copy(
        fixture("tinyllama-tokenizer/tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
}

/// Tiny HF folders with a byte-level BPE tokenizer (SmolLM2's, as `gpt2`) and a SentencePiece
/// one (TinyLlama's, as `llama` with scores), merged into GGUFs (q4_1, whose 64-wide rows are
/// whole blocks, the tied embedding in q8_0; and f16): the `gguf` package
/// reads the tokenizer keys as the converter writes them; llama.cpp, building its tokenizer from them, splits text into the ids this engine's
/// tokenizer does (BOS, special tokens, digits, spaces, bytes); this engine loads the GGUF back
/// with the same tokenizer.
#[test]
fn hf_folder_tokenizers_are_written_as_llama_cpp_reads_them() {
    let d = tempdir();
    small_recipe(d.path(), 4, 2, 2, N, "");
    let texts = [
        "Attention Is All You Need",
        "  two spaces, digits 12345 and 3.14",
        "naïve café — 東京 🎉",
        "line one\nline two",
    ];
    let cases = [
        ("bpe", "q4_1", "gpt2", "Q4_1"),
        ("spm", "f16", "llama", "F16"),
    ];
    for (name, ty, model, tensor_ty) in cases {
        let dir = d.path().join(name);
        if name == "bpe" {
            tiny_folder(&dir.join("model"), 64, 2);
        } else {
            tinyllama_folder(&dir.join("model"));
        }
        let folder = dir.join("model");
        let mut m = Model::load(
            &resolve(folder.to_str().unwrap(), "main").unwrap(),
            &LoadOptions::cpu_f32(),
        )
        .unwrap();
        let adapter =
            attach_random_adapter(&mut m, &dir, &[Projection::QProj, Projection::KProj], 0.05);
        let set = format!("generate.model={}", folder.display());
        let config = d.path().join("pipeline.toml");
        let set_args = ["--config", config.to_str().unwrap(), "--set", &set];
        let out = merge_gguf(&dir, &adapter, ty, &set_args);
        let file = out.join("model.gguf");
        let g = gguf_read(&file, &[]);
        let md = &g["metadata"];
        assert_eq!(md["tokenizer.ggml.model"]["value"], model, "{name}");
        let vocab = m.llama.cfg.vocab_size;
        assert_eq!(md["tokenizer.ggml.tokens"]["len"], vocab, "{name}");
        assert_eq!(md["tokenizer.ggml.token_type"]["len"], vocab, "{name}");
        if model == "gpt2" {
            assert_eq!(md["tokenizer.ggml.pre"]["value"], "smollm");
            assert!(md["tokenizer.ggml.merges"]["len"].as_u64().unwrap() > 40_000);
        } else {
            assert_eq!(
                md["tokenizer.ggml.scores"]["types"],
                json!(["ARRAY", "FLOAT32"])
            );
            assert_eq!(md["tokenizer.ggml.add_space_prefix"]["value"], true);
            assert_eq!(md["tokenizer.ggml.unknown_token_id"]["value"], 0);
            assert_eq!(md["tokenizer.ggml.add_bos_token"]["value"], true);
        }
        assert_eq!(md["llama.embedding_length"]["value"], 64);
        let ty_of = |n: &str| {
            let t = g["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == n);
            t.unwrap_or_else(|| panic!("{name}: no {n}"))["type"].clone()
        };
        assert_eq!(ty_of("blk.1.attn_q.weight"), tensor_ty, "{name}");
        if ty == "q4_1" {
            // Tied to the embedding, the head is kept in q8_0.
            assert_eq!(ty_of("token_embd.weight"), "Q8_0");
        }

        let s = LlamaServer::serve(&file, &["--parallel", "1"]);
        let back = Model::load(
            &resolve(file.to_str().unwrap(), "main").unwrap(),
            &LoadOptions::cpu_f32(),
        );
        for t in texts {
            let want = m.meta.tok.encode(t, true).unwrap();
            let v = s.post_ok(
                "/tokenize",
                &json!({"content": t, "add_special": true, "parse_special": true}),
            );
            assert_eq!(v["tokens"], json!(want), "{name}: {t:?}");
            if let Ok(b) = &back {
                assert_eq!(
                    b.meta.tok.encode(t, true).unwrap(),
                    want,
                    "{name}, loaded back: {t:?}"
                );
            }
        }
        // This engine reads byte-level BPE GGUF tokenizers; SentencePiece ones it refuses by name.
        match (model, back) {
            ("gpt2", Ok(_)) => {}
            ("llama", Err(e)) => assert!(e.to_string().contains("\"llama\""), "{e}"),
            (_, r) => panic!("{name}: loading the export back: {:?}", r.err()),
        }
    }
}

/// A PEFT folder in `dir` whose safetensors holds `tensors` and whose config is PEFT's with
/// `config` merged over it.
fn peft_folder(dir: &Path, tensors: &[(&str, Vec<usize>)], config: Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, shape)| {
            (
                n.to_string(),
                Tensor::ones(shape.as_slice(), DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
    let mut cfg = json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj"], "use_dora": false, "use_rslora": false,
        "alpha_pattern": {}, "rank_pattern": {}, "modules_to_save": null});
    cfg.as_object_mut()
        .unwrap()
        .extend(config.as_object().cloned().unwrap());
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    dir.to_path_buf()
}

/// `pipeline ARGS` in `dir` fails with exit code `code`, its message naming every one of `names`,
/// without a panic.
fn refused(dir: &Path, args: &[&str], code: i32, names: &[&str]) {
    let o = pipeline(dir, args);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    for n in names {
        assert!(
            err.contains(n),
            "{args:?}: the message does not name {n:?}: {err}"
        );
    }
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// What llama.cpp or this engine cannot use is refused by name, before anything is written: a
/// LoRA on the embeddings, DoRA, an adapter of another base, an output over the base model; and
/// `--type` without `--format gguf`, a `.gguf` file name for the output folder.
#[test]
fn exports_refuse_what_cannot_be_used_by_name() {
    let d = tempdir();
    small_recipe(d.path(), 4, 2, 2, N, "");
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    let (qa, qb) = (format!("{q}.lora_A.weight"), format!("{q}.lora_B.weight"));
    let embed = "base_model.model.model.embed_tokens.lora_embedding_A";
    let on_embeddings = peft_folder(
        &d.path().join("embed"),
        &[
            (&qa, vec![8, 576]),
            (&qb, vec![576, 8]),
            (embed, vec![8, 49152]),
        ],
        json!({}),
    );
    let dora = peft_folder(
        &d.path().join("dora"),
        &[(&qa, vec![8, 576]), (&qb, vec![576, 8])],
        json!({"use_dora": true}),
    );
    let out = d.path().join("x.gguf");
    let merged = d.path().join("merged");
    let (o, e, dr) = (
        out.to_str().unwrap(),
        on_embeddings.to_str().unwrap(),
        dora.to_str().unwrap(),
    );
    refused(
        d.path(),
        &["export-adapter", "--adapter", e, "--out", o],
        1,
        &[embed, "embeddings"],
    );
    refused(
        d.path(),
        &[
            "merge-adapter",
            "--adapter",
            e,
            "--out",
            merged.to_str().unwrap(),
            "--format",
            "gguf",
        ],
        1,
        &[embed],
    );
    refused(
        d.path(),
        &["export-adapter", "--adapter", dr, "--out", o],
        1,
        &["use_dora"],
    );
    assert!(!out.exists() && !merged.exists());
    let base = smollm2();
    let before = std::fs::metadata(&base).unwrap().modified().unwrap();
    refused(
        d.path(),
        &[
            "export-adapter",
            "--adapter",
            dr,
            "--out",
            base.to_str().unwrap(),
        ],
        1,
        &["a file of the base model"],
    );
    refused(
        d.path(),
        &[
            "merge-adapter",
            "--adapter",
            dr,
            "--out",
            base.parent().unwrap().to_str().unwrap(),
            "--format",
            "gguf",
        ],
        1,
        &["the base model's folder"],
    );
    assert_eq!(
        std::fs::metadata(&base).unwrap().modified().unwrap(),
        before
    );
    refused(
        d.path(),
        &[
            "merge-adapter",
            "--adapter",
            dr,
            "--out",
            o,
            "--type",
            "q8_0",
        ],
        2,
        &["--format gguf"],
    );
    refused(
        d.path(),
        &[
            "merge-adapter",
            "--adapter",
            dr,
            "--out",
            o,
            "--format",
            "gguf",
        ],
        2,
        &["a folder"],
    );
    // A file already at --out (the user's own, or an earlier export) is replaced only with
    // --force, and refused before any work.
    let mine = d.path().join("mine.gguf");
    std::fs::write(&mine, b"not yours").unwrap();
    refused(
        d.path(),
        &[
            "export-adapter",
            "--adapter",
            dr,
            "--out",
            mine.to_str().unwrap(),
        ],
        1,
        &["mine.gguf already exists", "--force"],
    );
    let kept = d.path().join("kept");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::write(kept.join("Modelfile"), b"FROM llama3").unwrap();
    refused(
        d.path(),
        &[
            "merge-adapter",
            "--adapter",
            dr,
            "--out",
            kept.to_str().unwrap(),
            "--format",
            "gguf",
        ],
        1,
        &["Modelfile already exists", "--force"],
    );
    assert_eq!(std::fs::read(&mine).unwrap(), b"not yours");
    assert_eq!(
        std::fs::read(kept.join("Modelfile")).unwrap(),
        b"FROM llama3"
    );
    // With --force the refusal is the adapter's own (DoRA), not the file's.
    refused(
        d.path(),
        &[
            "export-adapter",
            "--adapter",
            dr,
            "--out",
            mine.to_str().unwrap(),
            "--force",
        ],
        1,
        &["use_dora"],
    );
    // An adapter of another base: its shapes are not SmolLM2's.
    let mut tiny = with_smollm2_tokenizer(tiny_llama(1, DType::F32));
    let other = attach_random_adapter(&mut tiny, &d.path().join("tiny"), &[Projection::VProj], 0.1);
    refused(
        d.path(),
        &[
            "export-adapter",
            "--adapter",
            other.to_str().unwrap(),
            "--out",
            o,
        ],
        1,
        &["v_proj", "another base model"],
    );
    assert!(!out.exists());
}
