//! The 256-bit VNNI tiled kernel: `vpdpbusd` on ymm registers, eight weight rows a register,
//! for CPUs with AVX-VNNI but no AVX-512 (Intel Alder Lake and later client parts, Zen 5
//! client parts run AVX-512 instead). Those CPUs take it over [`super::avx2`]'s tiles, which
//! need two instructions (`vpmaddubsw`, `vpmaddwd`) and a sign fix-up where this needs one.
//!
//! One body, two encodings of the same instruction: VEX (`_mm256_dpbusd_avx_epi32`, the
//! `avxvnni` feature) where the CPU has AVX-VNNI, EVEX (`_mm256_dpbusd_epi32`, AVX-512 VNNI +
//! VL) where it has only those. The lanes compute the same sums, so the EVEX form lets an
//! AVX-512 machine run, test and time this kernel's code (`REVIEWER2_QKERNEL=avxvnni`); the
//! VEX form differs by that one intrinsic.
//!
//! The products are the other tiled kernels' bits: each block's integer sums are exact and the
//! float steps are theirs lane for lane (the scale product, one FMA for the sum, one for Q4_1's
//! minimum), so a prompt's text does not depend on which of the three a CPU runs.

// Kernels index several per-row arrays with one counter.
#![allow(clippy::needless_range_loop)]

use super::{Format, Packed, QActs, Tiles, QK, TILE, TILE_ROWS};
use std::arch::x86_64::*;

/// One encoding of `vpdpbusd` on 256 bits: `acc` plus, in each 32-bit lane, the four products
/// of `u`'s unsigned bytes with `s`'s signed ones.
trait Dot {
    /// # Safety
    /// The CPU has the encoding's features (see the implementations).
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
}

/// The VEX encoding: AVX-VNNI.
struct Vex;

impl Dot for Vex {
    /// # Safety
    /// The CPU has AVX-VNNI.
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: a register-only intrinsic; the CPU has AVX-VNNI (this function's contract).
        unsafe { _mm256_dpbusd_avx_epi32(acc, u, s) }
    }
}

/// The EVEX encoding: AVX-512 VNNI with VL.
struct Evex;

impl Dot for Evex {
    /// # Safety
    /// The CPU has AVX-512 F, VL and VNNI.
    #[inline(always)]
    unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: a register-only intrinsic; the CPU has AVX-512 VL and VNNI (this function's
        // contract).
        unsafe { _mm256_dpbusd_epi32(acc, u, s) }
    }
}

/// Whether this CPU runs the kernel, in either encoding (besides AVX2, FMA and F16C, which
/// [`super::Kernel::available`] checks first).
pub(super) fn detected() -> bool {
    is_x86_feature_detected!("avxvnni")
        || (is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni"))
}

/// `out[(j0 + j) * w.rows + 16 tile + l] = w[16 tile + l] . x[j0 + j]` for `j < g <= 8`,
/// `l < 16`, from the tiled copy `t` of `w`, in two halves of eight rows (one register each),
/// up to four activation rows a pass; in the VEX encoding where the CPU has AVX-VNNI.
///
/// # Safety
/// - The CPU has AVX2, FMA, F16C and [`detected`]'s features: [`super::Kernel::available`]
///   offers [`super::Kernel::AvxVnni`] only where it found them.
/// - `t` is `w`'s tiled copy (`Packed::tiles_unchecked`: `t.q` holds `rows / 16 * nb`
///   tile-blocks of 256 bytes (Q4_1) or 512 (Q8_0); `t.d`, and `t.m` (Q4_1) or `t.neg` (Q8_0),
///   `rows / 16 * nb * 16` values), and `tile < w.rows / 16`.
/// - `x.nb == w.nb` and `j0 + g <= x.rows`, `1 <= g <= 8` (others panic); for Q8_0, `x.qu` is
///   filled (`QActs::quantize` fills it wherever a VNNI kernel runs).
/// - `out` is valid for writes of the 16 values at `(j0 + j) * w.rows + 16 tile` for every
///   `j < g`, and nothing else reads or writes them during the call.
pub(super) unsafe fn tiled(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    g: usize,
    out: *mut f32,
) {
    // SAFETY: this function's contract is the entry points', each taken only where its
    // encoding's features were detected (and `detected()` found one of them).
    unsafe {
        if is_x86_feature_detected!("avxvnni") {
            tiled_vex(w, t, x, tile, j0, g, out)
        } else {
            tiled_evex(w, t, x, tile, j0, g, out)
        }
    }
}

/// [`tiled`] in the VEX encoding.
///
/// # Safety
/// [`tiled`]'s contract, with AVX-VNNI among the CPU's features.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(super) unsafe fn tiled_vex(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    g: usize,
    out: *mut f32,
) {
    // SAFETY: `passes`' contract is this function's; the features `Vex` needs are enabled here.
    unsafe { passes::<Vex>(w, t, x, tile, j0, g, out) }
}

