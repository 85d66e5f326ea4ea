//! Validation of the `[train]` settings, with errors that say why a value cannot work.

use crate::config::Loaded;
use anyhow::{bail, Result};

pub const LOSSES: [&str; 5] = ["sigmoid", "hinge", "ipo", "robust", "kto"];
pub const SCHEDULERS: [&str; 3] = ["cosine", "linear", "constant"];
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

pub fn validate(l: &Loaded) -> Result<()> {
    let t = &l.settings.train;
    let err = |key: &str, msg: String| -> Result<()> { bail!("{}: {key}: {msg}", l.origin(key)) };
    if !LOSSES.contains(&t.loss.as_str()) {
        err(
            "train.loss",
            format!("is {:?}; use one of {}", t.loss, LOSSES.join(", ")),
        )?;
    }
    if !SCHEDULERS.contains(&t.lr_scheduler.as_str()) {
        err(
            "train.lr_scheduler",
            format!(
                "is {:?}; use one of {}",
                t.lr_scheduler,
                SCHEDULERS.join(", ")
            ),
        )?;
    }
    if !["keep_end", "keep_start"].contains(&t.truncation_mode.as_str()) {
        err(
            "train.truncation_mode",
            format!(
                "is {:?}; use \"keep_end\" or \"keep_start\"",
                t.truncation_mode
            ),
        )?;
    }
    if t.max_length <= t.max_prompt_length {
        err(
            "train.max_length",
            format!(
                "is {} but train.max_prompt_length is {}: a long prompt is cut to max_prompt_length and the \
                 responses to max_length - max_prompt_length = {} tokens, so every response would be empty, \
                 its log-probability 0 under both models, and the loss stuck at ln 2 (the published recipe's \
                 bug). Raise max_length above max_prompt_length (e.g. max_length = {})",
                t.max_length,
                t.max_prompt_length,
                t.max_length as i64 - t.max_prompt_length as i64,
                t.max_prompt_length + 128
            ),
        )?;
    }
    if t.beta.is_nan() || t.beta <= 0.0 {
        err("train.beta", "must be > 0".into())?;
    }
    if !(0.0..0.5).contains(&t.label_smoothing) {
        err("train.label_smoothing", "must be in [0, 0.5)".into())?;
    }
    if t.batch_size == 0 || t.gradient_accumulation_steps == 0 {
        err(
            "train.batch_size",
            "batch_size and gradient_accumulation_steps must be at least 1".into(),
        )?;
    }
    if t.max_steps == 0 && t.epochs == 0 {
        err("train.max_steps", "set max_steps or epochs".into())?;
    }
    if t.learning_rate.is_nan() || t.learning_rate <= 0.0 {
        err("train.learning_rate", "must be > 0".into())?;
    }
    if t.lora.r == 0 {
        err("train.lora.r", "must be at least 1".into())?;
    }
    if !(0.0..1.0).contains(&t.lora.dropout) {
        err("train.lora.dropout", "must be in [0, 1)".into())?;
    }
    if t.lora.targets.is_empty() {
        err(
            "train.lora.targets",
            format!("needs at least one of {}", TARGETS.join(", ")),
        )?;
    }
    for x in &t.lora.targets {
        if !TARGETS.contains(&x.as_str()) {
            err(
                "train.lora.targets",
                format!(
                    "{x:?} is not a Llama projection; use {}",
                    TARGETS.join(", ")
                ),
            )?;
        }
    }
    if !["auto", "cpu", "cuda"].contains(&t.device.as_str()) {
        err(
            "train.device",
            format!("is {:?}; use \"auto\", \"cpu\" or \"cuda\"", t.device),
        )?;
    }
    Ok(())
}
