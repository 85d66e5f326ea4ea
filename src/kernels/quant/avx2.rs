//! The AVX2 + FMA + F16C kernels: activation quantization, one weight row against a few
//! activation rows (`vpmaddubsw`, widened by `vpmaddwd`), and the tiled kernel (eight weight
//! rows a register) for prefill and wide batches. The path of every x86-64 CPU since Haswell /
//! Zen 1 without AVX-512 VNNI (Zen 2 and 3, Intel client parts), and the one AVX-512 machines
//! take with `REVIEWER2_QKERNEL=avx2`.

// Kernels index several per-row arrays with one counter.
#![allow(clippy::needless_range_loop)]

use super::{Format, Packed, QActs, Tiles, GROUP, QK, TILE, TILE_ROWS};
use std::arch::x86_64::*;

/// [`super::quantize_row`] in AVX2: the same values (`vcvtps2dq` rounds half to even).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (checked by [`super::Kernel::available`]: any kernel but the
/// portable one implies them). For `nb = x.len() / 32` blocks, `q` holds at least `nb * 32`
/// values and `qu` is empty or holds at least `nb * 32` (`d` and `s` are indexed with bounds
/// checks).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row(
    x: &[f32],
    q: &mut [i8],
    qu: &mut [u8],
    d: &mut [f32],
    s: &mut [f32],
) {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let flip = _mm256_set1_epi8(-128);
    for b in 0..x.len() / QK {
        // SAFETY: `b < x.len() / 32`, so the 32 values at `b * 32` lie inside `x`.
        let v = unsafe {
            let p = x.as_ptr().add(b * QK);
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let db = amax / 127.0;
        let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
        let i = [
            _mm256_cvtps_epi32(_mm256_mul_ps(v[0], id)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[1], id)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[2], id)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[3], id)),
        ];
        let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01));
        // Saturating packs keep the order within 128-bit lanes; the permute restores it.
        let w01 = _mm256_packs_epi32(i[0], i[1]);
        let w23 = _mm256_packs_epi32(i[2], i[3]);
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(w01, w23),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        // SAFETY: `q` holds at least `x.len() / 32 * 32` bytes (the contract above), so block
        // `b`'s 32 lie inside it; likewise `qu` where it is not empty.
        unsafe {
            _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, bytes);
            if !qu.is_empty() {
                _mm256_storeu_si256(
                    qu.as_mut_ptr().add(b * QK) as *mut __m256i,
                    _mm256_xor_si256(bytes, flip),
                );
            }
        }
        d[b] = db;
        s[b] = db * _mm_cvtsi128_si32(sum) as f32;
    }
}

/// The sum of `v`'s eight lanes.
///
/// # Safety
/// The CPU has AVX (inlined into the AVX2 kernels, whose callers checked it).
#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    // SAFETY: register-only AVX/SSE intrinsics; the CPU has AVX (this function's contract).
    unsafe {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

/// Eight f16 values from `v[at..]` as f32 (zeros past the end of `v`).
///
/// # Safety
/// The CPU has AVX and F16C. Any `v` and `at` are in bounds: the load is taken only where
/// `at + 8 <= v.len()`, otherwise `v[at..]` is copied with bounds checks (and panics for
/// `at > v.len()`).
#[inline(always)]
unsafe fn load8_f16(v: &[half::f16], at: usize) -> __m256 {
    if at + 8 <= v.len() {
        // SAFETY: `at + 8 <= v.len()`, so the 16 bytes read lie inside `v`; the CPU has F16C
        // (this function's contract).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(at) as *const __m128i)) }
    } else {
        let mut tmp = [0u16; 8];
        for (t, h) in tmp.iter_mut().zip(&v[at..]) {
            *t = h.to_bits();
        }
        // SAFETY: `tmp` is 16 bytes; the CPU has F16C (this function's contract).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(tmp.as_ptr() as *const __m128i)) }
    }
}

/// AVX2: one block at a time, `vpmaddubsw` of unsigned weights (Q4_1's nibbles) or of
/// |w| against sign-adjusted activations (Q8_0), widened by `vpmaddwd`. Scales are
/// converted and multiplied eight blocks at a time; two accumulators a row, alternating,
/// so consecutive FMAs do not wait on each other.
///
/// # Safety
/// - The CPU has AVX2, FMA and F16C ([`super::Kernel::available`] offers
///   [`super::Kernel::Avx2`] and [`super::Kernel::Avx512Vnni`] only where it detected them).
/// - `r < w.rows`, `x.nb == w.nb` (asserted by [`Packed::matmul`]), `1 <= g <= GROUP` (a
///   `g` outside that range runs as 4) and `j0 + g <= x.rows`.
///
/// With these, every raw read is in bounds by the layout invariants [`Packed::from_ggml`] and
/// [`Packed::permute_rows`] establish (`qs` holds `rows * nb * 16` bytes for Q4_1, `rows * nb *
/// 32` for Q8_0; `d`, and `m` for Q4_1, `rows * nb` scales) and [`QActs::quantize`] establishes
/// (`q` holds `rows * nb * 32` quants; `d` and `s` `rows * nbp` values, `nbp` a multiple of 16
/// with the padding zeroed).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn avx2_row(
    w: &Packed,
    r: usize,
    x: &QActs,
    j0: usize,
    g: usize,
    acc: &mut [f32; GROUP],
) {
    // On the group size, so the accumulators stay in registers.
    // SAFETY: this function's contract is `avx2_rows::<G>`'s, with `G` the `g` it was given
    // (4 for a `g` outside 1..=4, which the contract excludes).
    unsafe {
        match g {
            1 => avx2_rows::<1>(w, r, x, j0, acc),
            2 => avx2_rows::<2>(w, r, x, j0, acc),
            3 => avx2_rows::<3>(w, r, x, j0, acc),
            _ => avx2_rows::<4>(w, r, x, j0, acc),
        }
    }
}

