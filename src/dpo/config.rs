//! The `[train]` settings: their types, defaults and the checks that say why a value cannot work.
//!
//! Every setting with a fixed set of values is an enum, so an unknown value is refused where the
//! recipe is parsed (with the valid choices) and no code compares strings later. The recipe
//! (the `config` module) composes this section; nothing here knows about files or `--set`.

use crate::model::lora::{LoraSpec, Projection};
use crate::model::options::{AttentionChoice, DTypeChoice, DeviceChoice};
use serde::{Deserialize, Serialize};

/// The preference loss (TRL's `loss_type`); `Kto` trains on unpaired rows.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
    Kto,
}

impl Loss {
    /// The name as the recipe spells it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Loss::Sigmoid => "sigmoid",
            Loss::Hinge => "hinge",
            Loss::Ipo => "ipo",
            Loss::Robust => "robust",
            Loss::Kto => "kto",
        }
    }

    /// IPO compares length-averaged log-probs; every other loss sums them.
    pub(crate) fn averages_logps(self) -> bool {
        self == Loss::Ipo
    }

    /// KTO reads prompt/completion/label rows instead of prompt/chosen/rejected.
    pub(crate) fn is_unpaired(self) -> bool {
        self == Loss::Kto
    }
}

/// The learning-rate schedule after warmup, as `transformers` computes it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Cosine,
    Linear,
    Constant,
}

/// Which end of an over-long prompt TRL keeps.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    KeepEnd,
    KeepStart,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSettings {
    pub r: usize,
    alpha: f64,
    dropout: f64,
    pub(crate) targets: Vec<Projection>,
}

impl LoraSettings {
    /// The adapter these settings describe.
    pub(crate) fn spec(&self) -> LoraSpec {
        LoraSpec {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
        }
    }
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec![Projection::QProj, Projection::KProj, Projection::VProj],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Train on the split stage's output ("") or on a Parquet file / folder.
    pub dataset: String,
    /// Model to train ("" = generate.model).
    pub model: String,
    pub loss: Loss,
    pub beta: f64,
    pub label_smoothing: f64,
    /// TRL's `rpo_alpha` (RPO): add this times the NLL of the chosen responses (the mean over
    /// their tokens) to the pairwise loss, so training keeps the chosen text likely instead of
    /// only pushing the rejected one down. 0 = off (TRL's `None`).
    pub rpo_alpha: f64,
    pub learning_rate: f64,
    pub lr_scheduler: LrScheduler,
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
    pub truncation_mode: TruncationMode,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub logging_steps: usize,
    pub seed: u64,
    pub device: DeviceChoice,
    /// The frozen base's dtype (`auto`: bf16 on a GPU, f32 on the CPU); LoRA weights and the
    /// optimizer state stay f32 whatever it is.
    pub dtype: DTypeChoice,
    /// Attention in the training forward: `auto` (the fused kernel on the CPU in f32, composed
    /// ops elsewhere), `fused` or `composed`.
    pub attention: AttentionChoice,
    pub lora: LoraSettings,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            dataset: String::new(),
            model: String::new(),
            loss: Loss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            rpo_alpha: 0.0,
            learning_rate: 5e-4,
            lr_scheduler: LrScheduler::Cosine,
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
            truncation_mode: TruncationMode::KeepEnd,
            eval_steps: 100,
            save_steps: 100,
            logging_steps: 10,
            seed: 42,
            device: DeviceChoice::Auto,
            dtype: DTypeChoice::Auto,
            attention: AttentionChoice::Auto,
            lora: LoraSettings::default(),
        }
    }
}

/// A value that cannot work: the dotted key (relative to the recipe root) and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Invalid {
    pub(crate) key: &'static str,
    pub(crate) why: String,
}

/// `Err(Invalid)` with the key and the reason unless `ok`.
pub(crate) fn check(
    ok: bool,
    key: &'static str,
    why: impl FnOnce() -> String,
) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(Invalid { key, why: why() })
    }
}

