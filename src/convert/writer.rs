//! A streaming GGUF (version 3) writer: the header first, whose sizes are known before any
//! tensor is computed, then each tensor's bytes as the caller produces them, so a model is never
//! held in memory whole. candle's `gguf_file::write` needs every tensor up front and writes
//! version 2. The file is written beside its target under a temporary name, fsynced and renamed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;

/// GGUF's default data alignment (llama.cpp's `GGUF_DEFAULT_ALIGNMENT`).
const ALIGNMENT: usize = 32;

/// A tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// Row-major, outermost first (candle's order; GGUF stores them innermost first).
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorEntry {
    pub fn bytes(&self) -> usize {
        let elems: usize = self.dims.iter().product();
        elems / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// ggml's type ids (`enum ggml_type`), which candle keeps crate-private.
pub fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn value_type_id(v: &Value) -> u32 {
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

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            // GGUF arrays hold one type; an empty one may name any.
            let ty = items.first().map_or(value_type_id(&Value::U32(0)), value_type_id);
            if items.iter().any(|i| value_type_id(i) != ty) {
                return Err(std::io::Error::other("a GGUF array mixes value types"));
            }
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}

fn padding(pos: usize) -> usize {
    pos.next_multiple_of(ALIGNMENT) - pos
}

/// Writes `path`: `metadata`, then `tensors`, whose bytes `data(i)` returns in order (it must
/// return exactly `tensors[i].bytes()` bytes). Nothing is left at `path` unless all of it was
/// written; an existing file there is replaced only at the end.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
    mut data: impl FnMut(usize) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| anyhow::anyhow!("{} names no file", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            write_str(&mut header, key)?;
            header.extend_from_slice(&value_type_id(value).to_le_bytes());
            write_value(&mut header, value)?;
        }
        let mut offset = 0usize;
        for t in tensors {
            write_str(&mut header, &t.name)?;
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for &d in t.dims.iter().rev() {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.bytes() + padding(t.bytes());
        }
        header.resize(header.len() + padding(header.len()), 0);
        w.write_all(&header)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i)?;
            anyhow::ensure!(
                bytes.len() == t.bytes(),
                "tensor {} came out as {} bytes, its header says {}",
                t.name,
                bytes.len(),
                t.bytes()
            );
            w.write_all(&bytes)?;
            w.write_all(&vec![0u8; padding(bytes.len())])?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable once the folder is synced.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
