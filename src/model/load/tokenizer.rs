//! Tokenizer: a `tokenizers::Tokenizer` plus the special-token facts generation needs.
//!
//! HF folders ship tokenizer.json. GGUF files ship the vocabulary and merges in their metadata;
//! candle's GGUF helper gets SmolLM2's pre-tokenizer wrong, so [`from_gguf`] builds the byte-level
//! BPE tokenizer itself (digits split, byte-level without prefix space, special tokens added).

use crate::error::{ensure, Context, Result};
use crate::model::config::FIX;
use candle_core::quantized::gguf_file;
use std::path::Path;

pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub bos_token: String,
    pub eos_id: u32,
    pub eos_token: String,
    /// Extra ids that also end generation (e.g. `<|im_end|>` when it differs from eos).
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
    /// Prepend BOS when encoding a prompt (tokenizer_config's add_bos_token / GGUF's flag).
    pub add_bos: bool,
}

impl Tok {
    /// Encode prompt text: special tokens written in the text are recognised, BOS added if the
    /// model expects it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| crate::error::err!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| crate::error::err!("decoding: {e}"))
    }

    pub fn is_stop(&self, id: u32) -> bool {
        id == self.eos_id || self.stop_ids.contains(&id)
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    /// From an HF folder's tokenizer.json (+ tokenizer_config.json for special tokens).
    pub(crate) fn from_hf(tokenizer_json: &Path, tcfg: &serde_json::Value) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| crate::error::err!("{}: {e}", tokenizer_json.display()))?;
        let tok_str = |k: &str| -> Option<String> {
            match tcfg.get(k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
                _ => None,
            }
        };
        let eos_token = tok_str("eos_token").unwrap_or_else(|| "</s>".into());
        let eos_id = inner.token_to_id(&eos_token).with_context(|| {
            format!(
                "{}: eos token {eos_token:?} is not in the vocabulary",
                tokenizer_json.display()
            )
        })?;
        let bos_token = tok_str("bos_token").unwrap_or_default();
        let bos_id = inner.token_to_id(&bos_token);
        let pad_id = tok_str("pad_token")
            .and_then(|p| inner.token_to_id(&p))
            .unwrap_or(eos_id);
        let add_bos = tcfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(bos_id.is_some() && has_bos_postprocessor(tokenizer_json));
        let mut t = Self {
            inner,
            bos_id,
            bos_token,
            eos_id,
            eos_token,
            stop_ids: vec![],
            pad_id,
            add_bos,
        };
        t.add_chat_stops();
        Ok(t)
    }

    /// Every id this tokenizer can produce or is told to use (bos, eos, pad, the stops, every
    /// token of its vocabulary, added ones included) must index a row of the model's embedding,
    /// `rows` long: a larger one would fail in the middle of generating, or worse. `origin` is
    /// the tokenizer's file, `embedding` names the table.
    pub(crate) fn check_fits(&self, rows: usize, origin: &str, embedding: &str) -> Result<()> {
        let named = [
            ("bos", self.bos_id),
            ("eos", Some(self.eos_id)),
            ("pad", Some(self.pad_id)),
        ];
        let stops = self.stop_ids.iter().map(|&i| ("stop", Some(i)));
        for (what, id) in named.into_iter().chain(stops) {
            if let Some(id) = id {
                ensure!(
                    (id as usize) < rows,
                    "{origin}: the {what} token id {id} is beyond the {rows} rows of the model's embedding ({embedding}); {FIX}"
                );
            }
        }
        let vocab = self.inner.get_vocab(true);
        if let Some((token, &max)) = vocab.iter().max_by_key(|(_, &id)| id) {
            ensure!(
                (max as usize) < rows,
                "{origin}: the tokenizer's vocabulary ({} tokens) reaches id {max} ({token:?}), beyond the {rows} rows of the model's embedding ({embedding}); {FIX}",
                vocab.len()
            );
        }
        Ok(())
    }

    /// Chat models end a turn with their template's end marker; stop there too.
    fn add_chat_stops(&mut self) {
        for s in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = self.inner.token_to_id(s) {
                if id != self.eos_id {
                    self.stop_ids.push(id);
                }
            }
        }
    }
}

