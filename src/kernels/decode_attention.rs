//! Attention of the plain-Rust inference forward (`model/cpu_forward.rs`): one layer's new
//! tokens against the KV cache, one task per (row, KV group) on the spin pool, token by token
//! through one kernel (AVX2 + FMA + F16C where the CPU has them, portable loops otherwise), so a
//! token's arithmetic depends only on its row. The cache holds f32 or f16 ([`KvElem`]).

use crate::error::Result;

/// An element of the KV cache: f32, or f16 where prefill and decoding both run here
/// (`generate.weights = "blocks"`, as llama.cpp keeps its cache): decoding reads every cached
/// key and value once a token, so half the bytes is nearly half the time.
pub(crate) trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// Eight values from `p` as f32 lanes (inlined into AVX2 + F16C code).
    ///
    /// # Safety
    /// `p` is valid for reading 8 consecutive values (no alignment needed), and the CPU has AVX
    /// and F16C (the caller, `x86::attend`, runs only where `x86::available` found them).
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
    /// `_mm256_loadu_ps`.
    ///
    /// # Safety
    /// [`KvElem::load8`]'s: `p` is valid for reading 8 values (32 bytes); the CPU has AVX.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the 8 values (32 bytes) at `p` are readable and the CPU has AVX, both by the
        // trait method's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
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
    /// `vcvtph2ps` of a 16-byte load.
    ///
    /// # Safety
    /// [`KvElem::load8`]'s: `p` is valid for reading 8 values (16 bytes); the CPU has AVX and
    /// F16C.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the 8 values (16 bytes) at `p` are readable and the CPU has F16C, both by the
        // trait method's contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// `a . b`, eight lanes at a time (the portable attention's and the forward's LoRA dot).
#[inline(always)]
pub(crate) fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
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
// Long because one kernel: scores, softmax and P @ V share the row's registers and scratch.
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
        // SAFETY: `x86::available()` found AVX2, FMA and F16C (a non-portable quant kernel is
        // offered only after detecting them, and F16C is checked again), and `hd % 8 == 0` is
        // checked beside it; the slice lengths `x86::attend` needs it asserts itself.
        return unsafe { x86::attend(q, kv, cols, hd, scale, out) };
    }
    attend_generic(q, kv, cols, hd, scale, out)
}

/// Softmax of one row of scores, in place, through the vectorized exp.
fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    row.iter_mut().for_each(|e| *e -= max);
    crate::kernels::vexp::exp_in_place(row);
    let inv = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|e| *e *= inv);
}

pub(crate) fn attend_generic<E: KvElem>(
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
        crate::kernels::quant::Kernel::get() != crate::kernels::quant::Kernel::Portable
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// [`super::attend`] for `hd` a multiple of 8.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (`available()` checks them), and `hd % 8 == 0`. (That
    /// `kc` and `vc` hold `cols.end * hd` values and `out` as many as `q` is asserted: a
    /// violation panics.)
    // Long because one kernel: scores, softmax and P @ V share the row's registers and scratch.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend<E: super::KvElem>(
        q: &[f32],
        (kc, vc): (&[E], &[E]),
        cols: std::ops::Range<usize>,
        hd: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        // SAFETY: the CPU features and `hd % 8 == 0` are this function's contract, and the
        // assertion below gives the lengths; with them every raw access is in bounds:
        // - keys: `kp` is `kc` from column `cols.start`, read 8 values at `(j + l) * hd + c` with
        //   `j + l < ncol` and `c + 8 <= hd`, so inside `kc[cols.start * hd..cols.end * hd]`;
        //   values likewise through `vp` (columns `jj < ncol`, offsets `c0 + 8 i + 8 <= hd`).
        // - queries: 8 values at `r * hd + c` with `r < rep = q.len() / hd` and `c + 8 <= hd`
        //   (`hd` a multiple of 8), inside `q`; `out` (as long as `q`) is read and written at the
        //   same kind of offsets, `r * hd + c0 + 8 i`.
        // - scores: 8 values at `r * ncol + j` with `j + 8 <= ncol`, inside `p` (`rep * ncol`).
        // - `E::load8` reads 8 values at each such offset, on a CPU with AVX and F16C.
        unsafe {
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
}

/// The shapes one layer's attention needs.
#[derive(Clone, Copy)]
pub(crate) struct Geometry {
    /// New tokens a row.
    pub(crate) t: usize,
    pub(crate) nh: usize,
    pub(crate) nkv: usize,
    pub(crate) hd: usize,
    /// The cache's columns, and those filled before this call.
    pub(crate) cap: usize,
    pub(crate) len: usize,
    pub(crate) scale: f32,
}

/// One layer's attention for every row (`q`: `[B, t, nh, hd]`, the new keys and values
/// already in the cache) into `att` (`[B, t, nh * hd]`): one task per (row, KV group), whose
/// `rep` query heads read the group's keys and values once; token j of row i sees columns
/// `start[i]..=len + j`.
pub(crate) fn attention<E: KvElem>(
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
    let out = crate::kernels::quant::SendPtr(att.as_mut_ptr());
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
    let pool = crate::kernels::spin_pool::SpinPool::global();
    let threads = pool.threads();
    let tasks = b * nkv;
    pool.run(&|th| {
        for tk in (th..tasks).step_by(threads) {
            task(tk);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mx = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let rep = q.len() / hd;
        assert!(
            mx < 1e-5,
            "{label}, hd {hd}, rep {rep}, columns {cols:?}: differ by {mx}"
        );
    }
}
