//! Quantized weights for decoding on the CPU, and the products over them.
//!
//! A [`Packed`] matrix holds GGML's Q4_1 or Q8_0 blocks (32 weights each) as the GGUF file has
//! them, regrouped so that a row's quants are contiguous and its scales sit in arrays of their
//! own: a kernel then converts sixteen scales with one instruction instead of one at a time.
//! Activations are quantized to 8 bits per block of 32 ([`QActs`], llama.cpp's Q8 scheme), so the
//! inner loop is an integer dot product. The kernel is chosen once, at run time, for the widest
//! vector unit the CPU has: AVX-512 VNNI (`vpdpbusd`, two blocks an instruction), AVX2 (`vpmaddubsw`),
//! or portable code, which is also the reference the others are tested against.
//!
//! candle has SIMD kernels for Q8_0 but none for Q4_1 (the format of the SmolLM2 GGUF), and its
//! AVX-512 path only takes inner dimensions divisible by 256 (SmolLM2's hidden size is 576).
//!
//! One weight row against up to [`GROUP`] activation rows at a time: each block's quants are
//! unpacked once and multiplied into every activation row, so a batch of a few rows reads the
//! weights once.

use half::f16;

/// Weights per block.
pub(crate) const QK: usize = 32;

/// Activation rows one pass over a weight row serves.
const GROUP: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `w = d * q + m`, q in 0..16 (4 bits).
    Q4_1,
    /// `w = d * q`, q in -128..128 (8 bits).
    Q8_0,
}

/// A `[rows, cols]` matrix of quantized blocks.
///
/// The SIMD kernels read `qs`, `d`, `m`, `sums` and the tiles through raw pointers, in bounds
/// by these invariants, which [`Packed::from_ggml`] and [`Packed::permute_rows`] (the only
/// constructors) establish and nothing changes afterwards: `nb = cols / 32`; `qs` holds
/// `rows * nb * 16` bytes (Q4_1) or `rows * nb * 32` (Q8_0), row `r` from `r * nb * 16` (or
/// `* 32`); `d` holds `rows * nb` scales, and `m` (Q4_1) or `sums` (Q8_0) `rows * nb` values;
/// `tiles`, where present, is built from these and `rows` is a multiple of 16.
pub(crate) struct Packed {
    pub(crate) format: Format,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Blocks per row.
    nb: usize,
    /// Q4_1: 16 bytes a block. Blocks `2p` and `2p + 1` of a row share 32 bytes: element j of
    /// the first in the low nibble of byte j, of the second in the high nibble, so one load and
    /// two masks give both blocks' 32 quants in order. A row's last block, when it has no
    /// partner, keeps GGML's order (element j low, j + 16 high in byte j). Q8_0: 32 signed
    /// bytes a block.
    qs: Vec<u8>,
    /// `[rows, nb]` scales.
    d: Vec<f16>,
    /// Q4_1: `[rows, nb]` block minimums.
    m: Vec<f16>,
    /// Q8_0: `[rows, nb]` sums of the quants. The VNNI kernel multiplies unsigned activations
    /// (`q + 128`) and takes `128 * sum` back off.
    sums: Vec<i16>,
    /// The same blocks sixteen rows side by side, for the tiled kernels (AVX-512 VNNI's, and
    /// AVX2's in two halves of eight); built when one runs here and the row count is whole tiles.
    tiles: Option<Tiles>,
}

/// Weight rows side by side in a tile: the sixteen 32-bit lanes of one 512-bit register.
const TILE: usize = 16;

/// Activation rows one tile's block serves from registers.
const TILE_ROWS: usize = 8;

/// Activation rows whose quants stay in cache while a thread's tiles pass over them.
const ROW_CHUNK: usize = 64;

