//! How a model is loaded and where it runs: the typed choices of the recipe's `generate.*` and
//! `train.*` model keys (device, dtype, weights, attention) and [`LoadOptions`], built once from
//! the resolved recipe.

use crate::error::{bail, Context, Result};
use crate::kernels::quant;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// How to hold a GGUF's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsMode {
    /// Quantized matmuls: least memory, fastest for one row at a time.
    Quantized,
    /// The GGUF's own Q4_1 and Q8_0 blocks (others requantized to Q8_0) for decoding steps,
    /// through our SIMD kernels (`kernels/quant/`, `model/cpu_forward.rs`), and the same weights
    /// dequantized for prefill, where dense gemm is faster: both copies in memory.
    Mixed,
    /// As `Mixed`, with every projection requantized to Q8_0 (closer to the dense weights).
    Q8,
    /// As `Mixed`, with prefill on the blocks too: every product is llama.cpp's arithmetic
    /// (the file's blocks against 8-bit activations). Where the tiled AVX-512 VNNI kernel runs
    /// (`kernels/quant/`), prefill goes about twice as fast as dense f32 gemm.
    Blocks,
    /// Dequantized to the compute dtype: fastest for batches, and required for training.
    Dense,
}

impl WeightsMode {
    /// The text may depend on how rows are batched: candle's quantized matmul rounds
    /// differently for one row than for several, and `Mixed` / `Q8` decode on blocks (each row
    /// on its own) after a dense prefill whose float-level differences between batch shapes
    /// become other 8-bit roundings, which can change a token at a near-tie. Dense weights give
    /// every row its solo text, and so does `Blocks`: prefill and decoding both run in plain
    /// Rust, every row's products, norms and attention its own in a fixed order (tested: solo,
    /// batched with refills, and resumed give the same text).
    pub(crate) fn batch_dependent(self) -> bool {
        !matches!(self, WeightsMode::Dense | WeightsMode::Blocks)
    }

    /// How a GGUF loaded for the batch stages (the generate stage, and the eval's and the rounds'
    /// sampling from the training model, `Recipe::sampler`) with `generate.weights = "auto"` is
    /// held: on the CPU in f32, on its blocks where a tiled kernel runs (AVX-512 VNNI, AVX-VNNI or
    /// AVX2: faster than dense f32 there, docs/PERF.md, and batch-invariant as dense is); `None`
    /// keeps dense weights (a GPU, bf16, or a CPU without AVX2).
    pub(crate) fn batch_auto(dev: &Device, dtype: DType) -> Option<WeightsMode> {
        (dev.is_cpu() && dtype == DType::F32 && quant::prefill_on_blocks_pays())
            .then_some(WeightsMode::Blocks)
    }

    /// How a GGUF loaded for one person waiting (`sample`, `serve`) with
    /// `generate.weights = "auto"` is held: on the CPU in f32, on its blocks, prefill included
    /// where a tiled kernel runs (`Blocks`: faster than dense gemm there), for decoding only
    /// elsewhere (`Mixed`); `None` keeps dense weights.
    pub(crate) fn interactive_auto(dev: &Device, dtype: DType) -> Option<WeightsMode> {
        if !(dev.is_cpu() && dtype == DType::F32) {
            return None;
        }
        Some(if quant::prefill_on_blocks_pays() {
            WeightsMode::Blocks
        } else {
            WeightsMode::Mixed
        })
    }

    /// Only candle's quantized matmuls keep q/k in the GGUF's interleaved-RoPE row order; the
    /// other modes reorder the rows to the Hugging Face layout, where adapters apply.
    pub(crate) fn interleaved_rope(self) -> bool {
        matches!(self, WeightsMode::Quantized)
    }
}

