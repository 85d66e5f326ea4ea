//! Fused scaled-dot-product attention for the CPU, with a backward pass.
//!
//! The composed candle version broadcasts the mask into a full score tensor and, in training,
//! keeps the scores, the masked scores, their exponentials and the probabilities alive for the
//! backward pass: six `[B, heads, T, S]` tensors per layer. Here each (row, KV head) is one task:
//! its query heads' scores are a single gemm, the mask and softmax are applied in place, and
//! `P @ V` writes straight into the `[B, T, heads * hd]` layout the output projection reads.
//! The backward pass recomputes the probabilities from Q and K (as flash attention does), so the
//! graph keeps only Q, K, V and the output. Grouped-query attention is native: the query heads
//! that share a KV head are rows of one matrix, so dK and dV sum over them inside the gemms.
//!
//! Only contiguous-last-dimension f32/f64 CPU tensors take this path; other devices and dtypes
//! use the composed ops in `llama.rs`.

use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, WithDType,
};
use gemm::{gemm, Parallelism};
use num_traits::Float;
use rayon::prelude::*;

type Res<T> = candle_core::Result<T>;

/// Large finite negative for masked scores in additive masks: -inf would turn fully masked rows
/// into NaN.
pub(crate) const MASK_NEG: f32 = -1e9;

/// Whether `sdpa` can run for tensors on `dev` in `dtype`.
pub(crate) fn supported(dev: &Device, dtype: DType) -> bool {
    dev.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// `softmax(q k^T * scale + mask) v`.
///
/// q: [B, nh, T, hd] · k, v: [B, nkv, S, hd] (views into a KV cache are fine) ·
/// mask: [B, 1, T, S] additive. Returns [B, T, nh * hd]. `train` takes the vectorized exp
/// (inference keeps libm's, rounding as candle's softmax does).
pub(crate) fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    train: bool,
) -> Res<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (kb, nkv, s, khd) = k.dims4()?;
    if (kb, khd) != (b, hd) || v.dims4()? != (kb, nkv, s, khd) || nkv == 0 || nh % nkv != 0 {
        candle_core::bail!(
            "sdpa: q {:?}, k {:?}, v {:?} are not [B, nh, T, hd], [B, nkv, S, hd] twice with nkv dividing nh",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    let mask = mask.to_dtype(q.dtype())?.contiguous()?;
    if mask.dims4()? != (b, 1, t, s) {
        candle_core::bail!(
            "sdpa: mask {:?} does not match [{b}, 1, {t}, {s}]",
            mask.shape()
        );
    }
    let op = Sdpa {
        mask,
        scale,
        train,
        dims: Dims {
            b,
            nh,
            nkv,
            t,
            s,
            hd,
        },
    };
    let out = q.contiguous()?.apply_op3(k, v, op)?; // [B, T, nh, hd]
    out.reshape((b, t, nh * hd))
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    hd: usize,
}

impl Dims {
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
    /// Rows of one task's matrices: the rep query heads times T.
    fn m(&self) -> usize {
        self.rep() * self.t
    }
}

/// Where `[b, h]` of a `[B, H, L, hd]` tensor starts, and its row stride; the last dim is unit.
#[derive(Clone, Copy)]
struct View {
    off: usize,
    s0: usize,
    s1: usize,
    row: usize,
}

impl View {
    fn of(l: &Layout) -> Res<Self> {
        let st = l.stride();
        if st.len() != 4 || st[3] != 1 {
            candle_core::bail!("sdpa: needs a rank-4 tensor with a contiguous last dimension");
        }
        Ok(Self {
            off: l.start_offset(),
            s0: st[0],
            s1: st[1],
            row: st[2],
        })
    }
    fn at(&self, b: usize, h: usize) -> usize {
        self.off + b * self.s0 + h * self.s1
    }
}

/// `dst[m, n] = a[m, k] @ b[k, n]`, all strides in elements, single-threaded (tasks are the
/// parallel unit). `a(i, j)` is at `a[i * a_rs + j * a_cs]`, likewise `b`; dst is row-major.
#[allow(clippy::too_many_arguments)]
fn mm<T: 'static + Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &[T],
    b_rs: usize,
    b_cs: usize,
) {
    // The furthest element gemm reads or writes in each operand must lie inside its slice;
    // checked always, since a wrong stride here would be an out-of-bounds read, not a panic.
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(
        m == 0
            || n == 0
            || (dst.len() >= m * n
                && (k == 0
                    || (last(m, k, a_rs, a_cs) < a.len() && last(k, n, b_rs, b_cs) < b.len()))),
        "sdpa: matrix operand out of bounds"
    );
    // SAFETY: the assertion above bounds every index gemm touches; dst is exclusively borrowed.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// What one call reads: q contiguous [B, nh, T, hd], k/v as views, mask [B, 1, T, S].
#[derive(Clone, Copy)]
struct Inputs<'a, T> {
    d: Dims,
    q: &'a [T],
    k: &'a [T],
    kl: View,
    v: &'a [T],
    vl: View,
    mask: &'a [T],
    scale: T,
    /// Training: softmax through the vectorized exp.
    train: bool,
}

