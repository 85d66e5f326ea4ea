//! The Llama architecture, in candle: the network ([`llama::Llama`], batched forward, KV cache,
//! training passes), its configuration, LoRA layers and adapters (PEFT's files), every tensor
//! name, and the plain-Rust inference forward over quantized blocks (`cpu_forward.rs`).
//! Generation and DPO training share the same `Llama`, which carries an optional LoRA adapter.
//!
//! - [`load`]: model files into a [`load::Model`] (sources, GGUF, safetensors, tokenizer, chat
//!   template, special text).
//! - [`save`]: a model or an adapter written for other engines (GGUF for llama.cpp and Ollama,
//!   the Ollama Modelfile).
//! - [`generate`]: sampling, the [`generate::Decoder`] that `generate()` and `pipeline serve`
//!   share, prefix sharing, context limits.
//!
//! The files directly in this folder may import `kernels` and the base modules only (not `load`
//! or `generate`, which build on them); docs/ARCHITECTURE.md has the floors.

pub(crate) mod adapter;
pub mod config;
pub(crate) mod cpu_forward;
pub mod generate;
pub mod llama;
pub mod load;
pub mod lora;
pub(crate) mod names;
pub mod options;
pub mod save;
