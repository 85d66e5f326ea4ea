//! A Llama decoder in candle, written for batched generation and for training.
//!
//! Unlike candle-transformers' llama, every row carries its own positions and an additive padding
//! mask, so left-padded batches give each row exactly its solo result; the KV cache is per layer
//! and preallocated; logits can be returned for every position. `Mode::train` swaps candle's fused
//! inference kernels (which silently drop gradients) for composed ops, and multiplies by frozen
//! base weights through `FrozenMatmul`, which returns no weight gradient. Attention on the CPU
//! is our own kernel with a backward (`kernels/attention.rs`). `Mode::checkpoint` keeps only each
//! layer's input and recomputes the layer during the backward pass ([`Checkpoint`]).
//!
//! Shapes in comments: B batch, T new tokens, S cached + new tokens, H hidden, nh / nkv heads,
//! hd head dim, V vocab.
//!
//! LoRA lives beside the base weights: a Llama carries at most one `Adapter`, attached and
//! detached without touching the base, and `Mode::lora` turns it off for one call.

use super::adapter::Adapter;
use super::lora::{Lora, LoraSpec, Projection};
use crate::error::{bail, Context, Result};
use crate::kernels::attention::MASK_NEG;
use crate::kernels::quant::{Packed, QActs};
use candle_core::backprop::GradStore;
use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, DType, Device, Layout, Module, Shape, Tensor, Var, D};
use std::sync::Arc;

use super::config::LlamaConfig;

/// Which pass a forward call is, and its options.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Inference over a prompt's tokens (many a row; a prefix-trie level of one token is still
    /// prefill, and must give what a whole-prompt prefill gives). `lora`: apply the attached
    /// adapter, if any.
    Prefill { lora: bool },
    /// Inference, one new token a row: weights kept as blocks too multiply through the blocks,
    /// whatever the batch. Decided by the caller, not by the token count.
    Decode { lora: bool },
    /// Gradient-carrying ops: training, and the reference pass that must compute what training
    /// computes.
    Train(TrainPass),
}

/// The options of a [`Mode::Train`] pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainPass {
    /// Apply the attached adapter (off = the base model, training's reference).
    pub lora: bool,
    /// Seed for LoRA dropout masks this step (`None` = no dropout, as in eval).
    pub dropout_seed: Option<u64>,
    /// Gradient checkpointing: see `Llama::forward_hidden_ckpt`.
    pub checkpoint: bool,
}

impl Mode {
    /// Prefill with the adapter on.
    pub fn infer() -> Self {
        Mode::Prefill { lora: true }
    }

    /// The decoding step of the same inference (training has none).
    pub fn decode_step(self) -> Self {
        Mode::Decode { lora: self.lora() }
    }

    /// The same pass with the adapter on or off.
    pub fn with_lora(self, lora: bool) -> Self {
        match self {
            Mode::Prefill { .. } => Mode::Prefill { lora },
            Mode::Decode { .. } => Mode::Decode { lora },
            Mode::Train(t) => Mode::Train(TrainPass { lora, ..t }),
        }
    }

    pub fn lora(self) -> bool {
        match self {
            Mode::Prefill { lora } | Mode::Decode { lora } => lora,
            Mode::Train(t) => t.lora,
        }
    }

    pub(crate) fn is_train(self) -> bool {
        matches!(self, Mode::Train(_))
    }

    pub(crate) fn is_decode(self) -> bool {
        matches!(self, Mode::Decode { .. })
    }

    pub(crate) fn dropout_seed(self) -> Option<u64> {
        match self {
            Mode::Train(t) => t.dropout_seed,
            _ => None,
        }
    }

    pub(crate) fn checkpoint(self) -> bool {
        matches!(
            self,
            Mode::Train(TrainPass {
                checkpoint: true,
                ..
            })
        )
    }
}

/// Which code computes an inference pass, resolved once when the model is loaded (and again only
/// when its attention choice changes): candle's ops, or the plain-Rust forward over the GGUF's
/// blocks (`cpu_forward.rs`), which then holds every projection's blocks.
pub(crate) enum InferPath {
    /// candle's ops for every pass (any device, dtype and weights; training always).
    Graph,
    /// Decoding steps in plain Rust over `weights`; prefill too when `prefill`
    /// (`generate.weights = "blocks"`), else through candle's ops on the dense copy.
    Blocks {
        weights: BlockWeights,
        prefill: bool,
    },
}

/// Every projection's blocks and the head's, for the plain-Rust forward.
pub(crate) struct BlockWeights {
    /// Per layer, in [`Projection::ALL`] order.
    layers: Vec<[Arc<Packed>; 7]>,
    pub(crate) lm_head: Arc<Packed>,
}

impl BlockWeights {
    /// Projection `p` of layer `layer`.
    pub(crate) fn proj(&self, layer: usize, p: Projection) -> &Packed {
        let i = Projection::ALL
            .iter()
            .position(|&q| q == p)
            .unwrap_or_default();
        &self.layers[layer][i]
    }
}