/// Probabilities of task (b, g): `p[m, S]` with rows (r, t), softmax over the last dim.
fn probs<T: Float + WithDType + 'static>(x: &Inputs<T>, bi: usize, g: usize) -> Vec<T> {
    let Inputs {
        d,
        q,
        k,
        kl: kv,
        mask,
        scale,
        train,
        ..
    } = *x;
    let (m, s, hd, t) = (d.m(), d.s, d.hd, d.t);
    let mut p = vec![T::zero(); m * s];
    // q is contiguous [B, nh, T, hd]: the rep heads of group g are m consecutive rows.
    let q0 = (bi * d.nh + g * d.rep()) * t * hd;
    let k0 = kv.at(bi, g);
    mm(m, s, hd, &mut p, &q[q0..], hd, 1, &k[k0..], 1, kv.row);
    for (i, row) in p.chunks_mut(s).enumerate() {
        let mrow = &mask[(bi * t + i % t) * s..][..s];
        for (x, &mk) in row.iter_mut().zip(mrow) {
            *x = *x * scale + mk;
        }
        // The same reductions and division as candle's softmax_last_dim, so inference through
        // this kernel rounds exactly as the composed path does.
        let mut max = T::neg_infinity();
        // SAFETY: `row` is one of `p`'s chunks of `s` (`p` is `m * s` long), so the reduction
        // reads `s` valid elements, and `max` is a live local it writes one value to.
        unsafe { T::vec_reduce_max(row.as_ptr(), &mut max, s) };
        for x in row.iter_mut() {
            *x -= max;
        }
        match super::vexp::as_f32_mut(row).filter(|_| train) {
            // Training: the vectorized exp (about 1 ulp). Inference keeps libm's, so that it
            // rounds as the composed path does.
            Some(r) => super::vexp::exp_in_place(r),
            None => row.iter_mut().for_each(|x| *x = x.exp()),
        }
        let mut sum = T::zero();
        // SAFETY: as for the maximum: `s` valid elements of `row`, one write to the local `sum`.
        unsafe { T::vec_reduce_sum(row.as_ptr(), &mut sum, s) };
        row.iter_mut().for_each(|x| *x /= sum);
    }
    p
}

fn forward<T: Float + WithDType + Send + Sync>(x: &Inputs<T>) -> Vec<T> {
    let Inputs { d, v, vl, .. } = *x;
    let (m, hd, t, rep) = (d.m(), d.hd, d.t, d.rep());
    let blocks: Vec<Vec<T>> = (0..d.b * d.nkv)
        .into_par_iter()
        .map(|task| {
            let (bi, g) = (task / d.nkv, task % d.nkv);
            if t == 1 && d.b > 1 {
                return decode_task(x, bi, g);
            }
            let p = probs(x, bi, g);
            let mut o = vec![T::zero(); m * hd];
            mm(
                m,
                hd,
                d.s,
                &mut o,
                &p,
                d.s,
                1,
                &v[vl.at(bi, g)..],
                vl.row,
                1,
            );
            o
        })
        .collect();
    let mut out = vec![T::zero(); d.b * t * d.nh * hd];
    for (task, o) in blocks.iter().enumerate() {
        let (bi, g) = (task / d.nkv, task % d.nkv);
        for (i, src) in o.chunks(hd).enumerate() {
            let (r, ti) = (i / t, i % t);
            let at = ((bi * t + ti) * d.nh + g * rep + r) * hd;
            out[at..at + hd].copy_from_slice(src);
        }
    }
    out
}

