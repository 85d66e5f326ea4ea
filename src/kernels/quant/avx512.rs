//! The AVX-512 VNNI kernels: `vpdpbusd` products of two blocks an instruction, one weight row
//! against a few activation rows, and the tiled kernel (sixteen weight rows a register) for
//! prefill and wide batches.

// Kernels index several per-row arrays with one counter.
#![allow(clippy::needless_range_loop)]

use super::{Format, Packed, QActs, Tiles, GROUP, QK, TILE, TILE_ROWS};
use std::arch::x86_64::*;

/// `out[(j0 + j) * w.rows + 16 tile + l] = w[16 tile + l] . x[j0 + j]` for `j < g <= 8`,
/// `l < 16`, from the tiled copy `t` of `w`.
///
/// # Safety
/// - The CPU has AVX-512 F, BW, VL, DQ and VNNI, AVX2, FMA and F16C: the kernel is
///   [`super::Kernel::Avx512Vnni`], which [`super::Kernel::available`] offers only where it
///   detected them all (and `w` has tiles only where that kernel runs).
/// - `t` is `w`'s tiled copy (`w.tiles`, built by `Packed::tiles_unchecked`: `t.q` holds
///   `rows / 16 * nb` tile-blocks of 256 bytes (Q4_1) or 512 (Q8_0); `t.d`, and `t.m` (Q4_1) or
///   `t.neg` (Q8_0), `rows / 16 * nb * 16` values), and `tile < w.rows / 16`.
/// - `x.nb == w.nb` and `j0 + g <= x.rows` (a `g` of 0 or above 8 panics); for Q8_0, `x.qu` is
///   filled (`QActs::quantize` fills it where the tiled kernel runs, as it does here).
/// - `out` is valid for writes of the 16 values at `(j0 + j) * w.rows + 16 tile` for every
///   `j < g`, and nothing else reads or writes them during the call.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn tiled(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    g: usize,
    out: *mut f32,
) {
    // SAFETY: `tiled_q4_1::<J>` and `tiled_q8_0::<J>` have this function's contract with
    // `g = J`, and the match runs them only for the `J` equal to `g`.
    unsafe {
        debug_assert!(g <= TILE_ROWS && j0 + g <= x.rows);
        macro_rules! go {
            ($($n:literal)*) => {
                match (w.format, g) {
                    $((Format::Q4_1, $n) => tiled_q4_1::<$n>(w, t, x, tile, j0, out),)*
                    $((Format::Q8_0, $n) => tiled_q8_0::<$n>(w, t, x, tile, j0, out),)*
                    _ => unreachable!("at most {TILE_ROWS} rows a pass"),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8)
    }
}

/// Four activation bytes (a quarter of a block's eighth) in every lane.
///
/// # Safety
/// The CPU has AVX-512F; `p` is valid for reading 4 bytes (no alignment needed).
#[inline(always)]
unsafe fn bcast4(p: *const u8) -> __m512i {
    // SAFETY: the 4 bytes at `p` are readable (unaligned) and the CPU has AVX-512F, both by
    // this function's contract.
    unsafe { _mm512_set1_epi32((p as *const i32).read_unaligned()) }
}

/// Sixteen f16 scales `v[at..at + 16]` as f32.
///
/// # Safety
/// The CPU has AVX-512F (and AVX); `at + 16 <= v.len()`.
#[inline(always)]
unsafe fn scales16(v: &[half::f16], at: usize) -> __m512 {
    // SAFETY: `at + 16 <= v.len()`, so the 32 bytes read lie inside `v`, and the CPU has the
    // features, both by this function's contract.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(at) as *const __m256i)) }
}

/// [`tiled`] for Q4_1 and `J` activation rows.
///
/// # Safety
/// [`tiled`]'s contract with `g = J` and `w.format == Q4_1` (so `t.m` is filled).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn tiled_q4_1<const J: usize>(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    out: *mut f32,
) {
    // SAFETY: the CPU features, `tile < w.rows / 16`, `x.nb == nb`, `j0 + J <= x.rows` and
    // the `out` elements are this function's contract. Every read is in bounds: with
    // `tb = tile * nb + b < (w.rows / 16) * nb`, tile-block `tb`'s 256 bytes lie inside `t.q`, its
    // 16 scales and minimums (`scales16` at `tb * 16`) inside `t.d` and `t.m`; the 4 bytes at
    // `4 k < 32` of block `b < nb` of activation row `j0 + j < x.rows` lie inside `x.q`
    // (`x.rows * nb * 32`), and `(j0 + j) * nbp + b < x.rows * nbp` inside `x.d` and `x.s`. The
    // 16 stores per row are the elements the contract gives to this call.
    unsafe {
        let (tq, td, tm) = (&t.q, &t.d, &t.m);
        let nb = w.nb;
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); J];
        for b in 0..nb {
            let tb = tile * nb + b;
            let p = tq.as_ptr().add(tb * 256);
            let mut wv = [_mm512_setzero_si512(); 8];
            for g in 0..4 {
                let v = _mm512_loadu_si512(p.add(64 * g) as *const _);
                wv[g] = _mm512_and_si512(v, low);
                wv[g + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            let mut ia = [_mm512_setzero_si512(); J];
            for k in 0..8 {
                for j in 0..J {
                    let xp = (x.q.as_ptr() as *const u8).add(((j0 + j) * nb + b) * QK + 4 * k);
                    // Unsigned 4-bit weights times signed 8-bit activations.
                    ia[j] = _mm512_dpbusd_epi32(ia[j], wv[k], bcast4(xp));
                }
            }
            let dw = scales16(td, tb * TILE);
            let mw = scales16(tm, tb * TILE);
            for j in 0..J {
                let at = (j0 + j) * x.nbp + b;
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(at)));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[j]), dd, acc[j]);
                // + m * (d_x * sum q_x)
                acc[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x.s.get_unchecked(at)), acc[j]);
            }
        }
        for j in 0..J {
            _mm512_storeu_ps(out.add((j0 + j) * w.rows + tile * TILE), acc[j]);
        }
    }
}

