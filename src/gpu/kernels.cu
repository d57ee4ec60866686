// braid's CUDA kernels: everything of the llama forward pass that is not a matrix product
// (those go to cuBLAS). Compiled by build.rs with nvcc, without FMA contraction, so that each
// kernel rounds the way braid's CPU code does: the GPU and CPU then differ only in the order of
// their sums.
//
// Layouts (row-major, one row per token of the flat batch):
//   residual x        f32  [n, hidden]
//   matrix inputs     bf16 (what cuBLAS multiplies), matrix outputs f32
//   KV cache          f16  [num_blocks, block_size, n_kv_head, head_dim] per layer, K and V apart

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        out[i] = __float2bfloat16_rn(dummy_value(seed, i, centre, scale));
    }
}

// Element i of a draw at out[(i / width) * stride + i % width]: one matrix's rows interleaved
// with another's (gate/up).
extern "C" __global__ void fill_dummy_bf16_rows(__nv_bfloat16* out, uint64_t n, uint64_t width, uint64_t stride, uint64_t seed,
                                                float centre, float scale) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        out[(i / width) * stride + i % width] = __float2bfloat16_rn(dummy_value(seed, i, centre, scale));
    }
}

extern "C" __global__ void fill_dummy_f32(float* out, uint64_t n, uint64_t seed, float centre, float scale) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        out[i] = dummy_value(seed, i, centre, scale);
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup: x[t] = table[tokens[t]] (bf16 table, f32 rows).

extern "C" __global__ void embed_rows(const __nv_bfloat16* table, const uint32_t* tokens, float* x, int hidden) {
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
            const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
            const float y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
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
// Paged attention for any mix of decodes and prefill chunks: one block per (query token, KV
// head), the heads of its query group together. Each token attends to its sequence's cached
// positions 0..=pos (within the window, if any) through the block table.
//
// A group of LPK = D / 8 lanes owns one key at a time (16-byte loads of 8 halves each); a warp
// covers 32 / LPK keys per pass and keeps a running (max, sum, acc) per query head (online
// softmax); the groups, then the 4 warps, are merged at the end.

#define MAX_GROUP 8

struct TokenPlan {
    uint32_t pos;        // logical position of the query token in its sequence
    uint32_t table;      // offset of the sequence's block table in `block_tables`
    uint32_t keep;       // window: first tokens always seen (0 with no window)
    uint32_t size;       // window size in tokens (0: no window)
};

__device__ __forceinline__ void load8(const __half* p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

template <int D, int ATT_WARPS>
__device__ void attention_impl(const float* q, const __half* k_cache, const __half* v_cache,
                               const TokenPlan* plans, const uint32_t* block_tables, __nv_bfloat16* out,
                               int n_head, int n_kv_head, int block_size, float scale, float* partial,
                               unsigned* counters) {
    constexpr int LPK = D / 8;          // lanes per key
    constexpr int KPW = 32 / LPK;       // keys per warp pass
    const int t = blockIdx.x, kvh = blockIdx.y;
    const int group = n_head / n_kv_head;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sub = lane / LPK, part = lane % LPK;  // which key of the pass, which 8 dims
    const TokenPlan plan = plans[t];
    const uint32_t* table = block_tables + plan.table;
    const int kv_width = n_kv_head * D;

    // Visible positions: [0, n_keep) then [first, pos].
    const int pos = plan.pos;
    int n_keep = 0, first = 0;
    if (plan.size) {
        const int kept = min((int)plan.keep, pos + 1);
        const int start = max(pos + 1 - (int)(plan.size - plan.keep), 0);
        first = max(start, kept);
        n_keep = kept;
    }
    const int n_keys = n_keep + (pos + 1 - first);

    float qr[MAX_GROUP][8];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (g < group) {
            const float* qp = q + (size_t)t * n_head * D + (size_t)(kvh * group + g) * D + part * 8;
#pragma unroll
            for (int i = 0; i < 8; i++) qr[g][i] = qp[i];
        }
    }
    float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][8];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        m[g] = -INFINITY; l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = 0.f;
    }

    // With `partial` (few blocks, long contexts), gridDim.z blocks share a token's keys: block z
    // takes a contiguous share and writes its unnormalised (max, sum, acc); the last to finish merges.
    const int splits = gridDim.z;
    const int share = (n_keys + splits - 1) / splits;
    const int key_begin = blockIdx.z * share, key_end = min(n_keys, key_begin + share);
    for (int base = key_begin + warp * KPW; base < key_end; base += ATT_WARPS * KPW) {
        const int idx = base + sub;
        const bool valid = idx < key_end;
        float kf[8], vf[8];
        if (valid) {
            const int j = idx < n_keep ? idx : first + (idx - n_keep);
            const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            const size_t off = slot * kv_width + (size_t)kvh * D + part * 8;
            load8(k_cache + off, kf);
            load8(v_cache + off, vf);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) { kf[i] = 0.f; vf[i] = 0.f; }
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            if (g < group) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < 8; i++) s = __fadd_rn(s, __fmul_rn(qr[g][i], kf[i]));
#pragma unroll
                for (int o = LPK / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (valid) {
                    s = __fmul_rn(s, scale);
                    const float m_new = fmaxf(m[g], s);
                    const float correction = expf(m[g] - m_new);
                    const float p = expf(s - m_new);
                    l[g] = l[g] * correction + p;
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * correction + p * vf[i];
                    m[g] = m_new;
                }
            }
        }
    }

    // Merge the key groups of each warp (lanes with the same `part`).
