//! The recipe: `pipeline.toml`, a named preset, `--set KEY=VALUE` overrides, and their validation.
//!
//! Every setting lives in [`Settings`], typed: a setting with a fixed set of values is an enum, so
//! an unknown value is refused here, with the valid choices, and never compared as a string later.
//! Layers apply in this order, each overriding the one before: built-in defaults, the config file,
//! the preset (`--preset NAME`), then each `--set` in command-line order. Errors name the file and
//! line (or the preset, or the `--set`), the key, and suggest the nearest valid key for a typo,
//! because a silently ignored setting is the worst kind of bug in a data pipeline.

pub use crate::dpo::config::TrainSettings;
use crate::model::{AttentionChoice, DTypeChoice, DeviceChoice, WeightsChoice};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::error::ConfigError;

type Result<T, E = ConfigError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub scrape: ScrapeSettings,
    pub(crate) prompts: PromptSettings,
    pub generate: GenerateSettings,
    pub(crate) merge: MergeSettings,
    pub split: SplitSettings,
    pub train: TrainSettings,
    pub(crate) eval: EvalSettings,
    pub(crate) judge: JudgeSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeSettings {
    /// Page listing the accepted papers.
    pub(crate) url: String,
    /// A saved copy of the page to parse instead of fetching `url` ("" = fetch; "bundled" = the
    /// compact NeurIPS 2023 snapshot shipped in the binary).
    pub snapshot: String,
    /// When `url` cannot be fetched, use the bundled NeurIPS 2023 snapshot (with a warning).
    pub(crate) fallback: bool,
    /// CSS selector whose elements' text are the titles.
    pub(crate) selector: String,
    pub count: usize,
    pub(crate) seed: u64,
    pub(crate) timeout_secs: u64,
    pub(crate) retries: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Shot {
    pub(crate) title: String,
    pub negative: String,
    pub positive: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PromptStyle {
    Chat,
    Plain,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PromptSettings {
    pub(crate) style: PromptStyle,
    pub(crate) system: String,
    pub(crate) shots: usize,
    pub(crate) seed: u64,
    /// Folder holding the minijinja templates, relative to the config file.
    pub(crate) templates: String,
    pub(crate) pool: Vec<Shot>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSettings {
    /// A Hugging Face repo id, a local model folder, or a .gguf file.
    pub model: String,
    pub(crate) revision: String,
    pub(crate) device: DeviceChoice,
    /// For .gguf models: how the weights are held.
    pub(crate) weights: WeightsChoice,
    /// Which attention implementation runs (results differ in the last bits).
    pub(crate) attention: AttentionChoice,
    /// What the weights are computed in (`auto`: bf16 on a GPU, f32 on the CPU).
    pub(crate) dtype: DTypeChoice,
    /// Prefill a batch's shared prompt prefixes once (results differ in the last bits).
    pub(crate) prefix_sharing: bool,
    pub(crate) batch_size: usize,
    pub(crate) max_new_tokens: usize,
    pub temperature: f64,
    pub(crate) top_k: usize,
    pub(crate) top_p: f64,
    pub(crate) seed: u64,
    /// Finished records are flushed to disk every `chunk_size` prompts (the resume granularity).
    pub(crate) chunk_size: usize,
    /// Only the first `limit` prompts (0 = all); handy for quick looks.
    pub(crate) limit: usize,
    /// Where the reviews are written: `local` (this binary's engine) or `openai` (servers that
    /// speak the OpenAI HTTP API: vLLM, TGI, SGLang, llama.cpp; see `[generate.openai]`).
    pub(crate) backend: Backend,
    pub(crate) openai: OpenAiSettings,
}

/// Which engine writes the generate stage's reviews.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Backend {
    Local,
    Openai,
}

/// Which OpenAI endpoint the `openai` backend calls.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OpenAiApi {
    /// `POST /completions` with the prompt text the local engine would tokenize (the prompts
    /// stage already rendered the model's chat template), so both backends answer the same text.
    Completions,
    /// `POST /chat/completions` with the messages, for servers that only take chat; the server
    /// applies its own chat template.
    Chat,
}

impl OpenAiApi {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpenAiApi::Completions => "completions",
            OpenAiApi::Chat => "chat",
        }
    }
}

