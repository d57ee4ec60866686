//! The CPU kernels the CPU model computes with, each matching llama.cpp's arithmetic to the bit
//! and giving a row the same bits whatever else is batched with it: quantized and bf16 matrix
//! products, paged attention over the f16 KV cache, RMS norm, rope and elementwise math.
//! Nothing here knows an architecture: `model/` composes these into one.

pub mod attention;
pub mod bf16;
pub mod draw;
pub mod f16_ops;
pub mod linear;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod row;
pub mod vmath;