fn has_bos_postprocessor(p: &Path) -> bool {
    std::fs::read_to_string(p)
        .map(|s| s.contains("\"TemplateProcessing\""))
        .unwrap_or(false)
}

/// Build the byte-level BPE tokenizer stored in a GGUF's metadata.
// Long because it builds one tokenizer.json document from the GGUF's metadata, piece by piece in
// the file format's order.
pub(crate) fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Tok> {
    let md = &content.metadata;
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        crate::error::unsupported!(
            "{}: GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\"); \
             use the model's Hugging Face folder or repo id, which ships tokenizer.json",
            path.display()
        );
    }
    // A value of the wrong type is named with the type found, never printed (it may be long).
    let array = |k: &str| -> Result<&Vec<gguf_file::Value>> {
        let v = md
            .get(k)
            .with_context(|| format!("{}: GGUF metadata lacks {k}; {FIX}", path.display()))?;
        v.to_vec().map_err(|_| {
            crate::error::err!(
                "{}: GGUF metadata {k} is a {:?}, expected an array; {FIX}",
                path.display(),
                v.value_type()
            )
        })
    };
    let element = |k: &str, i: usize, v: &gguf_file::Value, want: &str| {
        crate::error::err!(
            "{}: GGUF metadata {k}[{i}] is a {:?}, expected {want}; {FIX}",
            path.display(),
            v.value_type()
        )
    };
    let strings = |k: &str| -> Result<Vec<String>> {
        array(k)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string()
                    .cloned()
                    .map_err(|_| element(k, i, v, "a string"))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(_) => {
            let k = "tokenizer.ggml.token_type";
            array(k)?
                .iter()
                .enumerate()
                .map(|(i, v)| v.to_i32().map_err(|_| element(k, i, v, "an i32")))
                .collect::<Result<_>>()?
        }
        None => vec![1; tokens.len()],
    };
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    // Pre-tokenizers llama.cpp knows by name; the ones here share the GPT-2 byte-level scheme.
    let pre_tokenizer = match pre.as_str() {
        "smollm" | "starcoder" | "refact" => {
            serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]})
        }
        "gpt-2" | "default" | "" => serde_json::json!(
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
        other => crate::error::unsupported!(
            "{}: GGUF pre-tokenizer {other:?} is not supported (known: smollm, starcoder, gpt-2)",
            path.display()
        ),
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let inner: tokenizers::Tokenizer = std::str::FromStr::from_str(&json.to_string())
        .map_err(|e| crate::error::err!("{}: building the tokenizer: {e}", path.display()))?;
    // A special token's id names a token of the vocabulary: its text is what templates write.
    let id = |k: &str| -> Result<Option<u32>> {
        let Some(i) = md.get(k).and_then(|v| v.to_u32().ok()) else {
            return Ok(None);
        };
        ensure!(
            (i as usize) < tokens.len(),
            "{}: GGUF metadata {k} is {i}, beyond the vocabulary's {} tokens (tokenizer.ggml.tokens); {FIX}",
            path.display(),
            tokens.len()
        );
        Ok(Some(i))
    };
    let eos_id = id("tokenizer.ggml.eos_token_id")?.with_context(|| {
        format!(
            "{}: GGUF metadata lacks tokenizer.ggml.eos_token_id; {FIX}",
            path.display()
        )
    })?;
    let bos_id = id("tokenizer.ggml.bos_token_id")?;
    let pad_id = id("tokenizer.ggml.padding_token_id")?.unwrap_or(eos_id);
    let name = |i: Option<u32>| {
        i.and_then(|i| tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    };
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let mut t = Tok {
        inner,
        bos_id,
        bos_token: name(bos_id),
        eos_id,
        eos_token: name(Some(eos_id)),
        stop_ids: vec![],
        pad_id,
        add_bos,
    };
    t.add_chat_stops();
    Ok(t)
}
