//! A GGUF file's header, walked and checked before candle reads it.
//!
//! candle's reader trusts some of the header: `general.alignment` divides (zero panics), a
//! tensor's dimensions are multiplied (an overflow panics) and its offset and size are looked at
//! only when the tensor is read; and it holds every metadata value as a 32-byte `Value`, so a
//! file of one-byte array elements would take 32 times its size. This walk keeps no values:
//! every length is read against the bytes the file has left before anything is skipped or
//! allocated, and what candle or the engine could not use is refused, naming the key or tensor.
//! (Spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.)

use crate::error::{bail, ensure, Context, Result};
use candle_core::quantized::GgmlDType;
use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};

/// "GGUF" read as a little-endian u32. (candle also takes the byte-swapped magic, but reads
/// such a file as little-endian anyway: the numbers would be garbage.)
const MAGIC: u32 = 0x4655_4747;
/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// candle's limit on arrays nested in arrays (GGUF_MAX_VALUE_DEPTH).
const MAX_DEPTH: usize = 64;
/// The alignment when `general.alignment` is absent (GGUF_DEFAULT_ALIGNMENT).
const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata may take this much memory beyond [`MEMORY_PER_FILE_BYTE`] times the file's size.
const MEMORY_FLOOR: u64 = 64 << 20;
const MEMORY_PER_FILE_BYTE: u64 = 8;

const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

fn type_name(t: u32) -> &'static str {
    match t {
        T_U8 => "u8",
        T_I8 => "i8",
        T_U16 => "u16",
        T_I16 => "i16",
        T_U32 => "u32",
        T_I32 => "i32",
        T_F32 => "f32",
        T_BOOL => "bool",
        T_STRING => "string",
        T_ARRAY => "array",
        T_U64 => "u64",
        T_I64 => "i64",
        T_F64 => "f64",
        _ => "unknown type",
    }
}

/// The tensor types candle reads, by their GGUF number (ggml.h's `ggml_type`).
fn ggml_dtype(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Walk the header of the GGUF file `r` (from its current position) and check what candle
/// trusts. The error says what is wrong, without the file's name.
pub(crate) fn check<R: Read + Seek>(r: &mut R) -> Result<()> {
    let start = r.stream_position()?;
    let end = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(start))?;
    let mut w = Walk {
        r,
        pos: start,
        size: end,
        wide: true,
        memory: 0,
    };
    w.header()
}

struct Walk<'a, R> {
    r: &'a mut R,
    pos: u64,
    size: u64,
    /// Lengths and counts are u64 (GGUF v2 and v3), not u32 (v1).
    wide: bool,
    /// What candle will allocate for the metadata, roughly.
    memory: u64,
}

/// A tensor's data, from its header entry, to be checked against the file's end once the
/// data's start is known.
struct Extent {
    name: String,
    offset: u64,
    bytes: u64,
}