/// `[generate.openai]`: the servers the `openai` backend spreads requests over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OpenAiSettings {
    /// Base URLs, each ending where the OpenAI paths start (`http://10.0.0.5:8000/v1`).
    pub(crate) endpoints: Vec<String>,
    /// The served model's name, as the servers' `GET /v1/models` lists it.
    pub(crate) model: String,
    pub(crate) api: OpenAiApi,
    /// The name of the environment variable holding the API key ("" = send none). The key itself
    /// is never printed, logged, or written into a manifest or cache key.
    pub(crate) api_key_env: String,
    /// Requests in flight per endpoint.
    pub(crate) concurrency: usize,
    /// Per request, connect to last byte.
    pub(crate) timeout_secs: u64,
    /// Retries of one prompt after a connect error, a timeout, 408, 429 or 5xx.
    pub(crate) max_retries: u32,
    /// Send `top_k` (vLLM, TGI, SGLang and llama.cpp take it; api.openai.com refuses it).
    pub(crate) send_top_k: bool,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            model: String::new(),
            api: OpenAiApi::Completions,
            api_key_env: String::new(),
            concurrency: 8,
            timeout_secs: 300,
            max_retries: 6,
            send_top_k: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MergeSettings {
    /// Reviews shorter than this many characters (after trimming) drop their pair.
    pub(crate) min_chars: usize,
    /// Check each pair's labels with a judge: a pair whose chosen review is not judged more
    /// negative than its rejected one by `min_margin` is dropped (kept in rejected_pairs.jsonl).
    pub(crate) judge: JudgeKind,
    pub(crate) min_margin: f64,
}

/// Which judge scores a review's negativity (`crate::judge`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JudgeKind {
    Off,
    /// VADER's lexicon and rules: the negated compound score, in [-1, 1].
    Lexicon,
    /// P(negative) from a model's next-token log-probabilities after a judge prompt, in [0, 1].
    Llm,
}

impl JudgeKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            JudgeKind::Off => "off",
            JudgeKind::Lexicon => "lexicon",
            JudgeKind::Llm => "llm",
        }
    }
}

/// The LLM judge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JudgeSettings {
    /// The model that judges ("" = generate.model).
    pub(crate) model: String,
    /// The question, sent as the user turn through the model's chat template; `{review}` is
    /// replaced by the review. The answer is read from the next token's log-probabilities.
    pub(crate) question: String,
    /// The start of the answer (after the assistant turn opens); the verdict is the next word.
    pub(crate) answer_prefix: String,
    /// The two verdict words, read as the first token of " word".
    pub(crate) negative: String,
    pub(crate) positive: String,
    pub(crate) batch_size: usize,
}

impl Default for JudgeSettings {
    fn default() -> Self {
        Self {
            model: String::new(),
            question: "Here is a review of a scientific paper:\n\n\"{review}\"\n\nIs this review negative or positive? Answer with one word.".into(),
            answer_prefix: "The review is".into(),
            negative: "negative".into(),
            positive: "positive".into(),
            batch_size: 16,
        }
    }
}

