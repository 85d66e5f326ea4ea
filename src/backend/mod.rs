//! Generation backends: where reviews come from. `openai.rs` is the client of OpenAI-compatible
//! servers (vLLM, TGI, SGLang, llama.cpp): endpoint spreading, retries, the wire format.
//!
//! May import `model` (all of it), `kernels` and the base modules; never `config`, `stages` or
//! anything above.

pub(crate) mod openai;
