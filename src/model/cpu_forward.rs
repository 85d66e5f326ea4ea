//! The forward pass on the CPU in plain Rust, for inference on the quantized blocks: decoding
//! steps (one token a row) and prefill (many), without building a candle op.
//!
//! At one row a decoding step is about 0.3 GFLOP over 100 MB of weights, and the composed path
//! spends much of its time around the arithmetic: some 25 candle ops a layer, each allocating
//! its output, plus a mask and position tensors a step. Prefill through candle spent more than
//! half its time outside the products (allocation, page faults, libm's `expf` on masked scores,
//! copies). Here the buffers live in [`Scratch`] (kept across calls), the projections run on
//! the quantized blocks (`quant.rs`), norm, RoPE and SiLU are loops over slices, and attention
//! is one task per (row, KV group), token by token through one kernel. So a token's arithmetic
//! depends only on its row's inputs: not on how many tokens came in the same call, nor on the
//! rows beside it. A prompt prefilled after a cached prefix of itself, or one token at a time,
//! computes exactly what its whole-prompt prefill does (in `serve`, a seed reproduces its
//! text). The KV cache is the same [`KvCache`] the candle path fills, written in place.
//!
//! Decoding steps run where [`Llama::fast_decode`] says (CPU, f32, inference, our attention,
//! every projection held as blocks: `generate.weights = "mixed"`, `"blocks"` or `"q8"`);
//! prefill where [`Llama::fast_prefill`] says (the same, with prefill on the blocks:
//! `"blocks"`).

use super::llama::{KvCache, Llama, Mode};
use super::lora::{Lora, Projection};
use super::quant::QActs;
use crate::error::{bail, Result};
use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// Buffers reused from step to step.
#[derive(Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    acts: QActs,
    lora: Vec<f32>,
}

/// Run `f` on the f32 elements of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*st else {
        bail!("internal: the CPU decode step needs f32 tensors on the CPU");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("internal: the CPU decode step needs contiguous tensors");
    };
    Ok(f(&v[a..b]))
}

/// An element of the KV cache: f32, or f16 where prefill and decoding both run here
/// (`generate.weights = "blocks"`, as llama.cpp keeps its cache): decoding reads every cached
/// key and value once a token, so half the bytes is nearly half the time.
trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// Eight values from `p` as f32 lanes (inlined into AVX2 + F16C code).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// A KV cache tensor's contiguous elements, whichever of the two dtypes it holds.
enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

fn with_kv<R>(t: &Tensor, f: impl FnOnce(KvSlice) -> R) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("internal: the CPU forward needs a contiguous KV cache");
    };
    Ok(match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => f(KvSlice::F32(&v[a..b])),
        Storage::Cpu(CpuStorage::F16(v)) => f(KvSlice::F16(&v[a..b])),
        _ => bail!("internal: the CPU forward needs an f32 or f16 KV cache on the CPU"),
    })
}

/// Copy `x` rows' normalized values into `out`: `x / rms(x) * w`, as candle's `rms_norm`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let h = w.len();
    out.clear();
    for row in x.chunks_exact(h) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, w)| v * inv * w));
    }
}

/// Rotate-half RoPE of `heads` heads of every row, row `i` at position `pos[i]`.
fn rope(x: &mut [f32], heads: usize, hd: usize, pos: &[usize], cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (row, &p) in x.chunks_exact_mut(heads * hd).zip(pos) {
        let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        for head in row.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/// Adds LoRA's `scale * B (A x)` for `rows` rows of `x` to `y`.
fn add_lora(l: &Lora, x: &[f32], rows: usize, y: &mut [f32], tmp: &mut Vec<f32>) -> Result<()> {
    let (o, i) = l.dims()?;
    let r = l.a.as_tensor().dim(0)?;
    let scale = l.scale as f32;
    with_f32(l.a.as_tensor(), |a| {
        tmp.clear();
        for xr in x.chunks_exact(i).take(rows) {
            tmp.extend(a.chunks_exact(i).map(|ar| dot(ar, xr)));
        }
    })?;
    with_f32(l.b.as_tensor(), |b| {
        for (yr, hr) in y.chunks_exact_mut(o).zip(tmp.chunks_exact(r)) {
            for (yv, br) in yr.iter_mut().zip(b.chunks_exact(r)) {
                *yv += scale * dot(br, hr);
            }
        }
    })
}

#[inline(always)]
fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (ca, cb) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l].to_f32();
        }
    }
    acc.iter().sum::<f32>()
        + a[n..]
            .iter()
            .zip(&b[n..])
            .map(|(x, y)| x * y.to_f32())
            .sum::<f32>()
}