/// The eval stage: base model against the trained adapter on held-out titles.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct EvalSettings {
    pub(crate) judge: JudgeKind,
    /// 0 = the test split's titles; N = N titles drawn (with `seed`) from the scraped page that
    /// are in neither split.
    pub(crate) titles: usize,
    /// Reviews per title and model; sample k of a title has the same seed for both models.
    pub(crate) samples: usize,
    pub(crate) seed: u64,
    /// Who writes the reviews: `local` (this binary's engine, the adapter attached to the base)
    /// or `openai` (the `[generate.openai]` servers, which must serve the base model and the
    /// adapter under evaluation as `served_base` and `served_adapter`). The eval loss and the
    /// judge run here either way.
    pub(crate) backend: Backend,
    /// With `backend = "openai"`: the served names of the base model and of the adapter (vLLM:
    /// `--enable-lora --lora-modules reviewer2=DIR`).
    pub(crate) served_base: String,
    pub(crate) served_adapter: String,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            judge: JudgeKind::Lexicon,
            titles: 0,
            samples: 2,
            seed: 2024,
            backend: Backend::Local,
            served_base: String::new(),
            served_adapter: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SplitSettings {
    pub train: usize,
    pub test: usize,
    pub(crate) seed: u64,
    /// When merge kept fewer pairs than train + test: false refuses with the count; true takes
    /// what survived, shrinking both sides in proportion.
    pub(crate) shrink: bool,
}

pub const SYSTEM_MESSAGE: &str = "You are an experienced researcher and a reviewer of scientific papers. Given a title of the paper, write a review about it in one sentence.";

impl Default for ScrapeSettings {
    fn default() -> Self {
        Self {
            url: "https://neurips.cc/virtual/2023/papers.html".into(),
            snapshot: String::new(),
            selector: r#"a[href^="/virtual/2023/poster/"]"#.into(),
            fallback: true,
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

impl GenerateSettings {
    /// The sampler settings the engine takes.
    pub(crate) fn sampling(&self) -> crate::model::generate::Sampling {
        crate::model::generate::Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            ignore_eos: false,
        }
    }
}

impl Default for GenerateSettings {
    fn default() -> Self {
        Self {
            model: "TinyLlama/TinyLlama-1.1B-Chat-v1.0".into(),
            revision: "main".into(),
            device: DeviceChoice::Auto,
            weights: WeightsChoice::Auto,
            attention: AttentionChoice::Auto,
            dtype: DTypeChoice::Auto,
            prefix_sharing: true,
            batch_size: 16,
            max_new_tokens: 64,
            temperature: 0.5,
            top_k: 50,
            top_p: 0.95,
            seed: 1234,
            chunk_size: 64,
            limit: 0,
            backend: Backend::Local,
            openai: OpenAiSettings::default(),
        }
    }
}

impl Default for MergeSettings {
    fn default() -> Self {
        Self {
            min_chars: 1,
            judge: JudgeKind::Off,
            min_margin: 0.0,
        }
    }
}

impl Default for SplitSettings {
    fn default() -> Self {
        Self {
            train: 1000,
            test: 100,
            seed: 42,
            shrink: false,
        }
    }
}

/// The presets shipped with the binary: name, what it is for, its TOML.
const PRESETS: [(&str, &str, &str); 1] = [(
    "quick",
    "the whole pipeline offline in a few minutes on 2 CPU cores: the bundled NeurIPS 2023 \
     snapshot, SmolLM2-135M from scripts/setup.sh, 24 titles, 20 training steps",
    include_str!("../presets/quick.toml"),
)];

/// Where a recipe comes from: a config file, an optional preset, and `--set` overrides.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: PathBuf,
    /// A missing file is an error (an explicit `--config`) rather than "all defaults".
    pub must_exist: bool,
    pub preset: Option<String>,
    pub overrides: Vec<String>,
}

/// Settings plus where each came from, so later errors can point at a line.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    file: PathBuf,
    /// Folder of the config file: relative paths in the recipe resolve against it.
    pub(crate) base_dir: PathBuf,
    /// dotted key -> where it was last set.
    origins: BTreeMap<String, Origin>,
}

#[derive(Debug, Clone)]
enum Origin {
    Line(usize),
    Preset(String),
    Set,
}

