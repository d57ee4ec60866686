// Row-wise kernels: dummy weights, embedding lookup, RMS norm, rope with the K/V write,
// SwiGLU, the greedy argmax (included by ../kernels.cu).
#pragma once

// ---------------------------------------------------------------------------------------------
// Dummy weights: a counter-based generator the CPU reproduces bit for bit (presets.rs).

__device__ __forceinline__ uint32_t mix32(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z = z ^ (z >> 31);
    return (uint32_t)(z >> 32);
}

// value(i) = centre + scale * (k - 2^23) / 2^23 with k the top 24 bits of a hash of (seed, i):
// uniform in [centre - scale, centre + scale), never exactly zero for centre 0 and odd k.
__device__ __forceinline__ float dummy_value(uint64_t seed, uint64_t i, float centre, float scale) {
    uint32_t k = (mix32(seed * 0x9e3779b97f4a7c15ULL + i) >> 8) | 1u;
    float unit = (float)((int32_t)k - (1 << 23)) * (1.0f / 8388608.0f);
    return __fadd_rn(centre, __fmul_rn(unit, scale));
}

extern "C" __global__ void fill_dummy_bf16(__nv_bfloat16* out, uint64_t n, uint64_t seed, float centre, float scale) {
    pdl_enter();
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        out[i] = __float2bfloat16_rn(dummy_value(seed, i, centre, scale));
    }
}

// Element i of a draw at out[(i / width) * stride + i % width]: one matrix's rows interleaved
// with another's (gate/up).
extern "C" __global__ void fill_dummy_bf16_rows(__nv_bfloat16* out, uint64_t n, uint64_t width, uint64_t stride, uint64_t seed,
                                                float centre, float scale) {
    pdl_enter();
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        out[(i / width) * stride + i % width] = __float2bfloat16_rn(dummy_value(seed, i, centre, scale));
    }
}

