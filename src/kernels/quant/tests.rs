use super::*;
use rand::{Rng, SeedableRng};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Q4_1 blocks as llama.cpp's `quantize_row_q4_1_ref` makes them.
fn q4_1_bytes(w: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for blk in w.chunks_exact(QK) {
        let min = blk.iter().fold(f32::INFINITY, |a, &x| a.min(x));
        let max = blk.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        for i in 0..16 {
            let a = (((blk[i] - min) * id + 0.5) as u8).min(15);
            let b = (((blk[i + 16] - min) * id + 0.5) as u8).min(15);
            out.push(a | (b << 4));
        }
    }
    out
}

/// Every kernel the CPU has gives the portable kernel's products (the same integer sums,
/// summed in another order), for Q4_1 and Q8_0, for 1 to 6 activation rows, and for a row
/// length with an odd block count and a partial group of sixteen (k = 608: 19 blocks).
///
/// The threaded product uses the tiled kernel where the CPU has it and the rows are whole
/// tiles (48 and 32 rows here), with 1 to 70 activation rows: partial passes of eight and
/// more than one chunk of 64.
#[test]
fn kernels_agree_with_the_portable_reference() {
    for (rows, cols) in [
        (37, 576),
        (20, 608),
        (5, 1536),
        (48, 576),
        (32, 608),
        (32, 1536),
    ] {
        let wf = rand_vec(rows * cols, 1);
        let mats = [
            Packed::from_ggml(Format::Q4_1, &q4_1_bytes(&wf), rows, cols),
            Packed::quantize_q8_0(&wf, rows, cols),
        ];
        for m in [1, 3, 6, 11, 70] {
            let xf = rand_vec(m * cols, 2 + m as u64);
            let mut x = QActs::default();
            x.quantize(&xf, m, cols);
            for w in &mats {
                let want = Kernel::Portable.matmul(w, &x);
                for k in Kernel::available() {
                    let got = k.matmul(w, &x);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{} {:?} {rows}x{cols} m={m} at {i}: {a} vs {b}",
                            k.name(),
                            w.format
                        );
                    }
                }
                let mut out = vec![0f32; m * rows];
                w.matmul(&x, &mut out);
                assert_eq!(
                    w.tiles.is_some(),
                    Kernel::tiled_available() && rows % TILE == 0
                );
                if w.tiles.is_none() {
                    // The threaded product is the same kernel split by rows.
                    assert_eq!(out, Kernel::get().matmul(w, &x));
                    continue;
                }
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "tiled {:?} {rows}x{cols} m={m} at {i}: {a} vs {b}",
                        w.format
                    );
                }
            }
        }
    }
}

/// The quantized product is close to the exact one of the dequantized weights and the
/// unquantized activations: within what 8-bit activations can lose (a relative 1% of the
/// sum of |w x| terms here), so the kernels compute what the blocks mean.
#[test]
fn products_match_an_f64_reference_of_the_blocks() {
    let (rows, cols) = (16, 576);
    let wf = rand_vec(rows * cols, 5);
    let xf = rand_vec(cols, 6);
    for w in [
        Packed::from_ggml(Format::Q4_1, &q4_1_bytes(&wf), rows, cols),
        Packed::quantize_q8_0(&wf, rows, cols),
    ] {
        let dense = w.dequantize();
        // The dequantized blocks are the weights, to the format's precision.
        let step = if w.format == Format::Q4_1 {
            2.0 / 15.0
        } else {
            1.0 / 127.0
        };
        for (a, b) in dense.iter().zip(&wf) {
            assert!(
                (a - b).abs() <= step * 0.51 + 1e-3,
                "{:?}: {a} vs {b}",
                w.format
            );
        }
        let mut x = QActs::default();
        x.quantize(&xf, 1, cols);
        let mut out = vec![0f32; rows];
        w.matmul(&x, &mut out);
        for r in 0..rows {
            let row = &dense[r * cols..(r + 1) * cols];
            let exact: f64 = row
                .iter()
                .zip(&xf)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            let mag: f64 = row
                .iter()
                .zip(&xf)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            assert!(
                (out[r] as f64 - exact).abs() <= 0.01 * mag,
                "{:?} row {r}: {} vs {exact} (magnitude {mag})",
                w.format,
                out[r]
            );
        }
    }
}

