//! The recipe: `pipeline.toml`, its `--set KEY=VALUE` overrides, and their validation.
//!
//! Every setting lives in [`Settings`]. Errors name the file, the line and the key, and suggest the
//! nearest valid key for a typo, because a silently ignored setting is the worst kind of bug in a
//! data pipeline.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub scrape: ScrapeSettings,
    pub prompts: PromptSettings,
    pub generate: GenerateSettings,
    pub merge: MergeSettings,
    pub split: SplitSettings,
    pub train: TrainSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeSettings {
    /// Page listing the accepted papers.
    pub url: String,
    /// A saved copy of the page to parse instead of fetching `url` ("" = fetch).
    pub snapshot: String,
    /// CSS selector whose elements' text are the titles.
    pub selector: String,
    pub count: usize,
    pub seed: u64,
    pub timeout_secs: u64,
    pub retries: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Shot {
    pub title: String,
    pub negative: String,
    pub positive: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    Chat,
    Plain,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PromptSettings {
    pub style: PromptStyle,
    pub system: String,
    pub shots: usize,
    pub seed: u64,
    /// Folder holding the minijinja templates, relative to the config file.
    pub templates: String,
    pub pool: Vec<Shot>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSettings {
    /// A Hugging Face repo id, a local model folder, or a .gguf file.
    pub model: String,
    pub revision: String,
    /// "auto" | "cpu" | "cuda"
    pub device: String,
    /// For .gguf models: "auto" | "quantized" | "f32".
    pub weights: String,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
    /// Finished records are flushed to disk every `chunk_size` prompts (the resume granularity).
    pub chunk_size: usize,
    /// Only the first `limit` prompts (0 = all); handy for quick looks.
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MergeSettings {
    /// Reviews shorter than this many characters (after trimming) drop their pair.
    pub min_chars: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SplitSettings {
    pub train: usize,
    pub test: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Train on the split stage's output ("") or on a Parquet file / folder.
    pub dataset: String,
    /// Model to train ("" = generate.model).
    pub model: String,
    pub loss: String,
    pub beta: f64,
    pub label_smoothing: f64,
    pub learning_rate: f64,
    pub lr_scheduler: String,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Keep each layer's input instead of its activations and recompute the layer in the
    /// backward pass (TRL's `gradient_checkpointing`).
    pub gradient_checkpointing: bool,
    pub max_grad_norm: f64,
    pub max_steps: usize,
    pub epochs: usize,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub truncation_mode: String,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub logging_steps: usize,
    pub seed: u64,
    pub device: String,
    pub lora: LoraSettings,
}

pub const SYSTEM_MESSAGE: &str = "You are an experienced researcher and a reviewer of scientific papers. Given a title of the paper, write a review about it in one sentence.";

impl Default for ScrapeSettings {
    fn default() -> Self {
        Self {
            url: "https://neurips.cc/virtual/2023/papers.html".into(),
            snapshot: String::new(),
            selector: r#"a[href^="/virtual/2023/poster/"]"#.into(),
            count: 1100,
            seed: 42,
            timeout_secs: 30,
            retries: 3,
        }
    }
}

pub fn default_pool() -> Vec<Shot> {
    let s = |t: &str, n: &str, p: &str| Shot {
        title: t.into(),
        negative: n.into(),
        positive: p.into(),
    };
    vec![
        s(
            "FR-NAS: Forward-and-Reverse Graph Predictor for Efficient Neural Architecture Search",
            "The paper is poorly written and irrelevant. It's not interesting at all.",
            "The paper is well written, relevant and interesting.",
        ),
        s(
            "A novel genetic system to detect protein–protein interactions",
            "The proposed method has serious technical flaws and is not properly evaluated.",
            "The proposed method achieves state-of-the-art in multiple benchmarks.",
        ),
        s(
            "Quantum X-entropy in generalized quantum evidence theory",
            "The paper only provides theoretical results and lacks in experimental validation.",
            "The paper provides theoretical explanations and also rigorous experimental results.",
        ),
        s(
            "Proving Test Set Contamination in Black-Box Language Models",
            "The approach lacks in novelty and doesn't actually work for blackbox LLMs.",
            "The approach is novel and well defined and does work for blackbox LLMs.",
        ),
    ]
}

impl Default for PromptSettings {
    fn default() -> Self {
        Self {
            style: PromptStyle::Chat,
            system: SYSTEM_MESSAGE.into(),
            shots: 3,
            seed: 7,
            templates: "templates".into(),
            pool: default_pool(),
        }
    }
}

impl Default for GenerateSettings {
    fn default() -> Self {
        Self {
            model: "TinyLlama/TinyLlama-1.1B-Chat-v1.0".into(),
            revision: "main".into(),
            device: "auto".into(),
            weights: "auto".into(),
            batch_size: 16,
            max_new_tokens: 64,
            temperature: 0.5,
            top_k: 50,
            top_p: 0.95,
            seed: 1234,
            chunk_size: 64,
            limit: 0,
        }
    }
}

impl Default for MergeSettings {
    fn default() -> Self {
        Self { min_chars: 1 }
    }
}

impl Default for SplitSettings {
    fn default() -> Self {
        Self {
            train: 1000,
            test: 100,
            seed: 42,
        }
    }
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
        }
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            dataset: String::new(),
            model: String::new(),
            loss: "sigmoid".into(),
            beta: 0.1,
            label_smoothing: 0.0,
            learning_rate: 5e-4,
            lr_scheduler: "cosine".into(),
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            batch_size: 10,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: true,
            max_grad_norm: 1.0,
            max_steps: 2000,
            epochs: 0,
            max_length: 384,
            max_prompt_length: 256,
            truncation_mode: "keep_end".into(),
            eval_steps: 100,
            save_steps: 100,
            logging_steps: 10,
            seed: 42,
            device: "auto".into(),
            lora: LoraSettings::default(),
        }
    }
}

/// Settings plus where they came from, so later errors can point at a line.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub file: PathBuf,
    /// Folder of the config file: relative paths in the config resolve against it.
    pub base_dir: PathBuf,
    /// dotted key -> 1-based line in `file`.
    lines: BTreeMap<String, usize>,
    overridden: Vec<String>,
}

impl Loaded {
    /// Where a key was set, for error messages: `pipeline.toml:12` or `--set`.
    pub fn origin(&self, key: &str) -> String {
        if self.overridden.iter().any(|k| k == key) {
            return format!("--set {key}");
        }
        match self.lines.get(key) {
            Some(l) => format!("{}:{l}", self.file.display()),
            None => format!("{} (default for {key})", self.file.display()),
        }
    }

    /// Resolve a path setting relative to the config file's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// All dotted keys the schema knows (array-of-table entries as `prompts.pool.title` etc.).
pub fn known_keys() -> Vec<String> {
    let v = toml::Value::try_from(Settings::default()).expect("defaults serialize");
    let mut out = Vec::new();
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.push(key.clone());
                    walk(&key, v, out);
                }
            }
            toml::Value::Array(a) => {
                if let Some(first @ toml::Value::Table(_)) = a.first() {
                    walk(prefix, first, out);
                }
            }
            _ => {}
        }
    }
    walk("", &v, &mut out);
    out
}

