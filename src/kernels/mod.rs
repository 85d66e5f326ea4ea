//! Kernels: every `unsafe` of the library, behind safe functions the model calls.
//!
//! - `quant/`: GGUF Q4_1 / Q8_0 blocks ([`quant::Packed`]), 8-bit activations and their
//!   products, one file per instruction set (`avx2.rs`, `avxvnni.rs`, `avx512.rs`, the portable reference in
//!   `mod.rs`), the kernel picked at run time ([`quant::Kernel::get`], `REVIEWER2_QKERNEL`).
//! - `decode_attention.rs`: the plain-Rust forward's attention over an f32 or f16 KV cache.
//! - `attention.rs`: the candle op for attention on the CPU (f32/f64) with its backward, for
//!   candle's forward and training.
//! - `fused.rs`: the training path's RMS norm, RoPE, SwiGLU and token log-probs, one candle op
//!   each with a hand-written backward.
//! - `vexp.rs`: a vectorized exp; `spin_pool.rs`: the threads that run a step's products.
//!
//! May import the base modules (`error`) and external crates only: nothing of the model.

pub(crate) mod attention;
pub(crate) mod decode_attention;
pub(crate) mod fused;
pub(crate) mod quant;
pub(crate) mod spin_pool;
pub(crate) mod vexp;
