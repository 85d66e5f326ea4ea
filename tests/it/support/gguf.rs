//! A GGUF writer for the tests: a tiny random-weight Llama with a small byte-level BPE
//! vocabulary and a chat template ([`Gguf::tiny_llama`]), whose every header field can be set
//! to anything, malformed included. [`Gguf::to_bytes`] also says where each header field lies
//! ([`Field`]), for the fuzzer to aim at. It is checked against the `gguf` package's reader by
//! `model_files::our_gguf_writer_agrees_with_the_gguf_package`.

use rand::{Rng, SeedableRng};

/// GGUF's metadata value types used here (the spec's `gguf_metadata_value_type`).
pub mod ty {
    pub const U8: u32 = 0;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
}

/// ggml's tensor types used here.
pub const F32: u32 = 0;
pub const Q8_0: u32 = 8;

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    U8(u8),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    /// An array: its element type, then its elements.
    Arr(u32, Vec<Val>),
}

impl Val {
    pub fn ty(&self) -> u32 {
        match self {
            Val::U8(_) => ty::U8,
            Val::I32(_) => ty::I32,
            Val::U32(_) => ty::U32,
            Val::U64(_) => ty::U64,
            Val::F32(_) => ty::F32,
            Val::Bool(_) => ty::BOOL,
            Val::Str(_) => ty::STRING,
            Val::Arr(..) => ty::ARRAY,
        }
    }

    pub fn strs(v: impl IntoIterator<Item = String>) -> Val {
        Val::Arr(ty::STRING, v.into_iter().map(Val::Str).collect())
    }
}

#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    /// GGUF's order: the innermost dimension first ([columns, rows] for a matrix).
    pub dims: Vec<u64>,
    pub dtype: u32,
    pub data: Vec<u8>,
}

/// What kind of header field lies at a position, for the fuzzer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The tensor or metadata count.
    Count,
    /// A string's or an array's length.
    Len,
    /// A metadata value's or an array's element type.
    ValueType,
    /// A scalar metadata value.
    Value,
    /// A tensor's dimension count.
    NDims,
    /// A tensor dimension.
    Dim,
    /// A tensor's ggml type.
    TensorType,
    /// A tensor's data offset.
    Offset,
}

/// A header field: its kind, where it starts and how wide it is (bytes).
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub kind: Kind,
    pub pos: usize,
    pub width: usize,
}

#[derive(Debug, Clone)]
pub struct Gguf {
    pub kv: Vec<(String, Val)>,
    pub tensors: Vec<TensorSpec>,
    /// What the data is padded to, whatever `general.alignment` says.
    pub pad: usize,
}

/// The tiny model's shape.
pub const HIDDEN: usize = 32;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const LAYERS: usize = 2;
pub const FFN: usize = 64;

/// GPT-2's byte-level alphabet: the character each byte is written as in the vocabulary.
fn byte_chars() -> Vec<char> {
    let printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut out = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).unwrap();
    }
    out
}