impl Loaded {
    /// Where a key was set, for error messages: `pipeline.toml:12`, `--preset quick` or `--set`.
    pub fn origin(&self, key: &str) -> String {
        match self.origins.get(key) {
            Some(Origin::Set) => format!("--set {key}"),
            Some(Origin::Preset(p)) => format!("--preset {p}"),
            Some(Origin::Line(l)) => format!("{}:{l}", self.file.display()),
            None => format!("{} (default for {key})", self.file.display()),
        }
    }

    /// Resolve a path setting relative to the config file's folder.
    pub(crate) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// All dotted keys the schema knows (array-of-table entries as `prompts.pool.title` etc.).
fn known_keys() -> Vec<String> {
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

/// Walk a document: record each key's line and reject unknown keys with a suggestion.
fn check_keys(
    text: &str,
    origin: &dyn Fn(usize) -> String,
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
            return Err(ConfigError::UnknownKey {
                origin: origin(line),
                suggestion: suggest(&key, known),
                key,
            });
        }
        lines.insert(key.clone(), line);
        match item {
            toml_edit::Item::Table(t) => check_keys(text, origin, t, &key, known, lines)?,
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                let t = t.clone().into_table();
                check_keys(text, origin, &t, &key, known, lines)?
            }
            toml_edit::Item::ArrayOfTables(a) => {
                for t in a.iter() {
                    check_keys(text, origin, t, &key, known, lines)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The key whose line is the last at or before `line` (for type errors toml reports by span).
fn key_at(lines: &BTreeMap<String, usize>, line: usize) -> Option<&str> {
    lines
        .iter()
        .filter(|(_, l)| **l <= line)
        .max_by_key(|(_, l)| **l)
        .map(|(k, _)| k.as_str())
}

/// Parse one TOML layer (the file or a preset): keys checked, typed parse attributed to lines.
fn parse_layer(
    text: &str,
    origin: &dyn Fn(usize) -> String,
    known: &[String],
) -> Result<(toml::Table, BTreeMap<String, usize>)> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| ConfigError::Syntax {
        origin: origin(e.span().map(|s| line_of(text, s.start)).unwrap_or(0)),
        msg: e.message().to_string(),
    })?;
    let mut lines = BTreeMap::new();
    check_keys(text, origin, doc.as_table(), "", known, &mut lines)?;
    // A typed parse of the layer alone, so a wrong type or an unknown choice is reported
    // against its own line and key.
    if let Err(e) = toml::from_str::<Settings>(text) {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        let msg = match key_at(&lines, line) {
            Some(k) => format!("{k}: {}", e.message()),
            None => e.message().to_string(),
        };
        return Err(ConfigError::Type {
            origin: origin(line),
            msg,
        });
    }
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin(0),
        msg: e.message().to_string(),
    })?;
    Ok((table, lines))
}

