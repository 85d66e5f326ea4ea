//! The model engine against references nobody here wrote, on the real SmolLM2 model:
//! candle-transformers' quantized_llama logits, solo-vs-padded greedy decoding, the tokenizer,
//! and loading from an HF folder and from the hub cache layout.

use crate::support::*;
use candle_core::{DType, Device, Tensor, D};
use reviewer2::model::generate::{generate, Request, Sampling};
use reviewer2::model::llama::{build_mask, build_positions, Mode, TrainPass};
use reviewer2::model::load::source::resolve;
use reviewer2::model::load::Model;
use reviewer2::model::options::{LoadOptions, WeightsMode};

fn load(weights: WeightsMode) -> Model {
    Model::load(
        &smollm2_source(),
        &LoadOptions {
            weights,
            ..LoadOptions::cpu_f32()
        },
    )
    .unwrap()
}

fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Largest absolute difference, in f32 whatever the tensors hold (an f16 KV cache).
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn chat_prompt(m: &Model, title: &str) -> Vec<u32> {
    use reviewer2::model::load::chat::Message;
    let msgs = vec![
        Message::new(
            "system",
            "You are an experienced researcher and a reviewer of scientific papers.",
        ),
        Message::new("user", title),
    ];
    let text = m.meta.chat.as_ref().unwrap().render(&msgs, true).unwrap();
    m.meta.tok.encode(&text, true).unwrap()
}

#[test]
fn logits_match_candle_transformers_quantized_llama() {
    let m = load(WeightsMode::Quantized);
    let ids = chat_prompt(&m, "Scaling Laws for Reward Model Overoptimization");
    let t = ids.len();
    // Reference: candle-transformers' own GGUF Llama, position by position (it returns only the
    // last position's logits, so feed the prompt one token at a time through its KV cache).
    let path = smollm2();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let mut ref_rows = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let x = Tensor::new(&[*id], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let lg = reference.forward(&x, i).unwrap().squeeze(0).unwrap();
        ref_rows.push(lg);
    }
    let ref_logits = Tensor::stack(&ref_rows, 0).unwrap(); // [T, V]
                                                           // Ours, the same way: one token at a time through our KV cache (candle's quantized matmul
                                                           // takes another code path for a single row than for many, so compare like with like).
    let dev = Device::Cpu;
    let mut cache = reviewer2::model::llama::KvCache::new(&m.llama, 1, 8).unwrap();
    let mut rows = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let x = Tensor::new(&[[*id]], &dev).unwrap();
        let mask = build_mask(&[0], i, 1, DType::F32, &dev).unwrap();
        let pos = build_positions(&[0], i, 1, &dev).unwrap();
        rows.push(
            m.llama
                .forward(&x, &pos, &mask, Some(&mut cache), false, Mode::infer())
                .unwrap()
                .squeeze(0)
                .unwrap(),
        );
    }
    let ours = Tensor::stack(&rows, 0).unwrap();
    let diff = max_abs_diff(&ours, &ref_logits);
    let a: Vec<u32> = ours.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let b: Vec<u32> = ref_logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    assert_eq!(a, b, "argmax differs at some of {t} positions");
    assert!(diff < 1e-3, "max |logit diff| = {diff}");
    // A whole-prompt pass (many rows per quantized matmul) agrees up to that kernel's rounding.
    let x = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let whole = m
        .llama
        .forward_all(&x, Mode::infer())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let d2: f32 = max_abs_diff(&whole, &ref_logits);
    eprintln!("token-by-token max diff {diff}, whole-prompt against token-by-token {d2}");
    // Like with like: candle-transformers' model given the whole prompt at once (the many-rows
    // kernel too) returns the last position's logits; ours must match them closely.
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference2 = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let last = reference2.forward(&x, 0).unwrap().squeeze(0).unwrap();
    let d3 = max_abs_diff(&whole.get(t - 1).unwrap(), &last);
    assert!(
        d3 < 1e-3,
        "whole-prompt last-position max |logit diff| = {d3}"
    );
    assert_eq!(
        whole
            .get(t - 1)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap(),
        last.argmax(0).unwrap().to_scalar::<u32>().unwrap()
    );
}

