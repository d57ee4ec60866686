//! Shared helpers for tests on the real default model and the golden data.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use braid::loader::LoadedModel;

pub mod solo;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn golden(name: &str) -> Vec<serde_json::Value> {
    // BRAID_GOLDEN_DIR: where a copy of the golden data lives (a GPU machine without ../shared).
    let dir = std::env::var_os("BRAID_GOLDEN_DIR").map_or_else(|| root().join("../shared/golden"), PathBuf::from);
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn default_model_path() -> PathBuf {
    // BRAID_MODEL: the default model elsewhere (a GPU machine running a copied test binary).
    let path = std::env::var_os("BRAID_MODEL").map_or_else(|| root().join(braid::loader::DEFAULT_MODEL), PathBuf::from);
    assert!(path.exists(), "{} is missing: run `make model`", path.display());
    path
}

/// The default model, loaded once per test binary.
pub fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| braid::loader::load(&default_model_path(), &test_placement()).expect("default model loads"))
}

/// Where the tests put the model: the CPU, unless BRAID_TEST_DEVICE=cuda (a build with the
/// `cuda` feature on a GPU machine runs the same tests there).
pub fn test_placement() -> braid::loader::Placement {
    match std::env::var("BRAID_TEST_DEVICE").as_deref() {
        #[cfg(feature = "cuda")]
        Ok("cuda") => braid::loader::Placement::cuda(false).expect("a CUDA device"),
        Ok("cpu") | Err(_) => braid::loader::Placement::Cpu,
        Ok(other) => panic!(
            "BRAID_TEST_DEVICE={other}: this build knows cpu{}",
            if cfg!(feature = "cuda") { " and cuda" } else { "" }
        ),
    }
}

/// Whether the tests run on the CPU, whose arithmetic is llama.cpp's to the bit (the GPU runs
/// the weights dequantized to bf16: close to llama.cpp, not identical).
pub fn on_cpu() -> bool {
    matches!(test_placement(), braid::loader::Placement::Cpu)
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}