/// Attention of a KV group's query heads (`q`: `[rep, hd]`) over cache columns `cols` of the
/// group's keys and values (`kv`: `[cap, hd]` each, from column 0), into `out` (`[rep, hd]`).
fn attend<E: KvElem>(
    q: &[f32],
    kv: (&[E], &[E]),
    cols: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() && hd.is_multiple_of(8) {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { x86::attend(q, kv, cols, hd, scale, out) };
    }
    attend_generic(q, kv, cols, hd, scale, out)
}

/// Softmax of one row of scores, in place, through the vectorized exp.
fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    row.iter_mut().for_each(|e| *e -= max);
    super::vexp::exp_in_place(row);
    let inv = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|e| *e *= inv);
}

fn attend_generic<E: KvElem>(
    q: &[f32],
    (kc, vc): (&[E], &[E]),
    cols: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    let ncol = cols.len();
    let mut p = vec![0f32; q.len() / hd * ncol];
    for (qh, ph) in q.chunks_exact(hd).zip(p.chunks_exact_mut(ncol)) {
        for (col, e) in cols.clone().zip(ph.iter_mut()) {
            *e = dot(qh, &kc[col * hd..][..hd]) * scale;
        }
        softmax(ph);
    }
    for (col, j) in cols.zip(0..ncol) {
        let vr = &vc[col * hd..][..hd];
        for (oh, ph) in out.chunks_exact_mut(hd).zip(p.chunks_exact(ncol)) {
            let w = ph[j];
            for (a, &v) in oh.iter_mut().zip(vr) {
                *a += w * v.to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The decoding step's attention in AVX2 + FMA. It reads every cached key and value of a
    //! row once per token, so it should run at the memory's speed; the portable loops ran at
    //! half of it here (a multiply and a dependent add per element, a horizontal sum per
    //! score).

    use std::arch::x86_64::*;

    /// Lane `i` of the result: the sum of `a[i]`'s eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum8(a: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        // Lanes 0-3: a0..a3's sums of elements 0-3, 4-7: of elements 4-7 (u0), likewise u1.
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps(u0, u1, 0x20),
            _mm256_permute2f128_ps(u0, u1, 0x31),
        )
    }

    /// Whether [`attend`] can run: AVX2, FMA and F16C (for an f16 cache).
    pub(super) fn available() -> bool {
        super::super::quant::Kernel::get() != super::super::quant::Kernel::Portable
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// [`super::attend`] for `hd` a multiple of 8.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `hd % 8 == 0`; `kc` and `vc` hold `cols.end * hd`
    /// values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend<E: super::KvElem>(
        q: &[f32],
        (kc, vc): (&[E], &[E]),
        cols: std::ops::Range<usize>,
        hd: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let (ncol, rep) = (cols.len(), q.len() / hd);
        assert!(kc.len() >= cols.end * hd && vc.len() >= cols.end * hd && out.len() == q.len());
        if ncol == 0 {
            return;
        }
        let (kp, vp, qp) = (
            kc.as_ptr().add(cols.start * hd),
            vc.as_ptr().add(cols.start * hd),
            q.as_ptr(),
        );
        let mut p = vec![0f32; rep * ncol];
        let sc = _mm256_set1_ps(scale);
        // Scores, eight columns at a time: their keys stay in L1 while every head reads them.
        let mut j = 0;
        while j + 8 <= ncol {
            for r in 0..rep {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..hd).step_by(8) {
                    let qv = _mm256_loadu_ps(qp.add(r * hd + c));
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, E::load8(kp.add((j + l) * hd + c)), *a);
                    }
                }
                _mm256_storeu_ps(
                    p.as_mut_ptr().add(r * ncol + j),
                    _mm256_mul_ps(hsum8(&acc), sc),
                );
            }
            j += 8;
        }
        for jj in j..ncol {
            for r in 0..rep {
                let mut a = _mm256_setzero_ps();
                for c in (0..hd).step_by(8) {
                    a = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qp.add(r * hd + c)),
                        E::load8(kp.add(jj * hd + c)),
                        a,
                    );
                }
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), a);
                p[r * ncol + jj] = lanes.iter().sum::<f32>() * scale;
            }
        }
        p.chunks_exact_mut(ncol).for_each(super::softmax);
        // P @ V: each head's output, 64 values at a time, held in eight registers over the
        // columns.
        for (r, ph) in p.chunks_exact(ncol).enumerate() {
            for c0 in (0..hd).step_by(64) {
                let w = (hd - c0).min(64) / 8;
                let mut acc = [_mm256_setzero_ps(); 8];
                for (jj, &pw) in ph.iter().enumerate() {
                    let b = _mm256_set1_ps(pw);
                    let row = vp.add(jj * hd + c0);
                    for (i, a) in acc.iter_mut().enumerate().take(w) {
                        *a = _mm256_fmadd_ps(b, E::load8(row.add(i * 8)), *a);
                    }
                }
                let o = out.as_mut_ptr().add(r * hd + c0);
                for (i, a) in acc.iter().enumerate().take(w) {
                    _mm256_storeu_ps(
                        o.add(i * 8),
                        _mm256_add_ps(_mm256_loadu_ps(o.add(i * 8)), *a),
                    );
                }
            }
        }
    }
}

