//! One decoding step on the CPU in plain Rust: a token for each row, through every layer,
//! without building a candle op.
//!
//! At one row a decoding step is about 0.3 GFLOP over 100 MB of weights, and the composed path
//! spends much of its time around the arithmetic: some 25 candle ops a layer, each allocating
//! its output, plus a mask and position tensors a step. Here the buffers live in [`Scratch`]
//! (kept by the `Decoder` across steps), the projections run on the quantized blocks
//! (`quant.rs`), and norm, RoPE and attention are loops over slices. The KV cache is the same
//! [`KvCache`] the candle path fills, written in place, so prefill (dense gemm) and these steps
//! share it.
//!
//! Runs where [`Llama::fast_decode`] says: CPU, f32, inference, our attention (not the composed
//! ops a user can ask for), every projection held as blocks (`generate.weights = "mixed"` or
//! `"q8"`).

use super::llama::{KvCache, Llama, Mode};
use super::lora::{Lora, Projection};
use super::quant::QActs;
use crate::error::{bail, Result};
use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// Buffers reused from step to step.
#[derive(Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    acts: QActs,
    lora: Vec<f32>,
}

/// Run `f` on the f32 elements of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*st else {
        bail!("internal: the CPU decode step needs f32 tensors on the CPU");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("internal: the CPU decode step needs contiguous tensors");
    };
    Ok(f(&v[a..b]))
}

/// Copy `x` rows' normalized values into `out`: `x / rms(x) * w`, as candle's `rms_norm`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let h = w.len();
    out.clear();
    for row in x.chunks_exact(h) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, w)| v * inv * w));
    }
}

/// Rotate-half RoPE of `heads` heads of every row, row `i` at position `pos[i]`.
fn rope(x: &mut [f32], heads: usize, hd: usize, pos: &[usize], cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (row, &p) in x.chunks_exact_mut(heads * hd).zip(pos) {
        let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        for head in row.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/// Adds LoRA's `scale * B (A x)` for `rows` rows of `x` to `y`.
fn add_lora(l: &Lora, x: &[f32], rows: usize, y: &mut [f32], tmp: &mut Vec<f32>) -> Result<()> {
    let (o, i) = l.dims()?;
    let r = l.a.as_tensor().dim(0)?;
    let scale = l.scale as f32;
    with_f32(l.a.as_tensor(), |a| {
        tmp.clear();
        for xr in x.chunks_exact(i).take(rows) {
            tmp.extend(a.chunks_exact(i).map(|ar| dot(ar, xr)));
        }
    })?;
    with_f32(l.b.as_tensor(), |b| {
        for (yr, hr) in y.chunks_exact_mut(o).zip(tmp.chunks_exact(r)) {
            for (yv, br) in yr.iter_mut().zip(b.chunks_exact(r)) {
                *yv += scale * dot(br, hr);
            }
        }
    })
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (ca, cb) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    acc.iter().sum::<f32>() + a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum::<f32>()
}

/// Attention of a KV group's query heads (`q`: `[rep, hd]`) over cache columns `cols` of the
/// group's keys and values (`kv`: `[cap, hd]` each, from column 0), into `out` (`[rep, hd]`).
fn attend(
    q: &[f32],
    kv: (&[f32], &[f32]),
    cols: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::quant::Kernel::get() != super::quant::Kernel::Portable {
        // SAFETY: every kernel but the portable one implies AVX2 and FMA.
        return unsafe { attend_avx2(q, kv, cols, hd, scale, out) };
    }
    attend_generic(q, kv, cols, hd, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    q: &[f32],
    kv: (&[f32], &[f32]),
    cols: std::ops::Range<usize>,
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    attend_generic(q, kv, cols, hd, scale, out)
}

#[inline(always)]
fn attend_generic(
    q: &[f32],
    (kc, vc): (&[f32], &[f32]),
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
        let max = ph.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let mut sum = 0.0;
        for e in ph.iter_mut() {
            *e = (*e - max).exp();
            sum += *e;
        }
        let inv = 1.0 / sum;
        ph.iter_mut().for_each(|e| *e *= inv);
    }
    for (col, j) in cols.zip(0..ncol) {
        let vr = &vc[col * hd..][..hd];
        for (oh, ph) in out.chunks_exact_mut(hd).zip(p.chunks_exact(ncol)) {
            let w = ph[j];
            for (a, &v) in oh.iter_mut().zip(vr) {
                *a += w * v;
            }
        }
    }
}

/// Writes `[B, nkv, hd]` values into column `col` of a `[B, nkv, cap, hd]` cache tensor.
struct WriteColumn<'a> {
    col: usize,
    data: &'a [f32],
}

impl candle_core::InplaceOp1 for WriteColumn<'_> {
    fn name(&self) -> &'static str {
        "kv-write-column"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("kv-write-column: the cache is not f32");
        };
        let Some((start, _)) = l.contiguous_offsets() else {
            candle_core::bail!("kv-write-column: the cache is not contiguous");
        };
        let (b, h, cap, hd) = l.shape().dims4()?;
        if self.col >= cap || self.data.len() != b * h * hd {
            candle_core::bail!(
                "kv-write-column: column {} of {cap}, {} values",
                self.col,
                self.data.len()
            );
        }
        for (i, src) in self.data.chunks_exact(hd).enumerate() {
            let at = start + (i * cap + self.col) * hd;
            v[at..at + hd].copy_from_slice(src);
        }
        Ok(())
    }
}