fn suggest(key: &str, known: &[String]) -> String {
    let best = known
        .iter()
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, k)) if score > 0.75 => format!("; did you mean `{k}`?"),
        _ => String::new(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Walk the document: record each key's line and reject unknown keys with a suggestion.
fn check_keys(
    text: &str,
    file: &Path,
    table: &toml_edit::Table,
    prefix: &str,
    known: &[String],
    lines: &mut BTreeMap<String, usize>,
) -> Result<()> {
    for (k, item) in table.iter() {
        let key = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        let line = table
            .key(k)
            .and_then(|kk| kk.span())
            .map(|s| line_of(text, s.start))
            .unwrap_or(0);
        if !known.contains(&key) {
            bail!(
                "{}:{line}: unknown key `{key}`{}",
                file.display(),
                suggest(&key, known)
            );
        }
        lines.insert(key.clone(), line);
        match item {
            toml_edit::Item::Table(t) => check_keys(text, file, t, &key, known, lines)?,
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                let t = t.clone().into_table();
                check_keys(text, file, &t, &key, known, lines)?
            }
            toml_edit::Item::ArrayOfTables(a) => {
                for t in a.iter() {
                    check_keys(text, file, t, &key, known, lines)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Load a config file (missing file = an error, unless it is the default name and absent, which
/// means "all defaults") and apply `--set` overrides.
pub fn load(file: &Path, overrides: &[String], must_exist: bool) -> Result<Loaded> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => String::new(),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot read config {}: pass --config FILE or create it",
                    file.display()
                )
            })
        }
    };
    let known = known_keys();
    let doc = toml_edit::ImDocument::parse(text.as_str())
        .map_err(|e| anyhow::anyhow!("{}: invalid TOML: {e}", file.display()))?;
    let mut lines = BTreeMap::new();
    check_keys(&text, file, doc.as_table(), "", &known, &mut lines)?;

    // Typed parse of the file alone, so a wrong type is reported against its line.
    let mut value: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.to_string().trim_end()))?;
    let _: Settings = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(0);
        anyhow::anyhow!("{}:{line}: {}", file.display(), e.message())
    })?;

    let mut overridden = Vec::new();
    for ov in overrides {
        let (key, raw) = ov
            .split_once('=')
            .with_context(|| format!("--set {ov}: expected KEY=VALUE, e.g. --set split.seed=7"))?;
        let key = key.trim();
        if !known.iter().any(|k| k == key) {
            bail!("--set {key}: unknown key{}", suggest(key, &known));
        }
        let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").unwrap(),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        set_dotted(&mut value, key, parsed);
        overridden.push(key.to_string());
        // Check after each override so a wrong type is reported against the key that caused it.
        toml::Value::Table(value.clone())
            .try_into::<Settings>()
            .map_err(|e| anyhow::anyhow!("--set {ov}: {}", e.message()))?;
    }
    let settings: Settings = toml::Value::Table(value)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("--set: {}", e.message()))?;
    let base_dir = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let loaded = Loaded {
        settings,
        file: file.to_path_buf(),
        base_dir,
        lines,
        overridden,
    };
    validate(&loaded)?;
    Ok(loaded)
}

