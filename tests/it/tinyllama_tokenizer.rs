//! TinyLlama's tokenizer (the Llama / Llama-2 SentencePiece BPE, 32,000 tokens, byte fallback)
//! against a reference nobody here wrote: the npm package llama-tokenizer-js.
//!
//! tests/fixtures/tinyllama-tokenizer/ holds what its make.mjs built from that package alone:
//! tokenizer.json (gzipped) in the layout TinyLlama ships, with the package's vocabulary and
//! merges; TinyLlama's tokenizer_config.json facts; and expected.json, the package's token ids
//! (and decoded text) for varied strings, following the conventions of Hugging Face's fast
//! Llama tokenizer (make.mjs explains them: <s> first, special tokens in the text split out,
//! [1] for ""). The tokenizer is loaded the way the pipeline loads a TinyLlama folder.

use crate::support::*;
use reviewer2::model::config::LlamaConfig;
use reviewer2::model::load::chat::Message;
use reviewer2::model::load::source::{load_meta, resolve, ModelMeta};
use std::io::Read;

#[derive(serde::Deserialize)]
struct Expected {
    reference: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

fn expected() -> Expected {
    let p = fixture("tinyllama-tokenizer/expected.json");
    let e: Expected = read_json(&p);
    assert!(e.reference.starts_with("llama-tokenizer-js@"));
    // The fixture itself must stay meaningful: many cases, the edge cases among them.
    assert!(
        e.cases.len() >= 30,
        "{}: only {} cases",
        p.display(),
        e.cases.len()
    );
    assert!(
        e.cases.iter().all(|c| c.ids.first() == Some(&1)),
        "every case starts with <s>"
    );
    assert!(e.cases.iter().any(|c| c.text.is_empty()));
    assert!(e.cases.iter().any(|c| c.text.contains("</s>")));
    assert!(e
        .cases
        .iter()
        .any(|c| c.ids.iter().any(|&i| (3..259).contains(&i))));
    e
}

/// A TinyLlama model folder without weights (load_meta reads none): config.json,
/// tokenizer.json, tokenizer_config.json, and an index naming no shard.
fn tinyllama_meta() -> (tempfile::TempDir, ModelMeta) {
    let d = tempdir();
    let mut json = Vec::new();
    let gz = std::fs::read(fixture("tinyllama-tokenizer/tokenizer.json.gz")).unwrap();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .unwrap();
    std::fs::write(d.path().join("tokenizer.json"), json).unwrap();
    std::fs::copy(
        fixture("tinyllama-tokenizer/tokenizer_config.json"),
        d.path().join("tokenizer_config.json"),
    )
    .unwrap();
    std::fs::write(
        d.path().join("config.json"),
        serde_json::to_vec_pretty(&LlamaConfig::tinyllama().to_hf_json()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {}}"#,
    )
    .unwrap();
    let meta = load_meta(&resolve(d.path().to_str().unwrap(), "main").unwrap()).unwrap();
    (d, meta)
}

#[test]
fn special_tokens_and_vocabulary_are_tinyllamas() {
    let (_d, meta) = tinyllama_meta();
    let tok = &meta.tok;
    assert_eq!(tok.inner.get_vocab_size(true), 32000);
    assert_eq!(meta.config.vocab_size, 32000);
    for (id, t) in SPECIALS.iter().enumerate() {
        assert_eq!(tok.token_to_id(t), Some(id as u32), "{t}");
        assert_eq!(tok.inner.id_to_token(id as u32).as_deref(), Some(*t));
    }
    // The 256 byte-fallback tokens follow, in byte order.
    for b in 0..=255u32 {
        assert_eq!(
            tok.inner.id_to_token(3 + b),
            Some(format!("<0x{b:02X}>")),
            "byte {b}"
        );
    }
    assert_eq!(tok.token_to_id("▁"), Some(29871));
    assert_eq!((tok.bos_id, tok.bos_token.as_str()), (Some(1), "<s>"));
    assert_eq!((tok.eos_id, tok.eos_token.as_str()), (2, "</s>"));
    assert_eq!(tok.pad_id, 2);
    assert!(tok.add_bos);
    assert!(tok.is_stop(2));
    assert!(tok.stop_ids.is_empty());
}

#[test]
fn encode_matches_llama_tokenizer_js() {
    let (_d, meta) = tinyllama_meta();
    let e = expected();
    let mut wrong = Vec::new();
    for c in &e.cases {
        let got = meta.tok.encode(&c.text, true).unwrap();
        // Without BOS: the same ids after <s>.
        let bare = meta.tok.encode(&c.text, false).unwrap();
        if got != c.ids || bare != c.ids[1..] {
            wrong.push(format!(
                "{} {:?}:\n  reference {:?}\n  ours      {:?}\n  no BOS    {:?}",
                c.name, c.text, c.ids, got, bare
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} texts tokenize unlike {}:\n{}",
        wrong.len(),
        e.cases.len(),
        e.reference,
        wrong.join("\n")
    );
}

#[test]
fn decode_matches_llama_tokenizer_js() {
    let (_d, meta) = tinyllama_meta();
    for c in expected().cases {
        let got = meta.tok.decode(&c.ids, true).unwrap();
        assert_eq!(got, c.decoded, "{} {:?}", c.name, c.text);
        // SentencePiece round-trips any text without special tokens in it.
        if !SPECIALS.iter().any(|s| c.text.contains(s)) {
            assert_eq!(got, c.text, "{}: round trip", c.name);
        }
    }
}

/// The prompt the pipeline sends: TinyLlama's chat template rendered, then tokenized, equals the
/// reference's ids for that exact text.
#[test]
fn chat_prompt_renders_and_tokenizes_like_the_reference() {
    let (_d, meta) = tinyllama_meta();
    let chat = meta
        .chat
        .as_ref()
        .expect("tokenizer_config.json has a chat_template");
    let prompt = chat
        .render(
            &[
                Message::new("system", "You are a reviewer."),
                Message::new("user", "Attention Is All You Need"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        prompt,
        "<|system|>\nYou are a reviewer.</s>\n<|user|>\nAttention Is All You Need</s>\n<|assistant|>\n"
    );
    let e = expected();
    let case = e
        .cases
        .iter()
        .find(|c| c.text == prompt)
        .expect("expected.json has the rendered chat prompt");
    let ids = meta.tok.encode(&prompt, true).unwrap();
    assert_eq!(ids, case.ids);
    // </s> in the rendered text is the EOS token, not five characters.
    assert_eq!(ids.iter().filter(|&&i| i == meta.tok.eos_id).count(), 2);
}