enum Weight {
    /// `[out, in]`, in the model's dtype.
    Dense(Tensor),
    Quant(Arc<QMatMul>),
    /// Both: quantized blocks for decoding steps (integer dot products over a fifth of the
    /// bytes: `kernels/quant/`), the dense matrix for prefill (many tokens a row, where f32 gemm
    /// wins unless the tiled kernel runs) and training.
    Both {
        dense: Tensor,
        blocks: Arc<Packed>,
        /// Prefill on the blocks too (`generate.weights = "blocks"`).
        prefill: bool,
    },
}

/// A bias-free linear layer (a frozen base weight).
pub(crate) struct Linear {
    weight: Weight,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    pub(crate) fn dense(w: Tensor) -> Result<Self> {
        let (o, i) = w.dims2()?;
        Ok(Self {
            weight: Weight::Dense(w),
            out_features: o,
            in_features: i,
        })
    }

    pub(crate) fn quantized(q: QMatMul, (o, i): (usize, usize)) -> Self {
        Self {
            weight: Weight::Quant(Arc::new(q)),
            out_features: o,
            in_features: i,
        }
    }

    /// Dense `w` for many rows and quantized `q` (the same weights) for a few; with
    /// `prefill_on_blocks`, `q` for inference at any row count.
    pub(crate) fn both(w: Tensor, q: Packed, prefill_on_blocks: bool) -> Result<Self> {
        let (o, i) = w.dims2()?;
        crate::error::ensure!(
            (q.rows, q.cols) == (o, i),
            "internal: quantized [{}, {}] beside dense [{o}, {i}]",
            q.rows,
            q.cols
        );
        Ok(Self {
            weight: Weight::Both {
                dense: w,
                blocks: Arc::new(q),
                prefill: prefill_on_blocks,
            },
            out_features: o,
            in_features: i,
        })
    }

    /// x: [B, T, in] -> [B, T, out], plus `lora`'s contribution (its dropout mask seeded by the
    /// step's seed and `salt`).
    fn forward(&self, x: &Tensor, mode: Mode, lora: Option<&Lora>, salt: u64) -> Result<Tensor> {
        let (b, t, i) = x.dims3()?;
        let x2 = x.reshape((b * t, i))?;
        let base = match &self.weight {
            Weight::Dense(w) | Weight::Both { dense: w, .. } if mode.is_train() => {
                frozen_matmul(&x2, w)?
            }
            // Decoding steps (one new token a row) on the blocks, whatever the batch: each
            // row's result then does not depend on the rows beside it.
            Weight::Both {
                blocks, prefill, ..
            } if (mode.is_decode() || *prefill) && x2.device().is_cpu() => {
                packed_forward(blocks, x, &x2)?
            }
            Weight::Dense(w) | Weight::Both { dense: w, .. } => x2.matmul(&w.t()?)?,
            Weight::Quant(q) => q.forward(&x2.contiguous()?)?,
        };
        let y = match lora {
            Some(l) => (base + l.forward(&x2, mode.dropout_seed().map(|s| s ^ salt))?)?,
            None => base,
        };
        Ok(y.reshape((b, t, self.out_features))?)
    }

    /// `g @ W`: the gradient its input gets from `g` `[B, T, out]` through the frozen base
    /// weight, or `None` without a dense weight.
    fn input_grad(&self, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, o) = g.dims3()?;
        Ok(match &self.weight {
            Weight::Dense(w) | Weight::Both { dense: w, .. } => Some(
                g.reshape((b * t, o))?
                    .matmul(w)?
                    .reshape((b, t, self.in_features))?,
            ),
            Weight::Quant(_) => None,
        })
    }

    /// The quantized blocks, where this layer keeps them for decoding, and whether prefill
    /// runs on them too.
    fn blocks(&self) -> Option<(&Arc<Packed>, bool)> {
        match &self.weight {
            Weight::Both {
                blocks, prefill, ..
            } => Some((blocks, *prefill)),
            _ => None,
        }
    }

    /// The base weight as a dense f32 tensor `[out, in]`.
    pub(crate) fn dense_f32(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Dense(w) | Weight::Both { dense: w, .. } => w.to_dtype(DType::F32)?,
            Weight::Quant(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.dequantize(&Device::Cpu)?,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
            },
        })
    }
}

/// x: [N, in] f32 (`x2`, a view of `input`) through the quantized blocks -> [N, out].
///
/// q, k and v (and gate and up) take the same input: its quantized activations are kept,
/// per thread, under the input's tensor id (ids are never reused, and these tensors are
/// never written in place), so it is quantized once.
fn packed_forward(q: &Packed, input: &Tensor, x: &Tensor) -> Result<Tensor> {
    use std::cell::RefCell;
    thread_local! {
        static ACTS: RefCell<(Option<candle_core::TensorId>, QActs)> =
            RefCell::new((None, QActs::default()));
    }
    let (n, i) = x.dims2()?;
    let dt = x.dtype();
    let out = ACTS.with(|cell| -> Result<Vec<f32>> {
        let (id, acts) = &mut *cell.borrow_mut();
        if *id != Some(input.id()) || acts.rows != n {
            *id = None;
            let x = x.to_dtype(DType::F32)?.contiguous()?;
            let (st, layout) = x.storage_and_layout();
            match (&*st, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                    acts.quantize(&v[a..b], n, i)
                }
                _ => acts.quantize(&x.flatten_all()?.to_vec1::<f32>()?, n, i),
            }
            *id = Some(input.id());
        }
        let mut out = vec![0f32; n * q.rows];
        // Many rows: a prefill, between whose products candle's ops run on rayon's threads.
        if n > 8 {
            q.matmul_then_rest(acts, &mut out);
        } else {
            q.matmul(acts, &mut out);
        }
        Ok(out)
    })?;
    Ok(Tensor::from_vec(out, (n, q.rows), x.device())?.to_dtype(dt)?)
}