/// [`tiled`] for Q8_0 and `J` activation rows.
///
/// # Safety
/// [`tiled`]'s contract with `g = J` and `w.format == Q8_0` (so `t.neg` is filled), `x.qu`
/// included.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn tiled_q8_0<const J: usize>(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    out: *mut f32,
) {
    // SAFETY: the CPU features, `tile < w.rows / 16`, `x.nb == nb`, `j0 + J <= x.rows`, a
    // filled `x.qu` and the `out` elements are this function's contract. Every read is in
    // bounds: with `tb = tile * nb + b < (w.rows / 16) * nb`, tile-block `tb`'s 512 bytes lie
    // inside `t.q`, its 16 starting sums inside `t.neg` and its 16 scales inside `t.d`; the 4
    // bytes at `4 k < 32` of block `b < nb` of activation row `j0 + j < x.rows` lie inside `x.qu`
    // (`x.rows * nb * 32`), and `(j0 + j) * nbp + b < x.rows * nbp` inside `x.d`. The 16 stores
    // per row are the elements the contract gives to this call.
    unsafe {
        let (tq, td, tn) = (&t.q, &t.d, &t.neg);
        let nb = w.nb;
        let mut acc = [_mm512_setzero_ps(); J];
        for b in 0..nb {
            let tb = tile * nb + b;
            let p = tq.as_ptr().add(tb * 512);
            // Each sum starts at -128 sum(q_w), so after the unsigned products it is exact.
            let start = _mm512_loadu_si512(tn.as_ptr().add(tb * TILE) as *const _);
            let mut ia = [start; J];
            for k in 0..8 {
                let wk = _mm512_loadu_si512(p.add(64 * k) as *const _);
                for j in 0..J {
                    let xp = x.qu.as_ptr().add(((j0 + j) * nb + b) * QK + 4 * k);
                    ia[j] = _mm512_dpbusd_epi32(ia[j], bcast4(xp), wk);
                }
            }
            let dw = scales16(td, tb * TILE);
            for j in 0..J {
                let at = (j0 + j) * x.nbp + b;
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.get_unchecked(at)));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[j]), dd, acc[j]);
            }
        }
        for j in 0..J {
            _mm512_storeu_ps(out.add((j0 + j) * w.rows + tile * TILE), acc[j]);
        }
    }
}

