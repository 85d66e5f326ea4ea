//! reviewer2: build a synthetic preference dataset (reviewer2-1k-paired) and train on it with DPO.
//!
//! The binary `pipeline` is a thin CLI ([`cli`]) over these modules:
//! - [`config`]: the recipe (`pipeline.toml`, presets, `--set`), typed and validated.
//! - [`recipe`]: the recipe resolved once (model files, devices, load options, page source).
//! - [`cache`]: the content-addressed stage cache (keys, manifests, atomic writes, verification).
//! - [`stages`]: one module per pipeline stage, plus the graph that runs them.
//! - [`model`]: the Llama engine (loading, tokenizer, chat template, forward, batched generation).
//! - [`dpo`]: LoRA preference training, losses, PEFT adapter export.
//! - [`hub`]: the Hugging Face dataset folder (Parquet + dataset card).
//! - [`lock`], [`export_guard`], [`limits`], [`special_text`], [`term`]: the reliability guards:
//!   one writer per workdir, outputs that never replace what they did not write, the model's
//!   context, user text kept apart from special tokens, colour only on a terminal.

pub mod bench;
pub mod cache;
pub mod cli;
pub mod config;
pub mod dpo;
pub mod error;
pub mod estimate;
pub mod fsutil;
pub mod hub;
pub mod model;
pub mod recipe;
pub mod rng;
pub mod stages;

// Reliability guards (docs/RELIABILITY.md).
pub mod export_guard;
pub mod limits;
pub mod lock;
pub mod special_text;
pub mod term;