/// The shapes one layer's attention needs.
#[derive(Clone, Copy)]
struct Geometry {
    /// New tokens a row.
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    /// The cache's columns, and those filled before this call.
    cap: usize,
    len: usize,
    scale: f32,
}

/// One layer's attention for every row (`q`: `[B, t, nh, hd]`, the new keys and values
/// already in the cache) into `att` (`[B, t, nh * hd]`): one task per (row, KV group), whose
/// `rep` query heads read the group's keys and values once; token j of row i sees columns
/// `start[i]..=len + j`.
fn attention<E: KvElem>(
    q: &[f32],
    (kc, vc): (&[E], &[E]),
    start: &[usize],
    geo: Geometry,
    att: &mut Vec<f32>,
) -> Result<()> {
    let Geometry {
        t,
        nh,
        nkv,
        hd,
        cap,
        len,
        scale,
    } = geo;
    let (b, rep) = (start.len(), nh / nkv);
    att.clear();
    att.resize(b * t * nh * hd, 0.0);
    let out = super::quant::SendPtr(att.as_mut_ptr());
    let task = |tk: usize| {
        let out = &out;
        let (i, g) = (tk / nkv, tk % nkv);
        let base = (i * nkv + g) * cap;
        let kv = (&kc[base * hd..], &vc[base * hd..]);
        for j in 0..t {
            // Token j sees columns start[i]..=len + j; a left-padding token (before start[i])
            // sees none and keeps zeros.
            let cols = start[i]..len + j + 1;
            if cols.is_empty() {
                continue;
            }
            let at = ((i * t + j) * nh + g * rep) * hd;
            // SAFETY: task (i, g) alone writes the `rep * hd` elements of row i, token j,
            // group g, and `at + rep * hd <= b * t * nh * hd`, the length of `att`.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(at), rep * hd) };
            attend(&q[at..][..rep * hd], kv, cols, hd, scale, dst);
        }
    };
    // Tasks dealt round-robin to the pool's threads.
    let pool = super::spin_pool::SpinPool::global();
    let threads = pool.threads();
    let tasks = b * nkv;
    pool.run(&|th| {
        for tk in (th..tasks).step_by(threads) {
            task(tk);
        }
    });
    Ok(())
}

/// Writes `[B, T, nkv, hd]` values into columns `col..col + T` of a `[B, nkv, cap, hd]` cache
/// tensor.
struct WriteColumns<'a> {
    col: usize,
    t: usize,
    data: &'a [f32],
}

impl candle_core::InplaceOp1 for WriteColumns<'_> {
    fn name(&self) -> &'static str {
        "kv-write-columns"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        match s {
            CpuStorage::F32(v) => self.write(v, l),
            CpuStorage::F16(v) => self.write(v, l),
            _ => candle_core::bail!("kv-write-columns: the cache is neither f32 nor f16"),
        }
    }
}

impl WriteColumns<'_> {
    fn write<E: KvElem>(&self, v: &mut [E], l: &Layout) -> candle_core::Result<()> {
        let Some((start, _)) = l.contiguous_offsets() else {
            candle_core::bail!("kv-write-columns: the cache is not contiguous");
        };
        let (b, h, cap, hd) = l.shape().dims4()?;
        if self.col + self.t > cap || self.data.len() != b * self.t * h * hd {
            candle_core::bail!(
                "kv-write-columns: columns {}..{} of {cap}, {} values",
                self.col,
                self.col + self.t,
                self.data.len()
            );
        }
        // Source rows are (row, token, head); destination rows (row, head, column).
        for (i, src) in self.data.chunks_exact(hd).enumerate() {
            let (bi, j, hh) = (i / (self.t * h), i / h % self.t, i % h);
            let at = start + ((bi * h + hh) * cap + self.col + j) * hd;
            for (d, &x) in v[at..at + hd].iter_mut().zip(src) {
                *d = E::from_f32(x);
            }
        }
        Ok(())
    }
}