/// One decode task (T = 1): the rep query heads of KV group `g` against its S keys, with plain
/// loops. At these sizes (3 x S x 64) gemm's per-call set-up costs more than the arithmetic,
/// and decoding runs 2 x B x nkv x layers of them per token. A single row keeps the gemm path,
/// so batch-1 logits stay bit-identical to candle's own models (tests compare them).
fn decode_task<T: Float + WithDType>(x: &Inputs<T>, bi: usize, g: usize) -> Vec<T> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA, the features `decode_task_avx2` is compiled for, were detected
        // on this CPU just above; it has no other requirement.
        return unsafe { decode_task_avx2(x, bi, g) };
    }
    decode_task_generic(x, bi, g)
}

/// [`decode_task_generic`] compiled for AVX2 + FMA (the loops vectorize with them).
///
/// # Safety
/// The CPU has AVX2 and FMA ([`decode_task`] detects them). The body is safe code: the
/// features are the only requirement.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_task_avx2<T: Float + WithDType>(x: &Inputs<T>, bi: usize, g: usize) -> Vec<T> {
    decode_task_generic(x, bi, g)
}

#[inline(always)]
fn decode_task_generic<T: Float + WithDType>(x: &Inputs<T>, bi: usize, g: usize) -> Vec<T> {
    let d = x.d;
    let (s, hd, rep) = (d.s, d.hd, d.rep());
    let q0 = (bi * d.nh + g * rep) * hd;
    let (k0, v0) = (x.kl.at(bi, g), x.vl.at(bi, g));
    let mask = &x.mask[bi * s..][..s];
    let mut p = vec![T::zero(); rep * s];
    // Decoding reads every cached key and value once per token: it is bound by memory, so
    // padding columns are not read at all (their weight underflows to exactly zero anyway).
    let masked = T::from(MASK_NEG / 2.0).unwrap();
    for (j, &mk) in mask.iter().enumerate() {
        if mk < masked {
            for r in 0..rep {
                p[r * s + j] = mk;
            }
            continue;
        }
        let kj = &x.k[k0 + j * x.kl.row..][..hd];
        for r in 0..rep {
            p[r * s + j] = dot(&x.q[q0 + r * hd..][..hd], kj) * x.scale + mk;
        }
    }
    let mut o = vec![T::zero(); rep * hd];
    for (row, out) in p.chunks_mut(s).zip(o.chunks_mut(hd)) {
        let max = row.iter().fold(T::neg_infinity(), |a, &b| Float::max(a, b));
        let mut sum = T::zero();
        for e in row.iter_mut() {
            *e = (*e - max).exp();
            sum += *e;
        }
        let inv = T::one() / sum;
        for (j, &e) in row.iter().enumerate() {
            // Masked keys weigh exactly zero: skip their values.
            if e != T::zero() {
                let w = e * inv;
                let vj = &x.v[v0 + j * x.vl.row..][..hd];
                for (a, &b) in out.iter_mut().zip(vj) {
                    *a += w * b;
                }
            }
        }
    }
    o
}

/// Dot product with eight independent accumulators, so it vectorizes.
#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let n = a.len() / 8 * 8;
    for (ca, cb) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = acc[l] + ca[l] * cb[l];
        }
    }
    let mut s = acc.iter().fold(T::zero(), |x, &y| x + y);
    for i in n..a.len() {
        s = s + a[i] * b[i];
    }
    s
}