#pragma unroll
    for (int g = 0; g < MAX_GROUP; g++) {
        if (g < group) {
#pragma unroll
            for (int o = LPK; o < 32; o <<= 1) {
                const float m_other = __shfl_xor_sync(0xffffffffu, m[g], o);
                const float l_other = __shfl_xor_sync(0xffffffffu, l[g], o);
                const float m_new = fmaxf(m[g], m_other);
                const float a = m[g] == -INFINITY ? 0.f : expf(m[g] - m_new);
                const float b = m_other == -INFINITY ? 0.f : expf(m_other - m_new);
                l[g] = l[g] * a + l_other * b;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const float acc_other = __shfl_xor_sync(0xffffffffu, acc[g][i], o);
                    acc[g][i] = acc[g][i] * a + acc_other * b;
                }
                m[g] = m_new;
            }
        }
    }

    // Merge the warps through shared memory: lanes 0..LPK of each warp hold the whole state.
    __shared__ float sm_m[ATT_WARPS][MAX_GROUP], sm_l[ATT_WARPS][MAX_GROUP];
    __shared__ float sm_acc[ATT_WARPS][MAX_GROUP][D];
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < MAX_GROUP; g++) {
            if (g < group) {
                if (part == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
#pragma unroll
                for (int i = 0; i < 8; i++) sm_acc[warp][g][part * 8 + i] = acc[g][i];
            }
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < group * D; e += blockDim.x) {
        const int g = e / D, d = e % D;
        float m_all = -INFINITY;
        for (int w = 0; w < ATT_WARPS; w++) m_all = fmaxf(m_all, sm_m[w][g]);
        float l_all = 0.f, acc_all = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) {
            const float mw = sm_m[w][g];
            const float f = mw == -INFINITY ? 0.f : expf(mw - m_all);
            l_all += sm_l[w][g] * f;
            acc_all += sm_acc[w][g][d] * f;
        }
        const size_t head = (size_t)t * n_head + kvh * group + g;
        if (partial) {  // [token, head, split] of (max, sum, acc[D])
            float* p = partial + (head * splits + blockIdx.z) * (D + 2);
            if (d == 0) { p[0] = m_all; p[1] = l_all; }
            p[2 + d] = acc_all;
        } else {
            out[head * D + d] = __float2bfloat16_rn(acc_all / l_all);
        }
    }
    if (!partial) return;
    // The last block of a split (token, KV head) merges every block's share, in split order.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned* counter = counters + (size_t)t * n_kv_head + kvh;
        last = atomicAdd(counter, 1u) == (unsigned)splits - 1;
        if (last) *counter = 0;  // ready for the next launch
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int e = threadIdx.x; e < group * D; e += blockDim.x) {
        const int g = e / D, d = e % D;
        const size_t head = (size_t)t * n_head + kvh * group + g;
        const float* p = partial + head * splits * (D + 2);
        float m_all = -INFINITY;
        for (int z = 0; z < splits; z++) m_all = fmaxf(m_all, __ldcg(p + z * (D + 2)));
        float l_all = 0.f, acc_all = 0.f;
        for (int z = 0; z < splits; z++) {
            const float mz = __ldcg(p + z * (D + 2));
            const float f = mz == -INFINITY ? 0.f : expf(mz - m_all);
            l_all += __ldcg(p + z * (D + 2) + 1) * f;
            acc_all += __ldcg(p + z * (D + 2) + 2 + d) * f;
        }
        out[head * D + d] = __float2bfloat16_rn(acc_all / l_all);
    }
}

