//! reviewer2: build a synthetic preference dataset (reviewer2-1k-paired) and train on it with DPO.
//!
//! The binary `pipeline` is a thin CLI ([`cli`]) over these modules (docs/ARCHITECTURE.md shows
//! the whole on one page):
//! - [`config`]: the recipe (`pipeline.toml`, presets, `--set`), typed and validated.
//! - `recipe`: the recipe resolved once (model files, devices, load options, page source).
//! - `cache`: the content-addressed stage cache (keys, manifests, atomic commits, verification).
//! - [`stages`]: one module per pipeline stage, plus the graph that runs them.
//! - [`model`]: the Llama engine (loading, tokenizer, chat template, forward, batched generation,
//!   LoRA adapters and their PEFT files).
//! - [`dpo`]: preference training only: data, log-probs, losses, optimizer, trainer, charts.
//! - [`hub`]: the Hugging Face dataset folder (Parquet + dataset card).
//! - [`error`]: the library's error type.
//! - [`fsutil`], `rng`: the one atomic write, hashes, JSONL; the one seed mixer and seeded orders.
//! - `protocol`: the OpenAI HTTP API's wire format, shared by `pipeline serve` and the `openai` backend.
//! - `estimate`: how long a run's plan will take on this device.
//! - [`lock`], `export_guard`, [`term`]: one writer per workdir, outputs that never replace what
//!   they did not write, colour only on a terminal (docs/RELIABILITY.md).
//! - [`bench`]: `pipeline bench`.

pub(crate) mod backend;
pub(crate) mod bench;
pub(crate) mod cache;
pub mod cli;
pub mod config;
pub mod dpo;
pub mod error;
pub(crate) mod estimate;
pub(crate) mod export_guard;
pub mod fsutil;
pub mod hub;
pub mod judge;
pub(crate) mod kernels;
pub mod lock;
pub mod model;
pub(crate) mod protocol;
pub(crate) mod recipe;
pub(crate) mod retry;
pub(crate) mod rng;
pub(crate) mod serve;
pub mod stages;
pub mod term;
