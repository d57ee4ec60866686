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

/// What computes K/V from the weights: braid's version, the kernel family this CPU runs and the
/// kernels' revision. Every fingerprint starts with it.
fn build() -> String {
    format!(
        "braid {} kernels {} r{};",
        env!("CARGO_PKG_VERSION"),
        crate::cpu::linear::kernel_family(),
        crate::cpu::linear::KERNEL_REVISION
    )
}

/// Hashes the first `SAMPLE_BYTES` bytes of a tensor's data, which starts at byte `start`.
fn hash_sample(reader: &mut BufReader<File>, start: u64, buf: &mut Vec<u8>, h: &mut Xxh3) -> std::io::Result<()> {
    reader.seek(SeekFrom::Start(start))?;
    buf.clear();
    reader.take(SAMPLE_BYTES).read_to_end(buf)?;
    h.update(buf);
    Ok(())
}

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
    h.update(build().as_bytes());
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
        hash_sample(&mut reader, start, &mut sample, &mut h)?;
    }
    Ok(h.digest128())
}

/// The fingerprint of a Hugging Face folder: like `gguf_fingerprint`, over every file that
/// shapes the K/V — `config.json`, and of each `.safetensors` file its header (names, dtypes,
/// shapes, offsets) and the first bytes of every tensor — with braid's version and kernels.
pub fn folder_fingerprint(dir: &Path) -> std::io::Result<u128> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut h = Xxh3::new();
    h.update(format!("{} folder;", build()).as_bytes());
    h.update(&std::fs::read(dir.join("config.json"))?);
    let mut shards: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    for shard in shards {
        let mut reader = BufReader::new(File::open(&shard)?);
        let mut len = [0u8; 8];
        reader.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(bad(format!("{}: a safetensors header of {len} bytes", shard.display())));
        }
        let mut header = vec![0u8; len as usize];
        reader.read_exact(&mut header)?;
        h.update(&header);
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("{}: {e}", shard.display())))?;
        let mut starts: Vec<u64> = header.values().filter_map(|t| t.get("data_offsets")?.get(0)?.as_u64()).collect();
        starts.sort_unstable();
        let mut sample = Vec::with_capacity(SAMPLE_BYTES as usize);
        for start in starts {
            hash_sample(&mut reader, 8 + len + start, &mut sample, &mut h)?;
        }
    }
    Ok(h.digest128())
}

/// The fingerprint of dummy weights (`--load-format dummy`): the preset and seed they are drawn
/// from, and what computes the K/V from them.
pub fn dummy_fingerprint(preset: &str, seed: u64) -> u128 {
    let mut h = Xxh3::new();
    h.update(format!("{} dummy {preset} seed {seed}", build()).as_bytes());
    h.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder's fingerprint is stable, and moves when its config or any tensor's leading
    /// bytes change (a fine-tune of the same shape).
    #[test]
    fn folder_fingerprint_tells_weights_and_configs_apart() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/llama");
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
        }
        let base = folder_fingerprint(dir.path()).unwrap();
        assert_eq!(base, folder_fingerprint(&fixture).unwrap());
        let weights = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + header + 1] ^= 1;
        std::fs::write(&weights, &bytes).unwrap();
        let tweaked = folder_fingerprint(dir.path()).unwrap();
        assert_ne!(base, tweaked);
        let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        std::fs::write(dir.path().join("config.json"), config.replace("\"rms_norm_eps\"", "\"rms_norm_eps\" "))
            .unwrap();
        assert_ne!(tweaked, folder_fingerprint(dir.path()).unwrap());
    }
}
