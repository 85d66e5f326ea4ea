//! The AVX-512 VNNI kernels: `vpdpbusd` products of two blocks an instruction, one weight row
//! against a few activation rows, and the tiled kernel (sixteen weight rows a register) for
//! prefill and wide batches.

// Kernels index several per-row arrays with one counter.
#![allow(clippy::needless_range_loop)]

use super::{Format, Packed, QActs, Tiles, GROUP, QK, TILE, TILE_ROWS};
use std::arch::x86_64::*;

/// `out[(j0 + j) * w.rows + 16 tile + l] = w[16 tile + l] . x[j0 + j]` for `j < g <= 8`,
/// `l < 16`, from the tiled copy `t` of `w`.
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

/// Four activation bytes (a quarter of a block's eighth) in every lane.
#[inline(always)]
unsafe fn bcast4(p: *const u8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

#[inline(always)]
unsafe fn scales16(v: &[half::f16], at: usize) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(at) as *const __m256i))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn tiled_q4_1<const J: usize>(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    out: *mut f32,
) {
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

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn tiled_q8_0<const J: usize>(
    w: &Packed,
    t: &Tiles,
    x: &QActs,
    tile: usize,
    j0: usize,
    out: *mut f32,
) {
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

/// AVX-512 VNNI: dispatches on the group size so the accumulators stay in registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn vnni_row(
    w: &Packed,
    r: usize,
    x: &QActs,
    j0: usize,
    g: usize,
    acc: &mut [f32; GROUP],
) {
    match g {
        1 => vnni_rows::<1>(w, r, x, j0, acc),
        2 => vnni_rows::<2>(w, r, x, j0, acc),
        3 => vnni_rows::<3>(w, r, x, j0, acc),
        _ => vnni_rows::<4>(w, r, x, j0, acc),
    }
}

/// 32-bit sums of four byte products each. Q4_1: unsigned quants times signed activations.
/// Q8_0: both signed, so the activations go unsigned (`q + 128`, by flipping the top bit)
/// and the caller takes `128 * sum(w)` back off. Zero bytes in both give zero either way.
#[inline(always)]
unsafe fn dot_bytes(f: Format, wq: __m512i, xv: __m512i) -> __m512i {
    match f {
        Format::Q4_1 => _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv),
        Format::Q8_0 => _mm512_dpbusd_epi32(
            _mm512_setzero_si512(),
            _mm512_xor_si512(xv, _mm512_set1_epi8(-128)),
            wq,
        ),
    }
}

/// Two blocks an instruction (`vpdpbusd`: unsigned x signed bytes into 32-bit sums, lanes
/// 0-7 the first block, 8-15 the second); scales converted sixteen blocks at a time and
/// spread to the lanes by a permute.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_rows<const G: usize>(
    w: &Packed,
    r: usize,
    x: &QActs,
    j0: usize,
    acc: &mut [f32; GROUP],
) {
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
                let xv = _mm512_loadu_si512(x.q.as_ptr().add((row * nb + b0 + b) * QK) as *const _);
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