/// AVX-512 VNNI: dispatches on the group size so the accumulators stay in registers.
///
/// # Safety
/// - The CPU has AVX-512 F, BW, VL, DQ and VNNI, AVX2, FMA and F16C
///   ([`super::Kernel::available`] offers [`super::Kernel::Avx512Vnni`] only where it detected
///   them all).
/// - `r < w.rows`, `x.nb == w.nb` (asserted by [`Packed::matmul`]), `1 <= g <= GROUP` (a `g`
///   outside that range runs as 4) and `j0 + g <= x.rows`.
///
/// With these, every raw read is in bounds by the layout invariants of [`Packed`] (`qs` holds
/// `rows * nb * 16` bytes for Q4_1, `rows * nb * 32` for Q8_0; `d`, and `m` (Q4_1) or `sums`
/// (Q8_0), `rows * nb` values) and of [`QActs`] (`q` holds `rows * nb * 32` quants; `d` and
/// `s` `rows * nbp` values, `nbp` a multiple of 16 with the padding zeroed).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn vnni_row(
    w: &Packed,
    r: usize,
    x: &QActs,
    j0: usize,
    g: usize,
    acc: &mut [f32; GROUP],
) {
    // SAFETY: this function's contract is `vnni_rows::<G>`'s, with `G` the `g` it was given
    // (4 for a `g` outside 1..=4, which the contract excludes).
    unsafe {
        match g {
            1 => vnni_rows::<1>(w, r, x, j0, acc),
            2 => vnni_rows::<2>(w, r, x, j0, acc),
            3 => vnni_rows::<3>(w, r, x, j0, acc),
            _ => vnni_rows::<4>(w, r, x, j0, acc),
        }
    }
}

/// 32-bit sums of four byte products each. Q4_1: unsigned quants times signed activations.
/// Q8_0: both signed, so the activations go unsigned (`q + 128`, by flipping the top bit)
/// and the caller takes `128 * sum(w)` back off. Zero bytes in both give zero either way.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 VNNI.
#[inline(always)]
unsafe fn dot_bytes(f: Format, wq: __m512i, xv: __m512i) -> __m512i {
    // SAFETY: register-only AVX-512 intrinsics; the CPU has AVX-512F and VNNI (this function's
    // contract).
    unsafe {
        match f {
            Format::Q4_1 => _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv),
            Format::Q8_0 => _mm512_dpbusd_epi32(
                _mm512_setzero_si512(),
                _mm512_xor_si512(xv, _mm512_set1_epi8(-128)),
                wq,
            ),
        }
    }
}