/// One product against candle's own Q4_1 and Q8_0 matmuls (code we did not write) on the
/// same blocks. Both quantize activations the same way (8 bits, `amax / 127` per block),
/// but GGML keeps each activation block's scale in f16 and we keep it in f32: each block's
/// term may differ by f16's relative step (2^-11), so the bound is that share of the sum of
/// |w x| (a wrong quant order or scale is off by the whole sum).
#[test]
fn products_match_candles_quantized_matmul() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    let (rows, cols, m) = (48, 576, 3);
    let w = Tensor::from_vec(rand_vec(rows * cols, 11), (rows, cols), &Device::Cpu).unwrap();
    let xf = rand_vec(m * cols, 12);
    let x = Tensor::from_vec(xf.clone(), (m, cols), &Device::Cpu).unwrap();
    for (dt, f) in [
        (GgmlDType::Q4_1, Format::Q4_1),
        (GgmlDType::Q8_0, Format::Q8_0),
    ] {
        let q = QTensor::quantize(&w, dt).unwrap();
        let packed = Packed::from_ggml(f, &q.data().unwrap(), rows, cols);
        let want: Vec<f32> = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut acts = QActs::default();
        acts.quantize(&xf, m, cols);
        let mut got = vec![0f32; m * rows];
        packed.matmul(&acts, &mut got);
        let dense = packed.dequantize();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let (j, r) = (i / rows, i % rows);
            let mag: f32 = dense[r * cols..(r + 1) * cols]
                .iter()
                .zip(&xf[j * cols..(j + 1) * cols])
                .map(|(w, x)| (w * x).abs())
                .sum();
            assert!(
                (a - b).abs() <= mag / 2048.0,
                "{f:?} at {i}: {a} vs candle's {b} (sum of |w x| {mag})"
            );
        }
    }
}

/// The SIMD quantizer, split across threads (300 rows), gives the portable one's bytes and
/// scales exactly, including an all-zero block and values at rounding ties.
#[test]
fn simd_quantization_is_the_portable_one() {
    let (rows, cols) = (300, 576);
    let mut xf = rand_vec(rows * cols, 21);
    xf[..QK].fill(0.0);
    // 127 / 2.54 = 50 per unit: x = k + 0.5 units lands exactly on ties.
    for (i, v) in xf[QK..2 * QK].iter_mut().enumerate() {
        *v = (i as f32 - 16.0 + 0.5) / 50.0;
    }
    xf[2 * QK - 1] = 2.54;
    let mut x = QActs::default();
    x.quantize(&xf, rows, cols);
    let nb = cols / QK;
    let mut want = QActs {
        rows,
        nb,
        nbp: x.nbp,
        q: vec![0; rows * cols],
        qu: vec![0; x.qu.len()],
        d: vec![0.0; rows * x.nbp],
        s: vec![0.0; rows * x.nbp],
    };
    for r in 0..rows {
        let range = r * cols..(r + 1) * cols;
        let qu: &mut [u8] = if want.qu.is_empty() {
            &mut []
        } else {
            &mut want.qu[range.clone()]
        };
        quantize_row(
            &xf[range.clone()],
            &mut want.q[range],
            qu,
            &mut want.d[r * x.nbp..][..nb],
            &mut want.s[r * x.nbp..][..nb],
        );
    }
    assert_eq!(x.q, want.q);
    assert_eq!(x.qu, want.qu);
    assert_eq!(x.d, want.d);
    assert_eq!(x.s, want.s);
    assert!(x.q[QK..2 * QK].iter().any(|&v| v % 2 != 0));
}

#[test]
fn permuted_rows_are_the_rows_reordered() {
    let (rows, cols) = (6, 64);
    let wf = rand_vec(rows * cols, 9);
    let w = Packed::from_ggml(Format::Q4_1, &q4_1_bytes(&wf), rows, cols);
    let order = [3, 0, 5, 1, 4, 2];
    let p = w.permute_rows(&order).dequantize();
    let d = w.dequantize();
    for (i, &r) in order.iter().enumerate() {
        assert_eq!(&p[i * cols..(i + 1) * cols], &d[r * cols..(r + 1) * cols]);
    }
}