impl Llama {
    /// Whether [`Llama::decode_step_cpu`] runs for `rows` rows in `mode`: at any batch size
    /// (measured faster than dense gemm at 1 to 64 rows, docs/PERF.md), unless the load
    /// options asked for candle's composed attention (`attention = "composed"`).
    pub(crate) fn fast_decode(&self, rows: usize, mode: Mode) -> bool {
        rows >= 1
            && !mode.train
            && self.fused_attention
            && self.device.is_cpu()
            && self.dtype == candle_core::DType::F32
            && self.lm_head.packed().is_some()
            && self.layers.iter().all(|l| {
                Projection::ALL
                    .iter()
                    .all(|&p| l.proj(p).packed().is_some())
            })
    }

    /// Whether [`Llama::forward_cpu`] runs prefill (many tokens a row) in `mode`: as
    /// [`Llama::fast_decode`], with every product of a prefill on the blocks
    /// (`generate.weights = "blocks"`), so that it computes what the candle path would.
    pub(crate) fn fast_prefill(&self, mode: Mode) -> bool {
        self.fast_decode(1, mode)
            && self.layers.iter().all(|l| {
                Projection::ALL
                    .iter()
                    .all(|&p| l.proj(p).prefill_on_blocks())
            })
    }

    /// The KV cache's dtype: f16 where prefill and decoding both run in this module, as
    /// llama.cpp keeps its cache (docs/PERF.md has what that changes); otherwise the model's.
    pub(crate) fn kv_dtype(&self) -> candle_core::DType {
        if self.fast_prefill(Mode::infer()) {
            candle_core::DType::F16
        } else {
            self.dtype
        }
    }

    /// One token for each row: `ids[i]` is fed to row `i`, whose valid cache columns start at
    /// `start[i]`; the new keys and values go to column `cache.len`. Returns each row's logits.
    pub(crate) fn decode_step_cpu(
        &self,
        ids: &[u32],
        start: &[usize],
        cache: &mut KvCache,
        mode: Mode,
        s: &mut Scratch,
    ) -> Result<Vec<Vec<f32>>> {
        let all: Vec<usize> = (0..ids.len()).collect();
        self.forward_cpu(ids, 1, start, cache, mode, s, &all)
    }