/// Two blocks an instruction (`vpdpbusd`: unsigned x signed bytes into 32-bit sums, lanes
/// 0-7 the first block, 8-15 the second); scales converted sixteen blocks at a time and
/// spread to the lanes by a permute.
///
/// # Safety
/// [`vnni_row`]'s contract, with `g = G`: the AVX-512 VNNI kernel's features; `r < w.rows`;
/// `x.nb == w.nb`; `j0 + G <= x.rows`.
// Long because one kernel: the accumulators must stay in registers across the whole block loop,
// so it is not split into calls.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_rows<const G: usize>(
    w: &Packed,
    r: usize,
    x: &QActs,
    j0: usize,
    acc: &mut [f32; GROUP],
) {
    // SAFETY: the CPU features and the bounds below are this function's contract. With
    // `r < w.rows`, `x.nb == nb` and rows `j0..j0 + G` inside `x`, every raw access is in bounds:
    // - `w.d`, `w.m` (Q4_1) and `w.sums` (Q8_0): masked loads of the `n <= nb - b0` values of
    //   row `r` at `r * nb + b0` (masked-off lanes are not read; the arrays hold `rows * nb`).
    // - `x.d` and `x.s`, 16 values at `row * nbp + b0`: `b0` is a multiple of 16 below
    //   `nb <= nbp`, and `nbp` a multiple of 16, so `b0 + 16 <= nbp` (the padding is zeros).
    // - A pair of blocks `b0 + b`, `b0 + b + 1 < nb` (`b + 1 < n`): 32 bytes of `w.qs` at
    //   `(r * nb + b0 + b) * 16` (Q4_1, paired since `b0 + b` is even) or 64 at `* 32` (Q8_0),
    //   and 64 bytes of `x.q` at `(row * nb + b0 + b) * 32`; the unpaired last block: 16 or 32
    //   bytes of `w.qs` and 32 of `x.q` at the same offsets. All lie inside row `r` of `w.qs`
    //   (`rows * nb * 16` or `* 32` bytes) and row `row < x.rows` of `x.q` (`x.rows * nb * 32`).
    // - `dot_bytes` needs AVX-512F and VNNI, which this function has.
    unsafe {
        let nb = w.nb;
        let low = _mm256_set1_epi8(0x0F);
        // Two accumulators per row, alternating by block whatever G is, so consecutive FMAs do
        // not wait on each other and a row's sum does not depend on the rows beside it. (Eight
        // rows a pass, one accumulator each, measured within noise of this at 32 rows.)
        let mut sa = [_mm512_setzero_ps(); G];
        let mut sb = [_mm512_setzero_ps(); G];
        let mut corr = [_mm512_setzero_ps(); G];
        let mut dd = [_mm512_setzero_ps(); G];
        let wrow = r * nb;
        let lanes_lo = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let two = _mm512_set1_epi32(2);
        let mut b0 = 0;
        while b0 < nb {
            let n = (nb - b0).min(16);
            let kmask: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
            let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                kmask,
                w.d.as_ptr().add(wrow + b0) as *const i16,
            ));
            let extra = match w.format {
                Format::Q4_1 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    kmask,
                    w.m.as_ptr().add(wrow + b0) as *const i16,
                )),
                Format::Q8_0 => _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(
                        kmask,
                        w.sums.as_ptr().add(wrow + b0),
                    ))),
                    _mm512_set1_ps(128.0),
                ),
            };
            for j in 0..G {
                let row = j0 + j;
                let xd = _mm512_loadu_ps(x.d.as_ptr().add(row * x.nbp + b0));
                dd[j] = _mm512_mul_ps(dw, xd);
                corr[j] = match w.format {
                    // + m * (d_x * sum q_x)
                    Format::Q4_1 => _mm512_fmadd_ps(
                        extra,
                        _mm512_loadu_ps(x.s.as_ptr().add(row * x.nbp + b0)),
                        corr[j],
                    ),
                    // - d_w d_x * 128 * sum q_w
                    Format::Q8_0 => _mm512_fnmadd_ps(extra, dd[j], corr[j]),
                };
            }
            // Pairs of blocks; `idx` picks their two scales out of `dd`.
            let mut idx = lanes_lo;
            let mut b = 0;
            while b + 1 < n {
                let wi = wrow + b0 + b;
                let wq = match w.format {
                    Format::Q4_1 => {
                        let v = _mm256_loadu_si256(w.qs.as_ptr().add(wi * 16) as *const __m256i);
                        let lo = _mm256_and_si256(v, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
                    }
                    Format::Q8_0 => _mm512_loadu_si512(w.qs.as_ptr().add(wi * 32) as *const _),
                };
                for j in 0..G {
                    let row = j0 + j;
                    let xv =
                        _mm512_loadu_si512(x.q.as_ptr().add((row * nb + b0 + b) * QK) as *const _);
                    let p = dot_bytes(w.format, wq, xv);
                    let sc = _mm512_permutexvar_ps(idx, dd[j]);
                    if b % 4 == 0 {
                        sa[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, sa[j]);
                    } else {
                        sb[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, sb[j]);
                    }
                }
                idx = _mm512_add_epi32(idx, two);
                b += 2;
            }
            if b < n {
                // The row's unpaired last block (Q4_1 keeps it in GGML's order).
                let wi = wrow + b0 + b;
                let wq = match w.format {
                    Format::Q4_1 => {
                        let v = _mm_loadu_si128(w.qs.as_ptr().add(wi * 16) as *const __m128i);
                        let l = _mm_set1_epi8(0x0F);
                        let lo = _mm_and_si128(v, l);
                        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), l);
                        _mm512_zextsi256_si512(_mm256_set_m128i(hi, lo))
                    }
                    Format::Q8_0 => _mm512_zextsi256_si512(_mm256_loadu_si256(
                        w.qs.as_ptr().add(wi * 32) as *const __m256i,
                    )),
                };
                let lanes = _mm512_set1_epi32(b as i32);
                for j in 0..G {
                    let row = j0 + j;
                    let xv = _mm512_zextsi256_si512(_mm256_loadu_si256(
                        x.q.as_ptr().add((row * nb + b0 + b) * QK) as *const __m256i,
                    ));
                    let p = dot_bytes(w.format, wq, xv);
                    let sc = _mm512_permutexvar_ps(lanes, dd[j]);
                    sa[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, sa[j]);
                }
            }
            b0 += n;
        }
        for j in 0..G {
            acc[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(sa[j], sb[j]), corr[j]));
        }
    }
}