extern "C" __global__ void fill_dummy_f32(float* out, uint64_t n, uint64_t seed, float centre, float scale) {
    pdl_enter();
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        out[i] = dummy_value(seed, i, centre, scale);
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup: x[t] = table[tokens[t]] (bf16 table, f32 rows).

extern "C" __global__ void embed_rows(const __nv_bfloat16* table, const uint32_t* tokens, float* x, int hidden) {
    pdl_enter();
    const int t = blockIdx.x;
    const __nv_bfloat16* row = table + (size_t)tokens[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        x[(size_t)t * hidden + i] = __bfloat162float(row[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// RMS norm as norm.rs computes it: sum of squares in f64, scale = 1 / sqrt(mean + eps) in f32,
// out = (x * scale) * w, rounded to bf16 for the next matrix product. One block per output row;
// `rows` (optional) picks which rows of x to normalise.

#define NORM_THREADS 1024

extern "C" __global__ void rms_norm_bf16(const float* x, const uint32_t* rows, const float* w, __nv_bfloat16* out,
                                         int hidden, float eps) {
    pdl_enter();
    const int r = blockIdx.x;
    const float* row = x + (size_t)(rows ? rows[r] : r) * hidden;
    double sum = 0.0;
    for (int i = threadIdx.x; i < hidden; i += NORM_THREADS) {
        float v = row[i];
        sum += (double)__fmul_rn(v, v);
    }
    __shared__ double partial[NORM_THREADS / 32];
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    __shared__ float scale_shared;
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int i = 0; i < NORM_THREADS / 32; i++) total += partial[i];
        float mean = (float)(total / (double)hidden);
        scale_shared = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    }
    __syncthreads();
    const float scale = scale_shared;
    for (int i = threadIdx.x; i < hidden; i += NORM_THREADS) {
        out[(size_t)r * hidden + i] = __float2bfloat16_rn(__fmul_rn(__fmul_rn(row[i], scale), w[i]));
    }
}

// ---------------------------------------------------------------------------------------------
// After the QKV product: adds the bias (Qwen2), rotates Q and K (rope.rs), keeps Q in f32 for
// attention and writes K and V as f16 into their cache slots. One block per token.
//   qkv   f32 [n, q_width + 2 * kv_width]
//   cos/sin f32 [max_position, rope_dim / 2] (rope.rs's tables)

extern "C" __global__ void rope_and_cache(const float* qkv, const float* bias, const uint32_t* positions,
                                          const uint32_t* slots, const float* cos_table, const float* sin_table,
                                          float* q_out, __half* k_cache, __half* v_cache, int n_head, int n_kv_head,
                                          int head_dim, int rope_dim, int neox) {
    pdl_enter();
    const int t = blockIdx.x;
    const int q_width = n_head * head_dim, kv_width = n_kv_head * head_dim;
    const int row_width = q_width + 2 * kv_width;
    const float* row = qkv + (size_t)t * row_width;
    const int half_rope = rope_dim / 2;
    const float* cs = cos_table + (size_t)positions[t] * half_rope;
    const float* sn = sin_table + (size_t)positions[t] * half_rope;
    const size_t slot = slots[t];
    // Pairs of rotated dims (and untouched dims) of Q and K heads.
    const int heads = n_head + n_kv_head;
    const int pairs_per_head = head_dim / 2;
    for (int p = threadIdx.x; p < heads * pairs_per_head; p += blockDim.x) {
        const int head = p / pairs_per_head, i = p % pairs_per_head;
        int a, b;
        if (i < half_rope) {
            if (neox) { a = i; b = i + half_rope; } else { a = 2 * i; b = 2 * i + 1; }
        } else {  // dimensions past rope_dim are not rotated
            a = rope_dim + 2 * (i - half_rope); b = a + 1;
        }
        const int base = head * head_dim;  // Q heads, then K heads, in the row
        float x0 = row[base + a], x1 = row[base + b];
        if (bias) { x0 = __fadd_rn(x0, bias[base + a]); x1 = __fadd_rn(x1, bias[base + b]); }
        if (i < half_rope) {
            const float c = cs[i], s = sn[i];
            // Fused as the CPU's rope (rope.rs) fuses it, after llama.cpp.
            const float y0 = __fmaf_rn(x0, c, -__fmul_rn(x1, s));
            const float y1 = __fmaf_rn(x0, s, __fmul_rn(x1, c));
            x0 = y0; x1 = y1;
        }
        if (head < n_head) {
            q_out[(size_t)t * q_width + base + a] = x0;
            q_out[(size_t)t * q_width + base + b] = x1;
        } else {
            const size_t k_base = slot * kv_width + (base - q_width);
            k_cache[k_base + a] = __float2half_rn(x0);
            k_cache[k_base + b] = __float2half_rn(x1);
        }
    }
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        float v = row[q_width + kv_width + i];
        if (bias) v = __fadd_rn(v, bias[q_width + kv_width + i]);
        v_cache[slot * kv_width + i] = __float2half_rn(v);
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: out = silu(gate) * up, as vmath.rs computes it (gate / (1 + exp(-gate)) * up, the
// exp being ggml's AVX-512 polynomial), rounded to bf16 for the down projection. gate_up f32
// [n, 2 * ffn], gate and up interleaved (the GPU stores the gate/up weight rows alternately:
// weights.rs).

// vmath.rs's `ggml_exp_lane`, operation for operation.
__device__ __forceinline__ float ggml_expf(float x) {
    const float r = __int_as_float(0x4b400000);  // 0x1.8p23
    const float n = __fsub_rn(__fmaf_rn(x, __int_as_float(0x3fb8aa3b), r), r);
    const float b = __fmaf_rn(-n, __int_as_float(0x35bfbe8e), __fmaf_rn(-n, __int_as_float(0x3f317200), x));
    const float u = __fmul_rn(b, b);
    const float j = __fmaf_rn(
        __fmaf_rn(__fmaf_rn(__int_as_float(0x3c072010), b, __int_as_float(0x3d2b9f17)), u,
                  __fmaf_rn(__int_as_float(0x3e2aaf33), b, __int_as_float(0x3efffedb))),
        u, __fmaf_rn(__int_as_float(0x3f7ffff6), b, 1.0f));
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    // scalef: j * 2^n with one rounding. Exact in f32 while the result stays normal
    // (j is in [0.7, 1.5)); through f64 where it may round.
    if (n >= -125.0f && n <= 127.0f) return __fmul_rn(j, __int_as_float(((int)n + 127) << 23));
    return (float)((double)j * ldexp(1.0, (int)n));
}

// silu(g) * u as vmath.rs's `silu_mul` computes element `i` of a row of `ffn` (ggml's vector
// exp for the whole 16s of the row, libm's for the rest).
__device__ __forceinline__ float silu_mul(float g, float u, int i, int ffn) {
    const float e = i < ffn / 16 * 16 ? ggml_expf(__fsub_rn(0.0f, g)) : expf(-g);
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, e)), u);
}

extern "C" __global__ void silu_mul_bf16(const float* gate_up, __nv_bfloat16* out, int ffn, uint64_t total) {
    pdl_enter();
    for (uint64_t e = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; e < total; e += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t t = e / ffn, i = e % ffn;
        const float g = gate_up[t * 2 * ffn + 2 * i], u = gate_up[t * 2 * ffn + 2 * i + 1];
        out[e] = __float2bfloat16_rn(silu_mul(g, u, (int)i, ffn));
    }
}

// ---------------------------------------------------------------------------------------------
// Greedy sampling on the device: per logits row, the first maximum and its log-probability
// (logit - logsumexp). Only these come back to the host.

#define ARGMAX_THREADS 1024

// A row is cut into gridDim.y slices; each block finds its slice's first maximum and
// sum(exp(x - max)), and the last block of the row to finish merges the slices in order.
struct ArgmaxPart {
    double sum;
    float max;
    int index;
};

extern "C" __global__ void argmax_logprob(const float* logits, int vocab, uint32_t* ids, float* logprobs,
                                          ArgmaxPart* parts, unsigned* counters) {
    pdl_enter();
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const int slices = gridDim.y, slice = blockIdx.y;
    const int width = (vocab + slices - 1) / slices;
    const int begin = slice * width, end = min(vocab, begin + width);
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    for (int i = begin + threadIdx.x; i < end; i += ARGMAX_THREADS) {
        const float v = row[i];
        if (v > best) { best = v; best_i = i; }  // i grows, so the first maximum of this thread
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ob > best || (ob == best && oi < best_i)) { best = ob; best_i = oi; }
    }
    __shared__ float sb[32];
    __shared__ int si[32];
    __shared__ double ss[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { sb[warp] = best; si[warp] = best_i; }
    __syncthreads();
    if (warp == 0) {
        best = sb[lane]; best_i = si[lane];
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
            if (ob > best || (ob == best && oi < best_i)) { best = ob; best_i = oi; }
        }
        if (lane == 0) { sb[0] = best; si[0] = best_i; }
    }
    __syncthreads();
    const float max = sb[0];
    double sum = 0.0;
    for (int i = begin + threadIdx.x; i < end; i += ARGMAX_THREADS) sum += (double)expf(row[i] - max);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) ss[warp] = sum;
    __syncthreads();
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int w = 0; w < ARGMAX_THREADS / 32; w++) total += ss[w];
    ArgmaxPart* mine = parts + (size_t)blockIdx.x * slices;
    mine[slice] = ArgmaxPart{total, max, si[0]};
    __threadfence();
    unsigned* counter = counters + blockIdx.x;
    if (atomicAdd(counter, 1u) != (unsigned)slices - 1) return;
    *counter = 0;  // ready for the next launch
    __threadfence();
    float m_all = -INFINITY;
    int id = 0x7fffffff;
    for (int z = 0; z < slices; z++) {
        const volatile ArgmaxPart* p = mine + z;
        const float mz = p->max;
        const int iz = p->index;
        if (mz > m_all || (mz == m_all && iz < id)) { m_all = mz; id = iz; }
    }
    double all = 0.0;
    for (int z = 0; z < slices; z++) {
        const volatile ArgmaxPart* p = mine + z;
        if (p->max != -INFINITY) all += p->sum * exp((double)p->max - (double)m_all);
    }
    ids[blockIdx.x] = (uint32_t)id;
    logprobs[blockIdx.x] = -(float)log(all);
}
