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
    /// The same blocks sixteen rows side by side, for the tiled AVX-512 VNNI kernel; built
    /// when that kernel runs here and the row count is whole tiles.
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
/// batches on blocks pay (llama.cpp's repacked Q4_0x8 kernels work the same way).
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
        if let (Some(tiles), Kernel::Avx512Vnni) = (&self.tiles, kernel) {
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
                            // SAFETY: the kernel is available (tiles are built only then); parts
                            // own disjoint tiles, so each output element has one writer, and
                            // rows j0..j0 + g, columns of `tile` lie inside `out` (asserted).
                            unsafe { x86::tiled(self, tiles, x, tile, j0, g, dst.0) };
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
                        // exactly one thread, and the index is inside `out` (asserted above).
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

pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only to write disjoint elements from parallel tasks (`Packed::matmul`, the
// attention of `cpu_forward.rs`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Activation rows quantized to 8 bits per block of 32, with what the kernels need per block.
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
        assert!(cols.is_multiple_of(QK) && x.len() == rows * cols);
        let nb = cols / QK;
        let nbp = nb.next_multiple_of(16);
        let tiled = Kernel::tiled_available();
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
                // SAFETY: each row's ranges are written by the one part that owns the row, and
                // lie inside the buffers sized above.
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
                    // SAFETY: every kernel but the portable one needs AVX2.
                    unsafe { x86::quantize_row(xr, qr, qur, dr, sr) };
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
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The best kernel this CPU runs (`REVIEWER2_QKERNEL=portable|avx2|avx512vnni` picks
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

    /// Whether the tiled kernel (part of the AVX-512 VNNI one) runs here.
    fn tiled_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            Kernel::get() == Kernel::Avx512Vnni
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
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// `acc[j] = w[r] . x[j0 + j]` for `j < g` (g <= GROUP).
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
            // SAFETY: `available()` offers these only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::avx2_row(w, r, x, j0, g, acc) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::vnni_row(w, r, x, j0, g, acc) },
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
// Kernels index several per-row arrays with one counter.
#[allow(clippy::needless_range_loop)]
mod x86 {
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

    /// [`super::quantize_row`] in AVX2: the same values (`vcvtps2dq` rounds half to even).
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
            let p = x.as_ptr().add(b * QK);
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
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
            _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, bytes);
            if !qu.is_empty() {
                _mm256_storeu_si256(
                    qu.as_mut_ptr().add(b * QK) as *mut __m256i,
                    _mm256_xor_si256(bytes, flip),
                );
            }
            d[b] = db;
            s[b] = db * _mm_cvtsi128_si32(sum) as f32;
        }
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

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Eight f16 values from `v[at..]` as f32 (zeros past the end of `v`).
    #[inline(always)]
    unsafe fn load8_f16(v: &[half::f16], at: usize) -> __m256 {
        if at + 8 <= v.len() {
            _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(at) as *const __m128i))
        } else {
            let mut tmp = [0u16; 8];
            for (t, h) in tmp.iter_mut().zip(&v[at..]) {
                *t = h.to_bits();
            }
            _mm256_cvtph_ps(_mm_loadu_si128(tmp.as_ptr() as *const __m128i))
        }
    }

    /// AVX2: one block at a time, `vpmaddubsw` of unsigned weights (Q4_1's nibbles) or of
    /// |w| against sign-adjusted activations (Q8_0), widened by `vpmaddwd`. Scales are
    /// converted and multiplied eight blocks at a time; two accumulators a row, alternating,
    /// so consecutive FMAs do not wait on each other.
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
        match g {
            1 => avx2_rows::<1>(w, r, x, j0, acc),
            2 => avx2_rows::<2>(w, r, x, j0, acc),
            3 => avx2_rows::<3>(w, r, x, j0, acc),
            _ => avx2_rows::<4>(w, r, x, j0, acc),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_rows<const G: usize>(
        w: &Packed,
        r: usize,
        x: &QActs,
        j0: usize,
        acc: &mut [f32; GROUP],
    ) {
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

    #[inline(always)]
    unsafe fn lo256_unused() -> __m256i {
        _mm256_setzero_si256()
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

#[cfg(test)]
mod tests {
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
}
