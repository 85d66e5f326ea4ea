//! GGUF weights: tensors read by name from an open file and held as the load options ask
//! (quantized matmuls, dense, or the file's blocks beside dense copies), q and k rows turned from
//! llama.cpp's interleaved RoPE layout back to the Hugging Face one.

use crate::error::{ensure, err, no_panic, Context, Result};
use crate::kernels::quant;
use crate::model::config::{LlamaConfig, FIX};
use crate::model::llama::{Layer, Linear, Llama};
use crate::model::lora::Projection;
use crate::model::names::{self, Weight};
use crate::model::options::{LoadOptions, WeightsMode};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::Tensor;
use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::Path;

/// Open a GGUF file and read its header: walked and checked by us first (`gguf_header`), then
/// read by candle. Returns the header and the open file, for reading tensors.
pub(crate) fn open(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    // Buffered: the metadata is tens of thousands of small reads (the vocabulary).
    let mut f =
        BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
    super::gguf_header::check(&mut f)
        .map_err(|e| err!("{}: not a usable GGUF file: {e}; {FIX}", path.display()))?;
    f.rewind()?;
    let content = no_panic(
        format!("{}: reading the GGUF header", path.display()),
        || {
            gguf_file::Content::read(&mut f)
                .with_context(|| format!("{}: not a readable GGUF file", path.display()))
        },
    )?;
    Ok((content, f))
}

/// Every tensor the network reads is in the file with the shape `cfg` implies (the output head
/// may be missing: tied to the embeddings), so that a damaged or mismatched file is refused at
/// load, naming the tensor, and not at the first forward pass as an anonymous shape error.
pub(crate) fn check_tensors(
    content: &gguf_file::Content,
    cfg: &LlamaConfig,
    path: &Path,
) -> Result<()> {
    cfg.each_weight(|w, shape| {
        let name = w.gguf();
        let Some(info) = content.tensor_infos.get(&name) else {
            ensure!(
                w == Weight::Head,
                "{}: tensor {name} is missing (the config has {} layers); {FIX}",
                path.display(),
                cfg.num_hidden_layers
            );
            return Ok(());
        };
        // Types llama.cpp only uses for intermediate results: candle's GGUF reader has no
        // loader for them.
        if matches!(info.ggml_dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            crate::error::unsupported!(
                "{}: tensor {name} is stored as {:?}, which this engine cannot load; use a GGUF quantized otherwise (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or a K-quant)",
                path.display(),
                info.ggml_dtype
            );
        }
        let found = info.shape.dims();
        ensure!(
            found == shape,
            "{}: tensor {name} has shape {found:?}, but the config implies {shape:?} (rows, columns); {FIX}",
            path.display()
        );
        Ok(())
    })
}

/// Undo llama.cpp's q/k permutation (interleaved RoPE layout -> HF rotate-half layout).
/// w: [heads * hd, in]
fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

/// The row order [`unpermute_qk`] makes: row `i` of the result is row `order[i]` of the input.
fn unpermute_order(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for t in 0..2 {
            for i in 0..hd / 2 {
                order.push(h * hd + i * 2 + t);
            }
        }
    }
    order
}

/// Reads named tensors from an open GGUF file, as the load options ask for them.
struct GgufTensors<'a> {
    content: &'a gguf_file::Content,
    file: &'a mut std::io::BufReader<std::fs::File>,
    opts: &'a LoadOptions,
}