/// Not a test: `cargo test --release --lib quant_speed -- --ignored --nocapture` prints
/// the products' speed on one layer's worth of SmolLM2-135M shapes.
#[test]
#[ignore]
fn quant_speed() {
    let shapes = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let mats: Vec<Packed> = shapes
        .iter()
        .map(|&(r, c)| Packed::from_ggml(Format::Q4_1, &q4_1_bytes(&rand_vec(r * c, 3)), r, c))
        .collect();
    let head = Packed::quantize_q8_0(&rand_vec(49152 * 576, 4), 49152, 576);
    let bytes: usize = mats.iter().map(|m| m.bytes()).sum::<usize>() * 30 + head.bytes();
    for m in [1, 4, 32, 64, 256] {
        let mut x576 = QActs::default();
        x576.quantize(&rand_vec(m * 576, 1), m, 576);
        let mut x1536 = QActs::default();
        x1536.quantize(&rand_vec(m * 1536, 1), m, 1536);
        let mut out = vec![0f32; m * 49152];
        let mut best = f64::INFINITY;
        for _ in 0..20 {
            let t = std::time::Instant::now();
            for _ in 0..30 {
                for w in &mats {
                    let x = if w.cols == 576 { &x576 } else { &x1536 };
                    w.matmul(x, &mut out[..m * w.rows]);
                }
            }
            head.matmul(&x576, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        // 2 operations a multiply-add, over the 30 layers and the head.
        let macs = (shapes.iter().map(|&(r, c)| r * c).sum::<usize>() * 30 + 49152 * 576) * m;
        println!(
            "m={m} {}: {:.2} ms a step's products, {:.1} GB/s, {:.0} GOP/s",
            Kernel::get().name(),
            best * 1e3,
            bytes as f64 / best / 1e9,
            2.0 * macs as f64 / best / 1e9
        );
    }
}

/// The tiled kernels give the same bits: AVX2's, the 256-bit VNNI one (in each encoding this
/// CPU has: EVEX with AVX-512 VNNI + VL, VEX with AVX-VNNI) and AVX-512 VNNI's (the same exact
/// integer sums, the same float steps lane for lane), so a prompt's text does not depend on
/// which one a CPU runs; and AVX2's are the portable reference's products to rounding. Whole
/// tiles of Q4_1 and Q8_0, an odd block count (608 = 19 blocks), 1 to 9 activation rows
/// (passes of one to four rows, and a second pass of eight).
#[cfg(target_arch = "x86_64")]
#[test]
fn the_tiled_kernels_give_the_same_bits() {
    type Tiled = unsafe fn(&Packed, &Tiles, &QActs, usize, usize, usize, *mut f32);
    let ks = Kernel::available();
    assert!(
        ks.contains(&Kernel::Avx2),
        "an x86-64 CPU without AVX2, FMA and F16C"
    );
    use std::arch::is_x86_feature_detected as has;
    // Each entry runs only where its features were detected.
    let mut others: Vec<(&str, Tiled)> = Vec::new();
    if has!("avxvnni") {
        others.push(("256-bit VNNI, VEX", avxvnni::tiled_vex));
    }
    if has!("avx512f") && has!("avx512vl") && has!("avx512vnni") {
        others.push(("256-bit VNNI, EVEX", avxvnni::tiled_evex));
    }
    if ks.contains(&Kernel::Avx512Vnni) {
        others.push(("AVX-512 VNNI", avx512::tiled));
    }
    eprintln!(
        "AVX2 tiles against: {:?}",
        others.iter().map(|o| o.0).collect::<Vec<_>>()
    );
    let mut compared = 0;
    for (rows, cols) in [(32, 576), (16, 608), (48, 1536)] {
        let wf = rand_vec(rows * cols, 11);
        let mats = [
            Packed::from_ggml(Format::Q4_1, &q4_1_bytes(&wf), rows, cols),
            Packed::quantize_q8_0(&wf, rows, cols),
        ];
        for m in [1, 2, 3, 4, 5, 8, 9] {
            let xf = rand_vec(m * cols, 20 + m as u64);
            let mut x = QActs::default();
            // With the unsigned copy the VNNI kernels read, whichever kernel is in use.
            x.quantize_with(&xf, m, cols, true);
            for w in &mats {
                let t = w.tiles_unchecked();
                let run = |kernel: Tiled| {
                    let mut out = vec![f32::NAN; m * rows];
                    for tile in 0..rows / TILE {
                        for j0 in (0..m).step_by(TILE_ROWS) {
                            let g = (m - j0).min(TILE_ROWS);
                            // SAFETY: `t` is `w`'s tiled copy, `tile < rows / 16`, `x` has
                            // `w`'s block count, `j0 + g <= m` rows and `qu` filled, `out`
                            // holds `m * rows` values and this loop is its only user; AVX2 was
                            // asserted above, and each other kernel is listed only where its
                            // features were detected.
                            unsafe { kernel(w, &t, &x, tile, j0, g, out.as_mut_ptr()) };
                        }
                    }
                    out
                };
                let got = run(avx2::tiled);
                let want = Kernel::Portable.matmul(w, &x);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "avx2 tiles {:?} {rows}x{cols} m={m} at {i}: {a} vs {b}",
                        w.format
                    );
                }
                for (name, kernel) in &others {
                    let v = run(*kernel);
                    let same = got.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{:?} {rows}x{cols} m={m}: AVX2 and {name} tiles differ",
                        w.format
                    );
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, 42 * others.len());
}
