//! A model file's fingerprint: what tells stored K/V of one model from those of another.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use xxhash_rust::xxh3::Xxh3;

/// Bytes of each tensor's data that go into the fingerprint. Two fine-tunes (or two
/// quantizations) of one architecture share names and shapes; their weights differ everywhere,
/// so the first bytes of every tensor tell them apart without reading the whole file.
const SAMPLE_BYTES: u64 = 4096;

/// xxh3-128 of a GGUF file's metadata (every key and value), its tensor names, types, shapes
/// and offsets, and the first bytes of every tensor; and of what computes the K/V from it:
/// braid's version and the kernel family this CPU runs. (Kernels differ in the last bits of
/// their sums, so blocks another build or another CPU computed would make a cached prompt's
/// output differ from the same prompt computed here.)
pub fn gguf_fingerprint(path: &Path) -> std::io::Result<u128> {
    let bad = |e: candle_core::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
    let mut reader = BufReader::new(File::open(path)?);
    let content = Content::read(&mut reader).map_err(bad)?;
    let mut h = Xxh3::new();
    h.update(
        format!("braid {} kernels {};", env!("CARGO_PKG_VERSION"), crate::cpu::linear::kernel_family()).as_bytes(),
    );
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    for key in keys {
        h.update(key.as_bytes());
        h.update(format!("={:?};", content.metadata[key]).as_bytes());
    }
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in &names {
        let info = &content.tensor_infos[*name];
        h.update(format!("{name}:{:?}:{:?}:{};", info.ggml_dtype, info.shape.dims(), info.offset).as_bytes());
    }
    let mut sample = Vec::with_capacity(SAMPLE_BYTES as usize);
    for name in names {
        let start = content.tensor_data_offset + content.tensor_infos[name].offset;
        reader.seek(SeekFrom::Start(start))?;
        sample.clear();
        (&mut reader).take(SAMPLE_BYTES).read_to_end(&mut sample)?;
        h.update(&sample);
    }
    Ok(h.digest128())
}

/// The fingerprint of dummy weights (`--load-format dummy`): the preset and seed they are drawn
/// from, and what computes the K/V from them.
pub fn dummy_fingerprint(preset: &str, seed: u64) -> u128 {
    let mut h = Xxh3::new();
    h.update(
        format!(
            "braid {} kernels {}; dummy {preset} seed {seed}",
            env!("CARGO_PKG_VERSION"),
            crate::cpu::linear::kernel_family()
        )
        .as_bytes(),
    );
    h.digest128()
}