fn finite_positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

impl TrainSettings {
    /// Every range the trainer relies on, checked once where the recipe is loaded.
    // Long because one check per `[train]` setting, in the recipe's order, each naming its key.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        let t = self;
        check(
            t.max_length > t.max_prompt_length,
            "train.max_length",
            || {
                format!(
                "is {} but train.max_prompt_length is {}: a long prompt is cut to max_prompt_length and the \
                 responses to max_length - max_prompt_length = {} tokens, so every response would be empty, \
                 its log-probability 0 under both models, and the loss stuck at ln 2 (the published recipe's \
                 bug). Raise max_length above max_prompt_length (e.g. max_length = {})",
                t.max_length,
                t.max_prompt_length,
                t.max_length as i64 - t.max_prompt_length as i64,
                t.max_prompt_length + 128
            )
            },
        )?;
        check(finite_positive(t.beta), "train.beta", || {
            format!("is {}; must be finite and > 0", t.beta)
        })?;
        check(
            (0.0..0.5).contains(&t.label_smoothing),
            "train.label_smoothing",
            || format!("is {}; must be in [0, 0.5)", t.label_smoothing),
        )?;
        check(
            t.rpo_alpha.is_finite() && t.rpo_alpha >= 0.0,
            "train.rpo_alpha",
            || format!("is {}; must be finite and >= 0 (0 = off)", t.rpo_alpha),
        )?;
        check(
            t.rpo_alpha == 0.0 || !t.loss.is_unpaired(),
            "train.rpo_alpha",
            || {
                "is set, but train.loss is \"kto\", which has no chosen responses: RPO's NLL term is for the pairwise losses".into()
            },
        )?;
        check(
            finite_positive(t.learning_rate),
            "train.learning_rate",
            || format!("is {}; must be finite and > 0", t.learning_rate),
        )?;
        check(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "train.weight_decay",
            || format!("is {}; must be finite and >= 0", t.weight_decay),
        )?;
        check(
            (0.0..1.0).contains(&t.adam_beta1),
            "train.adam_beta1",
            || format!("is {}; must be in [0, 1)", t.adam_beta1),
        )?;
        check(
            (0.0..1.0).contains(&t.adam_beta2),
            "train.adam_beta2",
            || format!("is {}; must be in [0, 1)", t.adam_beta2),
        )?;
        check(
            finite_positive(t.adam_epsilon),
            "train.adam_epsilon",
            || format!("is {}; must be finite and > 0", t.adam_epsilon),
        )?;
        check(
            t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0,
            "train.max_grad_norm",
            || {
                format!(
                    "is {}; must be finite and >= 0 (0 = no clipping)",
                    t.max_grad_norm
                )
            },
        )?;
        check(t.batch_size > 0, "train.batch_size", || {
            "must be at least 1".into()
        })?;
        check(
            t.gradient_accumulation_steps > 0,
            "train.gradient_accumulation_steps",
            || "must be at least 1".into(),
        )?;
        check(t.max_steps > 0 || t.epochs > 0, "train.max_steps", || {
            "and train.epochs are both 0; set max_steps or epochs".into()
        })?;
        check(t.lora.r > 0, "train.lora.r", || "must be at least 1".into())?;
        check(finite_positive(t.lora.alpha), "train.lora.alpha", || {
            format!("is {}; must be finite and > 0", t.lora.alpha)
        })?;
        check(
            (0.0..1.0).contains(&t.lora.dropout),
            "train.lora.dropout",
            || format!("is {}; must be in [0, 1)", t.lora.dropout),
        )?;
        check(!t.lora.targets.is_empty(), "train.lora.targets", || {
            format!(
                "needs at least one of {}",
                Projection::ALL.map(|p| p.name()).join(", ")
            )
        })?;
        Ok(())
    }
}
