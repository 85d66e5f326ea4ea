//! Where a model comes from: a Hugging Face repo id (hf-hub's cache, then download), a local
//! folder, or a .gguf file. Also the model's identity (what cache keys depend on) and its chat
//! facts, both cheap to get without loading weights.

use super::chat::ChatTemplate;
use super::tokenizer::{self, Tok};
use crate::error::{bail, Context, Result};
use crate::fsutil::sha256_hex;
use crate::model::config::LlamaConfig;
use crate::retry::{Failure, GiveUp};
use candle_core::quantized::gguf_file;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub(crate) enum ModelFiles {
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
    pub(crate) spec: String,
    pub(crate) files: ModelFiles,
    /// Stable identity: changes when the weights or tokenizer change.
    pub identity: String,
}

/// How to reach the Hugging Face Hub, read from the environment once by the recipe
/// (`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`) so the engine reads none of it.
#[derive(Clone)]
pub struct HubAccess {
    pub cache_dir: PathBuf,
    pub endpoint: Option<String>,
    /// Never printed or written anywhere.
    pub token: Option<String>,
    /// Use the cache only: `HF_HUB_OFFLINE`, and `pipeline status`, which never downloads.
    pub offline: bool,
}

impl std::fmt::Debug for HubAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubAccess")
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubAccess {
    pub(crate) fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            cache_dir: hf_hub::Cache::from_env().path().clone(),
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
            offline: var("HF_HUB_OFFLINE")
                .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        }
    }
}

