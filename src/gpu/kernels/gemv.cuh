// Products of a few rows, with norms, rope and SwiGLU folded in (included by ../kernels.cu).
#pragma once

// ---------------------------------------------------------------------------------------------
// Products of a few rows (decode of 1-4 sequences): y[m, n] = x[m, k] · w[n, k]ᵀ (+ y), M = m.
// Reading the weights once at full bandwidth is all that matters here: each warp owns two
// weight rows and streams them with 16-byte loads, two k-steps in flight; the activations
// (a few KB) stay in L1. Used instead of cuBLAS's kernels for m <= 4, which leave a 2048-wide
// matrix latency-bound. k must be a multiple of 8.

#define GEMV_WARPS 4
#define GEMV_ROWS 2  // weight rows per warp

__device__ __forceinline__ void bf16x8_to_float(uint4 raw, float* out) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// What a few-row product reads and where it writes (one struct: the variants share it).
//   input:  x (bf16 rows [M, k]); or, with norm_w, the f32 residual rows normalised inside as
//           rms_norm_bf16 does (each block computes the rows' scale itself). (SwiGLU inside the
//           down product was tried and dropped: every block recomputing it made that product
//           slower than the launch it saved.)
//   output: y (f32 [M, n], + y with accumulate); or, with q_out, the QKV row finished as
//           rope_and_cache does (interleaved rope): bias, rotation, Q to q_out, K and V to
//           their cache slots, a warp's two rows being one rotation pair; or, with act_out, the
//           interleaved gate/up row finished as silu_mul_bf16 does, a warp's two rows being
//           one (gate, up) pair: bf16 [M, n / 2].
struct GemvArgs {
    const __nv_bfloat16* x;
    const float* residual;
    const float* norm_w;
    float eps;
    int accumulate;
    const uint32_t* positions;
    const uint32_t* slots;
    const float* cos_table;
    const float* sin_table;
    const float* bias;
    float* q_out;
    __half* k_cache;
    __half* v_cache;
    int n_head, n_kv_head, head_dim, rope_dim;
    __nv_bfloat16* act_out;
};

// Writes the sums v0, v1 of activation row j and the adjacent output columns col, col + 1 (col
// even) as the product's mode asks: y (+ y); or SwiGLU of a (gate, up) pair into act_out; or a
// QKV pair finished as rope_and_cache does (bias, rotation, Q out, K and V into their slots).
__device__ __forceinline__ void few_row_finish(const GemvArgs& a, float* __restrict__ y, int n, int j, int col, float v0, float v1) {
    if (a.act_out) {
        a.act_out[(size_t)j * (n / 2) + col / 2] = __float2bfloat16_rn(silu_mul(v0, v1, col / 2, n / 2));
        return;
    }
    if (!a.q_out) {
        const float v[2] = {v0, v1};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (col + r < n) {
                float* out = y + (size_t)j * n + col + r;
                *out = a.accumulate ? __fadd_rn(v[r], *out) : v[r];
            }
        }
        return;
    }
    // Columns col, col + 1 are dims (d, d + 1) of one head.
    const int q_width = a.n_head * a.head_dim, kv_width = a.n_kv_head * a.head_dim;
    const int head = col / a.head_dim, d = col % a.head_dim;
    float x0 = v0, x1 = v1;
    if (a.bias) { x0 = __fadd_rn(x0, a.bias[col]); x1 = __fadd_rn(x1, a.bias[col + 1]); }
    const size_t slot = a.slots[j];
    if (head < a.n_head + a.n_kv_head && d < a.rope_dim) {
        const int half_rope = a.rope_dim / 2, i = d / 2;
        const float cs = a.cos_table[(size_t)a.positions[j] * half_rope + i];
        const float sn = a.sin_table[(size_t)a.positions[j] * half_rope + i];
        // Fused as the CPU's rope (rope.rs) fuses it, after llama.cpp.
        const float y0 = __fmaf_rn(x0, cs, -__fmul_rn(x1, sn));
        const float y1 = __fmaf_rn(x0, sn, __fmul_rn(x1, cs));
        x0 = y0; x1 = y1;
    }
    if (head < a.n_head) {
        a.q_out[(size_t)j * q_width + col] = x0;
        a.q_out[(size_t)j * q_width + col + 1] = x1;
    } else if (head < a.n_head + a.n_kv_head) {
        __half* kp = a.k_cache + slot * kv_width + (col - q_width);
        kp[0] = __float2half_rn(x0); kp[1] = __float2half_rn(x1);
    } else {
        __half* vp = a.v_cache + slot * kv_width + (col - q_width - kv_width);
        vp[0] = __float2half_rn(x0); vp[1] = __float2half_rn(x1);
    }
}

