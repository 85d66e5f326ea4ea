//! Where a model comes from: a Hugging Face repo id (hf-hub's cache, then download), a local
//! folder, or a .gguf file. Also the model's identity (what cache keys depend on) and its chat
//! facts, both cheap to get without loading weights.

use super::chat::ChatTemplate;
use super::config::LlamaConfig;
use super::tokenizer::{self, Tok};
use crate::fsutil::sha256_hex;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum ModelFiles {
    Gguf(PathBuf),
    Hf {
        dir: PathBuf,
        config: PathBuf,
        tokenizer: PathBuf,
        tokenizer_config: Option<PathBuf>,
        weights: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct ModelSource {
    pub spec: String,
    pub files: ModelFiles,
    /// Stable identity: changes when the weights or tokenizer change.
    pub identity: String,
}

impl ModelSource {
    pub fn is_gguf(&self) -> bool {
        matches!(self.files, ModelFiles::Gguf(_))
    }
}

/// Resolve `generate.model`.
pub fn resolve(spec: &str, revision: &str) -> Result<ModelSource> {
    let p = Path::new(spec);
    if p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        if !p.is_file() {
            bail!(
                "model file {spec} does not exist; run scripts/fetch-model.sh for the SmolLM2 test model, or fix generate.model"
            );
        }
        return Ok(ModelSource {
            spec: spec.into(),
            identity: format!("gguf:{}:{}", file_name(p), quick_hash(p)?),
            files: ModelFiles::Gguf(p.to_path_buf()),
        });
    }
    if p.is_dir() {
        return from_folder(spec, p);
    }
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
        return from_hub(spec, revision);
    }
    bail!("generate.model {spec:?} is neither a .gguf file, a model folder, nor a Hub repo id (owner/name)")
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Size plus the hash of the first and last 4 MiB: catches a changed or truncated file without
/// reading gigabytes on every `pipeline status`.
fn quick_hash(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let len = f.metadata()?.len();
    let n = 4 << 20;
    let mut buf = Vec::new();
    buf.extend_from_slice(&len.to_le_bytes());
    let mut head = vec![0u8; n.min(len as usize)];
    f.read_exact(&mut head)?;
    buf.extend_from_slice(&head);
    if len as usize > n {
        f.seek(SeekFrom::Start(len.saturating_sub(n as u64)))?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail)?;
        buf.extend_from_slice(&tail);
    }
    Ok(sha256_hex(&buf)[..16].to_string())
}

fn from_folder(spec: &str, dir: &Path) -> Result<ModelSource> {
    let need = |n: &str| -> Result<PathBuf> {
        let f = dir.join(n);
        if f.is_file() {
            Ok(f)
        } else {
            bail!("model folder {} has no {n}", dir.display())
        }
    };
    let config = need("config.json")?;
    let tokenizer = need("tokenizer.json")?;
    let tcfg = dir.join("tokenizer_config.json");
    let weights = weight_files(dir)?;
    let mut id = Vec::new();
    for f in [&config, &tokenizer].into_iter().chain(weights.iter()) {
        id.extend_from_slice(quick_hash(f)?.as_bytes());
    }
    if tcfg.is_file() {
        id.extend_from_slice(quick_hash(&tcfg)?.as_bytes());
    }
    Ok(ModelSource {
        spec: spec.into(),
        identity: format!("folder:{}:{}", file_name(dir), &sha256_hex(&id)[..16]),
        files: ModelFiles::Hf {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            tokenizer_config: tcfg.is_file().then_some(tcfg),
            weights,
        },
    })
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return files
            .into_iter()
            .map(|f| {
                let p = dir.join(&f);
                if p.is_file() {
                    Ok(p)
                } else {
                    bail!("{} names shard {f}, which is missing", index.display())
                }
            })
            .collect();
    }
    bail!(
        "model folder {} has neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )
}

