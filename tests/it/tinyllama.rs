//! TinyLlama's path, proven on the CPU against references nobody here wrote.
//!
//! The architecture: a random-weight model with TinyLlama's proportions (untied embeddings, 8:1
//! grouped-query attention, RoPE theta 10,000, RMSNorm epsilon 1e-5, SiLU MLP at 2.75x width),
//! small enough for CI, written as an HF model folder and loaded by our loader, against
//! candle-transformers' own Llama (`models::llama`) reading the same safetensors: last-position
//! logits over several prompts, and greedy decoding through both KV caches.

use crate::support::*;
use candle_core::{DType, Device, Tensor};
use reviewer2::model::config::LlamaConfig;
use reviewer2::model::generate::{generate, Request, Sampling};
use reviewer2::model::llama::Mode;
use reviewer2::model::load::source::resolve;
use reviewer2::model::load::Model;
use reviewer2::model::options::LoadOptions;

/// TinyLlama-1.1B's proportions at hidden 128: 16 query heads over 2 KV heads (8:1, as 32 over
/// 4), head dim 8 (= hidden / heads, as candle-transformers assumes), intermediate 352 (the
/// 5632 / 2048 ratio), untied embeddings, 3 layers.
fn tinyllama_shape(vocab_size: usize) -> LlamaConfig {
    let full = LlamaConfig::tinyllama();
    let hidden = 128;
    LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: full.intermediate_size * hidden / full.hidden_size,
        num_hidden_layers: 3,
        num_attention_heads: 16,
        num_key_value_heads: 16 * full.num_key_value_heads / full.num_attention_heads,
        head_dim: hidden / 16,
        ..full
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn tinyllama_shape_matches_candle_transformers_llama() {
    let d = tempdir();
    let cfg = tinyllama_shape(smollm2_vocab());
    assert_eq!(cfg.num_attention_heads / cfg.num_key_value_heads, 8);
    assert!(!cfg.tie_word_embeddings);
    model_folder(d.path(), &cfg, 21);
    let ours = Model::load(
        &resolve(d.path().to_str().unwrap(), "main").unwrap(),
        &LoadOptions::cpu_f32(),
    )
    .unwrap();

    // The reference: candle-transformers' Llama on the same files and config.json.
    let ct_cfg: candle_transformers::models::llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(d.path().join("config.json")).unwrap()).unwrap();
    let ct_cfg = ct_cfg.into_config(false);
    assert!(!ct_cfg.tie_word_embeddings);
    // SAFETY: the mapped file is this test's own, written above into its private temporary
    // folder, and nothing modifies or truncates it while the mapping lives.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[d.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let reference = candle_transformers::models::llama::Llama::load(vb, &ct_cfg).unwrap();

    let prompts: [Vec<u32>; 3] = [
        vec![1, 520, 33, 4011, 7, 99],
        (0..40)
            .map(|i| (i * 977 + 13) % cfg.vocab_size as u32)
            .collect(),
        vec![3, 3, 3, 3, 12000, 48000, 17],
    ];
    for ids in &prompts {
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut cache =
            candle_transformers::models::llama::Cache::new(true, DType::F32, &ct_cfg, &Device::Cpu)
                .unwrap();
        let want = reference
            .forward(&x, 0, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let got = ours.llama.forward_all(&x, Mode::infer()).unwrap();
        let got = got.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        let diff = max_abs(&(&got - &want).unwrap());
        let scale = max_abs(&want);
        assert!(
            diff < 1e-4 * scale.max(1.0),
            "{} tokens: max |diff| {diff} (logits up to {scale})",
            ids.len()
        );

        // Greedy decoding, 12 tokens, through both engines' KV caches.
        let mut want_tokens = Vec::new();
        let mut next = want.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        for pos in ids.len()..ids.len() + 12 {
            want_tokens.push(next);
            let x = Tensor::new(&[next], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let l = reference
                .forward(&x, pos, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap();
            next = l.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        }
        let mut got_tokens = Vec::new();
        generate(
            &ours,
            vec![Request {
                id: 0,
                ids: ids.clone(),
            }],
            &Sampling::greedy(12),
            1,
            |o, _| {
                got_tokens = o.tokens;
                Ok(())
            },
        )
        .unwrap();
        // Ours stops at a stop token; the reference decodes on: compare what both produced.
        assert!(!got_tokens.is_empty());
        assert_eq!(
            got_tokens[..],
            want_tokens[..got_tokens.len()],
            "prompt {ids:?}"
        );
        if got_tokens.len() < 12 {
            assert!(ours.meta.tok.is_stop(want_tokens[got_tokens.len()]));
        }
    }
}