// Row j's values at chunk c (8 values of k) normalised as rms_norm_bf16 does, rounded to bf16.
__device__ __forceinline__ void gemv_norm_chunk(const GemvArgs& a, int k, int j, int c, float scale, float (&out)[8]) {
    const float4* nw = reinterpret_cast<const float4*>(a.norm_w) + 2 * c;
    const float4 n0 = __ldg(nw), n1 = __ldg(nw + 1);
    const float nv[8] = {n0.x, n0.y, n0.z, n0.w, n1.x, n1.y, n1.z, n1.w};
    const float4* rp = reinterpret_cast<const float4*>(a.residual + (size_t)j * k) + 2 * c;
    const float4 r0 = __ldg(rp), r1 = __ldg(rp + 1);
    const float rv[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
#pragma unroll
    for (int i = 0; i < 8; i++) out[i] = __bfloat162float(__float2bfloat16_rn(__fmul_rn(__fmul_rn(rv[i], scale), nv[i])));
}

// One 16-byte chunk (8 values of k) of a few-row product: the inputs (normalised here, or x),
// then each row's sums. (Normalising once per block into shared memory instead of once per
// warp and chunk measured the same.)
template <int M>
__device__ __forceinline__ void gemv_chunk(const GemvArgs& a, int k, int c, const float* scale, const uint4* wraw,
                                           float (&acc)[GEMV_ROWS][M]) {
        float xf[M][8];
#pragma unroll
        for (int j = 0; j < M; j++) {
            if (a.norm_w) gemv_norm_chunk(a, k, j, c, scale[j], xf[j]);
            else bf16x8_to_float(__ldg(reinterpret_cast<const uint4*>(a.x + (size_t)j * k) + c), xf[j]);
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            float wf[8];
            bf16x8_to_float(wraw[r], wf);
#pragma unroll
            for (int j = 0; j < M; j++)
#pragma unroll
                for (int i = 0; i < 8; i++) acc[r][j] = __fadd_rn(acc[r][j], __fmul_rn(wf[i], xf[j][i]));
        }
}

// Address of 16-byte chunk c of weight row `row`, both clamped to the matrix (so that every
// load of a pass is in bounds; the sums skip what lies beyond).
__device__ __forceinline__ const uint4* gemv_chunk_at(const __nv_bfloat16* w, int n, int k, int row, int c) {
    return reinterpret_cast<const uint4*>(w + (size_t)min(row, n - 1) * k) + min(c, k / 8 - 1);
}

// One lane's weights for a pass: chunks c0 and c0 + step of rows row0, row0 + 1.
__device__ __forceinline__ void gemv_load_pass(const __nv_bfloat16* __restrict__ w, int n, int k, int row0, int c0, int step,
                                               uint4 (&wraw)[2][GEMV_ROWS]) {
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) wraw[h][r] = __ldg(gemv_chunk_at(w, n, k, row0 + r, c0 + step * h));
}