/// [`tiled`] in the EVEX encoding, for CPUs with AVX-512 VNNI and VL but no AVX-VNNI (and for
/// the tests there: the body every AVX-VNNI CPU runs).
///
/// # Safety
/// [`tiled`]'s contract, with AVX-512 F, VL and VNNI among the CPU's features.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn tiled_evex(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    g: usize,
    out: *mut f32,
) {
    // SAFETY: `passes`' contract is this function's; the features `Evex` needs are enabled
    // here.
    unsafe { passes::<Evex>(w, t, x, tile, j0, g, out) }
}

/// The passes of [`tiled`]: up to four activation rows, each half of the tile in turn. Always
/// inlined into an entry point, so every intrinsic below runs with its features enabled.
///
/// # Safety
/// [`tiled`]'s contract, with the CPU features `D` needs, and called only from a function that
/// enables AVX2, FMA, F16C and those features.
#[inline(always)]
unsafe fn passes<D: Dot>(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    g: usize,
    out: *mut f32,
) {
    assert!((1..=TILE_ROWS).contains(&g) && j0 + g <= x.rows);
    let mut j = 0;
    while j < g {
        let n = (g - j).min(4);
        for half in 0..2 {
            // SAFETY: this function's contract, for rows `j0 + j..j0 + j + n` (inside
            // `j0..j0 + g`) and half `half < 2`: `half_q4_1::<D, N>`'s and
            // `half_q8_0::<D, N>`'s contract with `N = n`.
            unsafe {
                match (w.format, n) {
                    (Format::Q4_1, 1) => half_q4_1::<D, 1>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q4_1, 2) => half_q4_1::<D, 2>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q4_1, 3) => half_q4_1::<D, 3>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q4_1, _) => half_q4_1::<D, 4>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q8_0, 1) => half_q8_0::<D, 1>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q8_0, 2) => half_q8_0::<D, 2>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q8_0, 3) => half_q8_0::<D, 3>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q8_0, _) => half_q8_0::<D, 4>(w, t, x, tile, half, j0 + j, out),
                }
            }
        }
        j += n;
    }
}

/// Four activation bytes in every 32-bit lane.
///
/// # Safety
/// The CPU has AVX; `p` is valid for reading 4 bytes (no alignment needed).
#[inline(always)]
unsafe fn bcast4(p: *const u8) -> __m256i {
    // SAFETY: the 4 bytes at `p` are readable (unaligned) and the CPU has AVX, both by this
    // function's contract.
    unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
}

