//! Shared helpers for tests on the real default model and the golden data.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use braid::model::LoadedModel;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn golden(name: &str) -> Vec<serde_json::Value> {
    let path = root().join("../shared/golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn default_model_path() -> PathBuf {
    let path = root().join(braid::model::DEFAULT_MODEL);
    assert!(path.exists(), "{} is missing: run `make model`", path.display());
    path
}

/// The default model, loaded once per test binary.
pub fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| braid::model::load(&default_model_path(), &candle_core::Device::Cpu).expect("default model loads"))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}
