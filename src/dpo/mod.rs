//! DPO training of a LoRA adapter on a frozen base, in candle: TRL-compatible tokenization, losses
//! and metrics. The adapter itself (initialisation, dropout, PEFT files, merging) belongs to the
//! model: `crate::model::adapter`.
//!
//! - [`config`]: validation of `[train]` settings.
//! - [`data`]: TRL-style tokenization and truncation.
//! - [`logps`]: sequence log-probabilities of the training forward pass.
//! - [`loss`]: TRL's preference losses (DPO's list, SimPO, ORPO, KTO) and rewards.
//! - `optim`: AdamW and the learning-rate schedule, with checkpointable state.
//! - [`trainer`]: the loop: reference log-probs, steps, eval, logs, checkpoints, resume.
//! - `charts`: learning-curve PNGs.
//! - `tensorboard`: the same metrics as TensorBoard event files.
//!
//! May import `model` (all of it), `kernels` and the base modules (floor 5 and below); never
//! `config`, `stages` or anything above.

pub(crate) mod charts;
pub mod config;
pub mod data;
pub mod logps;
pub mod loss;
pub(crate) mod optim;
pub(crate) mod tensorboard;
pub mod trainer;
