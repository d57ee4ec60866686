// braid's CUDA kernels, one module: the llama forward pass around cuBLAS's matrix products, and
// braid's own products (batch-invariant, and few-row ones for decode). Compiled by build.rs
// with nvcc, without FMA contraction, so that each kernel fuses only where it says so (rope
// and SwiGLU round as braid's CPU code does). The CPU follows llama.cpp's roundings where the
// GPU keeps its own: f16 running sums in attention, the order of every sum.
//
// Layouts (row-major, one row per token of the flat batch):
//   residual x        f32  [n, hidden]
//   matrix inputs     bf16, matrix outputs f32
//   KV cache          f16  [num_blocks, block_size, n_kv_head, head_dim] per layer, K and V apart

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kernels/pointwise.cuh"
#include "kernels/attention.cuh"
#include "kernels/gemm.cuh"
#include "kernels/gemv.cuh"