#[test]
fn training_mode_forward_matches_inference_mode() {
    let m = load(WeightsMode::Dense);
    let ids = chat_prompt(&m, "Direct Preference Optimization");
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = m.llama.forward_all(&x, Mode::infer()).unwrap();
    let b = m
        .llama
        .forward_all(
            &x,
            Mode::Train(TrainPass {
                lora: true,
                dropout_seed: None,
                checkpoint: false,
            }),
        )
        .unwrap();
    let diff: f32 = max_abs_diff(&a, &b);
    assert!(diff < 1e-3, "composed ops differ from fused ones by {diff}");
}

#[test]
fn left_padded_rows_match_their_solo_runs() {
    for w in [
        WeightsMode::Dense,
        WeightsMode::Mixed,
        WeightsMode::Quantized,
    ] {
        let m = load(w);
        let titles = [
            "Attention",
            "Tree of Thoughts: Deliberate Problem Solving with Large Language Models",
            "QLoRA: Efficient Finetuning of Quantized LLMs",
            "Visual Instruction Tuning",
            "Are Emergent Abilities of Large Language Models a Mirage?",
        ];
        let reqs: Vec<Request> = titles
            .iter()
            .enumerate()
            .map(|(i, t)| Request {
                id: i,
                ids: chat_prompt(&m, t),
            })
            .collect();
        let s = Sampling::greedy(24);
        let run = |bs: usize, rs: Vec<Request>| {
            let mut out = vec![Vec::new(); titles.len()];
            generate(&m, rs, &s, bs, |o, _| {
                out[o.id] = o.tokens;
                Ok(())
            })
            .unwrap();
            out
        };
        // Quantized weights' generation is `quantized_decoding_agrees_with_the_dense_model`'s;
        // here one solo run of theirs, every one of dense's.
        let solo: Vec<Vec<u32>> = reqs
            .iter()
            .take(if w == WeightsMode::Dense {
                reqs.len()
            } else {
                1
            })
            .map(|r| run(1, vec![r.clone()])[r.id].clone())
            .collect();
        // All in one padded batch, and a batch of 2 where rows are refilled as others finish.
        if w == WeightsMode::Dense {
            // Dense weights (what batches use): every padded or refilled row equals its solo run.
            assert_eq!(
                run(5, reqs.clone()),
                solo,
                "{w:?}: batch 5 differs from solo runs"
            );
            assert_eq!(
                run(2, reqs.clone()),
                solo,
                "{w:?}: batch 2 with refills differs from solo runs"
            );
        }
        // Quantized weights: candle's QMatMul rounds differently for one row than for several,
        // and decoding on blocks (mixed) turns the float-level differences of a batched prefill
        // into other 8-bit roundings, so decoding at batch 1 vs batch 5 may part ways at
        // near-ties; the padded prefill below must still agree.
        assert!(solo.iter().all(|t| !t.is_empty()));
        // And the logits themselves agree closely.
        let (a, b) = (&reqs[0].ids, &reqs[1].ids);
        let l = a.len().max(b.len());
        let mut ids = vec![0u32; 2 * l];
        ids[l - a.len()..l].copy_from_slice(a);
        ids[2 * l - b.len()..].copy_from_slice(b);
        let start = [l - a.len(), l - b.len()];
        let dev = Device::Cpu;
        let ids = Tensor::from_vec(ids, (2, l), &dev).unwrap();
        let mask = build_mask(&start, 0, l, DType::F32, &dev).unwrap();
        let pos = build_positions(&start, 0, l, &dev).unwrap();
        let batched = m
            .llama
            .forward(&ids, &pos, &mask, None, false, Mode::infer())
            .unwrap();
        let solo_a = m
            .llama
            .forward_all(
                &Tensor::new(a.as_slice(), &dev)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                Mode::infer(),
            )
            .unwrap();
        let last = solo_a
            .narrow(1, a.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap();
        let d = max_abs_diff(&batched.get(0).unwrap(), &last);
        assert!(d < 1e-3, "{w:?}: padded row logits differ by {d}");
    }
}

#[test]
fn tokenizer_encodes_the_chat_prompt_as_the_model_expects() {
    let meta = smollm2_meta();
    let tok = &meta.tok;
    // Special tokens are single ids; SmolLM2 needs no BOS.
    let start = tok.token_to_id("<|im_start|>").unwrap();
    let end = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!((start, end), (1, 2));
    assert!(!tok.add_bos);
    assert!(tok.is_stop(end));
    use reviewer2::model::load::chat::Message;
    let text = meta
        .chat
        .as_ref()
        .unwrap()
        .render(&[Message::new("user", "Hello 2023 world")], true)
        .unwrap();
    // SmolLM2's template adds its default system turn when the first message is not a system one.
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHello 2023 world<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids[0], start);
    assert_eq!(ids.iter().filter(|&&i| i == start).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == end).count(), 2);
    // Digits are split one by one, and no prefix space appears after a special token.
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| tok.inner.id_to_token(i).unwrap())
        .collect();
    assert_eq!(pieces[1], "system", "{pieces:?}");
    for d in ["2", "0", "3"] {
        assert!(pieces.iter().any(|p| p == d), "{pieces:?}");
    }
    assert!(!pieces.iter().any(|p| p.contains("2023")), "{pieces:?}");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        text,
        "decode does not round-trip"
    );
    let odd = "Ünïcödé — “quotes” & emoji 🦀 tabs\tand  double  spaces";
    assert_eq!(
        tok.decode(&tok.encode(odd, false).unwrap(), false).unwrap(),
        odd
    );
}