impl Llama {
    /// Whether [`Llama::decode_step_cpu`] runs for `rows` rows in `mode`: at any batch size
    /// (measured faster than dense gemm at 1 to 64 rows, docs/PERF.md), unless the load
    /// options asked for candle's composed attention (`attention = "composed"`).
    pub(crate) fn fast_decode(&self, rows: usize, mode: Mode) -> bool {
        rows >= 1
            && !mode.train
            && self.fused_attention
            && self.device.is_cpu()
            && self.dtype == candle_core::DType::F32
            && self.lm_head.packed().is_some()
            && self.layers.iter().all(|l| {
                Projection::ALL
                    .iter()
                    .all(|&p| l.proj(p).packed().is_some())
            })
    }

    /// One token for each row: `ids[i]` is fed to row `i`, whose valid cache columns start at
    /// `start[i]`; the new keys and values go to column `cache.len`. Returns each row's logits.
    pub(crate) fn decode_step_cpu(
        &self,
        ids: &[u32],
        start: &[usize],
        cache: &mut KvCache,
        mode: Mode,
        s: &mut Scratch,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let b = ids.len();
        let (hs, nh, nkv, hd, im) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size,
        );
        let rep = nh / nkv;
        let eps = c.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        cache.ensure(1)?;
        let len = cache.len;
        let pos: Vec<usize> = start.iter().map(|&st| len - st).collect();
        let adapter = self.adapter().filter(|_| mode.lora);
        let lora = |li: usize, p: Projection| adapter.and_then(|a| a.get(li, p));

