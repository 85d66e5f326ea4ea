//! The `[train]` settings: their types, defaults and the checks that say why a value cannot work.
//!
//! Every setting with a fixed set of values is an enum, so an unknown value is refused where the
//! recipe is parsed (with the valid choices) and no code compares strings later. The recipe
//! (the `config` module) composes this section; nothing here knows about files or `--set`.

use crate::model::lora::{LoraSpec, Projection};
use crate::model::options::{AttentionChoice, DTypeChoice, DeviceChoice};
use serde::{Deserialize, Serialize};

/// The preference loss (TRL's `loss_type`, or one of its CPO/ORPO trainers' losses); `Kto`
/// trains on unpaired rows.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
    Kto,
    ExoPair,
    NcaPair,
    BcoPair,
    SppoHard,
    Aot,
    ApoZero,
    ApoDown,
    Discopop,
    Sft,
    SigmoidNorm,
    /// TRL's CPO trainer with `loss_type = "simpo"`: reference-free.
    Simpo,
    /// TRL's ORPO trainer: reference-free.
    Orpo,
}

impl Loss {
    pub const ALL: [Loss; 17] = [
        Loss::Sigmoid,
        Loss::Hinge,
        Loss::Ipo,
        Loss::Robust,
        Loss::Kto,
        Loss::ExoPair,
        Loss::NcaPair,
        Loss::BcoPair,
        Loss::SppoHard,
        Loss::Aot,
        Loss::ApoZero,
        Loss::ApoDown,
        Loss::Discopop,
        Loss::Sft,
        Loss::SigmoidNorm,
        Loss::Simpo,
        Loss::Orpo,
    ];

    /// The name as the recipe spells it.
    pub fn name(self) -> &'static str {
        match self {
            Loss::Sigmoid => "sigmoid",
            Loss::Hinge => "hinge",
            Loss::Ipo => "ipo",
            Loss::Robust => "robust",
            Loss::Kto => "kto",
            Loss::ExoPair => "exo_pair",
            Loss::NcaPair => "nca_pair",
            Loss::BcoPair => "bco_pair",
            Loss::SppoHard => "sppo_hard",
            Loss::Aot => "aot",
            Loss::ApoZero => "apo_zero",
            Loss::ApoDown => "apo_down",
            Loss::Discopop => "discopop",
            Loss::Sft => "sft",
            Loss::SigmoidNorm => "sigmoid_norm",
            Loss::Simpo => "simpo",
            Loss::Orpo => "orpo",
        }
    }

    /// Compares length-averaged log-probs (TRL divides by the completion's token count, or its
    /// CPO/ORPO trainers average them); every other loss sums them.
    pub fn averages_logps(self) -> bool {
        matches!(
            self,
            Loss::Ipo | Loss::SigmoidNorm | Loss::Simpo | Loss::Orpo
        )
    }

    /// Reads the reference model's log-probs. SimPO and ORPO are defined without one, and SFT
    /// is the chosen responses' NLL alone.
    pub fn needs_reference(self) -> bool {
        !matches!(self, Loss::Simpo | Loss::Orpo | Loss::Sft)
    }

    /// A trainer of its own in TRL (KTO, CPO/SimPO, ORPO): not combined with others in a list.
    pub fn standalone(self) -> bool {
        matches!(self, Loss::Kto | Loss::Simpo | Loss::Orpo)
    }

    /// KTO reads prompt/completion/label rows instead of prompt/chosen/rejected.
    pub fn is_unpaired(self) -> bool {
        self == Loss::Kto
    }
}

/// `train.loss`: one loss, or a list of them whose weighted sum is trained (TRL's `loss_type`
/// list with `loss_weights`). One loss is written (and keyed) as a plain name, as before lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Losses(pub Vec<Loss>);

impl Losses {
    pub fn one(l: Loss) -> Self {
        Losses(vec![l])
    }

    /// The first loss: the whole list where a loss may not be combined (KTO, SimPO, ORPO).
    pub fn first(&self) -> Loss {
        self.0.first().copied().unwrap_or(Loss::Sigmoid)
    }

    pub fn contains(&self, l: Loss) -> bool {
        self.0.contains(&l)
    }

    pub fn is_unpaired(&self) -> bool {
        self.0.iter().any(|l| l.is_unpaired())
    }

