// Random draws on the device (included by ../kernels.cu, after pointwise.cuh): per logits row,
// the token that draw.rs's `draw` picks for the same logits, parameters and uniform number.
#pragma once

// ---------------------------------------------------------------------------------------------
// One block per row; rows whose temperature is 0 keep argmax_logprob's choice, which runs
// first (its token gives the row's maximum, its log-probability the row's log-sum-exp).
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

// What the search and the walk need of a row.
struct DrawRow {
    const float* logits;
    int vocab;
    float max, inv_t, min_p;
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

// Every thread's `v[j]` summed over the block, for all threads (u64: exact in any order).
template <int N>
__device__ void block_sums(unsigned long long (&v)[N]) {
    __shared__ unsigned long long partial[SAMPLE_WARPS][N];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < N; j++)
        for (int o = 16; o > 0; o >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], o);
    __syncthreads();  // the previous call's readers are done with `partial`
    if (lane == 0)
#pragma unroll
        for (int j = 0; j < N; j++) partial[warp][j] = v[j];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; j++) {
        unsigned long long s = 0;
        for (int w = 0; w < SAMPLE_WARPS; w++) s += partial[w][j];
        v[j] = s;
    }
}

// The largest key K in [lo, hi] such that the tokens with key >= K (counted, or weighed as
// `search_weight`) reach `target`; lo if none does. Each pass tries SEARCH_WAYS - 1 keys that
// cut (lo, hi] into SEARCH_WAYS parts and keeps the part that holds the answer.
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
        for (int i = threadIdx.x; i < r.vocab; i += SAMPLE_THREADS) {
            const float l = r.logits[i];
            const uint32_t key = order_key(l);
            if (key < at[0]) continue;
            const unsigned long long w = search_weight(r, l, count);
#pragma unroll
            for (int j = 0; j < T; j++) sum[j] += key >= at[j] ? w : 0;
        }
        block_sums(sum);
        // The sums fall as the keys rise: the last key still reaching the target.
        int best = -1;
#pragma unroll
        for (int j = 0; j < T; j++)
            if (sum[j] >= target) best = j;
        if (best < 0) hi = at[0] - 1;
        else {
            lo = at[best];
            if (best + 1 < T) hi = at[best + 1] - 1;
        }
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* logits, int vocab, const RowDraw* draws, uint32_t* ids, float* logprobs) {
    pdl_enter();
    const RowDraw d = draws[blockIdx.x];
    if (!(d.temperature > 0.0f)) return;
    DrawRow r;
    r.logits = logits + (size_t)blockIdx.x * vocab;
    r.vocab = vocab;
    r.max = r.logits[ids[blockIdx.x]];
    r.inv_t = __fdiv_rn(1.0f, d.temperature);
    r.min_p = d.min_p;
    const float max_logprob = logprobs[blockIdx.x];
    const uint32_t top = order_key(r.max);

    // top-k: the k-th largest logit's key.
    uint32_t floor = 0;
    if (d.top_k > 0 && d.top_k < vocab) floor = search_key(r, 0, top, (unsigned long long)d.top_k, true);
    // top-p: among the top-k tokens with p >= min_p, the highest key whose weights reach
    // top_p of all the top-k tokens' weight.
    if (d.top_p < 1.0f) {
        DrawRow all = r;
        all.min_p = 0.0f;
        unsigned long long top_k_weight[1] = {0};
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            const float l = r.logits[i];
            if (order_key(l) >= floor) top_k_weight[0] += search_weight(all, l, false);
        }
        block_sums(top_k_weight);
        const unsigned long long target = (unsigned long long)ceil((double)d.top_p * (double)top_k_weight[0]);
        floor = search_key(r, floor, top, target, false);
    }

    // The walk. Warp w's segment of the vocabulary, its kept weight, and the segments before.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int segment = (vocab + SAMPLE_WARPS - 1) / SAMPLE_WARPS;
    const int begin = min(vocab, warp * segment), end = min(vocab, begin + segment);
    auto kept_weight = [&](int i) -> unsigned long long {
        if (i >= end) return 0;
        const float l = r.logits[i];
        return order_key(l) >= floor ? search_weight(r, l, false) : 0;
    };
    unsigned long long mine = 0;
    for (int i = begin + lane; i < end; i += 32) mine += kept_weight(i);
    for (int o = 16; o > 0; o >>= 1) mine += __shfl_xor_sync(0xffffffffu, mine, o);
    __shared__ unsigned long long segment_sums[SAMPLE_WARPS];
    if (lane == 0) segment_sums[warp] = mine;
    __syncthreads();
    unsigned long long before = 0, total = 0;
    for (int w = 0; w < SAMPLE_WARPS; w++) {
        if (w < warp) before += segment_sums[w];
        total += segment_sums[w];
    }
    const unsigned long long pick = (unsigned long long)((double)d.uniform * (double)total);
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