/// [`avx2_row`] for `G` activation rows.
///
/// # Safety
/// [`avx2_row`]'s contract, with `g = G`: AVX2, FMA and F16C; `r < w.rows`; `x.nb == w.nb`;
/// `j0 + G <= x.rows`.
// Long because one kernel: the accumulators must stay in registers across the whole block loop,
// so it is not split into calls.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_rows<const G: usize>(
    w: &Packed,
    r: usize,
    x: &QActs,
    j0: usize,
    acc: &mut [f32; GROUP],
) {
    // SAFETY: the CPU features and the bounds below are this function's contract. With
    // `r < w.rows`, `x.nb == nb` and rows `j0..j0 + G` inside `x`, every raw access is in bounds:
    // - `xq(row, b)`: the 32 quants of block `b < nb` of activation row `row < x.rows`, inside
    //   `x.q` (`x.rows * nb * 32` values, `QActs::quantize`).
    // - `x.d` and `x.s`, 8 values at `row * nbp + b0`: `b0` is a multiple of 8 below
    //   `nb <= nbp`, and `nbp` a multiple of 16, so `b0 + 8 <= nbp` (the padding is zeros).
    // - `w.qs`: Q4_1 32 bytes at `(r * nb + b) * 16` (blocks `b` and `b + 1`, paired) where
    //   `b + 1 < nb`, else the last block's 16; Q8_0 32 bytes at `(r * nb + b) * 32`; all inside
    //   row `r` of `qs` (`rows * nb * 16` or `* 32` bytes, `Packed::from_ggml`).
    // - `w.d` and `w.m` are read through bounds-checked slices (`load8_f16`); `scale[j]` is a
    //   local array of 8.
    // - `load8_f16`, `hsum256` and `lo256_unused` need AVX and F16C, which this function has.
    unsafe {
        let g = G;
        let nb = w.nb;
        let wrow = r * nb;
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let mut sums = [[_mm256_setzero_ps(); G]; 2];
        let mut mins = [_mm256_setzero_ps(); G];
        let mut scale = [[0f32; 8]; G];
        let xq = |row: usize, b: usize| {
            _mm256_loadu_si256(x.q.as_ptr().add((row * nb + b) * QK) as *const __m256i)
        };
        let mut b0 = 0;
        while b0 < nb {
            let n = (nb - b0).min(8);
            let row_end = wrow + nb;
            let dw = load8_f16(&w.d[..row_end], wrow + b0);
            let mw = match w.format {
                Format::Q4_1 => load8_f16(&w.m[..row_end], wrow + b0),
                Format::Q8_0 => _mm256_setzero_ps(),
            };
            for j in 0..g {
                let at = (j0 + j) * x.nbp + b0;
                // Activation scales are padded to a multiple of 16 blocks with zeros.
                let dd = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d.as_ptr().add(at)));
                _mm256_storeu_ps(scale[j].as_mut_ptr(), dd);
                mins[j] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x.s.as_ptr().add(at)), mins[j]);
            }
            let mut k = 0;
            while k < n {
                let b = b0 + k;
                let wi = wrow + b;
                match w.format {
                    Format::Q4_1 => {
                        let p = w.qs.as_ptr().add(wi * 16);
                        // Two blocks from one load, or the unpaired last block in GGML's order.
                        let (wa, wb, two) = if b + 1 < nb {
                            let v = _mm256_loadu_si256(p as *const __m256i);
                            let lo = _mm256_and_si256(v, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                            (lo, hi, true)
                        } else {
                            let v = _mm_loadu_si128(p as *const __m128i);
                            let l = _mm_set1_epi8(0x0F);
                            let lo = _mm_and_si128(v, l);
                            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), l);
                            (_mm256_set_m128i(hi, lo), lo256_unused(), false)
                        };
                        for j in 0..g {
                            let row = j0 + j;
                            let pa = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xq(row, b)), ones);
                            let sa = _mm256_set1_ps(scale[j][k]);
                            sums[0][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pa), sa, sums[0][j]);
                            if two {
                                let pb = _mm256_madd_epi16(
                                    _mm256_maddubs_epi16(wb, xq(row, b + 1)),
                                    ones,
                                );
                                let sb = _mm256_set1_ps(scale[j][k + 1]);
                                sums[1][j] =
                                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb), sb, sums[1][j]);
                            }
                        }
                        k += if two { 2 } else { 1 };
                    }
                    Format::Q8_0 => {
                        let wq = _mm256_loadu_si256(w.qs.as_ptr().add(wi * 32) as *const __m256i);
                        let aw = _mm256_sign_epi8(wq, wq);
                        for j in 0..g {
                            let sx = _mm256_sign_epi8(xq(j0 + j, b), wq);
                            let pr = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                            let sc = _mm256_set1_ps(scale[j][k]);
                            let s = &mut sums[k % 2][j];
                            *s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr), sc, *s);
                        }
                        k += 1;
                    }
                }
            }
            b0 += n;
        }
        for j in 0..g {
            acc[j] = hsum256(_mm256_add_ps(
                _mm256_add_ps(sums[0][j], sums[1][j]),
                mins[j],
            ));
        }
    }
}

