//! The GGUF container, written as a stream (spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! version 3, the metadata, every tensor's name, dimensions (ggml's order: columns first), type
//! and offset, then each tensor's data at a 32-byte boundary (`general.alignment` left out: 32
//! is the default every reader assumes), the file atomically in place when whole.
//!
//! candle has a writer (`gguf_file::write`), but it takes every tensor quantized in memory at
//! once, as a `QTensor`: beside the loaded model, another copy of it (4.4 GB for TinyLlama in
//! f32), and SmolLM2 merged to f32 took 10 s with it on a 2-core VM, 5 s with this writer (the
//! same bytes but for the version: candle writes version 2). Here the data of one tensor at a
//! time is asked for, written and dropped. Metadata values are candle's `gguf_file::Value`,
//! written with the type each carries.

use crate::error::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;

/// A tensor's header entry.
pub(super) struct TensorInfo {
    pub(super) name: String,
    /// Rows first, as candle holds them (`[out, in]` for a weight).
    pub(super) dims: Vec<usize>,
    pub(super) dtype: GgmlDType,
}

impl TensorInfo {
    /// Bytes of its data: whole blocks of its type.
    fn bytes(&self) -> Result<u64> {
        let n: usize = self.dims.iter().product();
        let bs = self.dtype.block_size();
        ensure!(
            n.is_multiple_of(bs),
            "internal: {} has {n} values, not whole {:?} blocks",
            self.name,
            self.dtype
        );
        Ok((n / bs * self.dtype.type_size()) as u64)
    }
}

/// ggml's number for a tensor type (ggml.h's `ggml_type`), for the types this writer writes.
fn ggml_type(t: GgmlDType) -> Result<u32> {
    Ok(match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 8,
        other => bail!("internal: the GGUF writer does not write {other:?} tensors"),
    })
}

/// GGUF's number for a metadata value's type.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// A value without its type tag. An array's elements must share a type (an empty array is
/// written as one of u32: it has no element to say otherwise).
fn value(w: &mut impl Write, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x])?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[*x as u8])?,
        Value::String(s) => string(w, s)?,
        Value::Array(items) => {
            let t = items.first().map(value_type).unwrap_or(4);
            ensure!(
                items.iter().all(|i| value_type(i) == t),
                "internal: metadata {key} mixes value types in one array"
            );
            w.write_all(&t.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for i in items {
                value(w, key, i)?;
            }
        }
    }
    Ok(())
}

/// Zero bytes from `pos` to the next multiple of [`ALIGNMENT`].
fn pad(w: &mut impl Write, pos: u64) -> std::io::Result<u64> {
    let n = pos.next_multiple_of(ALIGNMENT) - pos;
    w.write_all(&vec![0u8; n as usize])?;
    Ok(pos + n)
}

/// Write `path`: `metadata`, then `tensors`, whose data `data(i)` returns for the i-th, one at a
/// time, in order. Returns the file's size.
pub(super) fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorInfo],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut header, k)?;
        header.extend_from_slice(&value_type(v).to_le_bytes());
        value(&mut header, k, v)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        string(&mut header, &t.name)?;
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&ggml_type(t.dtype)?.to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.bytes()?).next_multiple_of(ALIGNMENT);
    }
    let mut size = 0;
    crate::fsutil::write_atomic_with(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&header)?;
        let mut pos = pad(&mut w, header.len() as u64)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i).with_context(|| format!("tensor {}", t.name))?;
            ensure!(
                bytes.len() as u64 == t.bytes()?,
                "internal: {} is {} bytes, its header says {}",
                t.name,
                bytes.len(),
                t.bytes()?
            );
            w.write_all(&bytes)?;
            pos = pad(&mut w, pos + bytes.len() as u64)?;
        }
        w.flush()?;
        size = pos;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    /// What this writer writes, candle's reader reads back: values with their types, tensors
    /// with their shapes, types and bytes, at aligned offsets.
    #[test]
    fn candle_reads_back_what_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let md = vec![
            ("a.u32".to_string(), Value::U32(7)),
            ("a.f32".to_string(), Value::F32(0.5)),
            ("a.bool".to_string(), Value::Bool(true)),
            ("a.s".to_string(), Value::String("llama".into())),
            (
                "a.arr".to_string(),
                Value::Array(vec![Value::I32(1), Value::I32(-2)]),
            ),
        ];
        let tensors = vec![
            TensorInfo {
                name: "x".into(),
                dims: vec![3],
                dtype: GgmlDType::F32,
            },
            TensorInfo {
                name: "w".into(),
                dims: vec![2, 32],
                dtype: GgmlDType::Q8_0,
            },
        ];
        let x: Vec<u8> = [1f32, 2., 3.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let w: Vec<u8> = (0..68).map(|i| i as u8).collect();
        let size = write(&path, &md, &tensors, |i| {
            Ok([x.clone(), w.clone()][i].clone())
        })
        .unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let mut f = std::fs::File::open(&path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(c.metadata["a.u32"].to_u32().unwrap(), 7);
        assert_eq!(c.metadata["a.f32"].to_f32().unwrap(), 0.5);
        assert!(c.metadata["a.bool"].to_bool().unwrap());
        assert_eq!(c.metadata["a.s"].to_string().unwrap(), "llama");
        assert_eq!(
            c.metadata["a.arr"].to_vec().unwrap()[1].to_i32().unwrap(),
            -2
        );
        assert_eq!(c.tensor_infos["w"].shape.dims(), &[2, 32]);
        assert_eq!(c.tensor_infos["w"].ggml_dtype, GgmlDType::Q8_0);
        assert_eq!(c.tensor_infos["w"].offset % ALIGNMENT, 0);
        let t = c.tensor(&mut f, "x", &candle_core::Device::Cpu).unwrap();
        let back: Vec<f32> = t
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, [1., 2., 3.]);
        assert_eq!(
            c.tensor(&mut f, "w", &candle_core::Device::Cpu)
                .unwrap()
                .data()
                .unwrap()
                .as_ref(),
            &w[..]
        );
    }
}