/// A [`Packed`] matrix regrouped so that one `vpdpbusd` multiplies four consecutive quants of
/// each of sixteen weight rows by the same four activation bytes (broadcast): a block's integer
/// sums for sixteen rows build up in one register, its sixteen scales load as one vector, and
/// nothing is shuffled or summed across lanes. The row layout's kernel spends four instructions
/// on scales per `vpdpbusd`; this one one for eight, which is what makes prefill and wide
/// batches on blocks pay (llama.cpp's repacked Q4_0x8 kernels work the same way). AVX2's tiled
/// kernel reads the same layout eight rows (one half of each 64 bytes) at a time.
struct Tiles {
    /// `[rows / 16, nb]` tile-blocks. Q4_1: 4 x 64 bytes; byte `64 g + 4 l + e` holds element
    /// `4 g + e` of the tile's row `l` in its low nibble and element `16 + 4 g + e` in its high
    /// one. Q8_0: 8 x 64 bytes; byte `64 k + 4 l + e` is element `4 k + e` of row `l`.
    q: Vec<u8>,
    /// `[rows / 16, nb, 16]` scales.
    d: Vec<f16>,
    /// Q4_1: `[rows / 16, nb, 16]` minimums.
    m: Vec<f16>,
    /// Q8_0: `[rows / 16, nb, 16]` `-128 * sum(q)`, where each block's integer sum starts: the
    /// kernel multiplies `q_x + 128` (unsigned) and this takes the excess off exactly.
    neg: Vec<i32>,
}

/// Bytes of one GGML block in a GGUF file.
pub(crate) fn block_bytes(f: Format) -> usize {
    match f {
        Format::Q4_1 => 20,
        Format::Q8_0 => 34,
    }
}

impl Packed {
    /// From a GGUF tensor's raw bytes: `rows * cols / 32` GGML blocks.
    pub(crate) fn from_ggml(format: Format, bytes: &[u8], rows: usize, cols: usize) -> Self {
        assert!(
            cols.is_multiple_of(QK),
            "{cols} columns is not whole blocks"
        );
        let nb = cols / QK;
        let bb = block_bytes(format);
        assert_eq!(
            bytes.len(),
            rows * nb * bb,
            "GGML block data of the wrong size"
        );
        let qlen = match format {
            Format::Q4_1 => 16,
            Format::Q8_0 => 32,
        };
        let mut p = Packed {
            format,
            rows,
            cols,
            nb,
            qs: Vec::with_capacity(rows * nb * qlen),
            d: Vec::with_capacity(rows * nb),
            m: Vec::new(),
            sums: Vec::new(),
            tiles: None,
        };
        let h = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
        let mut unpacked = [0u8; 64];
        for (bi, blk) in bytes.chunks_exact(bb).enumerate() {
            p.d.push(h(blk, 0));
            match format {
                Format::Q4_1 => {
                    p.m.push(h(blk, 2));
                    let b = bi % nb;
                    if b + 1 == nb && nb % 2 == 1 {
                        p.qs.extend_from_slice(&blk[4..20]);
                    } else {
                        let half = &mut unpacked[(b % 2) * 32..][..32];
                        for (j, &q) in blk[4..20].iter().enumerate() {
                            half[j] = q & 15;
                            half[j + 16] = q >> 4;
                        }
                        if b % 2 == 1 {
                            p.qs.extend((0..32).map(|j| unpacked[j] | (unpacked[32 + j] << 4)));
                        }
                    }
                }
                Format::Q8_0 => {
                    let q = &blk[2..34];
                    p.sums.push(q.iter().map(|&x| x as i8 as i16).sum());
                    p.qs.extend_from_slice(q);
                }
            }
        }
        p.tiles = p.tile();
        p
    }

    /// The tiled copy, where the tiled kernel runs on this CPU and the rows are whole tiles.
    fn tile(&self) -> Option<Tiles> {
        if !Kernel::tiled_available() || !self.rows.is_multiple_of(TILE) {
            return None;
        }
        Some(self.tiles_unchecked())
    }

