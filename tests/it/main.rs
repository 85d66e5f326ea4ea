//! The integration tests, one test binary (`cargo test --test it`), one module per area:
//! `cargo test --test it crash::` runs one area, `cargo test --test it -- --list` names them all.
//! Shared fixtures (the real model, the saved pages, the `pipeline` binary, fake HTTP servers)
//! are in `support`.

mod architecture;
mod cache_keys;
mod config;
mod crash;
mod dpo;
mod engine;
mod eval;
mod gguf_export;
mod gpu_path;
mod hostile_api;
mod hostile_files;
mod hub_faults;
mod items;
mod judge;
mod losses;
mod model_files;
mod openai_backend;
mod penalties;
mod pipeline;
mod prompts;
mod reliability;
mod rounds;
mod scrape;
mod serve;
mod styles;
mod support;
mod tinyllama;
mod tinyllama_tokenizer;