// Variants by head dimension and warps per block: 8 warps finish one token's keys sooner (small
// decode batches, where there are few blocks), 4 leave room for two blocks per multiprocessor
// (large batches). A token's sums depend on the variant, so the batch-invariant mode keeps one.
#define ATTENTION_VARIANT(NAME, D, WARPS)                                                                       \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                    \
    NAME(const float* q, const __half* k, const __half* v, const TokenPlan* plans, const uint32_t* tables,      \
         __nv_bfloat16* out, int n_head, int n_kv_head, int block_size, float scale, float* partial,           \
         unsigned* counters) {                                                                                 \
        attention_impl<D, WARPS>(q, k, v, plans, tables, out, n_head, n_kv_head, block_size, scale, partial,  \
                                 counters);                                                                   \
    }

ATTENTION_VARIANT(paged_attention_d64_w4, 64, 4)
ATTENTION_VARIANT(paged_attention_d64_w8, 64, 8)
ATTENTION_VARIANT(paged_attention_d128_w4, 128, 4)
ATTENTION_VARIANT(paged_attention_d128_w8, 128, 8)

// ---------------------------------------------------------------------------------------------
// SwiGLU: out = silu(gate) * up, as vmath.rs computes it (gate / (1 + exp(-gate)) * up),
// rounded to bf16 for the down projection. gate_up f32 [n, 2 * ffn], gate and up interleaved
// (the GPU stores the gate/up weight rows alternately: weights.rs).

extern "C" __global__ void silu_mul_bf16(const float* gate_up, __nv_bfloat16* out, int ffn, uint64_t total) {
    for (uint64_t e = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; e < total; e += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t t = e / ffn, i = e % ffn;
        const float g = gate_up[t * 2 * ffn + 2 * i], u = gate_up[t * 2 * ffn + 2 * i + 1];
        const float silu = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
        out[e] = __float2bfloat16_rn(__fmul_rn(silu, u));
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

// ---------------------------------------------------------------------------------------------
// Batch-invariant matrix product: y[m, n] = x[m, k] · w[n, k]ᵀ (+ y), bf16 operands, f32 sums.
//
// Every output element is summed in one fixed order that depends on k alone, never on m, the
// tile shape or how the work is spread: k is cut into `nseg` equal segments; each segment is
// summed by mma.m16n8k16 over 16-wide steps in increasing k, starting from zero; the segment
// sums are added in order (((s0 + s1) + s2) + ...), and finally the old y when accumulating.
// So a token's row comes out bit for bit the same alone or inside any batch (cuBLAS picks
// kernels, and so summation orders, by shape). Small products spread segments over blocks
// (`gemm_partial` + `gemm_reduce`); large ones keep the running sum in registers.

#define GEMM_BK 32
#define GEMM_STAGES 3
#define GEMM_PAD 8

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const int size = valid ? 16 : 0;  // 0: fill with zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned* r, const void* smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Block tile BM x BN, warps WM x WN (warp tile (BM/WM) x (BN/WN)). Block z handles segments
// [z * segs_per_block, (z + 1) * segs_per_block). With `partial`, the block's single segment
// sum goes to partial[z][m][n]; otherwise the block sums all segments and writes y.
template <int BM, int BN, int WM, int WN>
__device__ void gemm_tile(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, float* __restrict__ y,
                          float* __restrict__ partial, int m, int n, int k, int nseg, int segs_per_block, int accumulate) {
    constexpr int THREADS = WM * WN * 32;
    constexpr int TM = BM / WM, TN = BN / WN;  // warp tile
    constexpr int MT = TM / 16, NT = TN / 8;   // mma tiles per warp
    constexpr int ROW = GEMM_BK + GEMM_PAD;    // smem row, in elements (80 bytes: ldmatrix rows stay 16-byte aligned)
    __shared__ __align__(16) __nv_bfloat16 As[GEMM_STAGES][BM][ROW];
    __shared__ __align__(16) __nv_bfloat16 Bs[GEMM_STAGES][BN][ROW];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp / WN, wn = warp % WN;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int seg_tiles = k / nseg / GEMM_BK;
    const int seg_first = blockIdx.z * segs_per_block;
    const int tile_first = seg_first * seg_tiles;
    const int tiles = segs_per_block * seg_tiles;

    auto load = [&](int stage, int tile) {
        const int kk = (tile_first + tile) * GEMM_BK;
        for (int c = threadIdx.x; c < BM * 4; c += THREADS) {
            const int r = c >> 2, col = (c & 3) * 8;
            const bool ok = m0 + r < m;
            cp_async16(&As[stage][r][col], x + (size_t)(ok ? m0 + r : 0) * k + kk + col, ok);
        }
        for (int c = threadIdx.x; c < BN * 4; c += THREADS) {
            const int r = c >> 2, col = (c & 3) * 8;
            const bool ok = n0 + r < n;
            cp_async16(&Bs[stage][r][col], w + (size_t)(ok ? n0 + r : 0) * k + kk + col, ok);
        }
    };

    float seg[MT][NT][4], total[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) { seg[i][j][e] = 0.f; total[i][j][e] = 0.f; }

#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; s++) {
        if (s < tiles) load(s, s);
        cp_async_commit();
    }
    for (int t = 0; t < tiles; t++) {
        cp_async_wait<GEMM_STAGES - 2>();
        __syncthreads();
        const int next = t + GEMM_STAGES - 1;
        if (next < tiles) load(next % GEMM_STAGES, next);
        cp_async_commit();
        const int st = t % GEMM_STAGES;
#pragma unroll
        for (int ks = 0; ks < GEMM_BK; ks += 16) {
            unsigned a[MT][4], b[NT][2];
#pragma unroll
            for (int i = 0; i < MT; i++) {
                const int r = wm * TM + i * 16 + (lane & 15), c = ks + (lane >> 4) * 8;
                ldmatrix_x4(a[i], &As[st][r][c]);
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const int r = wn * TN + j * 8 + (lane & 7), c = ks + ((lane >> 3) & 1) * 8;
                ldmatrix_x2(b[j], &Bs[st][r][c]);
            }
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < NT; j++) mma_bf16(seg[i][j], a[i], b[j]);
        }
        if ((t + 1) % seg_tiles == 0) {  // a segment ends: fold it into the total, in order
            const bool first = t + 1 == seg_tiles;
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < NT; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        total[i][j][e] = first ? seg[i][j][e] : __fadd_rn(total[i][j][e], seg[i][j][e]);
                        seg[i][j][e] = 0.f;
                    }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = m0 + wm * TM + i * 16 + (lane >> 2) + (e >> 1) * 8;
                const int c = n0 + wn * TN + j * 8 + (lane & 3) * 2 + (e & 1);
                if (r < m && c < n) {
                    if (partial) {
                        partial[((size_t)blockIdx.z * m + r) * n + c] = total[i][j][e];
                    } else {
                        float* out = y + (size_t)r * n + c;
                        *out = accumulate ? __fadd_rn(total[i][j][e], *out) : total[i][j][e];
                    }
                }
            }
}

