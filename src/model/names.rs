//! Every tensor name the engine reads or writes, in one place: Hugging Face checkpoints
//! (`model.layers.{i}.self_attn.q_proj.weight`), PEFT adapters (the LoRA tensors of a projection,
//! `…q_proj.lora_A.weight`, under `base_model.model.`) and llama.cpp's GGUF
//! (`blk.{i}.attn_q.weight`).

use super::lora::Projection;

pub(crate) const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub(crate) const NORM: &str = "model.norm.weight";
pub(crate) const LM_HEAD: &str = "lm_head.weight";

/// The module path of a projection inside a layer: `self_attn.q_proj`, `mlp.up_proj`.
fn module(p: Projection) -> &'static str {
    match p {
        Projection::QProj => "self_attn.q_proj",
        Projection::KProj => "self_attn.k_proj",
        Projection::VProj => "self_attn.v_proj",
        Projection::OProj => "self_attn.o_proj",
        Projection::GateProj => "mlp.gate_proj",
        Projection::UpProj => "mlp.up_proj",
        Projection::DownProj => "mlp.down_proj",
    }
}

/// `model.layers.{i}.self_attn.q_proj`
fn projection(layer: usize, p: Projection) -> String {
    format!("model.layers.{layer}.{}", module(p))
}

pub(crate) fn weight(layer: usize, p: Projection) -> String {
    format!("{}.weight", projection(layer, p))
}

pub(crate) fn input_layernorm(layer: usize) -> String {
    format!("model.layers.{layer}.input_layernorm.weight")
}

pub(crate) fn post_attention_layernorm(layer: usize) -> String {
    format!("model.layers.{layer}.post_attention_layernorm.weight")
}

/// LoRA tensors as PEFT names them below its prefix (and training checkpoints name them).
pub(crate) fn lora_a(layer: usize, p: Projection) -> String {
    format!("{}.lora_A.weight", projection(layer, p))
}

pub(crate) fn lora_b(layer: usize, p: Projection) -> String {
    format!("{}.lora_B.weight", projection(layer, p))
}

/// What PEFT puts before a base model's tensor names in `adapter_model.safetensors`.
pub(crate) const PEFT_PREFIX: &str = "base_model.model.";

/// A LoRA tensor of `adapter_model.safetensors`: (layer, projection, is B), or `None` for a
/// name that is not one.
pub(crate) fn parse_peft(name: &str) -> Option<(usize, Projection, bool)> {
    let rest = name
        .strip_prefix(PEFT_PREFIX)?
        .strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (path, is_b) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, false)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, true)
    };
    let p = Projection::ALL.into_iter().find(|&p| module(p) == path)?;
    Some((layer, p, is_b))
}

/// A weight of the network, whatever the file format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Weight {
    Embed,
    /// The output head; absent from a file whose head is tied to the embeddings.
    Head,
    Norm,
    Proj(usize, Projection),
    InputNorm(usize),
    PostNorm(usize),
}

impl Weight {
    /// Its name in a Hugging Face checkpoint.
    pub(crate) fn hf(self) -> String {
        match self {
            Weight::Embed => EMBED_TOKENS.into(),
            Weight::Head => LM_HEAD.into(),
            Weight::Norm => NORM.into(),
            Weight::Proj(i, p) => weight(i, p),
            Weight::InputNorm(i) => input_layernorm(i),
            Weight::PostNorm(i) => post_attention_layernorm(i),
        }
    }

    /// Its name in a GGUF file.
    pub(crate) fn gguf(self) -> String {
        match self {
            Weight::Embed => gguf::TOKEN_EMBD.into(),
            Weight::Head => gguf::OUTPUT.into(),
            Weight::Norm => gguf::OUTPUT_NORM.into(),
            Weight::Proj(i, p) => gguf::weight(i, p),
            Weight::InputNorm(i) => gguf::attn_norm(i),
            Weight::PostNorm(i) => gguf::ffn_norm(i),
        }
    }
}

/// llama.cpp's names in a GGUF file.
pub(crate) mod gguf {
    use super::Projection;

    pub(crate) const TOKEN_EMBD: &str = "token_embd.weight";
    pub(crate) const OUTPUT_NORM: &str = "output_norm.weight";
    /// Absent when the head is tied to the embeddings.
    pub(crate) const OUTPUT: &str = "output.weight";

    pub(crate) fn weight(layer: usize, p: Projection) -> String {
        let n = match p {
            Projection::QProj => "attn_q",
            Projection::KProj => "attn_k",
            Projection::VProj => "attn_v",
            Projection::OProj => "attn_output",
            Projection::GateProj => "ffn_gate",
            Projection::UpProj => "ffn_up",
            Projection::DownProj => "ffn_down",
        };
        format!("blk.{layer}.{n}.weight")
    }

    pub(crate) fn attn_norm(layer: usize) -> String {
        format!("blk.{layer}.attn_norm.weight")
    }

    pub(crate) fn ffn_norm(layer: usize) -> String {
        format!("blk.{layer}.ffn_norm.weight")
    }

    /// The LoRA tensors of a GGUF adapter (llama.cpp's `convert_lora_to_gguf.py`): the base
    /// tensor's name and `.lora_a` (A, `[r, in]`) or `.lora_b` (B, `[out, r]`).
    pub(crate) fn lora_a(layer: usize, p: Projection) -> String {
        format!("{}.lora_a", weight(layer, p))
    }

    pub(crate) fn lora_b(layer: usize, p: Projection) -> String {
        format!("{}.lora_b", weight(layer, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_parse_back() {
        for p in Projection::ALL {
            let a = format!("{PEFT_PREFIX}{}", lora_a(12, p));
            let b = format!("{PEFT_PREFIX}{}", lora_b(3, p));
            assert_eq!(parse_peft(&a), Some((12, p, false)), "{a}");
            assert_eq!(parse_peft(&b), Some((3, p, true)), "{b}");
        }
        // The module paths of transformers' LlamaForCausalLM, as PEFT names its LoRA weights.
        for (p, module) in [
            (Projection::QProj, "self_attn.q_proj"),
            (Projection::KProj, "self_attn.k_proj"),
            (Projection::VProj, "self_attn.v_proj"),
            (Projection::OProj, "self_attn.o_proj"),
            (Projection::GateProj, "mlp.gate_proj"),
            (Projection::UpProj, "mlp.up_proj"),
            (Projection::DownProj, "mlp.down_proj"),
        ] {
            assert_eq!(
                lora_a(0, p),
                format!("model.layers.0.{module}.lora_A.weight")
            );
            assert_eq!(
                lora_b(7, p),
                format!("model.layers.7.{module}.lora_B.weight")
            );
        }
        for bad in [
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.weight",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_B.weight",
            "base_model.model.lm_head.lora_A.weight",
        ] {
            assert_eq!(parse_peft(bad), None, "{bad}");
        }
    }
}