    fn tiles_unchecked(&self) -> Tiles {
        let (nt, nb) = (self.rows / TILE, self.nb);
        let qb = match self.format {
            Format::Q4_1 => 256,
            Format::Q8_0 => 512,
        };
        let mut t = Tiles {
            q: vec![0u8; nt * nb * qb],
            d: Vec::with_capacity(nt * nb * TILE),
            m: Vec::new(),
            neg: Vec::new(),
        };
        for ti in 0..nt {
            for b in 0..nb {
                let q = &mut t.q[(ti * nb + b) * qb..][..qb];
                for l in 0..TILE {
                    let (r, i) = (ti * TILE + l, (ti * TILE + l) * nb + b);
                    t.d.push(self.d[i]);
                    match self.format {
                        Format::Q4_1 => {
                            t.m.push(self.m[i]);
                            for g in 0..4 {
                                for e in 0..4 {
                                    q[64 * g + 4 * l + e] = self.q4(r, b, 4 * g + e)
                                        | (self.q4(r, b, 16 + 4 * g + e) << 4);
                                }
                            }
                        }
                        Format::Q8_0 => {
                            t.neg.push(-128 * self.sums[i] as i32);
                            for k in 0..8 {
                                for e in 0..4 {
                                    q[64 * k + 4 * l + e] = self.qs[i * QK + 4 * k + e];
                                }
                            }
                        }
                    }
                }
            }
        }
        t
    }

    /// Quantize a dense row-major `[rows, cols]` matrix to Q8_0 (GGML's rounding).
    pub(crate) fn quantize_q8_0(w: &[f32], rows: usize, cols: usize) -> Self {
        assert!(
            cols.is_multiple_of(QK),
            "{cols} columns is not whole blocks"
        );
        assert_eq!(w.len(), rows * cols);
        let nb = cols / QK;
        let mut bytes = Vec::with_capacity(rows * nb * 34);
        for blk in w.chunks_exact(QK) {
            let amax = blk.iter().fold(0f32, |a, &x| a.max(x.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            bytes.extend(blk.iter().map(|&x| (x * id).round() as i8 as u8));
        }
        Self::from_ggml(Format::Q8_0, &bytes, rows, cols)
    }

    /// The same matrix with its rows in the order `order` (row `i` of the result is row
    /// `order[i]` of this one).
    pub(crate) fn permute_rows(&self, order: &[usize]) -> Self {
        assert_eq!(order.len(), self.rows);
        let nb = self.nb;
        let ql = self.qs.len() / (self.rows * nb).max(1);
        let pick = |v: &[f16]| -> Vec<f16> {
            if v.is_empty() {
                return Vec::new();
            }
            order
                .iter()
                .flat_map(|&r| v[r * nb..(r + 1) * nb].iter().copied())
                .collect()
        };
        let mut p = Packed {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            nb,
            tiles: None,
            qs: order
                .iter()
                .flat_map(|&r| self.qs[r * nb * ql..(r + 1) * nb * ql].iter().copied())
                .collect(),
            d: pick(&self.d),
            m: pick(&self.m),
            sums: if self.sums.is_empty() {
                Vec::new()
            } else {
                order
                    .iter()
                    .flat_map(|&r| self.sums[r * nb..(r + 1) * nb].iter().copied())
                    .collect()
            },
        };
        p.tiles = p.tile();
        p
    }

    /// Q4_1: the 4-bit quant of element `j` of block `b` of row `r`.
    fn q4(&self, r: usize, b: usize, j: usize) -> u8 {
        let row = &self.qs[r * self.nb * 16..][..self.nb * 16];
        if b + 1 == self.nb && self.nb % 2 == 1 {
            let byte = row[b * 16 + j % 16];
            if j < 16 {
                byte & 15
            } else {
                byte >> 4
            }
        } else {
            let byte = row[(b / 2) * 32 + j];
            if b.is_multiple_of(2) {
                byte & 15
            } else {
                byte >> 4
            }
        }
    }

    /// The weights as dense f32, row-major.
    #[cfg(test)]
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for b in 0..self.nb {
                let i = r * self.nb + b;
                let d = self.d[i].to_f32();
                match self.format {
                    Format::Q4_1 => {
                        let m = self.m[i].to_f32();
                        out.extend((0..QK).map(|j| d * self.q4(r, b, j) as f32 + m));
                    }
                    Format::Q8_0 => {
                        let q = &self.qs[i * 32..(i + 1) * 32];
                        out.extend(q.iter().map(|&x| d * x as i8 as f32));
                    }
                }
            }
        }
        out
    }