/// A zero register, for the second block of an unpaired one (never read).
///
/// # Safety
/// The CPU has AVX.
#[inline(always)]
unsafe fn lo256_unused() -> __m256i {
    // SAFETY: a register-only AVX intrinsic; the CPU has AVX (this function's contract).
    unsafe { _mm256_setzero_si256() }
}

/// The AVX-512 VNNI tiled kernel's products in AVX2 (`super::avx512::tiled`): `out[(j0 + j) *
/// w.rows + 16 tile + l] = w[16 tile + l] . x[j0 + j]` for `j < g <= 8`, `l < 16`, from the same
/// tiled copy `t` of `w`, in two halves of eight rows (one 256-bit register each), up to four
/// activation rows a pass.
///
/// Each block's integer sums are exact, as `vpdpbusd`'s are, and the float steps are the VNNI
/// kernel's lane for lane (the scale product, then one FMA for the sum and one for Q4_1's
/// minimum, block after block), so both kernels give the same bits: a prompt's text does not
/// depend on whether the CPU has AVX-512.
///
/// # Safety
/// - The CPU has AVX2, FMA and F16C ([`super::Kernel::available`] offers
///   [`super::Kernel::Avx2`] only where it detected them).
/// - `t` is `w`'s tiled copy (`Packed::tiles_unchecked`: `t.q` holds `rows / 16 * nb`
///   tile-blocks of 256 bytes (Q4_1) or 512 (Q8_0); `t.d`, and `t.m` (Q4_1), `rows / 16 * nb *
///   16` values), and `tile < w.rows / 16`.
/// - `x.nb == w.nb` and `j0 + g <= x.rows`, `1 <= g <= 8` (others panic).
/// - `out` is valid for writes of the 16 values at `(j0 + j) * w.rows + 16 tile` for every
///   `j < g`, and nothing else reads or writes them during the call.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tiled(
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
            // `j0..j0 + g`) and half `half < 2`: `half_tile::<N>`'s contract with `N = n`.
            unsafe {
                match (w.format, n) {
                    (Format::Q4_1, 1) => half_q4_1::<1>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q4_1, 2) => half_q4_1::<2>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q4_1, 3) => half_q4_1::<3>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q4_1, _) => half_q4_1::<4>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q8_0, 1) => half_q8_0::<1>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q8_0, 2) => half_q8_0::<2>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q8_0, 3) => half_q8_0::<3>(w, t, x, tile, half, j0 + j, out),
                    (Format::Q8_0, _) => half_q8_0::<4>(w, t, x, tile, half, j0 + j, out),
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
unsafe fn bcast4(p: *const i8) -> __m256i {
    // SAFETY: the 4 bytes at `p` are readable (unaligned) and the CPU has AVX, both by this
    // function's contract.
    unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
}

