//! The tokenizer as GGUF metadata: `tokenizer.ggml.*` and `tokenizer.chat_template`.
//!
//! A GGUF base's `tokenizer.*` keys are carried over verbatim (values and types): the merged
//! model tokenizes exactly as its base. An HF folder's `tokenizer.json` is written as llama.cpp's
//! converter (`convert_hf_to_gguf.py`) writes one: a byte-level BPE as `gpt2` (tokens, token
//! types, merges, and the pre-tokenizer by llama.cpp's name for it), a SentencePiece BPE (byte
//! fallback, as Llama 2 and TinyLlama ship) as `llama` (tokens, scores, token types). Then the
//! special token ids, `add_bos_token` and the chat template, for both.

use crate::error::{Context, Result};
use crate::model::config::FIX;
use crate::model::load::source::{ModelFiles, ModelMeta};
use crate::model::load::Model;
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's token types (gguf-py's `TokenType`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The tokenizer metadata of `model`'s GGUF.
pub(super) fn metadata(model: &Model) -> Result<Vec<(String, Value)>> {
    match &model.source.files {
        ModelFiles::Gguf(p) => from_gguf(p),
        ModelFiles::Hf { tokenizer, .. } => {
            from_tokenizer_json(tokenizer, &model.meta, model.llama.cfg.vocab_size)
        }
    }
}

/// Every `tokenizer.*` key of the base GGUF, sorted by name (the same inputs give the same
/// bytes).
fn from_gguf(p: &Path) -> Result<Vec<(String, Value)>> {
    let (content, _) = crate::model::load::gguf::open(p)?;
    let mut kv: Vec<(String, Value)> = content
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    kv.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(kv)
}

/// One entry of the vocabulary: its text, and whether it is an added token (special or not).
#[derive(Clone)]
struct Entry {
    text: String,
    added: Option<bool>,
}

/// `tokenizer.json`'s vocabulary by id (added tokens included), padded to `rows` (the
/// embedding's) with `[PAD{id}]` as the converter pads it.
fn vocabulary(j: &Json, path: &Path, rows: usize) -> Result<Vec<(Entry, bool)>> {
    let mut v: Vec<Option<Entry>> = vec![None; rows];
    let mut put = |id: u64, e: Entry| -> Result<()> {
        let slot = v.get_mut(id as usize).with_context(|| {
            format!(
                "{}: token id {id} ({:?}) is beyond the model's {rows} embedding rows; {FIX}",
                path.display(),
                e.text
            )
        })?;
        *slot = Some(e);
        Ok(())
    };
    let vocab = j["model"]["vocab"]
        .as_object()
        .with_context(|| format!("{}: model.vocab is not an object; {FIX}", path.display()))?;
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .with_context(|| format!("{}: model.vocab[{text:?}] is not an id", path.display()))?;
        put(
            id,
            Entry {
                text: text.clone(),
                added: None,
            },
        )?;
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let special = a["special"].as_bool().unwrap_or(false);
        put(
            id,
            Entry {
                text: text.into(),
                added: Some(special),
            },
        )?;
    }
    Ok(v.into_iter()
        .enumerate()
        .map(|(i, e)| match e {
            Some(e) => (e, false),
            None => (
                Entry {
                    text: format!("[PAD{i}]"),
                    added: None,
                },
                true,
            ),
        })
        .collect())
}

/// `model.merges` as `"a b"` strings (tokenizers writes either strings or pairs).
fn merges(j: &Json, path: &Path) -> Result<Vec<String>> {
    let bad = || {
        format!(
            "{}: model.merges is not a list of merges; {FIX}",
            path.display()
        )
    };
    j["model"]["merges"]
        .as_array()
        .with_context(bad)?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) => match (
                p.first().and_then(Json::as_str),
                p.get(1).and_then(Json::as_str),
            ) {
                (Some(a), Some(b)) if p.len() == 2 => Ok(format!("{a} {b}")),
                _ => Err(crate::error::err!("{}", bad())),
            },
            _ => Err(crate::error::err!("{}", bad())),
        })
        .collect()
}