/// Overlay `top` onto `base`, table by table; arrays and scalars replace.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Load the recipe: defaults, then the file, then the preset, then each `--set`.
pub fn load(src: &Sources) -> Result<Loaded> {
    let file = &src.file;
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !src.must_exist => String::new(),
        Err(source) => {
            return Err(ConfigError::Read {
                path: file.clone(),
                source,
            })
        }
    };
    let known = known_keys();
    let at_line = |l: usize| format!("{}:{l}", file.display());
    let (mut value, lines) = parse_layer(&text, &at_line, &known)?;
    let mut origins: BTreeMap<String, Origin> = lines
        .into_iter()
        .map(|(k, l)| (k, Origin::Line(l)))
        .collect();

    if let Some(name) = &src.preset {
        let (_, _, ptext) = PRESETS.iter().find(|(n, _, _)| n == name).ok_or_else(|| {
            ConfigError::UnknownPreset {
                name: name.clone(),
                choices: PRESETS.map(|p| p.0).join(", "),
            }
        })?;
        let in_preset = |l: usize| format!("preset {name} (line {l})");
        let (table, lines) = parse_layer(ptext, &in_preset, &known)?;
        merge(&mut value, table);
        for k in lines.into_keys() {
            origins.insert(k, Origin::Preset(name.clone()));
        }
        typed(&value).map_err(|msg| ConfigError::Type {
            origin: format!("--preset {name}"),
            msg,
        })?;
    }

    for ov in &src.overrides {
        let (key, raw) = ov
            .split_once('=')
            .ok_or_else(|| ConfigError::SetSyntax { arg: ov.clone() })?;
        let key = key.trim();
        if !known.iter().any(|k| k == key) {
            return Err(ConfigError::UnknownKey {
                origin: format!("--set {ov}"),
                key: key.into(),
                suggestion: suggest(key, &known),
            });
        }
        // A bare word is a string: `--set generate.device=cpu` needs no quotes.
        let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("the key just parsed"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        set_dotted(&mut value, key, parsed);
        origins.insert(key.to_string(), Origin::Set);
        // Checked after each override so an error is reported against the key that caused it.
        typed(&value).map_err(|msg| ConfigError::Type {
            origin: format!("--set {ov}"),
            msg: format!("{key}: {msg}"),
        })?;
    }
    let settings = typed(&value).map_err(|msg| ConfigError::Type {
        origin: file.display().to_string(),
        msg,
    })?;
    let base_dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let loaded = Loaded {
        settings,
        file: file.clone(),
        base_dir,
        origins,
    };
    if let Err(e) = loaded.settings.validate() {
        return Err(ConfigError::Invalid {
            origin: loaded.origin(e.key),
            key: e.key.into(),
            why: e.why,
        });
    }
    Ok(loaded)
}

fn typed(v: &toml::Table) -> std::result::Result<Settings, String> {
    toml::Value::Table(v.clone())
        .try_into::<Settings>()
        .map_err(|e| e.message().to_string())
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
        cur = entry.as_table_mut().expect("made a table above");
    }
}

use crate::dpo::config::{check, Invalid};