/// `x @ w^T` whose backward gives `x` its gradient and computes none for the frozen `w`
/// (candle's matmul always computes both: a weight-sized matmul per layer for nothing).
fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op2(w, FrozenMatmul)?)
}

/// The product is computed inside the op, by the backend's own matmul, so the graph holds it
/// once (an op that wrapped a precomputed product would keep two copies).
struct FrozenMatmul;

/// (batch, m, n, k) and the transposed-weight layout for `x [N, in] @ w^T`.
fn frozen_dims(
    xl: &Layout,
    wl: &Layout,
) -> candle_core::Result<((usize, usize, usize, usize), Layout)> {
    let (n, i) = xl.shape().dims2()?;
    let (o, i2) = wl.shape().dims2()?;
    if i != i2 {
        candle_core::bail!("frozen-matmul: x has {i} features, the weight {i2}");
    }
    Ok(((1, n, o, i), wl.transpose(0, 1)?))
}

impl candle_core::CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (bmnk, wt) = frozen_dims(xl, wl)?;
        Ok((x.matmul(w, bmnk, xl, &wt)?, Shape::from((bmnk.1, bmnk.2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (bmnk, wt) = frozen_dims(xl, wl)?;
        Ok((x.matmul(w, bmnk, xl, &wt)?, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // dL/dx = dL/dy @ w ; [N, out] @ [out, in]
        Ok((Some(grad.matmul(w)?), None))
    }
}

pub(crate) struct Layer {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
    pub(crate) input_layernorm: Tensor,
    pub(crate) post_attention_layernorm: Tensor,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    /// [V, H], in the compute dtype.
    pub(crate) embed_tokens: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: Linear,
    /// GGUF keeps q/k in the interleaved (GPT-J) RoPE layout; HF checkpoints use rotate-half.
    pub(crate) rope_interleaved: bool,
    /// The LoRA adapter `Mode::lora` applies.
    adapter: Option<Adapter>,
    /// [max_pos, hd/2], f32
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    /// Attention through our fused kernel (`kernels/attention.rs`): on where it runs (CPU, f32/f64)
    /// unless the load options ask for the composed ops ([`Llama::set_fused_attention`]).
    fused_attention: bool,
    /// Which code runs inference passes; follows from the weights and `fused_attention`.
    path: InferPath,
}

/// Per-layer key/value cache, preallocated and grown by doubling. Row `i` holds valid entries in
/// columns `[start[i], len)`: rows are left-aligned by padding, so refilled rows fit in.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub len: usize,
    cap: usize,
}

impl KvCache {
    pub fn new(model: &Llama, batch: usize, cap: usize) -> Result<Self> {
        let c = &model.cfg;
        let shape = (batch, c.num_key_value_heads, cap.max(1), c.head_dim);
        let mk = || Tensor::zeros(shape, model.kv_dtype(), &model.device);
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..c.num_hidden_layers {
            k.push(mk()?);
            v.push(mk()?);
        }
        Ok(Self {
            k,
            v,
            len: 0,
            cap: cap.max(1),
        })
    }

    pub(crate) fn ensure(&mut self, extra: usize) -> Result<()> {
        if self.len + extra <= self.cap {
            return Ok(());
        }
        let new_cap = (self.len + extra).max(self.cap * 2);
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let (b, h, _, d) = t.dims4()?;
            let grown = Tensor::zeros((b, h, new_cap, d), t.dtype(), t.device())?;
            grown.slice_set(&t.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            *t = grown;
        }
        self.cap = new_cap;
        Ok(())
    }

    /// A copy that shares no storage with this cache (in-place writes to one leave the other).
    #[cfg(test)]
    pub(crate) fn deep_copy(&self) -> Result<KvCache> {
        let copy =
            |v: &Vec<Tensor>| -> Result<Vec<Tensor>> { v.iter().map(|t| Ok(t.copy()?)).collect() };
        Ok(KvCache {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len: self.len,
            cap: self.cap,
        })
    }

    /// Row 0's columns `[from, from + n)` as a cache of their own (one row, no padding).
    pub(crate) fn columns(&self, from: usize, n: usize) -> Result<KvCache> {
        let cut = |t: &Tensor| -> Result<Tensor> {
            Ok(t.narrow(0, 0, 1)?.narrow(2, from, n)?.contiguous()?)
        };
        Ok(KvCache {
            k: self.k.iter().map(cut).collect::<Result<_>>()?,
            v: self.v.iter().map(cut).collect::<Result<_>>()?,
            len: n,
            cap: n,
        })
    }

    /// Fill this (empty, one-row) cache with the first `n` columns of `src`'s row 0.
    pub(crate) fn copy_prefix(&mut self, src: &KvCache, n: usize) -> Result<()> {
        self.ensure(n)?;
        for (dst, s) in self.k.iter().zip(&src.k).chain(self.v.iter().zip(&src.v)) {
            dst.slice_set(&s.narrow(0, 0, 1)?.narrow(2, 0, n)?.contiguous()?, 2, 0)?;
        }
        self.len = n;
        Ok(())
    }

    pub(crate) fn set_cap_from_tensors(&mut self) {
        self.cap = self.k[0].dim(2).unwrap_or(self.cap);
    }

    /// Keep only rows `idx` (in that order).
    pub(crate) fn select_rows(&mut self, idx: &[usize]) -> Result<()> {
        let dev = self.k[0].device().clone();
        let ids = Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev)?;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(&ids, 0)?;
        }
        Ok(())
    }

    /// Write `src`'s rows `from[i]` (their first `src.len` columns) into this cache's rows
    /// `to[i]`, at columns `at..at + src.len`, in place: a refilled slot takes its new prompt
    /// without the rest of the batch being copied. The columns of `to[i]` outside that range
    /// keep what they held (the caller moves the row's start past them).
    pub(crate) fn put_rows(
        &mut self,
        to: &[usize],
        src: &KvCache,
        from: &[usize],
        at: usize,
    ) -> Result<()> {
        crate::error::ensure!(
            to.len() == from.len() && at + src.len <= self.cap,
            "internal: {} rows into {} at column {at} + {} of {}",
            from.len(),
            to.len(),
            src.len,
            self.cap
        );
        for (dst, s) in self.k.iter().zip(&src.k).chain(self.v.iter().zip(&src.v)) {
            for (&t, &f) in to.iter().zip(from) {
                let part = s.narrow(0, f, 1)?.narrow(2, 0, src.len)?.contiguous()?;
                dst.narrow(0, t, 1)?.slice_set(&part, 2, at)?;
            }
        }
        Ok(())
    }

    /// Shift every row right by `n` columns (prepend padding) so the cache is `n` longer.
    pub(crate) fn pad_front(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let len = self.len;
        let cap = (len + n).max(self.cap);
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let (b, h, _, d) = t.dims4()?;
            let fresh = Tensor::zeros((b, h, cap, d), t.dtype(), t.device())?;
            if len > 0 {
                fresh.slice_set(&t.narrow(2, 0, len)?.contiguous()?, 2, n)?;
            }
            *t = fresh;
        }
        self.cap = cap;
        self.len = len + n;
        Ok(())
    }

    /// Drop the first `n` columns (padding no row uses any more).
    pub(crate) fn trim_front(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let len = self.len - n;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let (b, h, _, d) = t.dims4()?;
            let fresh = Tensor::zeros((b, h, self.cap, d), t.dtype(), t.device())?;
            if len > 0 {
                fresh.slice_set(&t.narrow(2, n, len)?.contiguous()?, 2, 0)?;
            }
            *t = fresh;
        }
        self.len = len;
        Ok(())
    }
}

