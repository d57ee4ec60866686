//! The CUDA path (feature `cuda`): braid's own kernels (kernels.cu, kernels/) and cuBLAS over bf16
//! weights, with a paged f16 KV cache on the device. The engine drives it exactly as it drives
//! the CPU model: one flat batch per step.

mod attention;
mod invariant;
mod plan;
pub mod runner;
pub mod runtime;
mod variants;
pub mod weights;

pub use runner::CudaRunner;
pub use runtime::{GemmKind, Gpu, GpuError, available};
pub use weights::CudaWeights;

#[cfg(test)]
mod attention_tests;
#[cfg(test)]
mod invariant_tests;
#[cfg(test)]
mod sample_tests;
#[cfg(test)]
mod tests;