/// Gradients of q ([B, nh, T, hd]), k and v ([B, nkv, S, hd]), all contiguous, from the
/// forward output `out` and its gradient `dout` ([B, T, nh, hd]).
fn backward<T: Float + WithDType + Send + Sync>(
    x: &Inputs<T>,
    out: &[T],
    dout: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Inputs {
        d,
        q,
        k,
        kl,
        v,
        vl,
        scale,
        ..
    } = *x;
    let (m, s, hd, t, rep) = (d.m(), d.s, d.hd, d.t, d.rep());
    let blocks: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..d.b * d.nkv)
        .into_par_iter()
        .map(|task| {
            let (bi, g) = (task / d.nkv, task % d.nkv);
            let p = probs(x, bi, g);
            // dO and O of this task's rows (r, t), gathered from [B, T, nh, hd].
            let mut dob = vec![T::zero(); m * hd];
            let mut delta = vec![T::zero(); m];
            for i in 0..m {
                let (r, ti) = (i / t, i % t);
                let at = ((bi * t + ti) * d.nh + g * rep + r) * hd;
                dob[i * hd..(i + 1) * hd].copy_from_slice(&dout[at..at + hd]);
                delta[i] = dout[at..at + hd]
                    .iter()
                    .zip(&out[at..at + hd])
                    .fold(T::zero(), |a, (&x, &y)| a + x * y);
            }
            let (k0, v0) = (kl.at(bi, g), vl.at(bi, g));
            // dP = dO V^T, then dS = P (dP - delta) * scale, in place.
            let mut ds = vec![T::zero(); m * s];
            mm(m, s, hd, &mut ds, &dob, hd, 1, &v[v0..], 1, vl.row);
            for ((row, prow), &dl) in ds.chunks_mut(s).zip(p.chunks(s)).zip(&delta) {
                for (x, &pi) in row.iter_mut().zip(prow) {
                    *x = pi * (*x - dl) * scale;
                }
            }
            let q0 = (bi * d.nh + g * rep) * t * hd;
            let mut dq = vec![T::zero(); m * hd];
            mm(m, hd, s, &mut dq, &ds, s, 1, &k[k0..], kl.row, 1);
            let mut dk = vec![T::zero(); s * hd];
            mm(s, hd, m, &mut dk, &ds, 1, s, &q[q0..], hd, 1);
            let mut dv = vec![T::zero(); s * hd];
            mm(s, hd, m, &mut dv, &p, 1, s, &dob, hd, 1);
            (dq, dk, dv)
        })
        .collect();
    let mut dq = Vec::with_capacity(d.b * d.nh * t * hd);
    let mut dk = Vec::with_capacity(d.b * d.nkv * s * hd);
    let mut dv = Vec::with_capacity(d.b * d.nkv * s * hd);
    // Tasks run b-major, g-minor: exactly the order of the contiguous outputs.
    for (a, b, c) in blocks {
        dq.extend(a);
        dk.extend(b);
        dv.extend(c);
    }
    (dq, dk, dv)
}

struct Sdpa {
    /// [B, 1, T, S], contiguous, in the inputs' dtype.
    mask: Tensor,
    scale: f64,
    train: bool,
    dims: Dims,
}

/// The whole CPU buffer behind a tensor (its layout says where the tensor lies in it).
fn cpu_slice<T: WithDType>(s: &Storage) -> Res<&[T]> {
    match s {
        Storage::Cpu(c) => T::cpu_storage_as_slice(c),
        _ => candle_core::bail!("sdpa: expected a CPU tensor"),
    }
}