/// llama.cpp's name for a byte-level BPE pre-tokenizer, where this exporter knows it (and this
/// engine reads it back): GPT-2's byte-level split, or SmolLM's (StarCoder's) digits one by one
/// before it. llama.cpp's converter recognises a tokenizer by hashing what it makes of a test
/// text; these two are told apart by their JSON.
fn bpe_pre(pre: &Json) -> Option<&'static str> {
    let byte_level = |p: &Json| p["type"] == "ByteLevel" && p["use_regex"].as_bool() != Some(false);
    if byte_level(pre) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array()?;
    match parts.as_slice() {
        [d, b]
            if pre["type"] == "Sequence"
                && d["type"] == "Digits"
                && d["individual_digits"] == true
                && byte_level(b) =>
        {
            Some("smollm")
        }
        _ => None,
    }
}

/// Does a SentencePiece tokenizer put `▁` before the text (llama.cpp's `add_space_prefix`)?
/// Older `tokenizer.json`s prepend it in the normalizer, newer ones in a Metaspace pre-tokenizer.
fn adds_space_prefix(j: &Json) -> bool {
    let prepends = |n: &Json| n["type"] == "Prepend" && n["prepend"] == "▁";
    let norm = &j["normalizer"];
    if prepends(norm)
        || norm["normalizers"]
            .as_array()
            .is_some_and(|v| v.iter().any(prepends))
    {
        return true;
    }
    let meta = |p: &Json| {
        p["type"] == "Metaspace"
            && (p["add_prefix_space"] == true
                || p["prepend_scheme"].as_str().is_some_and(|s| s != "never"))
    };
    let pre = &j["pre_tokenizer"];
    meta(pre)
        || pre["pretokenizers"]
            .as_array()
            .is_some_and(|v| v.iter().any(meta))
}

fn strings(v: impl IntoIterator<Item = String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

/// An HF folder's tokenizer as the converter writes it; `rows` is the embedding's row count
/// (llama.cpp wants exactly one token per row).
fn from_tokenizer_json(path: &Path, meta: &ModelMeta, rows: usize) -> Result<Vec<(String, Value)>> {
    let j: Json = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", path.display()))?;
    let how = "merge the adapter into a safetensors folder (`--format safetensors`) and convert \
               it with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers";
    if j["model"]["type"] != "BPE" {
        crate::error::unsupported!(
            "{}: a {} tokenizer; the GGUF export writes BPE tokenizers only (byte-level, as GPT-2 \
             and SmolLM2, or SentencePiece with byte fallback, as Llama 2 and TinyLlama): {how}",
            path.display(),
            j["model"]["type"]
        );
    }
    let vocab = vocabulary(&j, path, rows)?;
    let merges = merges(&j, path)?;
    let spm = j["model"]["byte_fallback"].as_bool().unwrap_or(false);
    let mut md = if spm {
        sentencepiece(&j, &vocab, &merges)
    } else {
        let Some(pre) = bpe_pre(&j["pre_tokenizer"]) else {
            crate::error::unsupported!(
                "{}: its pre-tokenizer ({}) is not one the GGUF export can name for llama.cpp \
                 (GPT-2's byte-level split, or SmolLM2's digits then byte-level): {how}",
                path.display(),
                j["pre_tokenizer"]["type"]
            );
        };
        byte_level(pre, &vocab, merges)
    };
    let tok = &meta.tok;
    let id = |k: &str, v: u32| (format!("tokenizer.ggml.{k}"), Value::U32(v));
    if let Some(b) = tok.bos_id {
        md.push(id("bos_token_id", b));
    }
    md.push(id("eos_token_id", tok.eos_id));
    md.push(id("padding_token_id", tok.pad_id));
    md.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tok.add_bos),
    ));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    if let Some(c) = &meta.chat {
        md.push((
            "tokenizer.chat_template".into(),
            Value::String(c.source().into()),
        ));
    }
    if spm {
        if let Some(unk) = j["model"]["unk_token"]
            .as_str()
            .and_then(|u| tok.token_to_id(u))
        {
            md.push(id("unknown_token_id", unk));
        }
    }
    Ok(md)
}

/// `gpt2`: tokens, their types (an added token is a control token when special, else
/// user-defined; padding unused), and the merges.
fn byte_level(pre: &str, vocab: &[(Entry, bool)], merges: Vec<String>) -> Vec<(String, Value)> {
    let types = vocab.iter().map(|(e, pad)| match (e.added, pad) {
        (_, true) => UNUSED,
        (Some(true), _) => CONTROL,
        (Some(false), _) => USER_DEFINED,
        (None, _) => NORMAL,
    });
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            strings(vocab.iter().map(|(e, _)| e.text.clone())),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
    ]
}