#define GEMM_VARIANT(NAME, BM, BN, WM, WN, MIN_BLOCKS)                                                         \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32, MIN_BLOCKS)                                     \
    NAME(const __nv_bfloat16* x, const __nv_bfloat16* w, float* y, float* partial, int m, int n, int k,       \
         int nseg, int segs_per_block, int accumulate) {                                                      \
        gemm_tile<BM, BN, WM, WN>(x, w, y, partial, m, n, k, nseg, segs_per_block, accumulate);              \
    }

GEMM_VARIANT(gemm_m16, 16, 64, 1, 4, 4)
GEMM_VARIANT(gemm_m64, 64, 64, 2, 2, 4)
GEMM_VARIANT(gemm_m128, 128, 64, 4, 2, 2)

// y = ((p0 + p1) + ...) (+ y): the segment sums of `gemm_*` with `partial`, in order.
extern "C" __global__ void gemm_reduce(const float* partial, float* y, uint64_t mn, int nseg, int accumulate) {
    for (uint64_t e = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; e < mn; e += (uint64_t)gridDim.x * blockDim.x) {
        float t = partial[e];
        for (int s = 1; s < nseg; s++) t = __fadd_rn(t, partial[(uint64_t)s * mn + e]);
        y[e] = accumulate ? __fadd_rn(t, y[e]) : t;
    }
}

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