impl Sdpa {
    fn fwd_typed<T: Float + WithDType + Send + Sync + 'static>(
        &self,
        q: &[T],
        k: (&[T], &Layout),
        v: (&[T], &Layout),
    ) -> Res<(CpuStorage, Shape)> {
        let d = self.dims;
        let (ms, ml) = self.mask.storage_and_layout();
        let mask = &cpu_slice::<T>(&ms)?[ml.start_offset()..];
        let o = forward(&Inputs {
            d,
            q,
            k: k.0,
            kl: View::of(k.1)?,
            v: v.0,
            vl: View::of(v.1)?,
            mask,
            scale: T::from(self.scale).unwrap(),
            train: self.train,
        });
        Ok((
            T::to_cpu_storage_owned(o),
            Shape::from((d.b, d.t, d.nh, d.hd)),
        ))
    }

    fn bwd_typed<T: Float + WithDType + Send + Sync + 'static>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Res<(Tensor, Tensor, Tensor)> {
        let d = self.dims;
        // Contiguous (a no-op for the usual graph tensors), then read in place.
        let (q, res, grad) = (q.contiguous()?, res.contiguous()?, grad.contiguous()?);
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (ms, ml) = self.mask.storage_and_layout();
        let inputs = Inputs {
            d,
            q: &cpu_slice::<T>(&qs)?[ql.start_offset()..],
            k: cpu_slice::<T>(&ks)?,
            kl: View::of(kl)?,
            v: cpu_slice::<T>(&vs)?,
            vl: View::of(vl)?,
            mask: &cpu_slice::<T>(&ms)?[ml.start_offset()..],
            scale: T::from(self.scale).unwrap(),
            train: self.train,
        };
        let (dq, dk, dv) = backward(
            &inputs,
            &cpu_slice::<T>(&os)?[ol.start_offset()..],
            &cpu_slice::<T>(&gs)?[gl.start_offset()..],
        );
        let dev = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), dev)?,
            Tensor::from_vec(dk, k.shape(), dev)?,
            Tensor::from_vec(dv, v.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "sdpa"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        if !l1.is_contiguous() || l1.start_offset() != 0 {
            candle_core::bail!("sdpa: q must be contiguous");
        }
        match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.fwd_typed(q, (k, l2), (v, l3))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                self.fwd_typed(q, (k, l2), (v, l3))
            }
            _ => candle_core::bail!("sdpa: q, k, v must all be f32 or all f64"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.bwd_typed::<f32>(q, k, v, res, grad)?,
            DType::F64 => self.bwd_typed::<f64>(q, k, v, res, grad)?,
            dt => candle_core::bail!("sdpa: no backward for {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q k^T * scale + mask) v with plain loops, in f64.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Vec<f64> {
        let (b, nh, t, hd) = q.dims4().unwrap();
        let (_, nkv, s, _) = k.dims4().unwrap();
        let get = |x: &Tensor| -> Vec<f64> {
            x.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (q, k, v, m) = (
            get(q),
            get(&k.contiguous().unwrap()),
            get(&v.contiguous().unwrap()),
            get(mask),
        );
        let mut out = vec![0.0; b * t * nh * hd];
        for bi in 0..b {
            for h in 0..nh {
                let g = h / (nh / nkv);
                for ti in 0..t {
                    let sc: Vec<f64> = (0..s)
                        .map(|j| {
                            let dot: f64 = (0..hd)
                                .map(|x| {
                                    q[((bi * nh + h) * t + ti) * hd + x]
                                        * k[((bi * nkv + g) * s + j) * hd + x]
                                })
                                .sum();
                            dot * scale + m[(bi * t + ti) * s + j]
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for x in 0..hd {
                        out[((bi * t + ti) * nh + h) * hd + x] = (0..s)
                            .map(|j| e[j] / z * v[((bi * nkv + g) * s + j) * hd + x])
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn mismatched_shapes_are_an_error_not_a_bad_read() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev).unwrap();
        let mask = Tensor::zeros((1, 1, 2, 3), DType::F32, &dev).unwrap();
        let ok = Tensor::zeros((1, 2, 3, 8), DType::F32, &dev).unwrap();
        for (k, v) in [
            (
                Tensor::zeros((1, 2, 3, 4), DType::F32, &dev).unwrap(),
                ok.clone(),
            ), // head dim
            (
                ok.clone(),
                Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap(),
            ), // v length
            (
                Tensor::zeros((1, 3, 3, 8), DType::F32, &dev).unwrap(),
                Tensor::zeros((1, 3, 3, 8), DType::F32, &dev).unwrap(),
            ), // 3 does not divide 4
        ] {
            let e = sdpa(&q, &k, &v, &mask, 1.0, false).unwrap_err().to_string();
            assert!(e.contains("sdpa: q"), "{e}");
        }
        assert!(sdpa(&q, &ok, &ok, &mask, 1.0, false).is_ok());
    }

    #[test]
    fn matches_plain_loops_with_cache_views_and_fewer_queries_than_keys() {
        let dev = Device::Cpu;
        let mut cases = vec![
            (2, 6, 2, 8, 16, 1, 7),
            (2, 6, 2, 8, 16, 3, 9),
            (2, 6, 2, 8, 16, 5, 5),
            (1, 9, 3, 64, 64, 1, 37),
            (3, 9, 3, 64, 64, 1, 20),
        ];
        cases.extend((1..60).map(|s| (1, 9, 3, 64, 64, 1, s)));
        for (b, nh, nkv, hd, cap, t, s) in cases {
            let q = Tensor::randn(0f32, 1.0, (b, nh, t, hd), &dev).unwrap();
            // K/V as a cache holds them: a prefix view of a longer buffer.
            let kc = Tensor::randn(0f32, 1.0, (b, nkv, cap, hd), &dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (b, nkv, cap, hd), &dev).unwrap();
            let (k, v) = (kc.narrow(2, 0, s).unwrap(), vc.narrow(2, 0, s).unwrap());
            // Left padding on the second row; every query still sees at least itself.
            let start: Vec<usize> = (0..b).map(|i| (i * 2).min(s - t)).collect();
            let mask = crate::model::llama::build_mask(&start, s - t, t, DType::F32, &dev).unwrap();
            let got: Vec<f32> = sdpa(&q, &k, &v, &mask, 0.35, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = naive(&q, &k, &v, &mask, 0.35);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() < 1e-4,
                    "t={t} s={s} [{i}]: {g} vs {w}"
                );
            }
        }
    }
}