fn greedy(m: &Model) -> Vec<u32> {
    let ids = chat_prompt(m, "A title");
    let mut out = Vec::new();
    generate(
        m,
        vec![Request { id: 0, ids }],
        &Sampling::greedy(8),
        1,
        |o, _| {
            out = o.tokens;
            Ok(())
        },
    )
    .unwrap();
    out
}

#[test]
fn loads_and_generates_from_an_hf_folder_and_the_hub_cache() {
    // It sets HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT and HF_TOKEN, which every test in this
    // process, and every process they start, would read: it runs in a process of its own.
    if !alone("engine::loads_and_generates_from_an_hf_folder_and_the_hub_cache") {
        return;
    }
    let d = tempdir();
    let folder = d.path().join("tiny");
    std::fs::create_dir_all(&folder).unwrap();
    tiny_folder(&folder, 64, 2);
    let src = resolve(folder.to_str().unwrap(), "main").unwrap();
    assert!(src.identity.starts_with("folder:"));
    let m = Model::load(&src, &LoadOptions::cpu_f32()).unwrap();
    let a = greedy(&m);
    // Random weights: eight tokens, or fewer ending where the model chose to stop.
    assert!(!a.is_empty() && a.len() <= 8, "{a:?}");

    // The same files laid out as hf-hub's cache: models--org--name/{refs/main, snapshots/<sha>/}.
    let cached = d.path().join("hf/hub/models--tiny-org--tiny-llama");
    let sha = hub::SHA;
    std::fs::create_dir_all(cached.join("refs")).unwrap();
    std::fs::write(cached.join("refs/main"), sha).unwrap();
    let snap = cached.join("snapshots").join(sha);
    std::fs::create_dir_all(&snap).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(folder.join(f), snap.join(f)).unwrap();
    }
    // hf-hub reads HF_HOME; set it for this process only (this test's own, see above).
    std::env::set_var("HF_HOME", d.path().join("hf"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let src = resolve("tiny-org/tiny-llama", "main").unwrap();
    assert_eq!(src.identity, format!("hub:tiny-org/tiny-llama@{sha}"));
    let m2 = Model::load(&src, &LoadOptions::cpu_f32()).unwrap();
    assert_eq!(greedy(&m2), a);
    let e = resolve("tiny-org/absent", "main").unwrap_err().to_string();
    assert!(
        e.contains("not in the Hugging Face cache") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    std::env::remove_var("HF_HUB_OFFLINE");

    // Online: hf-hub downloads into a fresh cache from a Hub-like server on 127.0.0.1
    // (HF_ENDPOINT), sending HF_TOKEN, and the files land in the standard layout.
    let server = hub::serve(folder.clone(), hub::no_faults());
    std::env::set_var("HF_HOME", d.path().join("hf2"));
    std::env::set_var("HF_ENDPOINT", server.url());
    std::env::set_var("HF_TOKEN", "hf_secret_token_for_test");
    let src = resolve("tiny-org/tiny-llama", "main").unwrap();
    assert_eq!(src.identity, format!("hub:tiny-org/tiny-llama@{sha}"));
    let snap2 = d
        .path()
        .join("hf2/hub/models--tiny-org--tiny-llama/snapshots")
        .join(sha);
    assert!(snap2.join("model.safetensors").is_file());
    assert_eq!(
        greedy(&Model::load(&src, &LoadOptions::cpu_f32()).unwrap()),
        a
    );
    let seen: Vec<String> = server
        .server
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(String::from))
        .collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|h| h == "Bearer hf_secret_token_for_test"),
        "{seen:?}"
    );
    let e = format!("{:#}", resolve("tiny-org/absent", "main").unwrap_err());
    assert!(
        e.contains("could not be downloaded") && !e.contains("hf_secret"),
        "{e}"
    );
    for k in ["HF_HOME", "HF_ENDPOINT", "HF_TOKEN"] {
        std::env::remove_var(k);
    }
}

