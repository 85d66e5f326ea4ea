//! The recipe resolved once: settings turned into the concrete things stages use.
//!
//! [`Recipe::resolve`] is the one step between "what the user wrote" ([`crate::config`]: file,
//! preset, `--set`) plus the environment, and what runs: where the titles come from, which model
//! files (a Hub id becomes a cache path, downloaded at most once and only when a stage needs
//! it), which device and dtype, which engine switches. Stages receive a `&Recipe` and read
//! neither the environment nor the raw settings' paths. `pipeline status` resolves with
//! [`Network::Never`]: it reads manifests and local files and never downloads a model.

use crate::config::Loaded;
use crate::error::{Context, Result};
use crate::model::load::source::{self, FingerprintMemo, HubAccess, ModelSource, ModelSpec};
use crate::model::options::{LoadOptions, WeightsChoice, WeightsMode};
use std::cell::OnceCell;
use std::path::{Path, PathBuf};

/// Whether resolving may use the network (model downloads, page fetches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Network {
    Allowed,
    /// `status`: caches and local files only.
    Never,
}

/// Where the scrape stage reads its page from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PageSource {
    /// A saved copy of a page (`scrape.snapshot` = a path).
    Snapshot(PathBuf),
    /// The compact NeurIPS 2023 snapshot shipped in the binary (`scrape.snapshot = "bundled"`).
    Bundled,
    /// Fetch `url` once into the page cache; on failure use the bundled snapshot if `fallback`.
    Url { url: String, fallback: bool },
    /// A file of items (`scrape.file`), not a page.
    File(PathBuf),
}

/// One model as a stage uses it: what it names, how it loads, and (once asked) its files.
pub(crate) struct ModelPlan {
    /// The setting it came from, for error messages.
    key: &'static str,
    spec: ModelSpec,
    pub(crate) load: LoadOptions,
    source: OnceCell<ModelSource>,
}

impl ModelPlan {
    /// "cpu" or "cuda": numerics differ between devices, so cache keys hold it.
    pub(crate) fn device_name(&self) -> &'static str {
        if self.load.device.is_cuda() {
            "cuda"
        } else {
            "cpu"
        }
    }

    /// The dtype weights are computed in, by name (cache keys).
    pub(crate) fn dtype_name(&self) -> String {
        format!("{:?}", self.load.dtype).to_lowercase()
    }

    /// What text sampled from this model depends on besides the model, for a stage's key: the
    /// device, the dtype, the weights and, where those make the text depend on how rows are
    /// batched, the batch size.
    pub(crate) fn sampling_numerics(&self, batch_size: usize) -> serde_json::Value {
        let mut v = serde_json::json!({
            "device": self.device_name(),
            "dtype": self.dtype_name(),
            "weights": format!("{:?}", self.load.weights).to_lowercase(),
        });
        if self.load.weights.batch_dependent() {
            v["batch_size"] = serde_json::json!(batch_size);
        }
        // `generate.prefix_sharing = false` prefills each prompt whole; named only when off, so
        // the default recipe's keys stay.
        if !self.load.share_prefixes {
            v["prefix_sharing"] = serde_json::json!(false);
        }
        v
    }

    /// Whether it holds the weights as the training model does (then one loaded model serves
    /// both, with the training model's prefix sharing: on).
    pub(crate) fn same_weights_as(&self, other: &ModelPlan) -> bool {
        self.load.weights == other.load.weights
    }
}

pub(crate) struct Recipe {
    pub(crate) loaded: Loaded,
    pub(crate) page: PageSource,
    pub(crate) templates: PathBuf,
    /// `train.dataset` as a path, or `None` for the split stage's output.
    pub(crate) train_dataset: Option<PathBuf>,
    pub(crate) generate: ModelPlan,
    pub(crate) train: ModelPlan,
    /// The training model as the eval stage and the rounds sample reviews from it (the adapter
    /// fits it): `train.model` on the batch stages' weights (`generate.weights`: under `auto`,
    /// a GGUF's blocks where a tiled kernel runs, several times faster than dense, docs/PERF.md).
    /// Dense where those are dense or cannot take an adapter (`quantized`).
    pub(crate) sampler: ModelPlan,
    /// The `llm` judge's model (`judge.model`, or generate.model), loaded as for generation.
    pub(crate) judge: ModelPlan,
    hub: HubAccess,
    memo: FingerprintMemo,
}