    /// Bytes held (what one product over all rows reads).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.m.len() + self.sums.len())
    }

    /// `out[j, r] = sum_c w[r, c] * x[j, c]` for the `x.rows` activation rows; `out` is
    /// `[x.rows, self.rows]`, row-major. Weight rows are split across the thread pool.
    pub(crate) fn matmul(&self, x: &QActs, out: &mut [f32]) {
        self.matmul_pooled(x, out, false)
    }

    /// [`Packed::matmul`] after which the pool's threads park at once: for products between
    /// which the caller runs other multi-threaded work (prefill through candle's ops).
    pub(crate) fn matmul_then_rest(&self, x: &QActs, out: &mut [f32]) {
        self.matmul_pooled(x, out, true)
    }

    // Long because the pool's work split and the tiled and row paths share one set of raw output
    // pointers, whose disjointness is argued once here.
    fn matmul_pooled(&self, x: &QActs, out: &mut [f32], rest: bool) {
        assert_eq!(
            x.nb, self.nb,
            "activations of {} blocks against rows of {}",
            x.nb, self.nb
        );
        assert_eq!(out.len(), x.rows * self.rows);
        let kernel = Kernel::get();
        let pool = super::spin_pool::SpinPool::global();
        #[cfg(target_arch = "x86_64")]
        if let (Some(tiles), Kernel::Avx512Vnni | Kernel::AvxVnni | Kernel::Avx2) =
            (&self.tiles, kernel)
        {
            // Tiles split across threads; activation rows in chunks that stay in cache while
            // a thread's tiles pass over them.
            let nt = self.rows / TILE;
            let parts = pool.threads().min(nt).max(1);
            let dst = SendPtr(out.as_mut_ptr());
            let run = |t: usize| {
                if t >= parts {
                    return;
                }
                let (t0, t1) = (nt * t / parts, nt * (t + 1) / parts);
                let dst = &dst;
                for c0 in (0..x.rows).step_by(ROW_CHUNK) {
                    let c1 = (c0 + ROW_CHUNK).min(x.rows);
                    for tile in t0..t1 {
                        for j0 in (c0..c1).step_by(TILE_ROWS) {
                            let g = (c1 - j0).min(TILE_ROWS);
                            // SAFETY: the three `tiled` kernels' contracts hold. The kernel
                            // is `Avx512Vnni`, `AvxVnni` or `Avx2`, offered only where the CPU
                            // has its features; `tiles` is `self.tiles`, built from `self`, and
                            // `tile < nt`; `x.nb == self.nb` (asserted above) and
                            // `1 <= g <= 8`, `j0 + g <= c1 <= x.rows`; for VNNI, `x.qu` is
                            // filled, since `QActs::quantize` fills it wherever those kernels run
                            // (both follow `Kernel::get`, fixed for the process). `out` holds
                            // `x.rows * self.rows` values (asserted above), and parts own
                            // disjoint tiles, so each written element (row `j0 + j`, the 16
                            // columns of `tile`) has this one writer and no reader.
                            unsafe {
                                match kernel {
                                    Kernel::Avx512Vnni => {
                                        avx512::tiled(self, tiles, x, tile, j0, g, dst.0)
                                    }
                                    Kernel::AvxVnni => {
                                        avxvnni::tiled(self, tiles, x, tile, j0, g, dst.0)
                                    }
                                    _ => avx2::tiled(self, tiles, x, tile, j0, g, dst.0),
                                }
                            };
                        }
                    }
                }
            };
            if parts == 1 {
                run(0);
            } else if rest {
                pool.run_then_rest(&run);
            } else {
                pool.run(&run);
            }
            return;
        }
        let parts = pool.threads().min(self.rows.div_ceil(16)).max(1);
        let dst = SendPtr(out.as_mut_ptr());
        let run = |t: usize| {
            if t >= parts {
                return;
            }
            let r0 = self.rows * t / parts;
            let r1 = self.rows * (t + 1) / parts;
            let dst = &dst;
            for j0 in (0..x.rows).step_by(GROUP) {
                let g = (x.rows - j0).min(GROUP);
                for r in r0..r1 {
                    let mut acc = [0f32; GROUP];
                    kernel.row(self, r, x, j0, g, &mut acc);
                    for (j, v) in acc[..g].iter().enumerate() {
                        // SAFETY: parts own disjoint weight rows, so each (j, r) is written by
                        // exactly one thread and read by none; `j0 + j < x.rows` and
                        // `r < self.rows`, so the index is inside `out` (`x.rows * self.rows`
                        // values, asserted above).
                        unsafe { *dst.0.add((j0 + j) * self.rows + r) = *v };
                    }
                }
            }
        };
        if parts == 1 {
            run(0);
        } else if rest {
            pool.run_then_rest(&run);
        } else {
            pool.run(&run);
        }
    }
}