    /// `t` tokens for each row: `ids` is `[B, t]`, row `i`'s valid cache columns start at
    /// `start[i]` (a column before it is left padding, and so is a token fed there), and the
    /// new keys and values go to columns `cache.len..cache.len + t`; token `j` of a row sees
    /// its columns up to its own. Returns the logits of the flat token indices `logits_at`
    /// (`i * t + j`), in that order.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_cpu(
        &self,
        ids: &[u32],
        t: usize,
        start: &[usize],
        cache: &mut KvCache,
        mode: Mode,
        s: &mut Scratch,
        logits_at: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let b = start.len();
        let n = b * t;
        crate::error::ensure!(
            t >= 1 && ids.len() == n && logits_at.iter().all(|&k| k < n),
            "internal: {} ids for {b} rows of {t}, logits at {logits_at:?}",
            ids.len()
        );
        let (hs, nh, nkv, hd, im) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size,
        );
        let eps = c.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        cache.ensure(t)?;
        let len = cache.len;
        // Token j of row i sits at position len + j - start[i] (a padding token's is unused).
        let mut pos: Vec<usize> = (0..n)
            .map(|k| (len + k % t).saturating_sub(start[k / t]))
            .collect();
        let adapter = self.adapter().filter(|_| mode.lora);
        let lora = |li: usize, p: Projection| adapter.and_then(|a| a.get(li, p));

        s.x.clear();
        with_f32(&self.embed_tokens, |e| {
            for &id in ids {
                s.x.extend_from_slice(&e[id as usize * hs..][..hs]);
            }
        })?;
        let cos_g = self.cos.storage_and_layout();
        let sin_g = self.sin.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(cos)), Storage::Cpu(CpuStorage::F32(sin))) =
            (&*cos_g.0, &*sin_g.0)
        else {
            bail!("internal: RoPE tables are not f32 on the CPU");
        };
        // Right padding in a trie pass can sit past the longest prompt; real tokens are held
        // inside the context (`limits.rs`), so a padding token's position is only kept in the
        // table.
        let last = (cos.len() / (hd / 2)).saturating_sub(1);
        pos.iter_mut().for_each(|p| *p = (*p).min(last));

        for (li, layer) in self.layers.iter().enumerate() {
            // y = W x (+ LoRA) for projection `p`, from `acts` (quantized from `x`).
            let project = |p: Projection,
                           x: &[f32],
                           acts: &QActs,
                           y: &mut Vec<f32>,
                           tmp: &mut Vec<f32>|
             -> Result<()> {
                let w = layer.proj(p).packed().expect("checked by fast_decode");
                // The product writes every element: only the length needs setting (zeroing
                // a prefill's outputs first was 3% of its time).
                y.resize(n * w.rows, 0.0);
                w.matmul(acts, y);
                if let Some(l) = lora(li, p) {
                    add_lora(l, x, n, y, tmp)?;
                }
                Ok(())
            };
            with_f32(&layer.input_layernorm, |w| rms_norm(&s.x, w, eps, &mut s.h))?;
            s.acts.quantize(&s.h, n, hs);
            project(Projection::QProj, &s.h, &s.acts, &mut s.q, &mut s.lora)?;
            project(Projection::KProj, &s.h, &s.acts, &mut s.k, &mut s.lora)?;
            project(Projection::VProj, &s.h, &s.acts, &mut s.v, &mut s.lora)?;
            rope(&mut s.q, nh, hd, &pos, cos, sin);
            rope(&mut s.k, nkv, hd, &pos, cos, sin);
            cache.k[li].inplace_op1(&WriteColumns {
                col: len,
                t,
                data: &s.k,
            })?;
            cache.v[li].inplace_op1(&WriteColumns {
                col: len,
                t,
                data: &s.v,
            })?;

            let (kt, vt) = (&cache.k[li], &cache.v[li]);
            let cap = kt.dim(2)?;
            let geo = Geometry {
                t,
                nh,
                nkv,
                hd,
                cap,
                len,
                scale,
            };
            with_kv(kt, |kc| {
                with_kv(vt, |vc| match (kc, vc) {
                    (KvSlice::F32(k), KvSlice::F32(v)) => {
                        attention(&s.q, (k, v), start, geo, &mut s.att)
                    }
                    (KvSlice::F16(k), KvSlice::F16(v)) => {
                        attention(&s.q, (k, v), start, geo, &mut s.att)
                    }
                    _ => bail!("internal: keys and values cached in different dtypes"),
                })
            })???;

            s.acts.quantize(&s.att, n, nh * hd);
            project(Projection::OProj, &s.att, &s.acts, &mut s.o, &mut s.lora)?;
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);

            with_f32(&layer.post_attention_layernorm, |w| {
                rms_norm(&s.x, w, eps, &mut s.h)
            })?;
            s.acts.quantize(&s.h, n, hs);
            project(Projection::GateProj, &s.h, &s.acts, &mut s.g, &mut s.lora)?;
            project(Projection::UpProj, &s.h, &s.acts, &mut s.u, &mut s.lora)?;
            swiglu_in_place(&mut s.g, &s.u, &mut s.lora);
            s.acts.quantize(&s.g, n, im);
            project(Projection::DownProj, &s.g, &s.acts, &mut s.o, &mut s.lora)?;
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
        }
        cache.len = len + t;

        // The head only where logits are asked for.
        s.o.clear();
        for &k in logits_at {
            s.o.extend_from_slice(&s.x[k * hs..][..hs]);
        }
        with_f32(&self.norm, |w| rms_norm(&s.o, w, eps, &mut s.h))?;
        let rows = logits_at.len();
        s.acts.quantize(&s.h, rows, hs);
        let head = self.lm_head.packed().expect("checked by fast_decode");
        let mut logits = vec![0f32; rows * head.rows];
        head.matmul(&s.acts, &mut logits);
        Ok(logits.chunks_exact(head.rows).map(|r| r.to_vec()).collect())
    }
}