/// A Hub repo id: the standard cache (HF_HOME) first, then a download unless HF_HUB_OFFLINE is set.
fn from_hub(repo_id: &str, revision: &str) -> Result<ModelSource> {
    let cache = hf_hub::Cache::from_env();
    let repo =
        hf_hub::Repo::with_revision(repo_id.into(), hf_hub::RepoType::Model, revision.into());
    let cached = cache.repo(repo.clone());
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    let fetch = |name: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(name) {
            return Ok(Some(p));
        }
        if offline {
            return Ok(None);
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
            .with_progress(false)
            .build()?;
        match api.repo(repo.clone()).get(name) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => {
                Ok(None)
            }
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    };
    let hint = || {
        format!(
            "model {repo_id}@{revision} is not in the Hugging Face cache ({}) {}; download it there, set HF_HOME, or point generate.model at a local folder or .gguf file",
            cache.path().display(),
            if offline { "and HF_HUB_OFFLINE is set" } else { "and could not be downloaded" }
        )
    };
    let config = fetch("config.json")
        .with_context(hint)?
        .with_context(hint)?;
    let dir = config.parent().unwrap().to_path_buf();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        fetch(f).with_context(hint)?;
    }
    if !dir.join("model.safetensors").is_file() {
        match fetch("model.safetensors.index.json").with_context(hint)? {
            Some(idx) => {
                let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&idx)?)?;
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| {
                        m.values()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                for s in shards {
                    fetch(&s).with_context(hint)?;
                }
            }
            None => {
                fetch("model.safetensors").with_context(hint)?;
            }
        }
    }
    let mut src = from_folder(repo_id, &dir)?;
    // The snapshot folder is named by the commit: the best identity a Hub model has.
    src.identity = format!("hub:{repo_id}@{}", file_name(&dir));
    Ok(src)
}

/// Model facts needed before any weight is loaded: config, tokenizer, chat template.
pub struct ModelMeta {
    pub config: LlamaConfig,
    pub tok: Tok,
    pub chat: Option<ChatTemplate>,
}

pub fn load_meta(src: &ModelSource) -> Result<ModelMeta> {
    match &src.files {
        ModelFiles::Gguf(p) => {
            let mut f = std::fs::File::open(p)?;
            let content = gguf_file::Content::read(&mut f)
                .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", p.display()))?;
            meta_from_gguf(&content, p)
        }
        ModelFiles::Hf {
            config,
            tokenizer,
            tokenizer_config,
            ..
        } => {
            let cfg = LlamaConfig::from_hf_json(config)?;
            let tcfg: serde_json::Value = match tokenizer_config {
                Some(p) => serde_json::from_slice(&std::fs::read(p)?)
                    .with_context(|| format!("{}: invalid JSON", p.display()))?,
                None => serde_json::json!({}),
            };
            let tok = Tok::from_hf(tokenizer, &tcfg)?;
            let chat = match tcfg.get("chat_template") {
                Some(serde_json::Value::String(t)) => Some(
                    ChatTemplate::new(
                        t,
                        &tok.bos_token,
                        &tok.eos_token,
                        &tokenizer_config.as_ref().unwrap().display().to_string(),
                    )?
                    .with_special_texts(crate::special_text::special_texts(&tok)),
                ),
                _ => None,
            };
            Ok(ModelMeta {
                config: cfg,
                tok,
                chat,
            })
        }
    }
}

pub fn meta_from_gguf(content: &gguf_file::Content, p: &Path) -> Result<ModelMeta> {
    let config = LlamaConfig::from_gguf(content, p)?;
    let tok = tokenizer::from_gguf(content, p)?;
    let chat = match content.metadata.get("tokenizer.chat_template") {
        Some(v) => Some(
            ChatTemplate::new(
                v.to_string()?,
                &tok.bos_token,
                &tok.eos_token,
                &format!("{} (tokenizer.chat_template)", p.display()),
            )?
            .with_special_texts(crate::special_text::special_texts(&tok)),
        ),
        None => None,
    };
    Ok(ModelMeta { config, tok, chat })
}