/// A model loaded (f32, CPU) from an HF folder.
fn load_folder(folder: &std::path::Path) -> Model {
    let src = resolve(folder.to_str().unwrap(), "main").unwrap();
    Model::load(&src, &LoadOptions::cpu_f32()).unwrap()
}

/// [`tiny_folder`] in `dir/tiny`, and the model loaded from it.
fn tiny_model(dir: &std::path::Path) -> (std::path::PathBuf, Model) {
    let folder = dir.join("tiny");
    std::fs::create_dir_all(&folder).unwrap();
    tiny_folder(&folder, 64, 2);
    let m = load_folder(&folder);
    (folder, m)
}

fn logits(m: &Model, ids: &[u32], mode: Mode) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.llama
        .forward_all(&x, mode)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn one_loaded_model_serves_base_and_adapter() {
    use reviewer2::model::lora::{LoraSpec, Projection};
    let d = tempdir();
    let (folder, mut m) = tiny_model(d.path());
    let ids = chat_prompt(&m, "Low-Rank Adaptation of Large Language Models");
    let base = logits(&m, &ids, Mode::infer());

    // A fresh adapter leaves the model as it is (B = 0): give B values so it changes it.
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: Projection::ALL.to_vec(),
    };
    let adapter = m.llama.new_adapter(&spec, 3).unwrap();
    for (name, v) in adapter.vars() {
        if name.ends_with("lora_B.weight") {
            let b = Tensor::randn(0f32, 0.05, v.as_tensor().shape(), &Device::Cpu).unwrap();
            v.set(&b).unwrap();
        }
    }
    m.llama.attach(adapter).unwrap();
    let saved = d.path().join("adapter");
    m.save_adapter(&saved).unwrap();
    let adapted = logits(&m, &ids, Mode::infer());
    let changed = max_diff(&base, &adapted);
    assert!(
        changed > 1e-2,
        "the adapter changes the logits by only {changed}"
    );
    // Switched off for one call (training's reference model): exactly the base.
    let off = Mode::infer().with_lora(false);
    assert!(logits(&m, &ids, off) == base);
    // Detached: exactly the base; attached again: exactly the adapted model.
    let adapter = m.llama.detach().unwrap();
    assert!(m.llama.adapter().is_none() && m.llama.detach().is_none());
    assert!(logits(&m, &ids, Mode::infer()) == base, "detached");
    m.llama.attach(adapter).unwrap();
    assert!(logits(&m, &ids, Mode::infer()) == adapted, "attached again");

    // The saved PEFT files on a second copy: the same adapted model; merged into its weights,
    // the same within rounding, with nothing left attached.
    let mut m2 = load_folder(&folder);
    m2.load_adapter(&saved).unwrap();
    assert_eq!(m2.llama.adapter().unwrap().spec(), &spec);
    assert!(logits(&m2, &ids, Mode::infer()) == adapted, "reloaded");
    m2.llama.merge_adapter().unwrap();
    assert!(m2.llama.adapter().is_none());
    let merged = logits(&m2, &ids, Mode::infer());
    let err = max_diff(&merged, &adapted);
    assert!(
        err < 1e-4,
        "merged differs from attached by {err} (the adapter changes {changed})"
    );
    // Written as a plain HF folder and loaded back: the merged model.
    let out = d.path().join("merged");
    m2.write_hf_folder(&out).unwrap();
    let m3 = load_folder(&out);
    assert!(
        logits(&m3, &ids, Mode::infer()) == merged,
        "written and reloaded"
    );
}

