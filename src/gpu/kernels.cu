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

// Programmatic dependent launch (compute capability 9.0): braid launches its kernels so that one
// may start while the kernel before it finishes (runtime.rs, `launch_raw`). Each kernel must
// therefore wait, in every block and before it exits, for the previous kernel's results (and
// before writing anything that kernel reads); only weights, which no kernel writes, may be
// read before. Each block first lets the next kernel be launched: its blocks take the places
// this one's leave and wait in turn (releasing after the wait measured slower).
// The batch-invariant few-row product (igemv.cuh) releases after its wait instead. Without the
// launch attribute, or below 9.0, both are no-ops.
__device__ __forceinline__ void pdl_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_enter() {
    pdl_release();
    pdl_wait();
}

// Dynamic shared memory of the products' pipelines (sized at launch by invariant.rs).
extern __shared__ __align__(16) unsigned char dynamic_smem[];

#include "kernels/pointwise.cuh"
#include "kernels/sample.cuh"
#include "kernels/attention.cuh"
#include "kernels/gemm.cuh"
#include "kernels/gemv.cuh"
#include "kernels/igemv.cuh"
#include "kernels/wgmma.cuh"