/// Causal + padding mask for `t` new tokens appended after `past` cached columns:
/// `[B, 1, T, past + T]`, 0 where row `i` may attend, MASK_NEG elsewhere. `start[i]` is the first
/// valid column of row `i`.
pub fn build_mask(
    start: &[usize],
    past: usize,
    t: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let s = past + t;
    let mut m = vec![0f32; start.len() * t * s];
    for (i, &st) in start.iter().enumerate() {
        for q in 0..t {
            for k in 0..s {
                if k < st || k > past + q {
                    m[(i * t + q) * s + k] = MASK_NEG;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (start.len(), 1, t, s), dev)?.to_dtype(dtype)?)
}

/// Positions of `t` new tokens after `past` columns: column - start, clamped at 0 for padding.
pub fn build_positions(start: &[usize], past: usize, t: usize, dev: &Device) -> Result<Tensor> {
    let mut p = Vec::with_capacity(start.len() * t);
    for &st in start {
        for q in 0..t {
            p.push((past + q).saturating_sub(st) as u32);
        }
    }
    Ok(Tensor::from_vec(p, (start.len(), t), dev)?)
}

/// Half types are upcast to f32 for reductions; f32 and f64 stay as they are.
pub(crate) fn accum_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, train: bool) -> Result<Tensor> {
    if train && crate::kernels::fused::supported(x) && x.dtype() == w.dtype() {
        return Ok(crate::kernels::fused::rms_norm(x, w, eps)?);
    }
    if train {
        // Composed: carries gradients (candle's fused kernel does not).
        let dt = x.dtype();
        let xf = x.to_dtype(accum_dtype(dt))?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
        Ok(y.to_dtype(dt)?.broadcast_mul(w)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
    }
}

/// What every layer of one forward pass shares.
struct LayerCtx {
    /// [B, T, hd/2]
    cos: Tensor,
    sin: Tensor,
    /// [B, 1, T, S] additive
    mask: Tensor,
    past: usize,
    fused: bool,
}

/// A checkpointed training forward: each layer's input, kept instead of its activations.
pub struct Checkpoint {
    inputs: Vec<Tensor>,
    /// The last layer's output, the leaf the loss's own graph starts from.
    last: Var,
    ctx: LayerCtx,
    mode: Mode,
}

impl Checkpoint {
    /// Carry the loss's gradients (from `loss.backward()`) back through the layers, one at a
    /// time: recompute the layer with its input as a leaf, backpropagate the incoming gradient,
    /// and add the LoRA gradients it yields to `grads`. LoRA dropout masks are seeded per step
    /// and layer, so the recomputation draws the same ones.
    pub fn backward(self, model: &Llama, grads: &mut GradStore) -> Result<()> {
        let Some(mut g) = grads.remove(self.last.as_tensor()) else {
            return Ok(()); // the loss does not depend on the layers
        };
        for (li, x) in self.inputs.iter().enumerate().rev() {
            let xv = Var::from_tensor(x)?;
            let mut local = model
                .layer_dot(li, xv.as_tensor(), &g, &self.ctx, self.mode)?
                .backward()?;
            for p in Projection::ALL {
                let Some(l) = model.adapter.as_ref().and_then(|a| a.get(li, p)) else {
                    continue;
                };
                for w in [&l.a, &l.b] {
                    if let Some(gw) = local.remove(w.as_tensor()) {
                        let sum = match grads.remove(w.as_tensor()) {
                            Some(prev) => (prev + gw)?,
                            None => gw,
                        };
                        grads.insert(w.as_tensor(), sum);
                    }
                }
            }
            g = match local.remove(xv.as_tensor()) {
                Some(gx) => gx,
                None => break, // nothing below this layer can change the loss
            };
        }
        Ok(())
    }
}

impl Llama {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: LlamaConfig,
        embed_tokens: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
        rope_interleaved: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let max = cfg.max_position_embeddings.max(1);
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let pos = Tensor::arange(0u32, max as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        let mut llama = Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_interleaved,
            adapter: None,
            device: device.clone(),
            dtype,
            fused_attention: crate::kernels::attention::supported(device, dtype),
            path: InferPath::Graph,
        };
        llama.path = llama.resolve_path();
        Ok(llama)
    }

    /// Attention through the fused kernel or candle's composed ops; the inference path follows.
    pub(crate) fn set_fused_attention(&mut self, fused: bool) {
        self.fused_attention = fused;
        self.path = self.resolve_path();
    }

    /// The plain-Rust forward runs on the CPU in f32 with our attention (`attention =
    /// "composed"` asks for candle's ops), where every projection and the head keep blocks
    /// (`generate.weights = "mixed"`, `"q8"` or `"blocks"`); prefill too where every projection
    /// prefills on them (`"blocks"`). Measured faster than dense gemm for decoding at 1 to 64
    /// rows (docs/PERF.md).
    fn resolve_path(&self) -> InferPath {
        if !(self.fused_attention && self.device.is_cpu() && self.dtype == DType::F32) {
            return InferPath::Graph;
        }
        let Some((lm_head, _)) = self.lm_head.blocks() else {
            return InferPath::Graph;
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut prefill = true;
        for l in &self.layers {
            let mut blocks = Vec::with_capacity(7);
            for p in Projection::ALL {
                let Some((b, pre)) = l.proj(p).blocks() else {
                    return InferPath::Graph;
                };
                prefill &= pre;
                blocks.push(b.clone());
            }
            let Ok(blocks) = <[Arc<Packed>; 7]>::try_from(blocks) else {
                return InferPath::Graph;
            };
            layers.push(blocks);
        }
        InferPath::Blocks {
            weights: BlockWeights {
                layers,
                lm_head: lm_head.clone(),
            },
            prefill,
        }
    }

    /// The blocks the plain-Rust forward runs `mode` on, or `None` where candle's ops run it:
    /// decoding steps on the blocks path, prefill there too with `weights = "blocks"`,
    /// training never.
    pub(crate) fn blocks_for(&self, mode: Mode) -> Option<&BlockWeights> {
        match (&self.path, mode) {
            (InferPath::Blocks { weights, .. }, Mode::Decode { .. }) => Some(weights),
            (
                InferPath::Blocks {
                    weights,
                    prefill: true,
                },
                Mode::Prefill { .. },
            ) => Some(weights),
            _ => None,
        }
    }

    /// The KV cache's dtype: f16 where prefill and decoding both run in plain Rust, as
    /// llama.cpp keeps its cache (docs/PERF.md has what that changes); otherwise the model's.
    pub(crate) fn kv_dtype(&self) -> DType {
        match self.path {
            InferPath::Blocks { prefill: true, .. } => DType::F16,
            _ => self.dtype,
        }
    }

    /// x: [B, heads, T, hd]; cos/sin: [B, T, hd/2].
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, train: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        if !train {
            return Ok(if self.rope_interleaved {
                candle_nn::rotary_emb::rope_i(&x, cos, sin)?
            } else {
                candle_nn::rotary_emb::rope(&x, cos, sin)?
            });
        }
        if crate::kernels::fused::supported(&x) {
            return Ok(crate::kernels::fused::rope(
                &x,
                cos,
                sin,
                self.rope_interleaved,
            )?);
        }
        let (b, h, t, d) = x.dims4()?;
        let cos = cos.unsqueeze(1)?; // [B,1,T,hd/2]
        let sin = sin.unsqueeze(1)?;
        if self.rope_interleaved {
            let xr = x.reshape((b, h, t, d / 2, 2))?;
            let x0 = xr.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
            let x1 = xr.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
            let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Ok(Tensor::stack(&[y0, y1], D::Minus1)?.reshape((b, h, t, d))?)
        } else {
            let cos = Tensor::cat(&[&cos, &cos], D::Minus1)?;
            let sin = Tensor::cat(&[&sin, &sin], D::Minus1)?;
            let x1 = x.narrow(D::Minus1, 0, d / 2)?;
            let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
            let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
        }
    }

    /// ids: [B, T] u32; positions: [B, T] u32; mask: [B, 1, T, S] additive.
    /// With a cache, the new keys/values are appended to it (S = cache.len + T).
    /// Returns logits [B, V] of the last position, or [B, T, V] with `all_logits`.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        all_logits: bool,
        mode: Mode,
    ) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let x = self.forward_hidden(ids, positions, mask, cache, mode)?;
        let x = if all_logits {
            x
        } else {
            x.narrow(1, t - 1, 1)?
        };
        let logits = self.logits(&x, mode)?;
        Ok(if all_logits {
            logits
        } else {
            logits.squeeze(1)?
        })
    }

    /// The head: final-norm hidden states [B, T, H] -> logits [B, T, V], in f32 (f64 on an f64
    /// model).
    pub(crate) fn logits(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self
            .lm_head
            .forward(h, mode, None, 0)?
            .to_dtype(accum_dtype(self.dtype))?)
    }

    /// The final-norm hidden states [B, T, H]: training applies the head ([`Llama::logits`])
    /// only where it needs log-probabilities (the response tokens), which saves most of the
    /// vocabulary matmul.
    ///
    /// With `mode.checkpoint()` this refuses to run: use [`Llama::forward_hidden_ckpt`], whose
    /// checkpoint must carry the gradient on through the layers.
    pub(crate) fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        crate::error::ensure!(
            !mode.checkpoint(),
            "internal: a checkpointed forward must keep its checkpoint (forward_hidden_ckpt)"
        );
        Ok(self
            .forward_hidden_ckpt(ids, positions, mask, cache, mode)?
            .0)
    }

    /// As [`Llama::forward_hidden`]; with `mode.checkpoint()` (training only) the layers keep no
    /// graph, only their inputs, and the returned [`Checkpoint`] recomputes each layer during
    /// the backward pass: activation memory of one layer instead of all of them, for one more
    /// forward pass.
    pub(crate) fn forward_hidden_ckpt(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<(Tensor, Option<Checkpoint>)> {
        let c = &self.cfg;
        let (b, t) = ids.dims2()?;
        let hd = c.head_dim;
        let flat_pos = positions.flatten_all()?;
        let cos = self
            .cos
            .index_select(&flat_pos, 0)?
            .reshape((b, t, hd / 2))?
            .to_dtype(self.dtype)?;
        let sin = self
            .sin
            .index_select(&flat_pos, 0)?
            .reshape((b, t, hd / 2))?
            .to_dtype(self.dtype)?;
        if let Some(kv) = cache.as_deref_mut() {
            kv.ensure(t)?;
        }
        let past = cache.as_ref().map(|kv| kv.len).unwrap_or(0);
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c.hidden_size))?;
        let ctx = LayerCtx {
            cos,
            sin,
            mask: mask.clone(),
            past,
            fused: self.fused_attention,
        };
        let checkpoint = mode.checkpoint();
        // A recomputed layer could not append to a cache a second time, and training has none.
        crate::error::ensure!(
            !(checkpoint && cache.is_some()),
            "internal: gradient checkpointing runs without a KV cache"
        );
        let mut inputs = Vec::new();
        for li in 0..self.layers.len() {
            if checkpoint {
                x = x.detach();
                inputs.push(x.clone());
                x = self.layer_forward(li, &x, &ctx, None, mode)?.detach();
            } else {
                x = self.layer_forward(li, &x, &ctx, cache.as_deref_mut(), mode)?;
            }
        }
        if let Some(kv) = cache {
            kv.len = past + t;
        }
        let (x, ckpt) = if checkpoint {
            let last = Var::from_tensor(&x)?;
            let x = last.as_tensor().clone();
            (
                x,
                Some(Checkpoint {
                    inputs,
                    last,
                    ctx,
                    mode,
                }),
            )
        } else {
            (x, None)
        };
        Ok((
            rms_norm(&x, &self.norm, c.rms_norm_eps, mode.is_train())?,
            ckpt,
        ))
    }

    /// Layer `li`'s attention with its residual: x [B, T, H] -> [B, T, H], appending the
    /// keys/values to the cache.
    fn attention_block(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &LayerCtx,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let layer = &self.layers[li];
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let rep = nh / nkv;
        let past = ctx.past;
        let scale = 1.0 / (hd as f64).sqrt();
        let proj = |p: Projection, x: &Tensor| self.proj_forward(li, p, x, mode);
        let h = rms_norm(x, &layer.input_layernorm, c.rms_norm_eps, mode.is_train())?;
        let q = proj(Projection::QProj, &h)?;
        let k = proj(Projection::KProj, &h)?;
        let v = proj(Projection::VProj, &h)?;
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?; // [B,nh,T,hd]
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?; // [B,nkv,T,hd]
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = self.rope(&q, &ctx.cos, &ctx.sin, mode.is_train())?;
        let k = self.rope(&k, &ctx.cos, &ctx.sin, mode.is_train())?;
        let (k, v) = match cache {
            Some(kv) => {
                // The cache may hold f16 (`Llama::kv_dtype`): keys and values are rounded on
                // the way in, and attention reads them back in the model's dtype.
                let kd = kv.k[li].dtype();
                kv.k[li].slice_set(&k.to_dtype(kd)?, 2, past)?;
                kv.v[li].slice_set(&v.to_dtype(kd)?, 2, past)?;
                let len = past + t;
                let read = |c: &Tensor| -> Result<Tensor> {
                    Ok(c.narrow(2, 0, len)?.to_dtype(self.dtype)?)
                };
                (read(&kv.k[li])?, read(&kv.v[li])?)
            }
            None => (k, v),
        };
        let y = if ctx.fused {
            crate::kernels::attention::sdpa(&q, &k, &v, &ctx.mask, scale, mode.is_train())?
        // [B,T,nh*hd]
        } else {
            // Grouped-query attention without copying K/V: fold the rep query heads that
            // share a KV head into the row dimension. q: [B,nkv,rep*T,hd]
            let mask5 = ctx.mask.reshape((b, 1, 1, t, past + t))?;
            let q = q.reshape((b, nkv, rep * t, hd))?;
            let att = (q.matmul(&k.t()?)? * scale)?; // [B,nkv,rep*T,S]
            let att = att
                .reshape((b, nkv, rep, t, past + t))?
                .broadcast_add(&mask5)?;
            let att = if mode.is_train() {
                candle_nn::ops::softmax(&att.to_dtype(accum_dtype(self.dtype))?, D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?.contiguous()?)?
            }
            .to_dtype(self.dtype)?;
            let y = att
                .reshape((b, nkv, rep * t, past + t))?
                .matmul(&v.contiguous()?)?; // [B,nkv,rep*T,hd]
            y.reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .reshape((b, t, nh * hd))?
        };
        let y = proj(Projection::OProj, &y)?;
        Ok((x + y)?)
    }

    /// The MLP's gated activation `silu(gate(h)) * up(h)` of layer `li`, h the normed `x`.
    fn mlp_act(&self, li: usize, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let c = &self.cfg;
        let layer = &self.layers[li];
        let proj = |p: Projection, x: &Tensor| self.proj_forward(li, p, x, mode);
        let h = rms_norm(
            x,
            &layer.post_attention_layernorm,
            c.rms_norm_eps,
            mode.is_train(),
        )?;
        let g = proj(Projection::GateProj, &h)?;
        let u = proj(Projection::UpProj, &h)?;
        let act = if mode.is_train() && crate::kernels::fused::supported(&g) {
            crate::kernels::fused::swiglu(&g, &u)?
        } else if mode.is_train() {
            (candle_nn::ops::silu(&g)? * u)?
        } else {
            (g.silu()? * u)?
        };
        Ok(act)
    }

    /// Decoder layer `li`: x [B, T, H] -> [B, T, H], appending its keys/values to the cache.
    fn layer_forward(
        &self,
        li: usize,
        x: &Tensor,
        ctx: &LayerCtx,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let x = self.attention_block(li, x, ctx, cache, mode)?;
        let act = self.mlp_act(li, &x, mode)?;
        let y = self.proj_forward(li, Projection::DownProj, &act, mode)?;
        Ok((x + y)?)
    }

    /// `sum(layer_forward(x) * g)`, whose gradients are the layer's backward pass of `g`,
    /// without the down projection's product: `sum(down(a) * g) = sum(a * (g @ W_down))`
    /// and its gradient to `a` is `g @ W_down` either way, so the recomputation skips a
    /// sixth of the layer's matmuls (only the down adapter, if any, still runs forward).
    fn layer_dot(
        &self,
        li: usize,
        x: &Tensor,
        g: &Tensor,
        ctx: &LayerCtx,
        mode: Mode,
    ) -> Result<Tensor> {
        let down = &self.layers[li].down_proj;
        let Some(gd) = down.input_grad(g)? else {
            let y = self.layer_forward(li, x, ctx, None, mode)?;
            return Ok((y * g)?.sum_all()?);
        };
        let x = self.attention_block(li, x, ctx, None, mode)?;
        let act = self.mlp_act(li, &x, mode)?;
        let mut dot = ((x * g)?.sum_all()? + (&act * gd)?.sum_all()?)?;
        let lora = self.adapter.as_ref().filter(|_| mode.lora());
        if let Some(l) = lora.and_then(|a| a.get(li, Projection::DownProj)) {
            let (b, t, i) = act.dims3()?;
            let salt = Self::salt(li, Projection::DownProj);
            let y = l.forward(
                &act.reshape((b * t, i))?,
                mode.dropout_seed().map(|s| s ^ salt),
            )?;
            dot = (dot + (y.reshape(g.shape())? * g)?.sum_all()?)?;
        }
        Ok(dot)
    }

    /// Projection `p` of layer `li`, with its adapter when `mode.lora()`.
    fn proj_forward(&self, li: usize, p: Projection, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let adapter = self.adapter.as_ref().filter(|_| mode.lora());
        let lora = adapter.and_then(|a| a.get(li, p));
        self.layers[li]
            .proj(p)
            .forward(x, mode, lora, Self::salt(li, p))
    }

    /// Each projection's dropout masks are seeded apart: salt (layer << 8) + 1..=7.
    fn salt(li: usize, p: Projection) -> u64 {
        ((li as u64) << 8) + p.index() as u64 + 1
    }

    /// Convenience: logits for every position of unpadded rows of equal length.
    pub fn forward_all(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let start = vec![0; b];
        let mask = build_mask(&start, 0, t, self.dtype, &self.device)?;
        let pos = build_positions(&start, 0, t, &self.device)?;
        self.forward(ids, &pos, &mask, None, true, mode)
            .context("forward")
    }

    /// A fresh adapter for this model's projections, as PEFT initialises one (B = 0, so the
    /// adapted model starts as the base), drawn from `seed`. Kept in f32 (f64 on an f64 model).
    pub fn new_adapter(&self, spec: &LoraSpec, seed: u64) -> Result<Adapter> {
        Adapter::fresh(
            spec,
            self.layers.len(),
            |li, p| {
                let l = self.layers[li].proj(p);
                (l.out_features, l.in_features)
            },
            &self.device,
            accum_dtype(self.dtype),
            seed,
        )
    }

    /// Attach `adapter` (replacing any attached one), after checking that it fits this model.
    pub fn attach(&mut self, adapter: Adapter) -> Result<()> {
        let nl = self.layers.len();
        if adapter.layers.len() > nl {
            bail!(
                "the adapter has {} layers, this model {nl}; was it trained on another base model?",
                adapter.layers.len()
            );
        }
        for (li, p, l) in adapter.loras() {
            let lin = self.layers[li].proj(p);
            let (o, i) = l.dims()?;
            if (o, i) != (lin.out_features, lin.in_features) {
                bail!(
                    "the adapter's layer {li} {} is [{o}, {i}], the model's [{}, {}]; was it trained on another base model?",
                    p.name(),
                    lin.out_features,
                    lin.in_features
                );
            }
            if self.rope_interleaved && matches!(p, Projection::QProj | Projection::KProj) {
                bail!(
                    "the adapter changes {}, whose weights this model holds in GGUF's RoPE layout; load the model with dense weights",
                    p.name()
                );
            }
        }
        self.adapter = Some(adapter);
        Ok(())
    }

    /// Take the attached adapter off: the model is the base again.
    pub fn detach(&mut self) -> Option<Adapter> {
        self.adapter.take()
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// Fold the attached adapter into the base weights, `W' = W + (alpha/r) B A`, and drop it.
    pub fn merge_adapter(&mut self) -> Result<()> {
        let adapter = self
            .adapter
            .take()
            .context("no adapter is attached to merge")?;
        for (li, p, l) in adapter.loras() {
            let lin = self.layers[li].proj_mut(p);
            let w = (lin.dense_f32()? + l.delta()?)?;
            *lin = Linear::dense(w.to_dtype(self.dtype)?)?;
        }
        Ok(())
    }
}