impl Gguf {
    /// A valid tiny Llama (2 layers, hidden 32, 4 heads over 2 KV heads, tied embeddings):
    /// F32 norms and attention, Q8_0 feed-forward weights, a vocabulary of the 256 byte
    /// characters, two merges and three special tokens, SmolLM2's chat markers.
    pub fn tiny_llama(seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        ];
        tokens.extend(byte_chars().into_iter().map(String::from));
        tokens.extend(["Ġt".to_string(), "he".to_string()]);
        let vocab = tokens.len();
        let types: Vec<Val> = (0..vocab)
            .map(|i| Val::I32(if i < 3 { 3 } else { 1 }))
            .collect();
        let template = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let s = |v: &str| Val::Str(v.into());
        let kv: Vec<(String, Val)> = vec![
            ("general.architecture".into(), s("llama")),
            ("general.alignment".into(), Val::U32(32)),
            ("general.name".into(), s("tiny test llama")),
            ("llama.block_count".into(), Val::U32(LAYERS as u32)),
            ("llama.context_length".into(), Val::U32(1024)),
            ("llama.embedding_length".into(), Val::U32(HIDDEN as u32)),
            ("llama.feed_forward_length".into(), Val::U32(FFN as u32)),
            ("llama.attention.head_count".into(), Val::U32(HEADS as u32)),
            (
                "llama.attention.head_count_kv".into(),
                Val::U32(KV_HEADS as u32),
            ),
            ("llama.rope.freq_base".into(), Val::F32(10000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Val::F32(1e-5),
            ),
            ("llama.vocab_size".into(), Val::U32(vocab as u32)),
            (
                "llama.rope.dimension_count".into(),
                Val::U32((HIDDEN / HEADS) as u32),
            ),
            ("tokenizer.ggml.add_bos_token".into(), Val::Bool(false)),
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s("smollm")),
            ("tokenizer.ggml.tokens".into(), Val::strs(tokens)),
            ("tokenizer.ggml.token_type".into(), Val::Arr(ty::I32, types)),
            (
                "tokenizer.ggml.merges".into(),
                Val::strs(["Ġ t".to_string(), "h e".to_string()]),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Val::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Val::U32(2)),
            ("tokenizer.ggml.padding_token_id".into(), Val::U32(2)),
            ("tokenizer.chat_template".into(), s(template)),
        ];
        let hd = HIDDEN / HEADS;
        let mut tensors = Vec::new();
        let mut f32s = |name: String, rows: usize, cols: usize, norm: bool, rng: &mut _| {
            let v: Vec<u8> = (0..rows * cols)
                .flat_map(|_| {
                    let x: f32 = if norm {
                        1.0
                    } else {
                        Rng::random_range(rng, -0.2..0.2)
                    };
                    x.to_le_bytes()
                })
                .collect();
            let dims = if rows == 1 {
                vec![cols as u64]
            } else {
                vec![cols as u64, rows as u64]
            };
            tensors.push(TensorSpec {
                name,
                dims,
                dtype: F32,
                data: v,
            });
        };
        f32s("token_embd.weight".into(), vocab, HIDDEN, false, &mut rng);
        let mut q8 = Vec::new();
        for l in 0..LAYERS {
            f32s(
                format!("blk.{l}.attn_norm.weight"),
                1,
                HIDDEN,
                true,
                &mut rng,
            );
            f32s(
                format!("blk.{l}.ffn_norm.weight"),
                1,
                HIDDEN,
                true,
                &mut rng,
            );
            f32s(
                format!("blk.{l}.attn_q.weight"),
                HEADS * hd,
                HIDDEN,
                false,
                &mut rng,
            );
            f32s(
                format!("blk.{l}.attn_k.weight"),
                KV_HEADS * hd,
                HIDDEN,
                false,
                &mut rng,
            );
            f32s(
                format!("blk.{l}.attn_v.weight"),
                KV_HEADS * hd,
                HIDDEN,
                false,
                &mut rng,
            );
            f32s(
                format!("blk.{l}.attn_output.weight"),
                HIDDEN,
                HEADS * hd,
                false,
                &mut rng,
            );
            q8.push((format!("blk.{l}.ffn_gate.weight"), FFN, HIDDEN));
            q8.push((format!("blk.{l}.ffn_up.weight"), FFN, HIDDEN));
            q8.push((format!("blk.{l}.ffn_down.weight"), HIDDEN, FFN));
        }
        f32s("output_norm.weight".into(), 1, HIDDEN, true, &mut rng);
        for (name, rows, cols) in q8 {
            // Q8_0: per 32 values an f16 scale (0.01) and 32 signed bytes.
            let mut data = Vec::new();
            for _ in 0..rows * cols / 32 {
                data.extend_from_slice(&0x211Fu16.to_le_bytes());
                data.extend((0..32).map(|_| rng.random::<i8>() as u8));
            }
            tensors.push(TensorSpec {
                name,
                dims: vec![cols as u64, rows as u64],
                dtype: Q8_0,
                data,
            });
        }
        Self {
            kv,
            tensors,
            pad: 32,
        }
    }

    /// Set a metadata value (added when absent).
    pub fn set(&mut self, key: &str, v: Val) -> &mut Self {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.kv.push((key.into(), v)),
        }
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.kv.retain(|(k, _)| k != key);
        self
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut TensorSpec {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    pub fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|t| t.name != name);
        self
    }

    /// The file's bytes (GGUF v3), and where each header field lies.
    pub fn to_bytes(&self) -> (Vec<u8>, Vec<Field>) {
        let mut w = Writer::default();
        w.raw(b"GGUF");
        w.u32(3);
        w.field(Kind::Count, &(self.tensors.len() as u64).to_le_bytes());
        w.field(Kind::Count, &(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            w.string(k);
            w.field(Kind::ValueType, &v.ty().to_le_bytes());
            w.value(v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            w.string(&t.name);
            w.field(Kind::NDims, &(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                w.field(Kind::Dim, &d.to_le_bytes());
            }
            w.field(Kind::TensorType, &t.dtype.to_le_bytes());
            w.field(Kind::Offset, &(offset as u64).to_le_bytes());
            offset += t.data.len().next_multiple_of(self.pad);
        }
        let mut out = w.out;
        out.resize(out.len().next_multiple_of(self.pad), 0);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(out.len().next_multiple_of(self.pad), 0);
        }
        (out, w.fields)
    }

    pub fn write(&self, path: &std::path::Path) {
        std::fs::write(path, self.to_bytes().0).unwrap();
    }
}

#[derive(Default)]
struct Writer {
    out: Vec<u8>,
    fields: Vec<Field>,
}

impl Writer {
    fn raw(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    fn u32(&mut self, v: u32) {
        self.raw(&v.to_le_bytes());
    }

    fn field(&mut self, kind: Kind, b: &[u8]) {
        self.fields.push(Field {
            kind,
            pos: self.out.len(),
            width: b.len(),
        });
        self.raw(b);
    }

    fn string(&mut self, s: &str) {
        self.field(Kind::Len, &(s.len() as u64).to_le_bytes());
        self.raw(s.as_bytes());
    }

    fn value(&mut self, v: &Val) {
        match v {
            Val::U8(x) => self.field(Kind::Value, &[*x]),
            Val::I32(x) => self.field(Kind::Value, &x.to_le_bytes()),
            Val::U32(x) => self.field(Kind::Value, &x.to_le_bytes()),
            Val::U64(x) => self.field(Kind::Value, &x.to_le_bytes()),
            Val::F32(x) => self.field(Kind::Value, &x.to_le_bytes()),
            Val::Bool(x) => self.field(Kind::Value, &[*x as u8]),
            Val::Str(s) => self.string(s),
            Val::Arr(et, items) => {
                self.field(Kind::ValueType, &et.to_le_bytes());
                self.field(Kind::Len, &(items.len() as u64).to_le_bytes());
                for i in items {
                    self.value(i);
                }
            }
        }
    }
}
