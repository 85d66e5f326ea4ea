//! DPO training with LoRA on a frozen base, in candle: TRL-compatible tokenization, losses and
//! metrics; a PEFT-compatible adapter.
//!
//! - [`config`]: validation of `[train]` settings.
//! - [`lora`]: adapters, their initialisation and dropout.
//! - [`data`]: TRL-style tokenization and truncation.
//! - [`loss`]: sigmoid / hinge / ipo / robust / kto losses and rewards.
//! - [`optim`]: AdamW and the learning-rate schedule, with checkpointable state.
//! - [`trainer`]: the loop: reference log-probs, steps, eval, logs, checkpoints, resume.
//! - [`adapter`]: PEFT's adapter files, loading them back, and merging into the base.
//! - [`charts`]: learning-curve PNGs.

pub mod adapter;
pub mod charts;
pub mod config;
pub mod data;
pub mod logps;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod trainer;