#[test]
fn an_adapter_is_refused_by_a_model_it_does_not_fit() {
    use reviewer2::model::lora::{LoraSpec, Projection};
    let d = tempdir();
    let (_, tiny) = tiny_model(d.path());
    let spec = |targets: Vec<Projection>| LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets,
    };
    let mut m = load(WeightsMode::Quantized);
    let other = tiny
        .llama
        .new_adapter(&spec(vec![Projection::VProj]), 1)
        .unwrap();
    let e = m.llama.attach(other).unwrap_err().to_string();
    assert!(e.contains("another base model"), "{e}");
    // Quantized q/k weights stay in GGUF's RoPE layout, which an HF-layout adapter does not fit.
    let qk = m
        .llama
        .new_adapter(&spec(vec![Projection::KProj]), 1)
        .unwrap();
    let e = m.llama.attach(qk).unwrap_err().to_string();
    assert!(e.contains("dense weights"), "{e}");
    assert!(m.llama.adapter().is_none());
    let v = m
        .llama
        .new_adapter(&spec(vec![Projection::VProj]), 1)
        .unwrap();
    m.llama.attach(v).unwrap();
}

#[test]
fn unsupported_architectures_are_named() {
    let d = tempdir();
    std::fs::write(d.path().join("config.json"), r#"{"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#).unwrap();
    let e = reviewer2::model::config::LlamaConfig::from_hf_json(&d.path().join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unsupported architecture") && e.contains("gpt2"),
        "{e}"
    );
}

#[test]
fn sampling_respects_top_k_and_is_seeded_per_prompt() {
    use reviewer2::model::generate::{row_rng, sample, Penalties};
    let logits: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
    let s = Sampling {
        temperature: 1.0,
        top_k: 3,
        top_p: 1.0,
        max_new_tokens: 1,
        seed: 0,
        ignore_eos: false,
        penalties: Penalties::OFF,
    };
    let mut rng = row_rng(5, 9);
    for _ in 0..200 {
        assert!(sample(&logits, &s, &mut rng) >= 97);
    }
    let s = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.5,
        max_new_tokens: 1,
        seed: 0,
        ignore_eos: false,
        penalties: Penalties::OFF,
    };
    let draws: Vec<u32> = (0..20)
        .map(|_| sample(&logits, &s, &mut row_rng(1, 2)))
        .collect();
    assert!(
        draws.windows(2).all(|w| w[0] == w[1]),
        "same (seed, id) must give the same draw"
    );
    let mut r = row_rng(1, 3);
    assert!(
        (0..200).all(|_| sample(&logits, &s, &mut r) >= 93),
        "top-p 0.5 keeps the top few"
    );
}

#[test]
fn shared_prefix_prefill_equals_whole_prompt_prefill() {
    // Dense weights: candle's ops, the same arithmetic in other matrix shapes.
    shared_prefix_case(&load(WeightsMode::Dense), 1e-3, 1e-3);
    // `blocks`: both prefills through `cpu_forward.rs` on the blocks. Each row's arithmetic
    // does not depend on the rows beside it or on the padding, so the two agree exactly here
    // (measured); the bound leaves room for a gemm that sums a longer row in another order.
    shared_prefix_case(&load(WeightsMode::Blocks), 1e-3, 1e-3);
}