/// Whether products over many rows (prefill) run faster on the blocks than dense f32 gemm does:
/// where the tiled kernel runs (docs/PERF.md: about 1.8x on an AVX-512 VNNI Zen 4).
pub(crate) fn prefill_on_blocks_pays() -> bool {
    Kernel::tiled_available()
}

/// A pointer parallel tasks write through, each to its own elements.
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: sharing the pointer value itself is harmless: it can only be dereferenced in `unsafe`
// code, and every such use (`Packed::matmul`, `QActs::quantize`, the attention of
// `decode_attention.rs`) writes elements that no other task reads or writes, while the buffer
// outlives the tasks (the pool's `run` returns after all of them).
unsafe impl Sync for SendPtr {}
// SAFETY: as for `Sync`: moving the pointer to another thread grants nothing by itself, and
// its uses write disjoint elements of a buffer that outlives them.
unsafe impl Send for SendPtr {}

/// Activation rows quantized to 8 bits per block of 32, with what the kernels need per block.
///
/// The SIMD kernels read `q`, `qu`, `d` and `s` through raw pointers, in bounds by these
/// invariants, which [`QActs::quantize`] establishes (and the empty default satisfies, with
/// `rows == 0`): `q` holds `rows * nb * 32` quants; `qu` as many where the VNNI tiled kernel runs,
/// none otherwise; `d` and `s` `rows * nbp` values, `nbp` the multiple of 16 at or above `nb`,
/// the padding zeros (so a kernel may load 16 from any block that is a multiple of 16).
#[derive(Default)]
pub(crate) struct QActs {
    pub(crate) rows: usize,
    nb: usize,
    /// `[rows, nb * 32]`
    q: Vec<i8>,
    /// `q + 128` (unsigned), for the tiled kernel's Q8_0 products.
    qu: Vec<u8>,
    /// `[rows, nbp]` scales, zero-padded to `nbp` (a multiple of 16) so a kernel can load 16.
    d: Vec<f32>,
    /// `[rows, nbp]` `d * sum(q)` per block (Q4_1's minimum term).
    s: Vec<f32>,
    nbp: usize,
}