impl Layer {
    pub(crate) fn proj(&self, p: Projection) -> &Linear {
        match p {
            Projection::QProj => &self.q_proj,
            Projection::KProj => &self.k_proj,
            Projection::VProj => &self.v_proj,
            Projection::OProj => &self.o_proj,
            Projection::GateProj => &self.gate_proj,
            Projection::UpProj => &self.up_proj,
            Projection::DownProj => &self.down_proj,
        }
    }

    fn proj_mut(&mut self, p: Projection) -> &mut Linear {
        match p {
            Projection::QProj => &mut self.q_proj,
            Projection::KProj => &mut self.k_proj,
            Projection::VProj => &mut self.v_proj,
            Projection::OProj => &mut self.o_proj,
            Projection::GateProj => &mut self.gate_proj,
            Projection::UpProj => &mut self.up_proj,
            Projection::DownProj => &mut self.down_proj,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frozen base weights of training get no gradient (even a weight that would track
    /// one); the input gets `grad @ w`.
    #[test]
    fn frozen_matmul_gives_the_weight_no_gradient() {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::new(&[[1f64, 2., 3.], [4., 5., 6.]], &dev).unwrap()).unwrap();
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f64, -1., 2.], [3., 0.25, -0.5]], &dev).unwrap())
                .unwrap();
        let y = frozen_matmul(x.as_tensor(), w.as_tensor()).unwrap();
        let want = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "the frozen weight got a gradient"
        );
        let gx: Vec<Vec<f64>> = grads.get(x.as_tensor()).unwrap().to_vec2().unwrap();
        assert_eq!(gx, vec![vec![3.5, -0.75, 1.5]; 2]);
    }
}