/// `llama` (SentencePiece): tokens, scores and types. `tokenizer.json` has no scores; llama.cpp
/// merges the adjacent pair whose joined piece scores highest, where `tokenizer.json`'s BPE
/// merges the pair of lowest rank, so the piece the merge of rank k makes scores -k, and a piece
/// no merge makes scores below them all (llama.cpp must never join one). The converter, given
/// only `tokenizer.json`, writes -1000 for every piece, with which llama.cpp merges left to
/// right instead.
fn sentencepiece(j: &Json, vocab: &[(Entry, bool)], merges: &[String]) -> Vec<(String, Value)> {
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (k, m) in merges.iter().enumerate() {
        rank.entry(m.replacen(' ', "", 1)).or_insert(k);
    }
    let unk = j["model"]["unk_token"].as_str();
    let floor = -(merges.len() as f32) - 1.0;
    let is_byte = |t: &str| {
        t.len() == 6
            && t.starts_with("<0x")
            && t.ends_with('>')
            && u8::from_str_radix(&t[3..5], 16).is_ok()
    };
    let mut scores = Vec::with_capacity(vocab.len());
    let mut types = Vec::with_capacity(vocab.len());
    for (e, pad) in vocab {
        let ty = match e.added {
            _ if *pad => UNUSED,
            _ if Some(e.text.as_str()) == unk => UNKNOWN,
            Some(true) => CONTROL,
            Some(false) => USER_DEFINED,
            None if is_byte(&e.text) => BYTE,
            None => NORMAL,
        };
        let score = match (ty, rank.get(&e.text)) {
            (NORMAL, Some(&k)) => -(k as f32),
            (NORMAL, None) => floor,
            _ => 0.0,
        };
        scores.push(Value::F32(score));
        types.push(Value::I32(ty));
    }
    vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            strings(vocab.iter().map(|(e, _)| e.text.clone())),
        ),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(adds_space_prefix(j)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizers_are_named_as_llama_cpp_names_them() {
        let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true});
        assert_eq!(bpe_pre(&bl), Some("gpt-2"));
        let smol = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bl]});
        assert_eq!(bpe_pre(&smol), Some("smollm"));
        // Llama 3's: a regex split, then byte-level without its own regex.
        let llama3 = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "..."}},
            {"type": "ByteLevel", "use_regex": false}]});
        assert_eq!(bpe_pre(&llama3), None);
    }

    #[test]
    fn sentencepiece_scores_follow_the_merge_ranks() {
        let j = json!({"model": {"unk_token": "<unk>"}});
        let e = |t: &str, added| {
            (
                Entry {
                    text: t.into(),
                    added,
                },
                false,
            )
        };
        let vocab = vec![
            e("<unk>", Some(true)),
            e("<s>", Some(true)),
            e("<0x41>", None),
            e("▁", None),
            e("t", None),
            e("▁t", None),
            e("▁▁", None),
            (
                Entry {
                    text: "[PAD7]".into(),
                    added: None,
                },
                true,
            ),
        ];
        let md = sentencepiece(&j, &vocab, &["▁ t".into()]);
        let get = |k: &str| md.iter().find(|(n, _)| n == k).unwrap().1.clone();
        let Value::Array(types) = get("tokenizer.ggml.token_type") else {
            panic!()
        };
        let types: Vec<i32> = types.iter().map(|v| v.to_i32().unwrap()).collect();
        assert_eq!(
            types,
            [UNKNOWN, CONTROL, BYTE, NORMAL, NORMAL, NORMAL, NORMAL, UNUSED]
        );
        let Value::Array(scores) = get("tokenizer.ggml.scores") else {
            panic!()
        };
        let scores: Vec<f32> = scores.iter().map(|v| v.to_f32().unwrap()).collect();
        // "▁t" is made by merge 0; "▁▁" by none, so it must never win a merge.
        assert_eq!(scores[5], 0.0);
        assert!(scores[6] < scores[5] && scores[6] < 0.0);
    }
}