fn set_dotted(t: &mut toml::Table, key: &str, v: toml::Value) {
    let mut parts = key.split('.').peekable();
    let mut cur = t;
    while let Some(p) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(p.to_string(), v);
            return;
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if !entry.is_table() {
            *entry = toml::Value::Table(Default::default());
        }
        cur = entry.as_table_mut().unwrap();
    }
}

/// Impossible values, each reported with where it was set and what would be valid.
pub fn validate(l: &Loaded) -> Result<()> {
    let s = &l.settings;
    let err = |key: &str, msg: String| -> Result<()> { bail!("{}: {key}: {msg}", l.origin(key)) };
    if s.scrape.count == 0 {
        err("scrape.count", "must be at least 1".into())?;
    }
    if s.scrape.selector.trim().is_empty() {
        err("scrape.selector", "must not be empty".into())?;
    }
    if s.scrape.url.is_empty() && s.scrape.snapshot.is_empty() {
        err("scrape.url", "set scrape.url or scrape.snapshot".into())?;
    }
    if s.prompts.pool.is_empty() {
        err("prompts.pool", "needs at least one few-shot example".into())?;
    }
    if s.prompts.shots > s.prompts.pool.len() {
        err(
            "prompts.shots",
            format!(
                "is {} but the pool holds only {} examples",
                s.prompts.shots,
                s.prompts.pool.len()
            ),
        )?;
    }
    let g = &s.generate;
    if g.model.trim().is_empty() {
        err(
            "generate.model",
            "must name a Hub repo id, a folder or a .gguf file".into(),
        )?;
    }
    if !["auto", "cpu", "cuda"].contains(&g.device.as_str()) {
        err(
            "generate.device",
            format!("is {:?}; use \"auto\", \"cpu\" or \"cuda\"", g.device),
        )?;
    }
    if !["auto", "quantized", "f32"].contains(&g.weights.as_str()) {
        err(
            "generate.weights",
            format!("is {:?}; use \"auto\", \"quantized\" or \"f32\"", g.weights),
        )?;
    }
    if g.batch_size == 0 {
        err("generate.batch_size", "must be at least 1".into())?;
    }
    if g.chunk_size == 0 {
        err("generate.chunk_size", "must be at least 1".into())?;
    }
    if g.max_new_tokens == 0 {
        err("generate.max_new_tokens", "must be at least 1".into())?;
    }
    if !(g.temperature >= 0.0 && g.temperature.is_finite()) {
        err("generate.temperature", "must be >= 0 (0 = greedy)".into())?;
    }
    if !(g.top_p > 0.0 && g.top_p <= 1.0) {
        err(
            "generate.top_p",
            format!("is {}; must be in (0, 1]", g.top_p),
        )?;
    }
    if s.split.train + s.split.test == 0 {
        err("split.train", "train + test must be at least 1".into())?;
    }
    if s.split.train + s.split.test > s.scrape.count {
        err(
            "split.train",
            format!(
                "train {} + test {} exceeds scrape.count {}: there are not enough titles",
                s.split.train, s.split.test, s.scrape.count
            ),
        )?;
    }
    crate::dpo::config::validate(l)?;
    Ok(())
}
