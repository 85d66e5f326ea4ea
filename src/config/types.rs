//! The recipe's types and their defaults: every setting, typed, with the built-in values
//! `pipeline.toml` documents.

pub(crate) use crate::backend::openai::{OpenAiApi, OpenAiSettings};
pub use crate::dpo::config::TrainSettings;
pub use crate::judge::{JudgeKind, JudgeSettings};
use crate::model::options::{AttentionChoice, DTypeChoice, DeviceChoice, WeightsChoice};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    pub(crate) rounds: RoundsSettings,
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
    /// The largest page (decoded: after gzip) a fetch reads; a larger one is refused.
    pub(crate) max_page_bytes: u64,
    /// A file of items to read instead of a page ("" = the page): `.txt` (one a line), `.csv`,
    /// `.tsv`, `.jsonl`, `.json` or `.parquet` (`column` names the field).
    pub(crate) file: String,
    /// The column or field of `file` that holds the items (not for `.txt`).
    pub(crate) column: String,
    /// The largest `file` read; a larger one is refused.
    pub(crate) max_file_bytes: u64,
}

/// The formats `scrape.file` reads, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ItemFormat {
    Txt,
    Csv,
    Tsv,
    Jsonl,
    Json,
    Parquet,
}

impl ItemFormat {
    pub(crate) const EXTENSIONS: &'static str = ".txt, .csv, .tsv, .jsonl, .json or .parquet";

    /// The format of a path by its extension (case-insensitive); `None` for any other.
    pub(crate) fn of(path: &str) -> Option<Self> {
        let ext = std::path::Path::new(path)
            .extension()?
            .to_str()?
            .to_ascii_lowercase();
        Some(match ext.as_str() {
            "txt" => Self::Txt,
            "csv" => Self::Csv,
            "tsv" => Self::Tsv,
            "jsonl" => Self::Jsonl,
            "json" => Self::Json,
            "parquet" => Self::Parquet,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Txt => "txt",
            Self::Csv => "csv",
            Self::Tsv => "tsv",
            Self::Jsonl => "jsonl",
            Self::Json => "json",
            Self::Parquet => "parquet",
        }
    }
}

/// A few-shot example: a title and one review in each style, keyed by the style's name
/// (`prompts.chosen`, `prompts.rejected`; validated to hold exactly those two).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Shot {
    pub(crate) title: String,
    #[serde(flatten)]
    pub styles: BTreeMap<String, String>,
}

impl Shot {
    /// The example of `style` (validation made sure every entry holds both styles).
    pub fn review(&self, style: &str) -> &str {
        self.styles.get(style).map(String::as_str).unwrap_or("")
    }
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
    /// The style whose reviews become `chosen` (the bot learns to write like them), and the one
    /// whose reviews become `rejected`: names of the pool entries' fields and the templates'
    /// `style` (and `polarity`) variable.
    pub(crate) chosen: String,
    pub(crate) rejected: String,
    /// A system message per style for its generation requests (`chat` style); a style not named
    /// here, and the neutral pair prompt, use `system`.
    pub(crate) style_system: BTreeMap<String, String>,
}

impl PromptSettings {
    /// The two styles in request order: chosen (request 2 * title id), then rejected (+ 1).
    pub(crate) fn styles(&self) -> [&str; 2] {
        [&self.chosen, &self.rejected]
    }

    /// Whether the styles are the published recipe's (negative chosen, positive rejected, no
    /// per-style system message): then the keys and outputs are those from before styles were
    /// settings.
    pub(crate) fn default_styles(&self) -> bool {
        self.chosen == "negative" && self.rejected == "positive" && self.style_system.is_empty()
    }
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
    /// transformers' repetition penalty over the prompt and the generated tokens (1 = off).
    pub(crate) repetition_penalty: f64,
    /// OpenAI's frequency and presence penalties over the generated tokens (0 = off).
    pub(crate) frequency_penalty: f64,
    pub(crate) presence_penalty: f64,
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

/// On-policy rounds after the eval (`stages::rounds`): the bot reviews fresh titles, a judge
/// picks the best and worst of each title's reviews as a pair, and DPO goes on from the bot on
/// those pairs. `count = 0`: none (the published recipe).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RoundsSettings {
    pub(crate) count: usize,
    /// Fresh titles per round: from the page, in neither split, not the eval's, not an earlier
    /// round's.
    pub(crate) titles: usize,
    /// Reviews the bot writes of each title (k), from the neutral pair prompt.
    pub(crate) samples: usize,
    /// The title draw and the samplers (round r's review j of title i: stream i * k + j of
    /// `mix(seed, r)`).
    pub(crate) seed: u64,
    /// The labelling judge (`lexicon` or `trained`): its negativity score, less the penalties
    /// below, ranks a title's reviews.
    pub(crate) judge: JudgeKind,
    /// Subtracted from the score of a review that repeats a sentence (`judge::coherence`).
    pub(crate) loop_penalty: f64,
    /// Times |ln(characters / the split's mean chosen length)|, subtracted from the score: a
    /// review that drifts long or short loses to one of the data's length.
    pub(crate) length_penalty: f64,
    /// A title whose best and worst scores differ by less than this gives no pair.
    pub(crate) margin: f64,
    /// Passes over a round's pairs (train.* settings otherwise).
    pub(crate) epochs: usize,
    /// The reference model of a round's DPO: `previous` (the bot the round starts from, as in
    /// iterative DPO) or `base`.
    pub(crate) reference: RoundReference,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RoundReference {
    Previous,
    Base,
}

impl Default for RoundsSettings {
    fn default() -> Self {
        Self {
            count: 0,
            titles: 100,
            samples: 4,
            seed: 5,
            // docs/RESULTS.md "On-policy rounds": labels by the trained judge gave the coherent
            // bot (no loops, the base's length); labels by the lexicon judge a formula of it.
            judge: JudgeKind::Trained,
            loop_penalty: 1.0,
            length_penalty: 0.25,
            margin: 0.1,
            epochs: 1,
            reference: RoundReference::Previous,
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
            // The real schedule page is under 1 MiB: room for far larger pages, and still a bound
            // on the memory a broken or hostile server can make a fetch take.
            max_page_bytes: 64 << 20,
            file: String::new(),
            column: String::new(),
            // As a page: room for a list far longer than any recipe draws from, and a bound.
            max_file_bytes: 64 << 20,
        }
    }
}

pub fn default_pool() -> Vec<Shot> {
    let s = |t: &str, n: &str, p: &str| Shot {
        title: t.into(),
        styles: BTreeMap::from([("negative".into(), n.into()), ("positive".into(), p.into())]),
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
            chosen: "negative".into(),
            rejected: "positive".into(),
            style_system: BTreeMap::new(),
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
            penalties: self.penalties(),
        }
    }

    pub(crate) fn penalties(&self) -> crate::model::generate::Penalties {
        crate::model::generate::Penalties {
            repetition: self.repetition_penalty,
            frequency: self.frequency_penalty,
            presence: self.presence_penalty,
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
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
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