        s.x.clear();
        with_f32(&self.embed_tokens, |e| {
            for &id in ids {
                s.x.extend_from_slice(&e[id as usize * hs..][..hs]);
            }
        })?;
        let cos_g = self.cos.storage_and_layout();
        let sin_g = self.sin.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(cos)), Storage::Cpu(CpuStorage::F32(sin))) =
            (&*cos_g.0, &*sin_g.0)
        else {
            bail!("internal: RoPE tables are not f32 on the CPU");
        };

        for (li, layer) in self.layers.iter().enumerate() {
            // y = W x (+ LoRA) for projection `p`, from `acts` (quantized from `x`).
            let project = |p: Projection,
                           x: &[f32],
                           acts: &QActs,
                           y: &mut Vec<f32>,
                           tmp: &mut Vec<f32>|
             -> Result<()> {
                let w = layer.proj(p).packed().expect("checked by fast_decode");
                y.clear();
                y.resize(b * w.rows, 0.0);
                w.matmul(acts, y);
                if let Some(l) = lora(li, p) {
                    add_lora(l, x, b, y, tmp)?;
                }
                Ok(())
            };
            with_f32(&layer.input_layernorm, |w| rms_norm(&s.x, w, eps, &mut s.h))?;
            s.acts.quantize(&s.h, b, hs);
            project(Projection::QProj, &s.h, &s.acts, &mut s.q, &mut s.lora)?;
            project(Projection::KProj, &s.h, &s.acts, &mut s.k, &mut s.lora)?;
            project(Projection::VProj, &s.h, &s.acts, &mut s.v, &mut s.lora)?;
            rope(&mut s.q, nh, hd, &pos, cos, sin);
            rope(&mut s.k, nkv, hd, &pos, cos, sin);
            cache.k[li].inplace_op1(&WriteColumn {
                col: len,
                data: &s.k,
            })?;
            cache.v[li].inplace_op1(&WriteColumn {
                col: len,
                data: &s.v,
            })?;

            // Attention: row i, query head h against its KV group's columns start[i]..=len.
            s.att.clear();
            s.att.resize(b * nh * hd, 0.0);
            let (kt, vt) = (&cache.k[li], &cache.v[li]);
            let cap = kt.dim(2)?;
            with_f32(kt, |kc| {
                with_f32(vt, |vc| {
                    let q = &s.q;
                    // One task per (row, KV group): the group's `rep` query heads read its
                    // keys and values once.
                    let task = |(t, out): (usize, &mut [f32])| {
                        let (i, g) = (t / nkv, t % nkv);
                        let base = (i * nkv + g) * cap;
                        let qg = &q[(i * nh + g * rep) * hd..][..rep * hd];
                        let kv = (&kc[base * hd..], &vc[base * hd..]);
                        attend(qg, kv, start[i]..len + 1, hd, scale, out);
                    };
                    // Tasks dealt round-robin to the decode threads.
                    let pool = super::spin_pool::SpinPool::global();
                    let n = pool.threads();
                    let out = super::quant::SendPtr(s.att.as_mut_ptr());
                    let tasks = b * nkv;
                    let w = rep * hd;
                    pool.run(&|th| {
                        let out = &out;
                        for t in (th..tasks).step_by(n) {
                            // SAFETY: task t alone writes elements [t * w, (t + 1) * w) of
                            // `att`, which holds b * nkv * w.
                            let chunk =
                                unsafe { std::slice::from_raw_parts_mut(out.0.add(t * w), w) };
                            task((t, chunk));
                        }
                    });
                })
            })??;

            s.acts.quantize(&s.att, b, nh * hd);
            project(Projection::OProj, &s.att, &s.acts, &mut s.o, &mut s.lora)?;
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);

            with_f32(&layer.post_attention_layernorm, |w| {
                rms_norm(&s.x, w, eps, &mut s.h)
            })?;
            s.acts.quantize(&s.h, b, hs);
            project(Projection::GateProj, &s.h, &s.acts, &mut s.g, &mut s.lora)?;
            project(Projection::UpProj, &s.h, &s.acts, &mut s.u, &mut s.lora)?;
            for (g, u) in s.g.iter_mut().zip(&s.u) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            s.acts.quantize(&s.g, b, im);
            project(Projection::DownProj, &s.g, &s.acts, &mut s.o, &mut s.lora)?;
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
        }
        cache.len = len + 1;

        with_f32(&self.norm, |w| rms_norm(&s.x, w, eps, &mut s.h))?;
        s.acts.quantize(&s.h, b, hs);
        let head = self.lm_head.packed().expect("checked by fast_decode");
        let mut logits = vec![0f32; b * head.rows];
        head.matmul(&s.acts, &mut logits);
        Ok(logits.chunks_exact(head.rows).map(|r| r.to_vec()).collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::generate::{argmax, prefill_padded, Request};
    use crate::model::llama::{build_mask, build_positions};
    use crate::model::{LoadOptions, Model, WeightsMode};

    /// The SmolLM2 GGUF with `weights`; fails (never skips) when the file is missing.
    pub(crate) fn smollm2(weights: WeightsMode) -> Model {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.is_file(),
            "{} is missing: run `bash scripts/fetch-model.sh`",
            p.display()
        );
        let src = crate::model::source::resolve(p.to_str().unwrap(), "main").unwrap();
        Model::load(
            &src,
            &LoadOptions {
                weights,
                ..LoadOptions::cpu_f32()
            },
        )
        .unwrap()
    }

    pub(crate) fn prompt(m: &Model, title: &str) -> Vec<u32> {
        use crate::model::chat::Message;
        let msgs = vec![
            Message::new("system", "You review papers in one sentence."),
            Message::new("user", title),
        ];
        let text = m.meta.chat.as_ref().unwrap().render(&msgs, true).unwrap();
        m.meta.tok.encode(&text, true).unwrap()
    }

    /// Greedy steps for a left-padded batch of two, through this module and through the candle
    /// ops, from copies of one prefilled cache: the same logits (both multiply the same blocks;
    /// norm, RoPE and attention are summed in other orders) and the same tokens.
    fn steps_agree(m: &Model, label: &str) -> Vec<Vec<f32>> {
        let reqs: Vec<Request> = ["Attention Is All You Need", "QLoRA"]
            .iter()
            .enumerate()
            .map(|(id, t)| Request {
                id,
                ids: prompt(m, t),
            })
            .collect();
        assert_ne!(reqs[0].ids.len(), reqs[1].ids.len(), "rows need padding");
        let (mut fast, start, first) = prefill_padded(m, &reqs, 16, Mode::infer()).unwrap();
        let mut slow = fast.deep_copy().unwrap();
        let mut ids: Vec<u32> = first.iter().map(|l| argmax(l)).collect();
        let mut scratch = Scratch::default();
        let mut all = Vec::new();
        let mut same = 0;
        assert!(m.llama.fast_decode(2, Mode::infer()));
        for step in 0..6 {
            let a = m
                .llama
                .decode_step_cpu(&ids, &start, &mut fast, Mode::infer(), &mut scratch)
                .unwrap();
            let dev = &m.llama.device;
            let x = Tensor::from_vec(ids.clone(), (2, 1), dev).unwrap();
            let mask = build_mask(&start, slow.len, 1, m.llama.dtype, dev).unwrap();
            let pos = build_positions(&start, slow.len, 1, dev).unwrap();
            let b: Vec<Vec<f32>> = m
                .llama
                .forward(
                    &x,
                    &pos,
                    &mask,
                    Some(&mut slow),
                    false,
                    Mode::infer().decode_step(),
                )
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(fast.len, slow.len);
            for (row, (la, lb)) in a.iter().zip(&b).enumerate() {
                let d = la
                    .iter()
                    .zip(lb)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                // Logits reach about 30. The two paths quantize activations summed in other
                // orders, and an activation rounded to the other 8-bit step in one layer moves
                // every layer after it: up to 1.8 apart over 6 adapter seeds (measured); a
                // wrong rotation moves them by 10, a skipped adapter by 20.
                assert!(
                    d < 3.0,
                    "{label} step {step} row {row}: logits differ by {d}"
                );
                same += usize::from(argmax(la) == argmax(lb));
            }
            ids = a.iter().map(|l| argmax(l)).collect();
            all.extend(a);
        }
        assert!(
            same >= 10,
            "{label}: the same next token at {same} of 12 steps"
        );
        all
    }

    #[test]
    fn the_plain_rust_step_matches_the_candle_ops() {
        use crate::model::lora::{LoraSpec, Projection};
        let mut m = smollm2(WeightsMode::Mixed);
        let base = steps_agree(&m, "base");
        // With an adapter on every projection (B random, so it changes the model).
        let spec = LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Projection::ALL.to_vec(),
        };
        let adapter = m.llama.new_adapter(&spec, 3).unwrap();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
        for (name, v) in adapter.vars() {
            if name.ends_with("lora_B.weight") {
                use rand::Rng;
                let shape = v.as_tensor().shape().clone();
                let vals: Vec<f32> = (0..shape.elem_count())
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.6)
                    .collect();
                v.set(&Tensor::from_vec(vals, shape, &candle_core::Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        m.llama.attach(adapter).unwrap();
        let adapted = steps_agree(&m, "adapter");
        let changed = base
            .iter()
            .zip(&adapted)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        assert!(
            changed > 0.1,
            "the adapter changed the logits by only {changed}"
        );
    }
}