/// `g = silu(g) * u`, the sigmoid through the vectorized exp, in chunks that stay in cache.
fn swiglu_in_place(g: &mut [f32], u: &[f32], tmp: &mut Vec<f32>) {
    const CHUNK: usize = 4096;
    for (gc, uc) in g.chunks_mut(CHUNK).zip(u.chunks(CHUNK)) {
        tmp.clear();
        tmp.extend(gc.iter().map(|v| -v));
        super::vexp::exp_in_place(tmp);
        for ((g, &u), &e) in gc.iter_mut().zip(uc).zip(tmp.iter()) {
            *g = *g / (1.0 + e) * u;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::generate::{argmax, prefill_padded, Request};
    use crate::model::llama::{build_mask, build_positions};
    use crate::model::{LoadOptions, Model, WeightsMode};

    /// The SmolLM2 GGUF with `weights`; fails (never skips) when the file is missing.
    pub(crate) fn smollm2(weights: WeightsMode) -> Model {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.is_file(),
            "{} is missing: run `bash scripts/fetch-model.sh`",
            p.display()
        );
        let src = crate::model::source::resolve(p.to_str().unwrap(), "main").unwrap();
        Model::load(
            &src,
            &LoadOptions {
                weights,
                ..LoadOptions::cpu_f32()
            },
        )
        .unwrap()
    }

    pub(crate) fn prompt(m: &Model, title: &str) -> Vec<u32> {
        use crate::model::chat::Message;
        let msgs = vec![
            Message::new("system", "You review papers in one sentence."),
            Message::new("user", title),
        ];
        let text = m.meta.chat.as_ref().unwrap().render(&msgs, true).unwrap();
        m.meta.tok.encode(&text, true).unwrap()
    }

    /// Greedy steps for a left-padded batch of two, through this module and through the candle
    /// ops, from copies of one prefilled cache: the same logits (both multiply the same blocks;
    /// norm, RoPE and attention are summed in other orders) and the same tokens.
    fn steps_agree(m: &Model, label: &str) -> Vec<Vec<f32>> {
        let reqs: Vec<Request> = ["Attention Is All You Need", "QLoRA"]
            .iter()
            .enumerate()
            .map(|(id, t)| Request {
                id,
                ids: prompt(m, t),
            })
            .collect();
        assert_ne!(reqs[0].ids.len(), reqs[1].ids.len(), "rows need padding");
        let (mut fast, start, first) = prefill_padded(m, &reqs, 16, Mode::infer()).unwrap();
        let mut slow = fast.deep_copy().unwrap();
        let mut ids: Vec<u32> = first.iter().map(|l| argmax(l)).collect();
        let mut scratch = Scratch::default();
        let mut all = Vec::new();
        let mut same = 0;
        assert!(m.llama.fast_decode(2, Mode::infer()));
        for step in 0..6 {
            let a = m
                .llama
                .decode_step_cpu(&ids, &start, &mut fast, Mode::infer(), &mut scratch)
                .unwrap();
            let dev = &m.llama.device;
            let x = Tensor::from_vec(ids.clone(), (2, 1), dev).unwrap();
            let mask = build_mask(&start, slow.len, 1, m.llama.dtype, dev).unwrap();
            let pos = build_positions(&start, slow.len, 1, dev).unwrap();
            let b: Vec<Vec<f32>> = m
                .llama
                .forward(
                    &x,
                    &pos,
                    &mask,
                    Some(&mut slow),
                    false,
                    Mode::infer().decode_step(),
                )
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(fast.len, slow.len);
            for (row, (la, lb)) in a.iter().zip(&b).enumerate() {
                let d = la
                    .iter()
                    .zip(lb)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                // Logits reach about 30. The two paths quantize activations summed in other
                // orders, and an activation rounded to the other 8-bit step in one layer moves
                // every layer after it: up to 1.8 apart over 6 adapter seeds (measured); a
                // wrong rotation moves them by 10, a skipped adapter by 20.
                assert!(
                    d < 3.0,
                    "{label} step {step} row {row}: logits differ by {d}"
                );
                same += usize::from(argmax(la) == argmax(lb));
            }
            ids = a.iter().map(|l| argmax(l)).collect();
            all.extend(a);
        }
        assert!(
            same >= 10,
            "{label}: the same next token at {same} of 12 steps"
        );
        all
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_simd_attention_matches_the_portable_loops() {
        use rand::{Rng, SeedableRng};
        if !x86::available() {
            eprintln!("no AVX2 + FMA + F16C on this CPU: only the portable attention runs here");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Head sizes with and without a remainder past 64 values; column counts below,
        // at and past a block of eight, starting anywhere.
        for (hd, rep) in [(64, 3), (24, 2), (80, 8)] {
            for cols in [0..1, 3..11, 5..8, 2..39, 0..250] {
                let n = cols.end * hd;
                let mut vals = |k: usize| -> Vec<f32> {
                    (0..k).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect()
                };
                let (q, k, v) = (vals(rep * hd), vals(n), vals(n));
                kernel_agrees(&q, (&k, &v), cols.clone(), hd, "f32");
                // An f16 cache: the kernel converts in registers what the loops convert one
                // value at a time.
                let half = |x: &[f32]| -> Vec<half::f16> {
                    x.iter().map(|&v| half::f16::from_f32(v)).collect()
                };
                kernel_agrees(&q, (&half(&k), &half(&v)), cols.clone(), hd, "f16");
            }
        }
    }

    /// The SIMD attention and the portable loops, on the same inputs, agree to 1e-5.
    #[cfg(target_arch = "x86_64")]
    fn kernel_agrees<E: KvElem>(
        q: &[f32],
        kv: (&[E], &[E]),
        cols: std::ops::Range<usize>,
        hd: usize,
        label: &str,
    ) {
        let (mut a, mut b) = (vec![0.5f32; q.len()], vec![0.5f32; q.len()]);
        attend_generic(q, kv, cols.clone(), hd, 0.125, &mut a);
        // SAFETY: the caller checked `x86::available()`; every head size here is a multiple
        // of 8.
        unsafe { x86::attend(q, kv, cols.clone(), hd, 0.125, &mut b) };
        let (mx, _) = diffs(&a, &b);
        let rep = q.len() / hd;
        assert!(
            mx < 1e-5,
            "{label}, hd {hd}, rep {rep}, columns {cols:?}: differ by {mx}"
        );
    }

    #[test]
    fn a_prompt_split_anywhere_computes_exactly_the_same() {
        // A token's arithmetic depends only on its row's inputs, not on how many tokens came
        // in the same call: whole, in two calls, or as decoding steps, the same logits to the
        // bit (what prefix reuse and a reproducible seed in `serve` rest on).
        let m = smollm2(WeightsMode::Blocks);
        let a = prompt(&m, "Attention Is All You Need");
        let l = a.len();
        let run = |cuts: &[usize]| -> Vec<f32> {
            let mut cache = KvCache::new(&m.llama, 1, l + 4).unwrap();
            let mut s = Scratch::default();
            let mut last = Vec::new();
            let mut from = 0;
            for &to in cuts.iter().chain([&l]) {
                let t = to - from;
                last = m
                    .llama
                    .forward_cpu(
                        &a[from..to],
                        t,
                        &[0],
                        &mut cache,
                        Mode::infer(),
                        &mut s,
                        &[t - 1],
                    )
                    .unwrap()
                    .remove(0);
                from = to;
            }
            last
        };
        let whole = run(&[]);
        for cuts in [vec![l - 1], vec![5], vec![3, 11, l - 2]] {
            assert!(run(&cuts) == whole, "prefill cut at {cuts:?}: other logits");
        }
        let steps: Vec<usize> = (1..l).collect();
        assert!(run(&steps) == whole, "one token a call: other logits");
    }

    /// Largest and mean absolute difference.
    fn diffs(a: &[f32], b: &[f32]) -> (f32, f32) {
        assert_eq!(a.len(), b.len());
        let d: Vec<f32> = a.iter().zip(b).map(|(x, y)| (x - y).abs()).collect();
        let max = d.iter().fold(0f32, |m, &x| m.max(x));
        (max, d.iter().sum::<f32>() / d.len().max(1) as f32)
    }

    /// A random adapter on every projection (B random, so it changes the model).
    fn random_adapter(m: &mut Model) {
        use crate::model::lora::LoraSpec;
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Projection::ALL.to_vec(),
        };
        let adapter = m.llama.new_adapter(&spec, 3).unwrap();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
        for (name, v) in adapter.vars() {
            if name.ends_with("lora_B.weight") {
                use rand::Rng;
                let shape = v.as_tensor().shape().clone();
                let vals: Vec<f32> = (0..shape.elem_count())
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.6)
                    .collect();
                v.set(&Tensor::from_vec(vals, shape, &candle_core::Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        m.llama.attach(adapter).unwrap();
    }

    #[test]
    fn the_plain_rust_prefill_matches_the_candle_ops() {
        // `blocks`: prefill on the blocks, through this module or through the candle ops (the
        // same products; norm, RoPE, attention and SiLU in other orders, exp vectorized).
        let mut m = smollm2(WeightsMode::Blocks);
        assert!(m.llama.fast_prefill(Mode::infer()));
        let base = prefill_agrees(&m, "base");
        random_adapter(&mut m);
        let adapted = prefill_agrees(&m, "adapter");
        let (changed, _) = diffs(&base, &adapted);
        assert!(
            changed > 0.1,
            "the adapter changed the logits by only {changed}"
        );
    }

    /// Prefill of three left-padded prompts both ways: every valid position's logits and the
    /// cached keys and values agree. Returns this module's logits.
    fn prefill_agrees(m: &Model, label: &str) -> Vec<f32> {
        let titles = [
            "Attention Is All You Need",
            "QLoRA",
            "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        ];
        let prompts: Vec<Vec<u32>> = titles.iter().map(|t| prompt(m, t)).collect();
        let l = prompts.iter().map(|p| p.len()).max().unwrap();
        let pad = m.meta.tok.pad_id;
        let (mut ids, mut start) = (Vec::new(), Vec::new());
        for p in &prompts {
            start.push(l - p.len());
            ids.extend(std::iter::repeat_n(pad, l - p.len()));
            ids.extend_from_slice(p);
        }
        assert!(
            start.iter().filter(|&&s| s > 0).count() >= 2,
            "rows need padding"
        );
        let b = prompts.len();
        let new_cache = || KvCache::new(&m.llama, b, l + 4).unwrap();
        let (mut fast, mut slow) = (new_cache(), new_cache());
        assert_eq!(
            fast.k[0].dtype(),
            candle_core::DType::F16,
            "blocks cache f16"
        );
        // Every token's logits: the causal mask shows at every position, not just the last.
        let at: Vec<usize> = (0..b)
            .flat_map(|i| (start[i]..l).map(move |j| i * l + j))
            .collect();
        let a = m
            .llama
            .forward_cpu(
                &ids,
                l,
                &start,
                &mut fast,
                Mode::infer(),
                &mut Scratch::default(),
                &at,
            )
            .unwrap();
        let dev = &m.llama.device;
        let x = Tensor::from_vec(ids.clone(), (b, l), dev).unwrap();
        let mask = build_mask(&start, 0, l, m.llama.dtype, dev).unwrap();
        let pos = build_positions(&start, 0, l, dev).unwrap();
        let all: Vec<Vec<Vec<f32>>> = m
            .llama
            .forward(&x, &pos, &mask, Some(&mut slow), true, Mode::infer())
            .unwrap()
            .to_vec3()
            .unwrap();
        assert_eq!((fast.len, slow.len), (l, l));
        let (mut worst, mut mean, mut same) = (0f32, 0f32, 0);
        for (k, la) in at.iter().zip(&a) {
            let lb = &all[k / l][k % l];
            let (mx, mn) = diffs(la, lb);
            worst = worst.max(mx);
            mean += mn / at.len() as f32;
            same += usize::from(argmax(la) == argmax(lb));
        }
        eprintln!(
            "{label} prefill: {} positions, max |logit diff| {worst}, mean {mean}, argmax equal \
             at {same}",
            at.len()
        );
        // As the decoding step's test: an activation rounded to the other 8-bit step moves
        // every layer after it, so single logits stray by up to a few units (measured: max
        // 1.17, mean 0.19 over 86 positions, as far as the tiled kernel is from candle's Q4_1
        // in docs/PERF.md); a wrong mask,
        // position or rotation moves them by tens and the argmax at most positions.
        // The random adapter makes logits larger and the model twitchier (measured: max 3.2,
        // mean 0.32, argmax equal at 80 of 86); skipping it moves logits by about 20.
        let (max_tol, mean_tol, agree) = if label == "base" {
            (4.0, 0.5, 9)
        } else {
            (6.0, 0.6, 8)
        };
        assert!(
            worst < max_tol && mean < mean_tol,
            "{label}: logits differ: max {worst}, mean {mean}"
        );
        assert!(
            same * 10 >= at.len() * agree,
            "{label}: argmax equal at {same} of {}",
            at.len()
        );
        // The cache holds the same keys and values (rows' valid columns).
        for li in [0, m.llama.cfg.num_hidden_layers - 1] {
            for (ta, tb) in [(&fast.k[li], &slow.k[li]), (&fast.v[li], &slow.v[li])] {
                for (i, &st) in start.iter().enumerate() {
                    let cut = |t: &Tensor| -> Vec<f32> {
                        t.narrow(0, i, 1)
                            .unwrap()
                            .narrow(2, st, l - st)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_dtype(candle_core::DType::F32)
                            .unwrap()
                            .to_vec1()
                            .unwrap()
                    };
                    let (va, vb) = (cut(ta), cut(tb));
                    let (mx, mn) = diffs(&va, &vb);
                    let size = vb.iter().map(|v| v.abs()).sum::<f32>() / vb.len() as f32;
                    // Layer 0's inputs are the embeddings themselves (measured: mean difference
                    // 2e-4 of the values' mean size); the 8-bit steps add up to 5% by the last
                    // layer.
                    let bound = if li == 0 { (0.05, 1e-3) } else { (2.0, 0.1) };
                    assert!(
                        mx < bound.0 && mn < bound.1 * size,
                        "{label} layer {li} row {i}: cached values differ by {mx} (mean {mn})"
                    );
                }
            }
        }
        a.concat()
    }

    #[test]
    fn the_plain_rust_step_matches_the_candle_ops() {
        // `blocks` keeps an f16 cache, which the candle ops read back as f32.
        steps_agree(&smollm2(WeightsMode::Blocks), "blocks (f16 cache)");
        let mut m = smollm2(WeightsMode::Mixed);
        assert_eq!(
            m.llama.kv_dtype(),
            candle_core::DType::F32,
            "mixed cache f32"
        );
        let base = steps_agree(&m, "base");
        random_adapter(&mut m);
        let adapted = steps_agree(&m, "adapter");
        let changed = base
            .iter()
            .zip(&adapted)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        assert!(
            changed > 0.1,
            "the adapter changed the logits by only {changed}"
        );
    }
}