// One 16-byte chunk (8 values of k) of a few-row product: the inputs, then each row's sums.
template <int M>
__device__ __forceinline__ void gemv_chunk(const GemvArgs& a, int k, int c, const float* scale, const uint4* wraw,
                                           float (&acc)[GEMV_ROWS][M]) {
        float xf[M][8];
        if (a.norm_w) {
            const float4* nw = reinterpret_cast<const float4*>(a.norm_w) + 2 * c;
            const float4 n0 = __ldg(nw), n1 = __ldg(nw + 1);
            const float nv[8] = {n0.x, n0.y, n0.z, n0.w, n1.x, n1.y, n1.z, n1.w};
#pragma unroll
            for (int j = 0; j < M; j++) {
                const float4* rp = reinterpret_cast<const float4*>(a.residual + (size_t)j * k) + 2 * c;
                const float4 r0 = __ldg(rp), r1 = __ldg(rp + 1);
                const float rv[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
#pragma unroll
                for (int i = 0; i < 8; i++) xf[j][i] = __bfloat162float(__float2bfloat16_rn(__fmul_rn(__fmul_rn(rv[i], scale[j]), nv[i])));
            }
        } else {
#pragma unroll
            for (int j = 0; j < M; j++) bf16x8_to_float(__ldg(reinterpret_cast<const uint4*>(a.x + (size_t)j * k) + c), xf[j]);
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

template <int M>
__device__ void gemv_impl(const __nv_bfloat16* __restrict__ w, float* __restrict__ y, int n, int k, const GemvArgs& a) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
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
    const int row0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
    if (row0 >= n) return;
    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int j = 0; j < M; j++) acc[r][j] = 0.f;
    const int chunks = k / 8;  // 16-byte chunks per row
    // Two chunks per lane per pass: their weight loads are in flight together. The sums still
    // run in increasing chunk order.
    for (int c0 = lane; c0 < chunks; c0 += 64) {
        uint4 wraw[2][GEMV_ROWS];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int c = min(c0 + 32 * h, chunks - 1);
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                const int row = min(row0 + r, n - 1);
                wraw[h][r] = __ldg(reinterpret_cast<const uint4*>(w + (size_t)row * k) + c);
            }
        }
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
    if (a.act_out) {
#pragma unroll
        for (int j = 0; j < M; j++) {
            const float g = acc[0][j], u = acc[1][j];
            const float silu = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
            a.act_out[(size_t)j * (n / 2) + row0 / 2] = __float2bfloat16_rn(__fmul_rn(silu, u));
        }
        return;
    }
    if (!a.q_out) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
            for (int j = 0; j < M; j++) {
                const int row = row0 + r;
                if (row < n) {
                    float* out = y + (size_t)j * n + row;
                    *out = a.accumulate ? __fadd_rn(acc[r][j], *out) : acc[r][j];
                }
            }
        return;
    }
    // QKV epilogue: rows row0, row0 + 1 are dims (d, d + 1) of one head.
    const int q_width = a.n_head * a.head_dim, kv_width = a.n_kv_head * a.head_dim;
    const int head = row0 / a.head_dim, d = row0 % a.head_dim;
#pragma unroll
    for (int j = 0; j < M; j++) {
        float x0 = acc[0][j], x1 = acc[1][j];
        if (a.bias) { x0 = __fadd_rn(x0, a.bias[row0]); x1 = __fadd_rn(x1, a.bias[row0 + 1]); }
        const size_t slot = a.slots[j];
        if (head < a.n_head + a.n_kv_head && d < a.rope_dim) {
            const int half_rope = a.rope_dim / 2, i = d / 2;
            const float cs = a.cos_table[(size_t)a.positions[j] * half_rope + i];
            const float sn = a.sin_table[(size_t)a.positions[j] * half_rope + i];
            const float y0 = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
            const float y1 = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs));
            x0 = y0; x1 = y1;
        }
        if (head < a.n_head) {
            a.q_out[(size_t)j * q_width + row0] = x0;
            a.q_out[(size_t)j * q_width + row0 + 1] = x1;
        } else if (head < a.n_head + a.n_kv_head) {
            __half* kp = a.k_cache + slot * kv_width + (row0 - q_width);
            kp[0] = __float2half_rn(x0); kp[1] = __float2half_rn(x1);
        } else {
            __half* vp = a.v_cache + slot * kv_width + (row0 - q_width - kv_width);
            vp[0] = __float2half_rn(x0); vp[1] = __float2half_rn(x1);
        }
    }
}

#define GEMV_VARIANT(M)                                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                             \
    gemv_m##M(const __nv_bfloat16* w, float* y, int n, int k, const GemvArgs a) {                              \
        gemv_impl<M>(w, y, n, k, a);                                                                          \
    }

GEMV_VARIANT(1)
GEMV_VARIANT(2)
GEMV_VARIANT(3)
GEMV_VARIANT(4)