fn shared_prefix_case(m: &Model, logit_tol: f32, kv_tol: f32) {
    use reviewer2::model::generate::prefill_padded;
    use reviewer2::model::generate::prefix::{prefill_shared, unique_tokens};
    use reviewer2::model::load::chat::Message;
    // Few-shot prompts as the prompts stage builds them: shared system message, shots drawn
    // from a pool in different orders, then the title. One prompt is a prefix of another.
    let shots = [
        ("Attention Is All You Need", "Not novel."),
        (
            "QLoRA: Efficient Finetuning of Quantized LLMs",
            "Poorly evaluated.",
        ),
        ("Visual Instruction Tuning", "Irrelevant."),
    ];
    let orders: [&[usize]; 5] = [&[0, 1], &[0, 2], &[1, 0], &[0, 1], &[2]];
    let titles = [
        "Tree of Thoughts",
        "Direct Preference Optimization",
        "A",
        "B",
        "C",
    ];
    let mut prompts: Vec<Vec<u32>> = orders
        .iter()
        .zip(titles)
        .map(|(o, title)| {
            let mut msgs = vec![Message::new("system", "You review papers in one sentence.")];
            for &s in o.iter() {
                msgs.push(Message::new("user", shots[s].0));
                msgs.push(Message::new("assistant", shots[s].1));
            }
            msgs.push(Message::new("user", title));
            let text = m.meta.chat.as_ref().unwrap().render(&msgs, true).unwrap();
            m.meta.tok.encode(&text, true).unwrap()
        })
        .collect();
    prompts.push(prompts[0][..prompts[0].len() - 3].to_vec());
    let ps: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let total: usize = ps.iter().map(|p| p.len()).sum();
    let unique = unique_tokens(&ps);
    assert!(
        unique * 2 < total,
        "{unique} of {total} tokens unique: too little sharing to test"
    );
    let (ca, sa, la) = prefill_shared(m, &ps, 8, Mode::infer()).unwrap();
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            id: i,
            ids: p.clone(),
        })
        .collect();
    let (cb, sb, lb) = prefill_padded(m, &reqs, 8, Mode::infer()).unwrap();
    assert_eq!(sa, sb, "first valid column per row");
    assert_eq!(ca.len, cb.len);
    for (i, (a, b)) in la.iter().zip(&lb).enumerate() {
        let ta = Tensor::new(a.as_slice(), &Device::Cpu).unwrap();
        let tb = Tensor::new(b.as_slice(), &Device::Cpu).unwrap();
        let d = max_abs_diff(&ta, &tb);
        assert!(d < logit_tol, "prompt {i}: last logits differ by {d}");
        assert_eq!(
            reviewer2::model::generate::argmax(a),
            reviewer2::model::generate::argmax(b),
            "prompt {i}: argmax"
        );
    }
    for li in [0, 15, m.llama.cfg.num_hidden_layers - 1] {
        for (i, &st) in sa.iter().enumerate() {
            let w = ca.len - st;
            for (x, y) in [(&ca.k[li], &cb.k[li]), (&ca.v[li], &cb.v[li])] {
                let x = x.narrow(0, i, 1).unwrap().narrow(2, st, w).unwrap();
                let y = y.narrow(0, i, 1).unwrap().narrow(2, st, w).unwrap();
                let d = max_abs_diff(&x, &y);
                assert!(
                    d < kv_tol,
                    "layer {li} row {i}: cached keys/values differ by {d}"
                );
            }
        }
    }
}

