//! `exp` over f32 slices, vectorized: the training path's softmax and SiLU take a few hundred
//! million exponentials a DPO step, and libm's `expf`, one call each (with a slow path for
//! every underflow, which masked attention scores all are), was 7% of the step (perf).
//!
//! Cephes' `expf` polynomial (about 1 ulp on the reduced range), written without fused
//! multiply-adds so the AVX-512, AVX2 and portable builds of the one loop round identically.
//! Inputs below -87.3 give exactly 0; inputs above 88 give `exp(88)` instead of a larger number
//! or infinity (callers feed it non-positive softmax arguments and `-g` of a sigmoid, for which
//! that is harmless). NaN stays NaN.

const LO: f32 = -87.336_55;
const HI: f32 = 88.0;

#[inline(always)]
fn exp1(x: f32) -> f32 {
    let xc = x.clamp(LO, HI);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // 2^n without a float-to-int conversion (Rust's saturating `as` does not vectorize): in
    // 1.5 * 2^23 + 127 + n the low mantissa bits hold n + 127, which the shift moves into the
    // exponent field, dropping the rest.
    let scale = f32::from_bits((n + (12_582_912.0 + 127.0)).to_bits() << 23);
    let y = e * scale;
    if x < LO {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

#[inline(always)]
fn exp_loop(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp1(*x);
    }
}

/// [`exp_loop`] compiled for AVX-512F (the same arithmetic: no fused multiply-adds).
///
/// # Safety
/// The CPU has AVX-512F ([`exp_in_place`] detects it). The body is safe code: the feature is
/// the only requirement.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    exp_loop(xs)
}

/// [`exp_loop`] compiled for AVX2 (the same arithmetic: no fused multiply-adds).
///
/// # Safety
/// The CPU has AVX2 ([`exp_in_place`] detects it). The body is safe code: the feature is the
/// only requirement.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    exp_loop(xs)
}

/// `x = exp(x)` for every element.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F, `exp_avx512`'s one requirement, was detected just above.
            return unsafe { exp_avx512(xs) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2, `exp_avx2`'s one requirement, was detected just above.
            return unsafe { exp_avx2(xs) };
        }
    }
    exp_loop(xs)
}

/// `s` as f32, when `T` is f32.
pub(crate) fn as_f32<T: 'static>(s: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: `T` is `f32` (the `TypeId`s are equal), so this is the same slice, same
        // pointer, length and lifetime, under its own type.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
}

/// `s` as f32, when `T` is f32.
pub(crate) fn as_f32_mut<T: 'static>(s: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: `T` is `f32` (the `TypeId`s are equal), so this is the same slice under its own
        // type; it reborrows `s` mutably for its lifetime, so nothing else aliases it.
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_libm_and_exact_at_the_edges() {
        let mut worst = 0.0f64;
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + i as f32 * (175.0 / 200_000.0))
            .collect();
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            worst = worst.max(((y as f64 - want) / want).abs());
        }
        // 2 ulp of f32 is 2.4e-7.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        let mut edge = [-1e9f32, -100.0, f32::NEG_INFINITY, 0.0, f32::NAN];
        exp_in_place(&mut edge);
        assert_eq!(&edge[..4], &[0.0, 0.0, 0.0, 1.0]);
        assert!(edge[4].is_nan());
    }

    #[test]
    fn every_instruction_set_rounds_the_same() {
        let xs: Vec<f32> = (0..10_007)
            .map(|i| (i as f32 * 0.7431).sin() * 60.0)
            .collect();
        let mut a = xs.clone();
        exp_in_place(&mut a);
        let mut b = xs.clone();
        exp_loop(&mut b);
        assert_eq!(a, b);
    }
}
