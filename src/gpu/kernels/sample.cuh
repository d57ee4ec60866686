// Random draws on the device (included by ../kernels.cu, after pointwise.cuh): per logits row,
// the token that draw.rs's `draw` picks for the same logits, parameters and uniform number.
#pragma once

#include <cooperative_groups.h>

// ---------------------------------------------------------------------------------------------
// One cluster of C blocks per row (the `sample_rows_c{C}` variants; runtime.rs picks more when
// rows are few), the blocks summing through each other's shared memory. Rows whose
// temperature is 0 keep argmax_logprob's choice, which runs first (its token gives the row's
// maximum, its log-probability the row's log-sum-exp).
//
// As in draw.rs: each token's weight is trunc(ggml_expf((logit - max) * (1 / T)) * 2^32), and
// all sums are of these integers, so their order does not matter. The top-k and top-p limits
// are thresholds on the logits' order keys, each found by a 16-way search over the keys (at
// most 8 passes over the row); the draw then walks the kept tokens in vocabulary order: each
// warp sums its own contiguous segment, and the warp whose segment holds the draw scans it 32
// tokens at a time.

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define SEARCH_WAYS 16
// Thread-block clusters (a row's blocks summing through each other's shared memory) exist
// from compute capability 9.0; below it every variant runs one block per row.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SAMPLE_CLUSTERS_AVAILABLE 1
#else
#define SAMPLE_CLUSTERS_AVAILABLE 0
#endif

// A row's draw (runner.rs writes these, `DRAW_WORDS` words each).
struct RowDraw {
    float temperature;  // 0: greedy
    int top_k;          // 0: off
    float top_p;        // 1: off
    float min_p;        // 0: off
    float uniform;      // in [0, 1)
    int pad[3];
};

// Order-preserving key of a float (-0 and +0 alike): a < b as floats iff key(a) < key(b).
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t b = f == 0.0f ? 0u : __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// What the search and the walk need of a row, and this block's share of it.
struct DrawRow {
    const float* logits;
    int vocab;
    float max, inv_t, min_p;
    int part, parts;  // this block's rank in the row's cluster, and the cluster's size
};

// A token's relative probability and its weight, as draw.rs's `weights`.
__device__ __forceinline__ float draw_p(const DrawRow& r, float logit) {
    return ggml_expf(__fmul_rn(__fsub_rn(logit, r.max), r.inv_t));
}
__device__ __forceinline__ unsigned long long draw_weight(float p) {
    return (unsigned long long)__fmul_rn(p, 4294967296.0f);  // truncates, as Rust's `as u64`
}

// The token's contribution to a search: 1 when counting, else its weight (0 below min-p).
__device__ __forceinline__ unsigned long long search_weight(const DrawRow& r, float logit, bool count) {
    if (count) return 1;
    const float p = draw_p(r, logit);
    return p >= r.min_p ? draw_weight(p) : 0;
}

// A barrier of the row's whole cluster (of its block alone when C is 1).
template <int C>
__device__ __forceinline__ void cluster_sync() {
#if SAMPLE_CLUSTERS_AVAILABLE
    if constexpr (C > 1) {
        cooperative_groups::this_cluster().sync();
        return;
    }
#endif
    __syncthreads();
}

// `p` (in this block's shared memory) in the shared memory of the cluster's block `rank`.
template <int C, typename T>
__device__ __forceinline__ T* cluster_shared(T* p, int rank) {
#if SAMPLE_CLUSTERS_AVAILABLE
    if constexpr (C > 1) return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#endif
    return p;
}

// Every thread's `v[j]` summed over the row's whole cluster, for all its threads (u64 sums:
// exact in any order). Every thread of the cluster calls it.
template <int C, int N>
__device__ void cluster_sums(unsigned long long (&v)[N]) {
    __shared__ unsigned long long partial[SAMPLE_WARPS][N];
    __shared__ unsigned long long block_total[N];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < N; j++)
        for (int o = 16; o > 0; o >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], o);
    cluster_sync<C>();  // every block's readers of the last sums are done
    if (lane == 0)
