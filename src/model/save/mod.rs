//! A model or an adapter written for other engines: the merged model as a GGUF file that
//! llama.cpp (and so Ollama and LM Studio) loads as any converted Llama (`gguf.rs`, its
//! tokenizer metadata in `tokenizer.rs`, the container in `gguf_file.rs`), a LoRA adapter as llama.cpp's GGUF LoRA (`lora.rs`),
//! and the Ollama Modelfile written beside a merged GGUF (`modelfile.rs`). The formats this
//! engine reads back stay with their readers' neighbours: PEFT folders in `model::adapter`, the
//! safetensors folder in `Model::write_hf_folder`.
//!
//! Every file is written atomically (`fsutil`): a reader never sees half a model.
//!
//! May import the model's core, `model::load` and the base modules; never `model::generate` or
//! anything above (a Modelfile's sampling parameters come in as plain numbers).

mod gguf;
mod gguf_file;
mod lora;
mod modelfile;
mod tokenizer;

pub use gguf::{write_merged_gguf, GgufType, Written};
pub use lora::{write_lora_gguf, LoraType};
pub use modelfile::{modelfile, OllamaParams};

/// llama.cpp's converter's q/k row order, from the Hugging Face one: within each head, row
/// `2i` is HF's row `i` and row `2i + 1` is HF's row `i + hd/2` (rotate-half pairs become
/// adjacent, as llama.cpp's RoPE rotates them). The inverse of the un-permute `model::load`
/// applies to GGUF q/k weights. `w`: `[heads * hd, cols]`.
pub(crate) fn permute_qk(
    w: &candle_core::Tensor,
    heads: usize,
) -> crate::error::Result<candle_core::Tensor> {
    let (rows, cols) = w.dims2()?;
    crate::error::ensure!(
        heads > 0 && rows.is_multiple_of(heads) && (rows / heads).is_multiple_of(2),
        "internal: {rows} rows do not split into {heads} heads of an even size"
    );
    let hd = rows / heads;
    Ok(w.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Row 2i of a head is HF's row i, row 2i + 1 HF's row i + hd/2 (the converter's
    /// `reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)`), for q (9 heads) and k (3 heads).
    #[test]
    fn rows_interleave_within_each_head() {
        for heads in [9usize, 3] {
            let (hd, cols) = (8, 3);
            let rows = heads * hd;
            let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            let p: Vec<Vec<f32>> = permute_qk(&w, heads).unwrap().to_vec2().unwrap();
            let orig: Vec<Vec<f32>> = w.to_vec2().unwrap();
            for h in 0..heads {
                for i in 0..hd / 2 {
                    assert_eq!(p[h * hd + 2 * i], orig[h * hd + i]);
                    assert_eq!(p[h * hd + 2 * i + 1], orig[h * hd + i + hd / 2]);
                }
            }
        }
    }
}
