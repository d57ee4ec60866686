// Paged attention over block tables, for decodes and prefill chunks alike (included by ../kernels.cu).
#pragma once

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

__device__ __forceinline__ void unpack8(uint4 raw, float* out) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// G: query heads per KV head that the registers hold (group <= G); U: passes whose keys are
// loaded before any is used, so that U loads of each lane are in flight at once (the sums are
// those of one pass at a time either way).
template <int D, int ATT_WARPS, int G, int U>
__device__ void attention_impl(const float* q, const __half* k_cache, const __half* v_cache,
                               const TokenPlan* plans, const uint32_t* block_tables, __nv_bfloat16* out,
                               int n_head, int n_kv_head, int block_size, float scale, float* partial,
                               unsigned* counters) {
    constexpr int LPK = D / 8;          // lanes per key
    constexpr int KPW = 32 / LPK;       // keys per warp pass
    // Scores in base 2: exp(x) = 2^(x log2 e), and exp2f is one instruction where expf is
    // several, in the loop's chain of dependent steps (on an H100 the forms braid runs 5-10%
    // faster alone, steps up to 2.6% faster). Every max and sum below is in base 2. The loop
    // multiplies and adds in fused steps (__fmaf_rn; the build's -fmad=false is for kernels
    // that round as the CPU does, which attention never did): 2-10% faster again.
    const float scale2 = __fmul_rn(scale, 1.4426950408889634f);
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

    float qr[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (g < group) {
            const float* qp = q + (size_t)t * n_head * D + (size_t)(kvh * group + g) * D + part * 8;
#pragma unroll
            for (int i = 0; i < 8; i++) qr[g][i] = qp[i];
        }
    }
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY; l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = 0.f;
    }

    // With `partial` (few blocks, long contexts), gridDim.z blocks share a token's keys: block z
    // takes a contiguous share and writes its unnormalised (max, sum, acc); the last to finish merges.
    const int splits = gridDim.z;
    const int share = (n_keys + splits - 1) / splits;
    const int key_begin = blockIdx.z * share, key_end = min(n_keys, key_begin + share);
    constexpr int STRIDE = ATT_WARPS * KPW;  // keys between a lane's passes
    for (int base = key_begin + warp * KPW; base < key_end; base += U * STRIDE) {
        // Keys past the end load the block's first key instead (always in range) and change
        // nothing: unconditional loads measured faster than guarded ones.
        uint4 kraw[U], vraw[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int idx = base + u * STRIDE + sub;
            const int i = idx < key_end ? idx : key_begin;
            const int j = i < n_keep ? i : first + (i - n_keep);
            const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            const size_t off = slot * kv_width + (size_t)kvh * D + part * 8;
            kraw[u] = *reinterpret_cast<const uint4*>(k_cache + off);
            vraw[u] = *reinterpret_cast<const uint4*>(v_cache + off);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const bool valid = base + u * STRIDE + sub < key_end;
            float kf[8], vf[8];
            unpack8(kraw[u], kf);
            unpack8(vraw[u], vf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                if (g < group) {
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; i++) s = __fmaf_rn(qr[g][i], kf[i], s);
#pragma unroll
                    for (int o = LPK / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                    if (valid) {
                        s = __fmul_rn(s, scale2);
                        const float m_new = fmaxf(m[g], s);
                        const float correction = exp2f(m[g] - m_new);
                        const float p = exp2f(s - m_new);
                        l[g] = __fmaf_rn(l[g], correction, p);
#pragma unroll
                        for (int i = 0; i < 8; i++) acc[g][i] = __fmaf_rn(p, vf[i], __fmul_rn(acc[g][i], correction));
                        m[g] = m_new;
                    }
                }
            }
        }
    }

    // Merge the key groups of each warp (lanes with the same `part`).
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (g < group) {
#pragma unroll
            for (int o = LPK; o < 32; o <<= 1) {
                const float m_other = __shfl_xor_sync(0xffffffffu, m[g], o);
                const float l_other = __shfl_xor_sync(0xffffffffu, l[g], o);
                const float m_new = fmaxf(m[g], m_other);
                const float a = m[g] == -INFINITY ? 0.f : exp2f(m[g] - m_new);
                const float b = m_other == -INFINITY ? 0.f : exp2f(m_other - m_new);
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
    __shared__ float sm_m[ATT_WARPS][G], sm_l[ATT_WARPS][G];
    __shared__ float sm_acc[ATT_WARPS][G][D];
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
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
            const float f = mw == -INFINITY ? 0.f : exp2f(mw - m_all);
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
            const float f = mz == -INFINITY ? 0.f : exp2f(mz - m_all);
            l_all += __ldcg(p + z * (D + 2) + 1) * f;
            acc_all += __ldcg(p + z * (D + 2) + 2 + d) * f;
        }
        out[head * D + d] = __float2bfloat16_rn(acc_all / l_all);
    }
}

// Variants by head dimension, warps per block, query heads per KV head held (4 or 8) and
// passes loaded at once (U). 8 warps finish one token's keys sooner (small decode batches,
// where there are few blocks); 4 leave room for more blocks per multiprocessor (large batches).
// A token's sums depend on the warps, so the batch-invariant mode keeps 4; G and U change no
// sum. Measured (H100, 32/8 heads x 64, 256 keys; before, every form held 8 heads and
// loaded one pass at a time): 256 tokens took 183 µs with 4 warps, 102 holding 4 heads (fewer
// registers, more blocks per multiprocessor), 89 loading 2 passes at once; one token took 17.4
// µs, 12.7 loading 8 passes at once. Split forms gained nothing from U (7.7 µs either way).
#define ATTENTION_VARIANT(NAME, D, WARPS, G, U)                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                    \
    NAME(const float* q, const __half* k, const __half* v, const TokenPlan* plans, const uint32_t* tables,      \
         __nv_bfloat16* out, int n_head, int n_kv_head, int block_size, float scale, float* partial,           \
         unsigned* counters) {                                                                                 \
        pdl_enter();                                                                                          \
        attention_impl<D, WARPS, G, U>(q, k, v, plans, tables, out, n_head, n_kv_head, block_size, scale,     \
                                       partial, counters);                                                    \
    }
#define ATTENTION_VARIANTS(D)                                                         \
    ATTENTION_VARIANT(paged_attention_d##D##_many_g4, D, 4, 4, 2)                     \
    ATTENTION_VARIANT(paged_attention_d##D##_many_g8, D, 4, 8, 2)                     \
    ATTENTION_VARIANT(paged_attention_d##D##_few_g4, D, 4, 4, 8)                      \
    ATTENTION_VARIANT(paged_attention_d##D##_few_g8, D, 4, 8, 8)                      \
    ATTENTION_VARIANT(paged_attention_d##D##_split_g4, D, 8, 4, 1)                    \
    ATTENTION_VARIANT(paged_attention_d##D##_split_g8, D, 8, 8, 1)

// runtime.rs names them (`AttentionKind`): "many" for (token, KV head) pairs that fill the
// multiprocessors; "few" for fewer, in the batch-invariant mode; "split" for fewer in the
// default mode, the keys shared by several blocks.
ATTENTION_VARIANTS(64)
ATTENTION_VARIANTS(128)
// For the tests (attention_tests.rs): the plain forms, one pass at a time.
ATTENTION_VARIANT(paged_attention_d64_w4_g8_u1, 64, 4, 8, 1)
ATTENTION_VARIANT(paged_attention_d64_w8_g8_u1, 64, 8, 8, 1)