/// [`tiled`] for Q4_1: rows `8 half..8 half + 8` of the tile against activation rows
/// `j0..j0 + J`, unsigned 4-bit weights times signed 8-bit activations.
///
/// # Safety
/// [`passes`]' contract for those rows (`j0 + J <= x.rows`), with `w.format == Q4_1` (so
/// `t.m` is filled) and `half < 2`.
#[inline(always)]
unsafe fn half_q4_1<D: Dot, const J: usize>(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    half: usize,
    j0: usize,
    out: *mut f32,
) {
    // SAFETY: the CPU features, `tile < w.rows / 16`, `x.nb == nb`, `j0 + J <= x.rows` and the
    // `out` elements are this function's contract. With `tb = tile * nb + b < (w.rows / 16) *
    // nb`, the 32 bytes at `tb * 256 + 64 g + 32 half` (`g < 4`, `half < 2`) lie inside
    // tile-block `tb`, and its 8 scales and minimums at `tb * 16 + 8 half` inside `t.d` and
    // `t.m`; the 4 bytes at `4 k < 32` of block `b < nb` of activation row `j0 + j < x.rows` lie
    // inside `x.q` (`x.rows * nb * 32`), and `(j0 + j) * nbp + b` inside `x.d` and `x.s`
    // (`x.rows * nbp`). The 8 stores per row are elements the contract gives to this call.
    unsafe {
        let nb = w.nb;
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); J];
        for b in 0..nb {
            let tb = tile * nb + b;
            let p = t.q.as_ptr().add(tb * 256 + 32 * half);
            let mut ia = [_mm256_setzero_si256(); J];
            for k in 0..8 {
                let v = _mm256_loadu_si256(p.add(64 * (k % 4)) as *const __m256i);
                let wk = if k < 4 {
                    _mm256_and_si256(v, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), low)
                };
                for j in 0..J {
                    let xp = (x.q.as_ptr() as *const u8).add(((j0 + j) * nb + b) * QK + 4 * k);
                    ia[j] = D::dpbusd(ia[j], wk, bcast4(xp));
                }
            }
            let at = tb * TILE + 8 * half;
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(at) as *const __m128i));
            let mw = _mm256_cvtph_ps(_mm_loadu_si128(t.m.as_ptr().add(at) as *const __m128i));
            for j in 0..J {
                let xa = (j0 + j) * x.nbp + b;
                let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xa)));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[j]), dd, acc[j]);
                // + m * (d_x * sum q_x)
                acc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*x.s.get_unchecked(xa)), acc[j]);
            }
        }
        for j in 0..J {
            _mm256_storeu_ps(out.add((j0 + j) * w.rows + tile * TILE + 8 * half), acc[j]);
        }
    }
}

/// [`tiled`] for Q8_0: rows `8 half..8 half + 8` of the tile against activation rows
/// `j0..j0 + J`: unsigned activations (`x.qu`, `q + 128`) times signed weights, each sum
/// starting at `-128 sum(q_w)` (`t.neg`) so that it ends exact.
///
/// # Safety
/// [`passes`]' contract for those rows (`j0 + J <= x.rows`), with `w.format == Q8_0` (so
/// `t.neg` is filled), `x.qu` filled and `half < 2`.
#[inline(always)]
unsafe fn half_q8_0<D: Dot, const J: usize>(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    half: usize,
    j0: usize,
    out: *mut f32,
) {
    // SAFETY: as in `half_q4_1`, with 512-byte tile-blocks: the 32 bytes at `tb * 512 + 64 k +
    // 32 half` (`k < 8`) lie inside tile-block `tb`, its 8 starting sums at `tb * 16 + 8 half`
    // inside `t.neg` and its 8 scales there inside `t.d`; the activation bytes are read from
    // `x.qu`, which the contract says is filled (`x.rows * nb * 32` values, as `x.q`).
    unsafe {
        let nb = w.nb;
        let mut acc = [_mm256_setzero_ps(); J];
        for b in 0..nb {
            let tb = tile * nb + b;
            let p = t.q.as_ptr().add(tb * 512 + 32 * half);
            let at = tb * TILE + 8 * half;
            let start = _mm256_loadu_si256(t.neg.as_ptr().add(at) as *const __m256i);
            let mut ia = [start; J];
            for k in 0..8 {
                let wk = _mm256_loadu_si256(p.add(64 * k) as *const __m256i);
                for j in 0..J {
                    let xp = x.qu.as_ptr().add(((j0 + j) * nb + b) * QK + 4 * k);
                    ia[j] = D::dpbusd(ia[j], bcast4(xp), wk);
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(at) as *const __m128i));
            for j in 0..J {
                let xa = (j0 + j) * x.nbp + b;
                let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xa)));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[j]), dd, acc[j]);
            }
        }
        for j in 0..J {
            _mm256_storeu_ps(out.add((j0 + j) * w.rows + tile * TILE + 8 * half), acc[j]);
        }
    }
}