#pragma unroll
        for (int j = 0; j < N; j++) partial[warp][j] = v[j];
    __syncthreads();
    if (threadIdx.x < N) {
        unsigned long long s = 0;
        for (int w = 0; w < SAMPLE_WARPS; w++) s += partial[w][threadIdx.x];
        block_total[threadIdx.x] = s;
    }
    cluster_sync<C>();
    // N threads gather the blocks' totals; then everyone reads them here.
    __shared__ unsigned long long cluster_total[N];
    if (threadIdx.x < N) {
        unsigned long long s = 0;
        for (int b = 0; b < C; b++) s += *cluster_shared<C>(block_total + threadIdx.x, b);
        cluster_total[threadIdx.x] = s;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; j++) v[j] = cluster_total[j];
}

// The largest key K in [lo, hi] such that the tokens with key >= K (counted, or weighed as
// `search_weight`) reach `target`; lo if none does. Each pass tries SEARCH_WAYS - 1 keys that
// cut (lo, hi] into SEARCH_WAYS parts and keeps the part that holds the answer.
template <int C>
__device__ uint32_t search_key(const DrawRow& r, uint32_t lo, uint32_t hi, unsigned long long target, bool count) {
    constexpr int T = SEARCH_WAYS - 1;
    while (lo < hi) {
        const uint64_t span = (uint64_t)hi - lo;
        uint32_t at[T];
#pragma unroll
        for (int j = 0; j < T; j++) at[j] = lo + (uint32_t)((span * (j + 1) + SEARCH_WAYS - 1) / SEARCH_WAYS);
        unsigned long long sum[T];
#pragma unroll
        for (int j = 0; j < T; j++) sum[j] = 0;
        for (int i = r.part * SAMPLE_THREADS + threadIdx.x; i < r.vocab; i += r.parts * SAMPLE_THREADS) {
            const float l = r.logits[i];
            const uint32_t key = order_key(l);
            if (key < at[0]) continue;
            const unsigned long long w = search_weight(r, l, count);
#pragma unroll
            for (int j = 0; j < T; j++) sum[j] += key >= at[j] ? w : 0;
        }
        cluster_sums<C>(sum);
        // The sums fall as the keys rise: the part after the last key still reaching the
        // target (indices known at compile time keep `at` in registers).
        uint32_t next_lo = lo, next_hi = at[0] - 1;
#pragma unroll
        for (int j = 0; j < T; j++)
            if (sum[j] >= target) {
                next_lo = at[j];
                next_hi = j + 1 < T ? at[j + 1] - 1 : hi;
            }
        lo = next_lo;
        hi = next_hi;
    }
    return lo;
}

