//! Broken model files give clear errors naming the problem, never a panic.

mod common;

use std::path::Path;

fn load_err(path: &Path) -> String {
    match braid::loader::load(path, &braid::loader::Placement::Cpu) {
        Ok(_) => panic!("{} loaded, but it is broken", path.display()),
        Err(e) => e.to_string(),
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("braid-bad-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn original() -> Vec<u8> {
    std::fs::read(common::default_model_path()).unwrap()
}

#[test]
fn truncated_file_is_reported_as_truncated() {
    let bytes = original();
    let path = scratch("truncated.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&path);
    assert!(err.contains("truncated"), "{err}");
    // Cut inside the header too.
    std::fs::write(&path, &bytes[..1000]).unwrap();
    let err = load_err(&path);
    assert!(err.contains("not a valid GGUF file"), "{err}");
}

#[test]
fn wrong_magic_is_not_a_gguf_file() {
    let mut bytes = original()[..4096].to_vec();
    bytes[..4].copy_from_slice(b"GGML");
    let path = scratch("magic.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let err = load_err(&path);
    assert!(err.contains("not a valid GGUF file") && err.contains("magic"), "{err}");
}

#[test]
fn missing_file_names_the_path() {
    let err = load_err(Path::new("/nonexistent/model.gguf"));
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

/// A minimal GGUF (v3) writer for hand-made broken files.
struct Gguf {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<u8>,
    n_tensors: u64,
}

impl Gguf {
    fn new() -> Self {
        Self { kv: Vec::new(), n_kv: 0, tensors: Vec::new(), n_tensors: 0 }
    }
    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }
    fn kv_str(mut self, k: &str, v: &str) -> Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(8u32.to_le_bytes());
        Self::string(&mut self.kv, v);
        self.n_kv += 1;
        self
    }
    fn kv_u32(mut self, k: &str, v: u32) -> Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    fn kv_f32(mut self, k: &str, v: f32) -> Self {
        Self::string(&mut self.kv, k);
        self.kv.extend(6u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    fn tensor(mut self, name: &str, dims: &[u64], dtype: u32, offset: u64) -> Self {
        Self::string(&mut self.tensors, name);
        self.tensors.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(dtype.to_le_bytes());
        self.tensors.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }
    fn write(self, name: &str, data_bytes: usize) -> std::path::PathBuf {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(self.kv);
        out.extend(self.tensors);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(vec![0u8; data_bytes]);
        let path = scratch(name);
        std::fs::write(&path, out).unwrap();
        path
    }
}

fn llama_keys() -> Gguf {
    Gguf::new()
        .kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.embedding_length", 32)
        .kv_u32("llama.feed_forward_length", 64)
        .kv_u32("llama.attention.head_count", 4)
        .kv_u32("llama.context_length", 128)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
}

#[test]
fn unknown_tensor_type_is_named() {
    let path = llama_keys().tensor("token_embd.weight", &[32, 8], 99, 0).write("dtype.gguf", 1024);
    let err = load_err(&path);
    assert!(err.contains("not a valid GGUF file") && err.contains("dtype"), "{err}");
}

#[test]
fn unsupported_tensor_type_is_named() {
    // Type 15 (Q8_K) parses but is not a weight type braid computes with.
    let path = llama_keys().tensor("token_embd.weight", &[256, 8], 15, 0).write("q8k.gguf", 1 << 16);
    let err = load_err(&path);
    assert!(err.contains("token_embd.weight") && err.contains("Q8K"), "{err}");
}

#[test]
fn unsupported_architecture_is_named() {
    let path = Gguf::new().kv_str("general.architecture", "mamba").write("arch.gguf", 0);
    let err = load_err(&path);
    assert!(err.contains("unsupported model architecture 'mamba'"), "{err}");
}

#[test]
fn missing_metadata_key_is_named() {
    let path = Gguf::new().kv_str("general.architecture", "llama").write("key.gguf", 0);
    let err = load_err(&path);
    assert!(err.contains("llama.embedding_length") && err.contains("missing"), "{err}");
}

#[test]
fn missing_tokenizer_keys_are_named() {
    let path = llama_keys().write("tokenizer.gguf", 0);
    let err = load_err(&path);
    assert!(err.contains("tokenizer.ggml.model") && err.contains("missing"), "{err}");
    let path = llama_keys().kv_str("tokenizer.ggml.model", "gpt2").write("tokens.gguf", 0);
    let err = load_err(&path);
    assert!(err.contains("tokenizer.ggml.tokens") && err.contains("missing"), "{err}");
}