impl Settings {
    /// Impossible values, each reported with what would be valid. The one place each setting
    /// outside `[train]` is checked (`[train]` checks itself, in `dpo::config`).
    fn validate(&self) -> Result<(), Invalid> {
        let s = self;
        check(s.scrape.count > 0, "scrape.count", || {
            "must be at least 1".into()
        })?;
        check(
            !s.scrape.selector.trim().is_empty(),
            "scrape.selector",
            || "must not be empty".into(),
        )?;
        check(
            !(s.scrape.url.is_empty() && s.scrape.snapshot.is_empty()),
            "scrape.url",
            || "set scrape.url or scrape.snapshot".into(),
        )?;
        check(s.scrape.timeout_secs > 0, "scrape.timeout_secs", || {
            "must be at least 1".into()
        })?;
        check(!s.prompts.pool.is_empty(), "prompts.pool", || {
            "needs at least one few-shot example".into()
        })?;
        check(
            s.prompts.shots <= s.prompts.pool.len(),
            "prompts.shots",
            || {
                format!(
                    "is {} but the pool holds only {} examples",
                    s.prompts.shots,
                    s.prompts.pool.len()
                )
            },
        )?;
        let g = &s.generate;
        check(!g.model.trim().is_empty(), "generate.model", || {
            "must name a Hub repo id, a folder or a .gguf file".into()
        })?;
        check(g.batch_size > 0, "generate.batch_size", || {
            "must be at least 1".into()
        })?;
        check(g.chunk_size > 0, "generate.chunk_size", || {
            "must be at least 1".into()
        })?;
        check(g.max_new_tokens > 0, "generate.max_new_tokens", || {
            "must be at least 1".into()
        })?;
        check(
            g.temperature.is_finite() && g.temperature >= 0.0,
            "generate.temperature",
            || format!("is {}; must be finite and >= 0 (0 = greedy)", g.temperature),
        )?;
        check(g.top_p > 0.0 && g.top_p <= 1.0, "generate.top_p", || {
            format!("is {}; must be in (0, 1]", g.top_p)
        })?;
        let o = &g.openai;
        if g.backend == Backend::Openai {
            check(!o.endpoints.is_empty(), "generate.openai.endpoints", || {
                "is empty; the openai backend needs at least one base URL, e.g. \
                 --set 'generate.openai.endpoints=[\"http://127.0.0.1:8000/v1\"]'"
                    .into()
            })?;
        }
        for e in &o.endpoints {
            let bad = |why: String| Invalid {
                key: "generate.openai.endpoints",
                why: format!("{:?} {why}", crate::model::remote::redact(e)),
            };
            let u = reqwest::Url::parse(e).map_err(|err| {
                bad(format!(
                    "is not a URL ({err}); write it as http://HOST:PORT/v1"
                ))
            })?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(bad("must be an http:// or https:// URL with a host".into()));
            }
            if u.query().is_some() || u.fragment().is_some() {
                return Err(bad("must be a base URL without a query or fragment".into()));
            }
        }
        if g.backend == Backend::Openai {
            check(!o.model.trim().is_empty(), "generate.openai.model", || {
                "must name the served model, as the servers' GET /v1/models lists it".into()
            })?;
        }
        check(o.concurrency > 0, "generate.openai.concurrency", || {
            "must be at least 1".into()
        })?;
        check(o.timeout_secs > 0, "generate.openai.timeout_secs", || {
            "must be at least 1".into()
        })?;
        check(s.split.train + s.split.test > 0, "split.train", || {
            "train + test must be at least 1".into()
        })?;
        check(
            s.split.train + s.split.test <= s.scrape.count,
            "split.train",
            || {
                format!(
                    "train {} + test {} exceeds scrape.count {}: there are not enough titles",
                    s.split.train, s.split.test, s.scrape.count
                )
            },
        )?;
        check(
            s.merge.min_margin.is_finite() && s.merge.min_margin >= 0.0,
            "merge.min_margin",
            || format!("is {}; must be finite and >= 0", s.merge.min_margin),
        )?;
        check(s.eval.judge != JudgeKind::Off, "eval.judge", || {
            "must be \"lexicon\" or \"llm\": the eval stage scores every review".into()
        })?;
        if s.eval.backend == Backend::Openai {
            let e = &s.eval;
            check(!o.endpoints.is_empty(), "eval.backend", || {
                "is \"openai\" but generate.openai.endpoints is empty: the eval's reviews go to those servers".into()
            })?;
            for (k, v) in [
                ("eval.served_base", &e.served_base),
                ("eval.served_adapter", &e.served_adapter),
            ] {
                check(!v.trim().is_empty(), k, || {
                    "must name a model the servers serve (GET /v1/models) when eval.backend = \"openai\"".into()
                })?;
            }
            check(
                e.served_base != e.served_adapter,
                "eval.served_adapter",
                || "must differ from eval.served_base: the eval compares two models".into(),
            )?;
            check(o.api == OpenAiApi::Completions, "eval.backend", || {
                "\"openai\" sends the test prompts' text, so it needs generate.openai.api = \"completions\"".into()
            })?;
        }
        check(s.eval.samples > 0, "eval.samples", || {
            "must be at least 1".into()
        })?;
        check(s.judge.batch_size > 0, "judge.batch_size", || {
            "must be at least 1".into()
        })?;
        check(
            s.judge.question.contains("{review}"),
            "judge.question",
            || "must contain {review}, where the review goes".into(),
        )?;
        for (k, w) in [
            ("judge.negative", &s.judge.negative),
            ("judge.positive", &s.judge.positive),
        ] {
            check(!w.trim().is_empty(), k, || "must not be empty".into())?;
        }
        check(
            s.judge.negative.trim() != s.judge.positive.trim(),
            "judge.positive",
            || "must differ from judge.negative".into(),
        )?;
        s.train.validate()
    }
}