impl GgufTensors<'_> {
    fn quantized(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let (content, file, device) = (self.content, &mut *self.file, &self.opts.device);
        no_panic(format!("tensor {name}"), || {
            content
                .tensor(file, name, device)
                .with_context(|| format!("tensor {name}"))
        })
    }

    /// A small tensor (norm weights, embeddings), always dequantized.
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self
            .quantized(name)?
            .dequantize(&self.opts.device)?
            .to_dtype(self.opts.dtype)?)
    }

    /// A projection; q/k (`permute_heads`) are un-permuted when dequantized to the HF layout.
    fn linear(
        &mut self,
        q: candle_core::quantized::QTensor,
        permute_heads: Option<usize>,
    ) -> Result<Linear> {
        if self.opts.weights == WeightsMode::Quantized {
            let dims = q.shape().dims2()?;
            return Ok(Linear::quantized(QMatMul::from_qtensor(q)?, dims));
        }
        let mut w = q.dequantize(&self.opts.device)?;
        let (o, i) = w.dims2()?;
        let blocks = matches!(
            self.opts.weights,
            WeightsMode::Mixed | WeightsMode::Q8 | WeightsMode::Blocks
        ) && self.opts.device.is_cpu()
            && i.is_multiple_of(quant::QK);
        let mut packed = if blocks {
            let raw =
                |f| -> Result<quant::Packed> { Ok(quant::Packed::from_ggml(f, &q.data()?, o, i)) };
            Some(match (self.opts.weights, q.dtype()) {
                (WeightsMode::Mixed | WeightsMode::Blocks, GgmlDType::Q4_1) => {
                    raw(quant::Format::Q4_1)?
                }
                (_, GgmlDType::Q8_0) => raw(quant::Format::Q8_0)?,
                _ => quant::Packed::quantize_q8_0(&w.flatten_all()?.to_vec1()?, o, i),
            })
        } else {
            None
        };
        if let Some(h) = permute_heads {
            w = unpermute_qk(&w, h)?;
            packed = packed.map(|p| p.permute_rows(&unpermute_order(o, h)));
        }
        let w = w.to_dtype(self.opts.dtype)?;
        match packed {
            Some(p) => Linear::both(w, p, self.opts.weights == WeightsMode::Blocks),
            None => Linear::dense(w),
        }
    }

    fn projection(&mut self, name: &str, permute_heads: Option<usize>) -> Result<Linear> {
        let q = self.quantized(name)?;
        self.linear(q, permute_heads)
    }
}

pub(super) fn load_gguf(
    content: &gguf_file::Content,
    file: &mut std::io::BufReader<std::fs::File>,
    cfg: &LlamaConfig,
    opts: &LoadOptions,
) -> Result<Llama> {
    let mut t = GgufTensors {
        content,
        file,
        opts,
    };
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let mut proj = |p: Projection, permute_heads: Option<usize>| {
            t.projection(&names::gguf::weight(i, p), permute_heads)
        };
        layers.push(Layer {
            q_proj: proj(Projection::QProj, Some(nh))?,
            k_proj: proj(Projection::KProj, Some(nkv))?,
            v_proj: proj(Projection::VProj, None)?,
            o_proj: proj(Projection::OProj, None)?,
            gate_proj: proj(Projection::GateProj, None)?,
            up_proj: proj(Projection::UpProj, None)?,
            down_proj: proj(Projection::DownProj, None)?,
            input_layernorm: t.dense(&names::gguf::attn_norm(i))?,
            post_attention_layernorm: t.dense(&names::gguf::ffn_norm(i))?,
        });
    }
    let norm = t.dense(names::gguf::OUTPUT_NORM)?;
    let embed_q = t.quantized(names::gguf::TOKEN_EMBD)?;
    let embed = embed_q.dequantize(&opts.device)?.to_dtype(opts.dtype)?;
    // Tied embeddings: no output.weight, the head reuses token_embd.
    let head_q = if content.tensor_infos.contains_key(names::gguf::OUTPUT) {
        t.quantized(names::gguf::OUTPUT)?
    } else {
        embed_q
    };
    let lm_head = t.linear(head_q, None)?;
    let interleaved_rope = opts.weights.interleaved_rope();
    Llama::new(
        cfg.clone(),
        embed,
        layers,
        norm,
        lm_head,
        interleaved_rope,
        &opts.device,
        opts.dtype,
    )
}