impl<R: Read + Seek> Walk<'_, R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    /// Make sure `n` more bytes are there for `what`.
    fn need(&self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        let left = self.left();
        ensure!(
            n <= left,
            "{}: {n} bytes needed, but the file ends {left} bytes later (is it cut short?)",
            what()
        );
        Ok(())
    }

    fn take<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(what)?))
    }

    /// A length or count: u32 in GGUF v1, u64 after.
    fn len(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        if self.wide {
            self.u64(what)
        } else {
            Ok(self.u32(what)? as u64)
        }
    }

    fn len_size(&self) -> u64 {
        if self.wide {
            8
        } else {
            4
        }
    }

    fn skip(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        self.need(n, what)?;
        // `need` bounds n by the file's size, far below i64::MAX.
        self.r.seek_relative(n as i64)?;
        self.pos += n;
        Ok(())
    }

    /// A string's length, checked against the file; the caller reads or skips that many bytes.
    fn string_len(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        let n = self.len(what)?;
        self.need(n, &|| format!("{} (a string of {n} bytes)", what()))?;
        self.memory = self.memory.saturating_add(n);
        Ok(n)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.string_len(what)?;
        // Bounded by the file's size (`string_len`).
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b)?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn header(&mut self) -> Result<()> {
        let magic = self.u32(&|| "the magic number".into())?;
        ensure!(
            magic == MAGIC,
            "it does not start with \"GGUF\" (magic number {magic:#010x})"
        );
        let version = self.u32(&|| "the version".into())?;
        ensure!(
            (1..=3).contains(&version),
            "GGUF version {version} is not one this engine reads (1 to 3)"
        );
        self.wide = version >= 2;
        let tensors = self.len(&|| "the tensor count".into())?;
        let kvs = self.len(&|| "the metadata count".into())?;
        // The least each entry takes: a metadata entry a key length, a type and one byte; a
        // tensor entry a name length, a dimension count, a type and an offset.
        let min = kvs
            .saturating_mul(self.len_size() + 4 + 1)
            .saturating_add(tensors.saturating_mul(self.len_size() + 4 + 4 + 8));
        self.need(min, &|| {
            format!("the header's {tensors} tensors and {kvs} metadata entries")
        })?;
        let mut keys = HashSet::new();
        let mut alignment = DEFAULT_ALIGNMENT;
        for i in 0..kvs {
            let key = self.string(&|| format!("metadata entry {i}'s key"))?;
            let ty = self.u32(&|| format!("metadata {key}'s type"))?;
            if key == "general.alignment" {
                alignment = self.alignment(ty)?;
            } else {
                self.value(ty, &key, 0)?;
            }
            self.memory = self.memory.saturating_add(value_memory(1));
            ensure!(keys.insert(key.clone()), "metadata {key} appears twice");
        }
        let budget = self
            .size
            .saturating_mul(MEMORY_PER_FILE_BYTE)
            .saturating_add(MEMORY_FLOOR);
        ensure!(
            self.memory <= budget,
            "its metadata would take about {} MiB of memory to read, more than a file of {} bytes can honestly need",
            self.memory >> 20,
            self.size
        );
        let mut names = HashSet::new();
        let mut extents = Vec::new();
        for i in 0..tensors {
            let e = self.tensor_info(i)?;
            ensure!(
                names.insert(e.name.clone()),
                "tensor {} appears twice",
                e.name
            );
            extents.push(e);
        }
        let data = self
            .pos
            .div_ceil(alignment)
            .checked_mul(alignment)
            .context("the tensor data's start overflows")?;
        for e in &extents {
            let end = data
                .checked_add(e.offset)
                .and_then(|s| s.checked_add(e.bytes));
            ensure!(
                end.is_some_and(|end| end <= self.size),
                "tensor {}'s data ({} bytes at offset {} after the header's {} bytes) lies beyond the end of the file ({} bytes; is it cut short?)",
                e.name,
                e.bytes,
                e.offset,
                data,
                self.size
            );
        }
        Ok(())
    }

    /// `general.alignment`: candle divides by it, and silently uses 32 when it has a type
    /// candle does not read, so anything but a power of two of a type it reads is refused.
    fn alignment(&mut self, ty: u32) -> Result<u64> {
        let what = || "metadata general.alignment".to_string();
        let v: i64 = match ty {
            T_U8 => self.take::<1>(&what)?[0] as i64,
            T_I8 => i8::from_le_bytes(self.take(&what)?) as i64,
            T_U16 => u16::from_le_bytes(self.take(&what)?) as i64,
            T_I16 => i16::from_le_bytes(self.take(&what)?) as i64,
            T_U32 => self.u32(&what)? as i64,
            T_I32 => i32::from_le_bytes(self.take(&what)?) as i64,
            t => bail!("general.alignment is a {}, expected u32", type_name(t)),
        };
        ensure!(
            v > 0 && (v as u64).is_power_of_two(),
            "general.alignment is {v}; it must be a power of two (GGUF's default is 32)"
        );
        Ok(v as u64)
    }

    /// Skip one metadata value of type `ty`, checking every length on the way.
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<()> {
        let what = || format!("metadata {key}");
        match ty {
            T_BOOL => {
                let b = self.take::<1>(&what)?[0];
                ensure!(b <= 1, "metadata {key}: a bool stored as {b} (not 0 or 1)");
            }
            T_STRING => {
                let n = self.string_len(&what)?;
                self.skip(n, &what)?;
            }
            T_ARRAY => {
                ensure!(
                    depth < MAX_DEPTH,
                    "metadata {key}: arrays nested more than {MAX_DEPTH} deep"
                );
                let et = self.u32(&what)?;
                let n = self.len(&what)?;
                let min = match fixed_size(et) {
                    Some(s) => s,
                    None if et == T_STRING => self.len_size(),
                    None if et == T_ARRAY => 4 + self.len_size(),
                    None => bail!("metadata {key}: an array of unknown type {et}"),
                };
                self.need(n.saturating_mul(min), &|| {
                    format!("metadata {key} (an array of {n} {}s)", type_name(et))
                })?;
                self.memory = self.memory.saturating_add(value_memory(n));
                match fixed_size(et) {
                    // Bools are checked one by one; other scalars need no look.
                    Some(s) if et != T_BOOL => self.skip(n * s, &what)?,
                    _ => {
                        for _ in 0..n {
                            self.value(et, key, depth + 1)?;
                        }
                    }
                }
            }
            t => match fixed_size(t) {
                Some(s) => self.skip(s, &what)?,
                None => bail!("metadata {key} has unknown type {t}"),
            },
        }
        Ok(())
    }

    fn tensor_info(&mut self, i: u64) -> Result<Extent> {
        let name = self.string(&|| format!("tensor entry {i}'s name"))?;
        let what = || format!("tensor {name}'s entry");
        let n_dims = self.u32(&what)?;
        ensure!(
            n_dims <= MAX_DIMS,
            "tensor {name} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}"
        );
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.len(&what)?);
        }
        let ty = self.u32(&what)?;
        let dtype = ggml_dtype(ty)
            .with_context(|| format!("tensor {name} has type {ty}, which candle does not read"))?;
        let offset = self.u64(&what)?;
        let elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok())
            .with_context(|| {
                format!("tensor {name}'s dimensions {dims:?} multiply past any memory")
            })?;
        let block = dtype.block_size() as u64;
        // GGUF lists the innermost dimension first; quantized blocks run along it.
        ensure!(
            dims.first().is_none_or(|d| d % block == 0),
            "tensor {name} ({dtype:?}, dimensions {dims:?}): its rows of {} elements are not whole blocks of {block}",
            dims[0]
        );
        let bytes = (elements / block)
            .checked_mul(dtype.type_size() as u64)
            .with_context(|| format!("tensor {name}'s size in bytes overflows"))?;
        Ok(Extent {
            name,
            offset,
            bytes,
        })
    }
}