/// What a model setting names, decided from the text and the filesystem alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    Gguf(PathBuf),
    Folder(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSpec {
    /// `spec` as written in the recipe; a path-like spec resolves against `base`.
    pub(crate) fn parse(spec: &str, revision: &str, base: &Path) -> Result<Self> {
        let p = base.join(spec);
        if spec.to_ascii_lowercase().ends_with(".gguf") {
            return Ok(ModelSpec::Gguf(p));
        }
        let path_like = spec.starts_with('.') || Path::new(spec).is_absolute() || p.exists();
        if path_like {
            return Ok(ModelSpec::Folder(p));
        }
        if spec.split('/').count() == 2 && spec.split('/').all(|s| !s.is_empty()) {
            return Ok(ModelSpec::Hub {
                repo: spec.into(),
                revision: revision.into(),
            });
        }
        bail!("{spec:?} is neither a .gguf file, a model folder, nor a Hub repo id (owner/name)")
    }
}

/// A model named as a recipe names it (a `.gguf` file, a folder, or a Hub id), found with the
/// environment's Hub access, for callers without a recipe (tools, tests).
pub fn resolve(spec: &str, revision: &str) -> Result<ModelSource> {
    resolve_spec(
        &ModelSpec::parse(spec, revision, Path::new(""))?,
        &HubAccess::from_env(),
        &FingerprintMemo::new(None),
    )
}

/// Find the model's files: a path as it is, a Hub id in the cache, downloaded unless offline.
/// `memo` remembers whole-file hashes by path, size and mtime, so a file is hashed once.
pub fn resolve_spec(
    spec: &ModelSpec,
    hub: &HubAccess,
    memo: &FingerprintMemo,
) -> Result<ModelSource> {
    match spec {
        ModelSpec::Gguf(p) => {
            if !p.is_file() {
                bail!(
                    "model file {} does not exist; run scripts/setup.sh (it fetches the SmolLM2 test model), or fix the model setting",
                    p.display()
                );
            }
            Ok(ModelSource {
                spec: p.display().to_string(),
                identity: format!("gguf:{}:{}", file_name(p), memo.hash(p)?),
                files: ModelFiles::Gguf(p.to_path_buf()),
            })
        }
        ModelSpec::Folder(dir) => {
            if !dir.is_dir() {
                bail!("model folder {} does not exist", dir.display());
            }
            from_folder(&dir.display().to_string(), dir, memo)
        }
        ModelSpec::Hub { repo, revision } => from_hub(repo, revision, hub, memo),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whole-file SHA-256 fingerprints, remembered in a JSON file by (path, size, mtime): a model
/// is read once, and any change to its bytes that touches its size or mtime is seen.
#[derive(Debug, Clone)]
pub struct FingerprintMemo {
    file: Option<PathBuf>,
}

impl FingerprintMemo {
    /// `None`: hash every time (tests, one-off tools).
    pub fn new(file: Option<PathBuf>) -> Self {
        Self { file }
    }

    fn load(&self) -> std::collections::BTreeMap<String, String> {
        self.file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn hash(&self, p: &Path) -> Result<String> {
        let md = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        let mtime = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let key = format!("{}|{}|{mtime}", abs.display(), md.len());
        let mut memo = self.load();
        if let Some(h) = memo.get(&key) {
            return Ok(h.clone());
        }
        let h = crate::fsutil::sha256_file(p)?[..16].to_string();
        if let Some(f) = &self.file {
            memo.insert(key, h.clone());
            // A lost update only costs a rehash later, so no lock is needed.
            crate::fsutil::write_json_pretty(f, &memo)?;
        }
        Ok(h)
    }
}

fn from_folder(spec: &str, dir: &Path, memo: &FingerprintMemo) -> Result<ModelSource> {
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
        id.extend_from_slice(memo.hash(f)?.as_bytes());
    }
    if tcfg.is_file() {
        id.extend_from_slice(memo.hash(&tcfg)?.as_bytes());
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

/// A Hub repo id: the cache first, then a download unless offline.
// Long because each file's fallbacks (cache, offline, download, the error naming what to do)
// read best in one place.
fn from_hub(
    repo_id: &str,
    revision: &str,
    hub: &HubAccess,
    memo: &FingerprintMemo,
) -> Result<ModelSource> {
    let cache = hf_hub::Cache::new(hub.cache_dir.clone());
    let repo =
        hf_hub::Repo::with_revision(repo_id.into(), hf_hub::RepoType::Model, revision.into());
    let cached = cache.repo(repo.clone());
    let offline = hub.offline;
    let endpoint = hub.endpoint.as_deref().unwrap_or("https://huggingface.co");
    let fetch = |name: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(name) {
            return Ok(Some(p));
        }
        if offline {
            return Ok(None);
        }
        let mut api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
            .with_token(hub.token.clone())
            .with_progress(false);
        if let Some(e) = &hub.endpoint {
            api = api.with_endpoint(e.clone());
        }
        let api = api.build()?;
        // hf-hub 0.4.3 does not retry by default (its `with_retries` covers only the body, not
        // the metadata request) and never checks a download against its etag. So each file gets
        // HUB_ATTEMPTS tries with backoff on transient faults (5xx, a cut connection, a body
        // that fails its hash), and `check_lfs_hash` deletes a file whose SHA-256 differs from
        // the one the Hub announced. A body cut short stays as hf-hub's `blobs/<etag>.part`
        // (never at the final name), and the next try resumes it with a Range request.
        let policy = crate::retry::Policy::new(HUB_ATTEMPTS - 1);
        let what = format!("downloading {name} from {repo_id}@{revision}");
        let r = policy.run(&what, &|| false, |_| {
            match api.repo(repo.clone()).get(name) {
                Ok(p) => match check_lfs_hash(&p) {
                    Ok(()) => Ok(Some(p)),
                    Err(why) => Err(Failure::retry(why)),
                },
                Err(e) => match http_status(&e.to_string()) {
                    Some(404) => Ok(None),
                    Some(s) if (400..500).contains(&s) => Err(Failure::from_status(
                        s,
                        format!("{repo_id}@{revision}: {name}: {e}"),
                        None,
                    )),
                    status => Err(Failure::Retry {
                        why: e.to_string(),
                        after: None,
                        status,
                    }),
                },
            }
        });
        let remote = |status, message| crate::error::Error::Remote {
            endpoint: endpoint.to_string(),
            status,
            message,
        };
        match r {
            Ok((found, _)) => Ok(found),
            Err(GiveUp::Fatal(f)) => Err(remote(f.status(), f.why().to_string())),
            Err(GiveUp::Exhausted { last, .. }) => Err(remote(
                last.status(),
                format!(
                    "could not download {name} of the Hub repo {repo_id}@{revision} from {endpoint} in {HUB_ATTEMPTS} tries (last: {}); check the connection or the Hub's status and run again (what was downloaded stays in the cache and a cut file resumes)",
                    last.why()
                ),
            )),
            Err(GiveUp::Stopped) => Err(remote(None, format!("{what}: stopped"))),
        }
    };
    let hint = || {
        format!(
            "model {repo_id}@{revision} is not in the Hugging Face cache ({}) {}; download it there, set HF_HOME, or point generate.model at a local folder or .gguf file",
            cache.path().display(),
            if offline { "and downloads are off (HF_HUB_OFFLINE, or `pipeline status`)" } else { "and could not be downloaded" }
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
    let mut src = from_folder(repo_id, &dir, memo)?;
    // The snapshot folder is named by the commit: the best identity a Hub model has.
    src.identity = format!("hub:{repo_id}@{}", file_name(&dir));
    Ok(src)
}

/// Tries per file downloaded from the Hub (waits of 0.5, 1 and 2 s between them).
const HUB_ATTEMPTS: u32 = 4;

/// The HTTP status in an hf-hub (ureq) error's text, "<url>: status code 503" (ureq is not a
/// direct dependency, so its error type cannot be matched).
fn http_status(err: &str) -> Option<u16> {
    let (_, rest) = err.rsplit_once("status code ")?;
    rest.get(..3)?.parse().ok()
}

/// An LFS file's blob is named by its etag, the SHA-256 of its content (a small git file's etag
/// is a git SHA-1, not checked). On a mismatch the blob, its snapshot link and any partial
/// download are deleted, so the next try (or run) downloads it afresh.
fn check_lfs_hash(pointer: &Path) -> std::result::Result<(), String> {
    let blob = match std::fs::read_link(pointer) {
        Ok(t) => pointer.parent().unwrap().join(t),
        Err(_) => return Ok(()), // not a link (hf-hub renames where symlinks fail): no etag
    };
    let etag = file_name(&blob);
    if etag.len() != 64 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let got = crate::fsutil::sha256_file(&blob).map_err(|e| format!("{e:#}"))?;
    if got.eq_ignore_ascii_case(&etag) {
        return Ok(());
    }
    for f in [pointer.to_path_buf(), blob.with_extension("part"), blob] {
        std::fs::remove_file(&f).ok();
    }
    Err(format!(
        "{}: the downloaded file's SHA-256 is {got} but the Hub announced {etag} (its etag); the file was deleted",
        file_name(pointer)
    ))
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
            let (content, _) = super::gguf::open(p)?;
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
            tok.check_fits(
                cfg.vocab_size,
                &tokenizer.display().to_string(),
                &format!(
                    "{}, vocab_size {} in {}",
                    crate::model::names::EMBED_TOKENS,
                    cfg.vocab_size,
                    config.display()
                ),
            )?;
            let chat = match tcfg.get("chat_template") {
                Some(serde_json::Value::String(t)) => Some(
                    ChatTemplate::new(
                        t,
                        &tok.bos_token,
                        &tok.eos_token,
                        &tokenizer_config.as_ref().unwrap().display().to_string(),
                    )?
                    .with_special_texts(crate::model::load::special_text::special_texts(&tok)),
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

pub(crate) fn meta_from_gguf(content: &gguf_file::Content, p: &Path) -> Result<ModelMeta> {
    let config = LlamaConfig::from_gguf(content, p)?;
    super::gguf::check_tensors(content, &config, p)?;
    let tok = tokenizer::from_gguf(content, p)?;
    tok.check_fits(
        config.vocab_size,
        &p.display().to_string(),
        crate::model::names::gguf::TOKEN_EMBD,
    )?;
    let chat = match content.metadata.get("tokenizer.chat_template") {
        Some(v) => Some(
            ChatTemplate::new(
                v.to_string().map_err(|_| {
                    crate::error::err!(
                        "{}: GGUF metadata tokenizer.chat_template is a {:?}, expected a string; {}",
                        p.display(),
                        v.value_type(),
                        crate::model::config::FIX
                    )
                })?,
                &tok.bos_token,
                &tok.eos_token,
                &format!("{} (tokenizer.chat_template)", p.display()),
            )?
            .with_special_texts(crate::model::load::special_text::special_texts(&tok)),
        ),
        None => None,
    };
    Ok(ModelMeta { config, tok, chat })
}