    /// The log-probs are computed as per-token means only when every loss wants them so (a
    /// list mixing kinds gets sums, and the averaging losses divide by the token counts).
    pub fn averages_logps(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|l| l.averages_logps())
    }

    /// False when no loss reads the reference: then no reference log-probs are computed.
    pub fn needs_reference(&self) -> bool {
        self.0.iter().any(|l| l.needs_reference())
    }

    /// `sigmoid` or `["sigmoid", "sft"]`, for messages.
    pub fn describe(&self) -> String {
        match &self.0[..] {
            [l] => l.name().to_string(),
            v => format!(
                "[{}]",
                v.iter()
                    .map(|l| format!("\"{}\"", l.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl Serialize for Losses {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0[..] {
            [l] => l.serialize(s),
            v => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Losses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Losses;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a loss name or a list of loss names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Losses, E> {
                use serde::de::IntoDeserializer;
                Ok(Losses::one(Loss::deserialize(v.into_deserializer())?))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Losses, A::Error> {
                let mut v = Vec::new();
                while let Some(l) = a.next_element::<Loss>()? {
                    v.push(l);
                }
                Ok(Losses(v))
            }
        }
        d.deserialize_any(V)
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
    pub loss: Losses,
    /// TRL's `loss_weights`: one weight per entry of a `loss` list (empty = every weight 1).
    pub loss_weights: Vec<f64>,
    pub beta: f64,
    pub label_smoothing: f64,
    /// SimPO's target reward margin (TRL's CPO `simpo_gamma`).
    pub simpo_gamma: f64,
    /// SimPO: this times the chosen responses' NLL is added (TRL's CPO `cpo_alpha`; 0 = pure SimPO).
    pub cpo_alpha: f64,
    /// DiscoPOP's temperature (TRL's `discopop_tau`).
    pub discopop_tau: f64,
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
            loss: Losses::one(Loss::Sigmoid),
            loss_weights: Vec::new(),
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            cpo_alpha: 1.0,
            discopop_tau: 0.05,
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
    /// `train.loss`, `train.loss_weights` and the losses' own settings, each where it applies.
    fn validate_losses(&self) -> Result<(), Invalid> {
        let t = self;
        let ls = &t.loss.0;
        check(!ls.is_empty(), "train.loss", || {
            "is an empty list; name at least one loss (e.g. \"sigmoid\")".into()
        })?;
        if ls.len() > 1 {
            if let Some(l) = ls.iter().find(|l| l.standalone()) {
                return Err(Invalid {
                    key: "train.loss",
                    why: format!(
                        "is {}, but \"{}\" is a trainer of its own in TRL ({}) and cannot be combined in a list; use it alone",
                        t.loss.describe(),
                        l.name(),
                        match l {
                            Loss::Kto => "KTO trains on unpaired rows",
                            Loss::Simpo => "CPO's SimPO",
                            _ => "ORPO",
                        }
                    ),
                });
            }
        }
        check(
            t.loss_weights.is_empty() || t.loss_weights.len() == ls.len(),
            "train.loss_weights",
            || {
                format!(
                    "has {} weights but train.loss = {} has {} losses; give one weight per loss (or none: all 1)",
                    t.loss_weights.len(),
                    t.loss.describe(),
                    ls.len()
                )
            },
        )?;
        check(
            t.loss_weights.iter().all(|w| w.is_finite() && *w >= 0.0),
            "train.loss_weights",
            || {
                format!(
                    "is {:?}; every weight must be finite and >= 0",
                    t.loss_weights
                )
            },
        )?;
        check(
            t.simpo_gamma.is_finite() && t.simpo_gamma >= 0.0,
            "train.simpo_gamma",
            || format!("is {}; must be finite and >= 0", t.simpo_gamma),
        )?;
        check(
            t.cpo_alpha.is_finite() && t.cpo_alpha >= 0.0,
            "train.cpo_alpha",
            || {
                format!(
                    "is {}; must be finite and >= 0 (0 = pure SimPO)",
                    t.cpo_alpha
                )
            },
        )?;
        check(
            finite_positive(t.discopop_tau),
            "train.discopop_tau",
            || format!("is {}; must be finite and > 0", t.discopop_tau),
        )?;
        check(
            !t.loss.contains(Loss::ExoPair) || t.label_smoothing > 0.0,
            "train.label_smoothing",
            || {
                "is 0, but train.loss includes \"exo_pair\", whose target distribution is (1 - label_smoothing, label_smoothing): \
                 log 0 makes the loss infinite. Set it above 0 (the EXO paper recommends 1e-3)"
                    .into()
            },
        )?;
        Ok(())
    }

    /// The loss settings that apply to `train.loss`, by their names: what the train and eval
    /// keys hold besides `loss`, `beta` and `label_smoothing`. Settings a loss does not read are
    /// left out, so keys from before they existed stay valid.
    pub(crate) fn loss_params(&self) -> Vec<(&'static str, serde_json::Value)> {
        let mut v = Vec::new();
        if !self.loss_weights.is_empty() {
            v.push(("loss_weights", serde_json::json!(self.loss_weights)));
        }
        if self.loss.contains(Loss::Simpo) {
            v.push(("simpo_gamma", serde_json::json!(self.simpo_gamma)));
            v.push(("cpo_alpha", serde_json::json!(self.cpo_alpha)));
        }
        if self.loss.contains(Loss::Discopop) {
            v.push(("discopop_tau", serde_json::json!(self.discopop_tau)));
        }
        v
    }

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
        t.validate_losses()?;
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
            t.rpo_alpha == 0.0 || !(t.loss.contains(Loss::Simpo) || t.loss.contains(Loss::Orpo)),
            "train.rpo_alpha",
            || {
                format!(
                    "is set, but train.loss = \"{}\" has its own NLL term on the chosen responses ({}); leave rpo_alpha at 0",
                    t.loss.describe(),
                    if t.loss.contains(Loss::Simpo) { "train.cpo_alpha" } else { "weighted 1, with train.beta on the odds ratio" }
                )
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