#[test]
fn quantized_decoding_agrees_with_the_dense_model() {
    // `weights = "mixed"` decodes on the GGUF's own Q4_1 blocks and `"q8"` on blocks
    // requantized to Q8_0, both through `quant.rs`'s kernels (and `generate` through
    // `cpu_forward.rs`). The reference is the same GGUF dequantized to f32: greedy tokens agree
    // on most prompts for the first tokens, and the logits stay close. candle's own Q4_1 matmul
    // (`"quantized"`, an implementation we did not write) multiplies the same blocks as
    // `mixed`: their logits agree more closely still.
    let dense = load(WeightsMode::Dense);
    let titles = [
        "Attention",
        "Tree of Thoughts: Deliberate Problem Solving with Large Language Models",
        "QLoRA: Efficient Finetuning of Quantized LLMs",
        "Visual Instruction Tuning",
        "Are Emergent Abilities of Large Language Models a Mirage?",
        "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    ];
    let s = Sampling::greedy(8);
    let run = |m: &Model| {
        let reqs: Vec<Request> = titles
            .iter()
            .enumerate()
            .map(|(i, t)| Request {
                id: i,
                ids: chat_prompt(m, t),
            })
            .collect();
        let mut out = vec![Vec::new(); titles.len()];
        generate(m, reqs, &s, 1, |o, _| {
            out[o.id] = o.tokens;
            Ok(())
        })
        .unwrap();
        out
    };
    let a = run(&dense);
    // The logits of one prompt, position by position against the dense model's.
    let ids = chat_prompt(&dense, titles[1]);
    // One token at a time through the KV cache: one row per matmul, the decoding path (the
    // quantized kernels run there, dense weights only for many rows).
    let logits = |m: &Model| {
        let dev = Device::Cpu;
        let mut cache = reviewer2::model::llama::KvCache::new(&m.llama, 1, 8).unwrap();
        let rows: Vec<Tensor> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let x = Tensor::new(&[[*id]], &dev).unwrap();
                let mask = build_mask(&[0], i, 1, DType::F32, &dev).unwrap();
                let pos = build_positions(&[0], i, 1, &dev).unwrap();
                m.llama
                    .forward(
                        &x,
                        &pos,
                        &mask,
                        Some(&mut cache),
                        false,
                        Mode::infer().decode_step(),
                    )
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
            })
            .collect();
        Tensor::stack(&rows, 0).unwrap().unsqueeze(0).unwrap()
    };
    let ld = logits(&dense);
    // Like llama.cpp, these kernels quantize the activations too (8-bit blocks); candle's Q4_1
    // path on the file's blocks is the yardstick.
    let l4 = logits(&load(WeightsMode::Quantized));
    let diff4 = max_abs_diff(&ld, &l4);
    let am = |t: &Tensor| -> Vec<u32> {
        t.squeeze(0)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let agree = |x: &Tensor, y: &Tensor| am(x).iter().zip(am(y)).filter(|(a, b)| **a == *b).count();
    let n = ids.len();
    // `blocks` is `mixed` with prefill on the blocks too: `run` prefills through them.
    for mode in [WeightsMode::Mixed, WeightsMode::Q8, WeightsMode::Blocks] {
        let m = load(mode);
        let b = run(&m);
        let first4 = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.iter().take(4).eq(y.iter().take(4)))
            .count();
        assert!(
            first4 >= 4,
            "{mode:?} and dense agree on the first 4 greedy tokens for {first4} of 6 prompts:\n{a:?}\n{b:?}"
        );
        let lq = logits(&m);
        let diff = max_abs_diff(&ld, &lq);
        let (same, same4) = (agree(&ld, &lq), agree(&ld, &l4));
        eprintln!(
            "{mode:?} against dense: max |logit diff| {diff}, argmax equal at {same} of {n} \
             positions (candle's Q4_1: {diff4}, {same4} of {n})"
        );
        assert!(
            diff <= 1.5 * diff4 + 0.1,
            "{mode:?} strays too far from the dense model ({diff}; candle on the file's blocks: {diff4})"
        );
        // The file's 4-bit blocks cost some positions whoever multiplies them (candle: `same4`).
        let floor = (n * 9 / 10).min(same4);
        assert!(
            same >= floor,
            "{mode:?}: argmax equal at {same} of {n} (candle on the file's blocks: {same4})"
        );
        if mode != WeightsMode::Q8 {
            let both = agree(&lq, &l4);
            // The same blocks and the same 8-bit activation scheme, summed in other orders:
            // an activation that rounds to the other 8-bit step in one layer moves every layer
            // after it, so the two are about as far apart as each is from dense (mean |logit
            // diff| 0.20 against candle's 0.19 from dense on the tiled VNNI kernel, 0.21 on the
            // row kernel), and which next token wins at a near-tie is luck (39 of 39 positions
            // on the row kernel, 34 on the tiled one). A wrong scale or quant order is off by
            // whole logits. (quant.rs checks one product against candle's, to 2^-11.)
            let (mean, mean4) = (mean_abs_diff(&lq, &l4), mean_abs_diff(&l4, &ld));
            eprintln!(
                "{mode:?} against candle's Q4_1: argmax equal at {both} of {n}, mean |logit \
                 diff| {mean} (candle against dense: {mean4})"
            );
            assert!(
                mean <= 1.2 * mean4 && both >= n * 8 / 10,
                "{mode:?} and candle's Q4_1 on the same blocks: mean |logit diff| {mean} \
                 (candle against dense: {mean4}), argmax equal at {both} of {n}"
            );
        }
    }
}