/// `device` settings: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when built with `--features cuda` and a GPU answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// Open the device (CUDA only when built with `--features cuda`).
    pub(crate) fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda => {
                if !cfg!(feature = "cuda") {
                    bail!("device \"cuda\" needs a build with `cargo build --release --features cuda`");
                }
                Ok(Device::new_cuda(0).context("opening CUDA device 0")?)
            }
            DeviceChoice::Auto => {
                if cfg!(feature = "cuda") {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// `dtype` settings: what the base weights are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// bf16 on a GPU, f32 on the CPU.
    #[default]
    Auto,
    F32,
    /// What the GPU runs; selectable on the CPU (slowly: candle widens bf16 matmuls to f32
    /// there) to exercise that path where no GPU is at hand.
    Bf16,
}

impl DTypeChoice {
    pub(crate) fn resolve(self, dev: &Device) -> DType {
        match self {
            DTypeChoice::Auto => default_dtype(dev),
            DTypeChoice::F32 => DType::F32,
            DTypeChoice::Bf16 => DType::BF16,
        }
    }
}

/// `generate.weights`: how a GGUF's weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WeightsChoice {
    /// For a GGUF on the CPU in f32: `Blocks` where a tiled kernel runs (AVX-512 VNNI or AVX2),
    /// for the batch stages (every row its solo text, at any batch size) and for `sample` and
    /// `serve`; elsewhere dense for the batch stages and `Mixed` for one person waiting
    /// (`Recipe::load_interactive`). Dense for everything else. docs/PERF.md.
    #[default]
    Auto,
    Quantized,
    /// The file's blocks for decoding, dense for prefill (see [`WeightsMode::Mixed`]).
    Mixed,
    /// The file's blocks for prefill and decoding (see [`WeightsMode::Blocks`]).
    Blocks,
    /// Requantized to Q8_0 at load (see [`WeightsMode::Q8`]).
    Q8,
    F32,
}

impl WeightsChoice {
    /// The batch stages' weights: `auto` is [`WeightsMode::batch_auto`] for a GGUF, dense
    /// otherwise; every other choice is [`WeightsChoice::mode`].
    pub(crate) fn batch_mode(self, gguf: bool, dev: &Device, dtype: DType) -> WeightsMode {
        match self {
            WeightsChoice::Auto if gguf => {
                WeightsMode::batch_auto(dev, dtype).unwrap_or(WeightsMode::Dense)
            }
            other => other.mode(gguf),
        }
    }

    /// Only GGUF files have quantized weights to keep; everything else is dense.
    pub(crate) fn mode(self, gguf: bool) -> WeightsMode {
        match self {
            WeightsChoice::Quantized if gguf => WeightsMode::Quantized,
            WeightsChoice::Mixed if gguf => WeightsMode::Mixed,
            WeightsChoice::Blocks if gguf => WeightsMode::Blocks,
            WeightsChoice::Q8 if gguf => WeightsMode::Q8,
            _ => WeightsMode::Dense,
        }
    }
}

/// `attention`: which attention implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionChoice {
    /// The fused kernel where it runs (CPU, f32/f64), composed candle ops elsewhere (GPU, bf16).
    #[default]
    Auto,
    /// Our fused CPU kernel (`kernels/attention.rs`); refused where it does not run.
    Fused,
    /// Composed candle ops: what the GPU path runs, selectable on the CPU to exercise it.
    Composed,
}

/// Everything that decides how a model is loaded, built once from the resolved recipe.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    pub weights: WeightsMode,
    pub attention: AttentionChoice,
    /// Prefill a batch's shared prompt prefixes once (`model/generate/prefix.rs`).
    pub share_prefixes: bool,
}

impl LoadOptions {
    /// Dense weights in the device's default dtype, default engine switches.
    pub(crate) fn new(device: Device) -> Self {
        Self {
            dtype: default_dtype(&device),
            device,
            weights: WeightsMode::Dense,
            attention: AttentionChoice::Auto,
            share_prefixes: true,
        }
    }

    pub fn cpu_f32() -> Self {
        Self::new(Device::Cpu)
    }
}

/// bf16 on a GPU, f32 on the CPU (no fast bf16 matmul there).
pub(crate) fn default_dtype(dev: &Device) -> DType {
    if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}