template <int C>
__device__ void sample_row(const float* logits, int vocab, const RowDraw* draws, uint32_t* ids, float* logprobs) {
    const RowDraw d = draws[blockIdx.x];
    if (!(d.temperature > 0.0f)) return;  // the whole cluster alike
    DrawRow r;
    r.logits = logits + (size_t)blockIdx.x * vocab;
    r.vocab = vocab;
    r.max = r.logits[ids[blockIdx.x]];
    r.inv_t = __fdiv_rn(1.0f, d.temperature);
    r.min_p = d.min_p;
    r.part = blockIdx.y;
    r.parts = C;
    const float max_logprob = logprobs[blockIdx.x];
    const uint32_t top = order_key(r.max);

    // top-k: the k-th largest logit's key.
    uint32_t floor = 0;
    if (d.top_k > 0 && d.top_k < vocab) floor = search_key<C>(r, 0, top, (unsigned long long)d.top_k, true);
    // top-p: among the top-k tokens with p >= min_p, the highest key whose weights reach
    // top_p of all the top-k tokens' weight.
    if (d.top_p < 1.0f) {
        DrawRow all = r;
        all.min_p = 0.0f;
        unsigned long long top_k_weight[1] = {0};
        for (int i = r.part * SAMPLE_THREADS + threadIdx.x; i < vocab; i += r.parts * SAMPLE_THREADS) {
            const float l = r.logits[i];
            if (order_key(l) >= floor) top_k_weight[0] += search_weight(all, l, false);
        }
        cluster_sums<C>(top_k_weight);
        const unsigned long long target = (unsigned long long)ceil((double)d.top_p * (double)top_k_weight[0]);
        floor = search_key<C>(r, floor, top, target, false);
    }

    // The walk. Warp g of the cluster (its blocks in rank order) owns a contiguous segment of
    // the vocabulary; the segments' kept weights give each warp the weight before its own.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = r.part * SAMPLE_WARPS + warp;
    const int segment = (vocab + r.parts * SAMPLE_WARPS - 1) / (r.parts * SAMPLE_WARPS);
    const int begin = min(vocab, g * segment), end = min(vocab, begin + segment);
    auto kept_weight = [&](int i) -> unsigned long long {
        if (i >= end) return 0;
        const float l = r.logits[i];
        return order_key(l) >= floor ? search_weight(r, l, false) : 0;
    };
    unsigned long long mine = 0;
    for (int i = begin + lane; i < end; i += 32) mine += kept_weight(i);
    for (int o = 16; o > 0; o >>= 1) mine += __shfl_xor_sync(0xffffffffu, mine, o);
    // The weight before this warp (its block's earlier warps, then the earlier blocks') and
    // the cluster's in all.
    __shared__ unsigned long long warp_weight[SAMPLE_WARPS], block_weight;
    if (lane == 0) warp_weight[warp] = mine;
    __syncthreads();
    unsigned long long before = 0, total[1] = {lane == 0 ? mine : 0ull};
    for (int w = 0; w < warp; w++) before += warp_weight[w];
    if (threadIdx.x == 0) {
        block_weight = 0;
        for (int w = 0; w < SAMPLE_WARPS; w++) block_weight += warp_weight[w];
    }
    cluster_sums<C>(total);  // (its syncs also publish block_weight)
    for (int b = 0; b < r.part; b++) before += *cluster_shared<C>(&block_weight, b);
    cluster_sync<C>();  // no block leaves while another reads its shared memory
    const unsigned long long pick = (unsigned long long)((double)d.uniform * (double)total[0]);
    if (pick < before || pick >= before + mine) return;
    // This warp's segment holds the draw: 32 tokens at a time, an inclusive scan of weights.
    unsigned long long left = pick - before;
    for (int base = begin; base < end; base += 32) {
        const unsigned long long w = kept_weight(base + lane);
        unsigned long long upto = w;
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long other = __shfl_up_sync(0xffffffffu, upto, o);
            if (lane >= o) upto += other;
        }
        const unsigned long long chunk = __shfl_sync(0xffffffffu, upto, 31);
        if (left >= chunk) {
            left -= chunk;
            continue;
        }
        // The first lane whose running sum passes `left` (its own weight is then > 0).
        const unsigned found = __ballot_sync(0xffffffffu, left < upto);
        if (lane == __ffs(found) - 1) {
            ids[blockIdx.x] = (uint32_t)(base + lane);
            logprobs[blockIdx.x] = __fadd_rn(__fsub_rn(r.logits[base + lane], r.max), max_logprob);
        }
        return;
    }
}

// Variants by blocks per row. Without clusters (below 9.0) each runs on its first block alone.
#if SAMPLE_CLUSTERS_AVAILABLE
#define SAMPLE_VARIANT(C)                                                                                      \
    extern "C" __global__ void __cluster_dims__(1, C, 1) __launch_bounds__(SAMPLE_THREADS)                      \
    sample_rows_c##C(const float* logits, int vocab, const RowDraw* draws, uint32_t* ids, float* logprobs) {   \
        pdl_enter();                                                                                          \
        sample_row<C>(logits, vocab, draws, ids, logprobs);                                                    \
    }
#else
#define SAMPLE_VARIANT(C)                                                                                      \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                                \
    sample_rows_c##C(const float* logits, int vocab, const RowDraw* draws, uint32_t* ids, float* logprobs) {   \
        pdl_enter();                                                                                          \
        if (blockIdx.y == 0) sample_row<1>(logits, vocab, draws, ids, logprobs);                               \
    }
#endif

SAMPLE_VARIANT(1)
SAMPLE_VARIANT(2)
SAMPLE_VARIANT(4)
SAMPLE_VARIANT(8)