/// [`tiled`] for Q4_1: rows `8 half..8 half + 8` of the tile against activation rows
/// `j0..j0 + J`.
///
/// # Safety
/// [`tiled`]'s contract for those rows (`j0 + J <= x.rows`), with `w.format == Q4_1` (so
/// `t.m` is filled) and `half < 2`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_q4_1<const J: usize>(
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
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); J];
        for b in 0..nb {
            let tb = tile * nb + b;
            let p = t.q.as_ptr().add(tb * 256 + 32 * half);
            // Nibble times byte pairs are at most 2 * 15 * 127 = 3810, so eight steps of them
            // add up in 16 bits (30,480) before one widening.
            let mut s16 = [_mm256_setzero_si256(); J];
            for k in 0..8 {
                let v = _mm256_loadu_si256(p.add(64 * (k % 4)) as *const __m256i);
                let wk = if k < 4 {
                    _mm256_and_si256(v, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), low)
                };
                for j in 0..J {
                    let xp = x.q.as_ptr().add(((j0 + j) * nb + b) * QK + 4 * k);
                    s16[j] = _mm256_add_epi16(s16[j], _mm256_maddubs_epi16(wk, bcast4(xp)));
                }
            }
            let at = tb * TILE + 8 * half;
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(at) as *const __m128i));
            let mw = _mm256_cvtph_ps(_mm_loadu_si128(t.m.as_ptr().add(at) as *const __m128i));
            for j in 0..J {
                let xa = (j0 + j) * x.nbp + b;
                let ia = _mm256_madd_epi16(s16[j], ones);
                let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(xa)));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), dd, acc[j]);
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
/// `j0..j0 + J`. `vpmaddubsw` takes one unsigned operand, so the products are |w| times the
/// activation with w's sign (at most 2 * 128 * 127 = 32,512 a pair: no saturation), which is
/// the exact sum that VNNI reaches through unsigned activations and a starting offset.
///
/// # Safety
/// [`tiled`]'s contract for those rows (`j0 + J <= x.rows`), with `w.format == Q8_0` and
/// `half < 2`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_q8_0<const J: usize>(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    half: usize,
    j0: usize,
    out: *mut f32,
) {
    // SAFETY: as in `half_q4_1`, with 512-byte tile-blocks: the 32 bytes at `tb * 512 + 64 k +
    // 32 half` (`k < 8`) lie inside tile-block `tb`, and its 8 scales at `tb * 16 + 8 half`
    // inside `t.d`.
    unsafe {
        let nb = w.nb;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); J];
        for b in 0..nb {
            let tb = tile * nb + b;
            let p = t.q.as_ptr().add(tb * 512 + 32 * half);
            let mut ia = [_mm256_setzero_si256(); J];
            for k in 0..8 {
                let wk = _mm256_loadu_si256(p.add(64 * k) as *const __m256i);
                let aw = _mm256_abs_epi8(wk);
                for j in 0..J {
                    let xp = x.q.as_ptr().add(((j0 + j) * nb + b) * QK + 4 * k);
                    let sx = _mm256_sign_epi8(bcast4(xp), wk);
                    let p16 = _mm256_maddubs_epi16(aw, sx);
                    ia[j] = _mm256_add_epi32(ia[j], _mm256_madd_epi16(p16, ones));
                }
            }
            let at = tb * TILE + 8 * half;
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