/// The size of a scalar of type `t`, or `None` for strings, arrays and unknown types.
fn fixed_size(t: u32) -> Option<u64> {
    match t {
        T_U8 | T_I8 | T_BOOL => Some(1),
        T_U16 | T_I16 => Some(2),
        T_U32 | T_I32 | T_F32 => Some(4),
        T_U64 | T_I64 | T_F64 => Some(8),
        _ => None,
    }
}

/// What `n` metadata values take in candle's memory (each a `gguf_file::Value`).
fn value_memory(n: u64) -> u64 {
    n.saturating_mul(std::mem::size_of::<candle_core::quantized::gguf_file::Value>() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use std::io::Cursor;

    /// A GGUF file with these metadata and one 2 x 32 f32 tensor, by candle's writer.
    fn file(md: &[(&str, Value)]) -> Vec<u8> {
        let t = Tensor::ones((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut c = Cursor::new(Vec::new());
        gguf_file::write(&mut c, &md, &[("w", &q)]).unwrap();
        c.into_inner()
    }

    fn walk(b: &[u8]) -> Result<()> {
        check(&mut Cursor::new(b))
    }

    fn refused(b: &[u8], says: &str) {
        let e = walk(b).expect_err(says).to_string();
        assert!(e.contains(says), "{e:?} does not say {says:?}");
    }

    /// Where `needle` starts in `b`.
    fn find(b: &[u8], needle: &[u8]) -> usize {
        b.windows(needle.len()).position(|w| w == needle).unwrap()
    }

    #[test]
    fn a_valid_file_passes_and_candle_reads_it() {
        let b = file(&[
            ("general.alignment", Value::U32(32)),
            ("a", Value::Array(vec![Value::String("x".into()); 3])),
            ("b", Value::Bool(true)),
        ]);
        walk(&b).unwrap();
        gguf_file::Content::read(&mut Cursor::new(&b)).unwrap();
    }

    #[test]
    fn an_alignment_candle_would_divide_by_or_ignore_is_refused() {
        refused(
            &file(&[("general.alignment", Value::U32(0))]),
            "general.alignment is 0",
        );
        refused(
            &file(&[("general.alignment", Value::U32(24))]),
            "general.alignment is 24",
        );
        refused(
            &file(&[("general.alignment", Value::I32(-32))]),
            "general.alignment is -32",
        );
        refused(
            &file(&[("general.alignment", Value::U64(32))]),
            "general.alignment is a u64, expected u32",
        );
    }

    #[test]
    fn lengths_beyond_the_file_are_refused_before_allocating() {
        let b = file(&[("a", Value::Array(vec![Value::U8(1); 4]))]);
        // The array's length, after its key and the array and element types.
        let at = find(&b, b"a") + 1 + 4 + 4;
        let mut huge = b.clone();
        huge[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        refused(&huge, "the file ends");
        // The key's own length.
        let mut key = b.clone();
        key[at - 17..at - 9].copy_from_slice(&u64::MAX.to_le_bytes());
        refused(&key, "the file ends");
    }

    #[test]
    fn tensor_dimensions_types_and_offsets_are_checked() {
        let b = file(&[]);
        let name = find(&b, b"w");
        let (n_dims, dim0) = (name + 1, name + 5);
        let (dtype, offset) = (dim0 + 16, dim0 + 20);
        let with = |at: usize, v: &[u8]| {
            let mut c = b.clone();
            c[at..at + v.len()].copy_from_slice(v);
            c
        };
        refused(&with(n_dims, &5u32.to_le_bytes()), "5 dimensions");
        refused(
            &with(dim0, &(1u64 << 63).to_le_bytes()),
            "multiply past any memory",
        );
        refused(&with(dtype, &99u32.to_le_bytes()), "type 99");
        // Q8_0: rows of 32 elements are whole blocks; of 31 they are not.
        let mut q8 = with(dim0, &31u64.to_le_bytes());
        q8[dtype..dtype + 4].copy_from_slice(&8u32.to_le_bytes());
        refused(&q8, "not whole blocks");
        refused(
            &with(offset, &4096u64.to_le_bytes()),
            "beyond the end of the file",
        );
        refused(&b[..b.len() - 1], "beyond the end of the file");
    }

    #[test]
    fn duplicates_and_unknown_types_are_refused() {
        let b = file(&[("k", Value::U32(1)), ("j", Value::U32(2))]);
        let mut dup = b.clone();
        let j = find(&dup, b"j");
        dup[j] = b'k';
        refused(&dup, "metadata k appears twice");
        let mut ty = b.clone();
        ty[j + 1..j + 5].copy_from_slice(&77u32.to_le_bytes());
        refused(&ty, "unknown type 77");
    }
}