impl Recipe {
    /// Resolve everything that needs no model files: paths, devices, load options, Hub access.
    // Long because it is the one place each setting becomes a typed value, in the order they
    // depend on each other (the workdir, then paths, then devices and load options).
    pub(crate) fn resolve(loaded: Loaded, workdir: &Path, network: Network) -> Result<Self> {
        let s = &loaded.settings;
        let page = match s.scrape.snapshot.as_str() {
            _ if !s.scrape.file.is_empty() => PageSource::File(loaded.resolve(&s.scrape.file)),
            "" => PageSource::Url {
                url: s.scrape.url.clone(),
                fallback: s.scrape.fallback,
            },
            "bundled" => PageSource::Bundled,
            p => PageSource::Snapshot(loaded.resolve(p)),
        };
        let spec = |key: &'static str, text: &str| -> Result<ModelSpec> {
            ModelSpec::parse(text, &s.generate.revision, &loaded.base_dir)
                .with_context(|| format!("{}: {key}", loaded.origin(key)))
        };
        let g = &s.generate;
        let gen_spec = spec("generate.model", &g.model)?;
        let gen_device = g
            .device
            .open()
            .with_context(|| loaded.origin("generate.device"))?;
        let gen_dtype = g.dtype.resolve(&gen_device);
        let gen_load = LoadOptions {
            weights: g.weights.batch_mode(
                matches!(gen_spec, ModelSpec::Gguf(_)),
                &gen_device,
                gen_dtype,
            ),
            attention: g.attention,
            share_prefixes: g.prefix_sharing,
            dtype: gen_dtype,
            ..LoadOptions::new(gen_device)
        };
        let (judge_key, judge_text) = if s.judge.model.is_empty() {
            ("generate.model", g.model.as_str())
        } else {
            ("judge.model", s.judge.model.as_str())
        };
        let judge_spec = spec(judge_key, judge_text)?;
        let judge_load = LoadOptions {
            // The llm judge scores through candle's forward: dense under `auto`, as before.
            weights: g.weights.mode(matches!(judge_spec, ModelSpec::Gguf(_))),
            ..gen_load.clone()
        };
        let t = &s.train;
        let (train_key, train_text) = if t.model.is_empty() {
            ("generate.model", g.model.as_str())
        } else {
            ("train.model", t.model.as_str())
        };
        let train_device = t
            .device
            .open()
            .with_context(|| loaded.origin("train.device"))?;
        // Training needs dense weights; GGUF q/k are un-permuted to the HF layout on load, so
        // the adapter applies to the HF checkpoint as it is.
        let train_load = LoadOptions {
            weights: WeightsMode::Dense,
            attention: t.attention,
            dtype: t.dtype.resolve(&train_device),
            ..LoadOptions::new(train_device)
        };
        let train_spec = spec(train_key, train_text)?;
        let sampler_load = LoadOptions {
            weights: match g.weights.batch_mode(
                matches!(train_spec, ModelSpec::Gguf(_)),
                &train_load.device,
                train_load.dtype,
            ) {
                w if w.interleaved_rope() => WeightsMode::Dense,
                w => w,
            },
            share_prefixes: g.prefix_sharing,
            ..train_load.clone()
        };
        Ok(Self {
            page,
            templates: loaded.resolve(&s.prompts.templates),
            train_dataset: (!t.dataset.is_empty()).then(|| loaded.resolve(&t.dataset)),
            generate: ModelPlan {
                key: "generate.model",
                spec: gen_spec,
                load: gen_load,
                source: OnceCell::new(),
            },
            train: ModelPlan {
                key: train_key,
                spec: train_spec.clone(),
                load: train_load,
                source: OnceCell::new(),
            },
            sampler: ModelPlan {
                key: train_key,
                spec: train_spec,
                load: sampler_load,
                source: OnceCell::new(),
            },
            judge: ModelPlan {
                key: judge_key,
                spec: judge_spec,
                load: judge_load,
                source: OnceCell::new(),
            },
            hub: {
                let mut hub = HubAccess::from_env();
                hub.offline |= network == Network::Never;
                hub
            },
            memo: FingerprintMemo::new(Some(workdir.join("cache").join("fingerprints.json"))),
            loaded,
        })
    }

    pub(crate) fn settings(&self) -> &crate::config::Settings {
        &self.loaded.settings
    }

    /// The model's files, found (and downloaded, when allowed) on first use, then remembered.
    pub(crate) fn model<'a>(&self, plan: &'a ModelPlan) -> Result<&'a ModelSource> {
        if let Some(s) = plan.source.get() {
            return Ok(s);
        }
        let hint = match plan.spec {
            ModelSpec::Hub { .. } => {
                "; without the Hub, `pipeline run --preset quick` runs everything offline with SmolLM2"
            }
            _ => "",
        };
        let src = source::resolve_spec(&plan.spec, &self.hub, &self.memo)
            .with_context(|| format!("{} ({}){hint}", plan.key, self.loaded.origin(plan.key)))?;
        Ok(plan.source.get_or_init(|| src))
    }
}

impl Recipe {
    /// Load a model as its plan says: the one place load options turn into a loaded model.
    pub(crate) fn load(&self, plan: &ModelPlan) -> Result<crate::model::load::Model> {
        self.load_with(plan, &plan.load)
    }

    fn load_with(&self, plan: &ModelPlan, opts: &LoadOptions) -> Result<crate::model::load::Model> {
        let src = self.model(plan)?;
        let t0 = std::time::Instant::now();
        let m = crate::model::load::Model::load(src, opts)?;
        tracing::info!(
            "loaded {} ({:?} weights) in {:.1}s",
            src.spec,
            opts.weights,
            t0.elapsed().as_secs_f64()
        );
        Ok(m)
    }

    /// The generation model for one person waiting on it (`sample`, `serve`), ready to take
    /// adapters when `adapters`. With `generate.weights = "auto"`, a GGUF on the CPU in f32
    /// runs on its own blocks (`"blocks"` where a tiled kernel runs, as for the batch stages;
    /// `"mixed"` elsewhere, where the batch stages keep dense weights: several times faster
    /// for a few streams, docs/PERF.md).
    /// Quantized weights held in the GGUF's RoPE layout (`"quantized"`) take no adapter: those
    /// load dense, as training does.
    pub(crate) fn load_interactive(&self, adapters: bool) -> Result<crate::model::load::Model> {
        let plan = &self.generate;
        let mut opts = plan.load.clone();
        if self.loaded.settings.generate.weights == WeightsChoice::Auto
            && matches!(plan.spec, ModelSpec::Gguf(_))
        {
            if let Some(w) = WeightsMode::interactive_auto(&opts.device, opts.dtype) {
                opts.weights = w;
            }
        }
        if adapters && opts.weights.interleaved_rope() {
            return self.load(&self.train);
        }
        self.load_with(plan, &opts)
    }
}