template <int M>
__device__ void gemv_impl(const __nv_bfloat16* __restrict__ w, float* __restrict__ y, int n, int k, const GemvArgs& a) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
    const int chunks = k / 8;  // 16-byte chunks per row
    // The weights depend on no earlier kernel: the first pass is loaded while that one
    // finishes (pdl_enter, kernels.cu). (Fetching later passes into L2 as well was slower.)
    uint4 wraw[2][GEMV_ROWS];
    if (row0 < n) gemv_load_pass(w, n, k, row0, lane, 32, wraw);
    pdl_enter();
    __shared__ float scale[M];
    if (a.norm_w) {
        __shared__ double partial[GEMV_WARPS][M];
#pragma unroll
        for (int j = 0; j < M; j++) {
            double sum = 0.0;
            for (int i = threadIdx.x; i < k; i += GEMV_WARPS * 32) {
                const float v = a.residual[(size_t)j * k + i];
                sum += (double)__fmul_rn(v, v);
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) partial[warp][j] = sum;
        }
        __syncthreads();
        if (threadIdx.x < M) {
            double total = 0.0;
            for (int i = 0; i < GEMV_WARPS; i++) total += partial[i][threadIdx.x];
            const float mean = (float)(total / (double)k);
            scale[threadIdx.x] = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, a.eps)));
        }
        __syncthreads();
    }
    if (row0 >= n) return;
    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int j = 0; j < M; j++) acc[r][j] = 0.f;
    // Two chunks per lane per pass: their weight loads are in flight together. The sums still
    // run in increasing chunk order.
    for (int c0 = lane; c0 < chunks; c0 += 64) {
        if (c0 != lane) gemv_load_pass(w, n, k, row0, c0, 32, wraw);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int c = c0 + 32 * h;
            if (c >= chunks) break;
            gemv_chunk<M>(a, k, c, scale, wraw[h], acc);
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int j = 0; j < M; j++)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], o);
    if (lane != 0) return;
#pragma unroll
    for (int j = 0; j < M; j++) few_row_finish(a, y, n, j, row0, acc[0][j], acc[1][j]);
}

// ---------------------------------------------------------------------------------------------
// The same product for narrow outputs (plain input and output, as o and down): a block's warps
// share its two rows and split k between them, so that a 2048-row matrix keeps four times as
// many loads in flight. Lane l of warp v sums chunks v·32 + l + 128·i in increasing i; the
// lanes of a warp are then summed, and the warps in order.
template <int M>
__device__ void gemv_split_impl(const __nv_bfloat16* __restrict__ w, float* __restrict__ y, int n, int k, const GemvArgs& a) {
    constexpr int STEP = GEMV_WARPS * 32;  // chunks between a lane's two of a pass
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * GEMV_ROWS, first = warp * 32 + lane;
    const int chunks = k / 8;
    uint4 wraw[2][GEMV_ROWS];
    gemv_load_pass(w, n, k, row0, first, STEP, wraw);  // before the wait, as gemv_impl's
    pdl_enter();
    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int j = 0; j < M; j++) acc[r][j] = 0.f;
    for (int c0 = first; c0 < chunks; c0 += 2 * STEP) {
        if (c0 != first) gemv_load_pass(w, n, k, row0, c0, STEP, wraw);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int c = c0 + STEP * h;
            if (c >= chunks) break;
            gemv_chunk<M>(a, k, c, nullptr, wraw[h], acc);
        }
    }
    __shared__ float part[GEMV_WARPS][GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int j = 0; j < M; j++) {
            float v = acc[r][j];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) part[warp][r][j] = v;
        }
    __syncthreads();
    if (threadIdx.x >= GEMV_ROWS * M) return;
    const int r = threadIdx.x / M, j = threadIdx.x % M, row = row0 + r;
    if (row >= n) return;
    float sum = part[0][r][j];
#pragma unroll
    for (int v = 1; v < GEMV_WARPS; v++) sum = __fadd_rn(sum, part[v][r][j]);
    float* out = y + (size_t)j * n + row;
    *out = a.accumulate ? __fadd_rn(sum, *out) : sum;
}

#define GEMV_VARIANT(M)                                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                             \
    gemv_m##M(const __nv_bfloat16* w, float* y, int n, int k, const GemvArgs a) {                              \
        gemv_impl<M>(w, y, n, k, a);                                                                          \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                             \
    gemv_split_m##M(const __nv_bfloat16* w, float* y, int n, int k, const GemvArgs a) {                        \
        gemv_split_impl<M>(w, y, n, k, a);                                                                    \
    }

GEMV_VARIANT(1)
GEMV_VARIANT(2)
GEMV_VARIANT(3)
GEMV_VARIANT(4)