impl QActs {
    /// Quantize `x` (`[rows, cols]`, row-major) into this buffer, reusing its memory. Many
    /// rows (a prefill) are split across the thread pool.
    pub(crate) fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        // Unsigned activations are only for VNNI's `vpdpbusd` (AVX2's tiles sign the bytes).
        self.quantize_with(x, rows, cols, Kernel::vnni_tiles())
    }

    /// [`QActs::quantize`], with the unsigned copy `qu` filled where `tiled` (the tests fill
    /// it whatever the kernel in use, to run every tiled kernel on the same activations).
    fn quantize_with(&mut self, x: &[f32], rows: usize, cols: usize, tiled: bool) {
        assert!(cols.is_multiple_of(QK) && x.len() == rows * cols);
        let nb = cols / QK;
        let nbp = nb.next_multiple_of(16);
        self.rows = rows;
        self.nb = nb;
        self.nbp = nbp;
        self.q.resize(rows * cols, 0);
        self.qu.resize(if tiled { rows * cols } else { 0 }, 0);
        self.d.clear();
        self.d.resize(rows * nbp, 0.0);
        self.s.clear();
        self.s.resize(rows * nbp, 0.0);
        let simd = Kernel::get() != Kernel::Portable;
        let (q, qu, d, s) = (
            SendPtr(self.q.as_mut_ptr() as *mut f32),
            SendPtr(self.qu.as_mut_ptr() as *mut f32),
            SendPtr(self.d.as_mut_ptr()),
            SendPtr(self.s.as_mut_ptr()),
        );
        let pool = super::spin_pool::SpinPool::global();
        // Below a few thousand values a split costs more than it saves.
        let parts = if rows * cols >= 1 << 14 {
            pool.threads().min(rows)
        } else {
            1
        };
        let run = |t: usize| {
            if t >= parts {
                return;
            }
            let (q, qu, d, s) = (&q, &qu, &d, &s);
            for row in rows * t / parts..rows * (t + 1) / parts {
                // SAFETY: `row < rows`, so `row * cols..+cols` lies inside `q` (and `qu` where
                // `tiled`), both resized to `rows * cols` above, and `row * nbp..+nb` inside `d`
                // and `s` (`rows * nbp`); `q` and `qu` went through `*mut f32` only as a
                // carrier and are cast back to their own element types. Each row belongs to
                // one part, so these slices alias nothing else while they live (`x` is a
                // separate borrow, and `self` is borrowed mutably for the whole call).
                let (qr, qur, dr, sr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut((q.0 as *mut i8).add(row * cols), cols),
                        if tiled {
                            std::slice::from_raw_parts_mut((qu.0 as *mut u8).add(row * cols), cols)
                        } else {
                            &mut []
                        },
                        std::slice::from_raw_parts_mut(d.0.add(row * nbp), nb),
                        std::slice::from_raw_parts_mut(s.0.add(row * nbp), nb),
                    )
                };
                let xr = &x[row * cols..(row + 1) * cols];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` means `Kernel::get()` is `Avx2`, `AvxVnni` or
                    // `Avx512Vnni`, which `Kernel::available` offers only where it detected AVX2,
                    // FMA and F16C; `xr` is `cols = nb * 32` values, `qr` `cols` and `qur` `cols`
                    // or empty.
                    unsafe { avx2::quantize_row(xr, qr, qur, dr, sr) };
                    continue;
                }
                let _ = simd;
                quantize_row(xr, qr, qur, dr, sr);
            }
        };
        if parts == 1 {
            run(0);
        } else {
            pool.run(&run);
        }
    }
}

/// One row of activations to 8 bits per block: `q = round(x / d)`, `d = max|x| / 127`,
/// `s = d * sum(q)`, and `qu = q + 128` where `qu` is not empty.
fn quantize_row(x: &[f32], q: &mut [i8], qu: &mut [u8], d: &mut [f32], s: &mut [f32]) {
    for (b, (blk, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        let amax = blk.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if db != 0.0 { 1.0 / db } else { 0.0 };
        let mut sum = 0i32;
        for (o, &v) in qb.iter_mut().zip(blk) {
            // Round half to even (as `vcvtps2dq` does) by the magic-number trick.
            let r = ((v * id) + 12582912.0) - 12582912.0;
            *o = r as i8;
            sum += r as i32;
        }
        d[b] = db;
        s[b] = db * sum as f32;
        if !qu.is_empty() {
            for (u, &v) in qu[b * QK..(b + 1) * QK].iter_mut().zip(qb.iter()) {
                *u = v as u8 ^ 0x80;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2's row kernel and 256-bit VNNI tiles (`avxvnni.rs`).
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The best kernel this CPU runs (`REVIEWER2_QKERNEL=portable|avx2|avxvnni|avx512vnni` picks
    /// another, to compare them; one this CPU lacks, or an unknown name, is named in a warning
    /// and the best one runs).
    pub(crate) fn get() -> Kernel {
        use std::sync::OnceLock;
        static K: OnceLock<Kernel> = OnceLock::new();
        *K.get_or_init(|| {
            let all = Kernel::available();
            let best = *all.last().expect("the portable kernel is always there");
            let Ok(want) = std::env::var("REVIEWER2_QKERNEL") else {
                return best;
            };
            match all.iter().find(|k| k.name() == want) {
                Some(k) => *k,
                None => {
                    let names: Vec<&str> = all.iter().map(|k| k.name()).collect();
                    tracing::warn!(
                        "REVIEWER2_QKERNEL={want:?} is not a kernel this CPU runs ({}); using {}",
                        names.join(", "),
                        best.name()
                    );
                    best
                }
            }
        })
    }

    /// Every kernel this CPU can run, the portable one first.
    pub(crate) fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Kernel::Avx2);
                if avxvnni::detected() {
                    v.push(Kernel::AvxVnni);
                }
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Kernel::Avx512Vnni);
                }
            }
        }
        v
    }

    /// Whether a tiled kernel (AVX-512 VNNI's, 256-bit VNNI's or AVX2's) runs here.
    fn tiled_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(
                Kernel::get(),
                Kernel::Avx512Vnni | Kernel::AvxVnni | Kernel::Avx2
            )
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether the tiled kernel here is a VNNI one, which reads unsigned activations
    /// (`QActs::qu`).
    fn vnni_tiles() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(Kernel::get(), Kernel::Avx512Vnni | Kernel::AvxVnni)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => "avxvnni",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// `acc[j] = w[r] . x[j0 + j]` for `j < g` (g <= GROUP).
    ///
    /// Requires `r < w.rows`, `x.nb == w.nb`, `1 <= g <= GROUP` and `j0 + g <= x.rows`, and
    /// `self` from [`Kernel::available`]: the SIMD kernels do not check these (the portable
    /// one panics instead).
    #[inline]
    pub(crate) fn row(
        self,
        w: &Packed,
        r: usize,
        x: &QActs,
        j0: usize,
        g: usize,
        acc: &mut [f32; GROUP],
    ) {
        match self {
            Kernel::Portable => portable_row(w, r, x, j0, g, acc),
            // SAFETY: `available()` offers `Avx2` only where the CPU has AVX2, FMA and F16C, and
            // every `Kernel` this crate runs comes from it (`get`, the tests). The bounds are
            // this method's documented requirements (`r < w.rows`, `x.nb == w.nb`,
            // `1 <= g <= GROUP`, `j0 + g <= x.rows`), which its callers meet:
            // `matmul_pooled` asserts `x.nb == w.nb` and loops within the rest, as does the
            // tests' `Kernel::matmul` on inputs of one width.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::avx2_row(w, r, x, j0, g, acc) },
            // SAFETY: as for `Avx2`: `available()` offers `AvxVnni` only after `Avx2`, where it
            // detected AVX2, FMA and F16C (its rows are AVX2's); same bounds.
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { avx2::avx2_row(w, r, x, j0, g, acc) },
            // SAFETY: as for `Avx2`: `available()` offers `Avx512Vnni` only where it detected
            // AVX-512 F, BW, VL, DQ and VNNI besides AVX2, FMA and F16C; same bounds.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx512::vnni_row(w, r, x, j0, g, acc) },
        }
    }

    /// `out = w x` with this kernel (tests compare kernels with it).
    #[cfg(test)]
    fn matmul(self, w: &Packed, x: &QActs) -> Vec<f32> {
        let mut out = vec![0f32; x.rows * w.rows];
        for j0 in (0..x.rows).step_by(GROUP) {
            let g = (x.rows - j0).min(GROUP);
            for r in 0..w.rows {
                let mut acc = [0f32; GROUP];
                self.row(w, r, x, j0, g, &mut acc);
                for j in 0..g {
                    out[(j0 + j) * w.rows + r] = acc[j];
                }
            }
        }
        out
    }
}

/// The reference: integer block dot products, scaled, in plain Rust.
fn portable_row(w: &Packed, r: usize, x: &QActs, j0: usize, g: usize, acc: &mut [f32; GROUP]) {
    let nb = w.nb;
    for (j, a) in acc.iter_mut().enumerate().take(g) {
        let row = j0 + j;
        let mut total = 0f32;
        for b in 0..nb {
            let wi = r * nb + b;
            let xq = &x.q[(row * nb + b) * QK..][..QK];
            let xd = x.d[row * x.nbp + b];
            let dw = w.d[wi].to_f32();
            match w.format {
                Format::Q4_1 => {
                    let s: i32 = (0..QK).map(|i| w.q4(r, b, i) as i32 * xq[i] as i32).sum();
                    total += dw * xd * s as f32 + w.m[wi].to_f32() * x.s[row * x.nbp + b];
                }
                Format::Q8_0 => {
                    let q = &w.qs[wi * 32..][..32];
                    let s: i32 = q
                        .iter()
                        .zip(xq)
                        .map(|(&a, &b)| a as i8 as i32 * b as i32)
                        .sum();
                    total += dw * xd * s as f32;
                }
            }
        }
        *a = total;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avxvnni;
#[cfg(test)]
mod tests;
