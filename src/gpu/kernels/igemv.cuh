// The batch-invariant product of a few rows (decode), streamed (included by ../kernels.cu).
#pragma once

// y[m, n] = x[m, k] · w[n, k]ᵀ for m <= XR (8, 16 or 32), with gemm_tile's sums bit for bit: the same
// mma.m16n8k16 steps in increasing k within each of the nseg segments, from zero, then the
// segment sums added in order and the old y last. Only the layout of the work differs, made
// for reading the weights once at full bandwidth: block b owns weight rows
// [8·NG·b, 8·NG·(b + 1)); its warp s sums segment s through a pipeline of its own (cp.async of
// weight and activation tiles into shared memory, ldmatrix, as gemm_tile). The block then
// folds the segments in order and finishes as gemv_impl does (GemvArgs: rope and the K/V
// write, SwiGLU, accumulate; the input is always x: a norm inside, paid per block, measured
// slower than rms_norm_bf16's launch), each lane holding two adjacent output
// columns: a rotation or gate/up pair. So a sequence decoded alone (here) gets the same bits
// as inside a large batch (gemm_tile).

// BK: k per pipeline stage (a multiple of 32; rows of BK + 8 elements keep ldmatrix free of
// bank conflicts).

// Bytes of one warp's shared memory: its weight stages, then its activation stages of xr rows.
// invariant.rs computes the same.
__host__ __device__ __forceinline__ int igemv_warp_bytes(int xr, int ng, int stages, int bk) {
    return stages * (8 * ng + xr) * (bk + 8) * 2;
}

// XR activation rows (8: the mma's rows 8..15 are zeros; 16; 32), NG weight groups of 8 rows.
template <int XR, int NG, int STAGES, int BK>
__device__ void igemv_impl(const __nv_bfloat16* __restrict__ w, float* __restrict__ y, int m, int n, int k, int nseg, const GemvArgs& a) {
    constexpr int ROWS = 8 * NG, MT = XR < 16 ? 1 : XR / 16, ROW = BK + 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = lane & 3, g = lane >> 2;
    const int n0 = blockIdx.x * ROWS;
    const int seg_len = k / nseg, tiles = seg_len / BK, k0 = warp * seg_len;
    unsigned char* mine = dynamic_smem + (size_t)warp * igemv_warp_bytes(XR, NG, STAGES, BK);
    typedef __nv_bfloat16 WStage[ROWS][ROW];
    typedef __nv_bfloat16 XStage[XR][ROW];
    WStage* ws = reinterpret_cast<WStage*>(mine);
    XStage* xs = reinterpret_cast<XStage*>(mine + STAGES * sizeof(WStage));

    auto load_weights = [&](int stage, int tile) {
        const int kk = k0 + tile * BK;
#pragma unroll
        for (int c = lane; c < ROWS * (BK / 8); c += 32) {
            const int r = c / (BK / 8), col = (c % (BK / 8)) * 8;
            // Rows past n read the last one (in bounds); their sums are never written.
            cp_async16(&ws[stage][r][col], w + (size_t)min(n0 + r, n - 1) * k + kk + col, true);
        }
    };
    auto load_x = [&](int stage, int tile) {
        const int kk = k0 + tile * BK;
        for (int c = lane; c < m * (BK / 8); c += 32) {
            const int r = c / (BK / 8), col = (c % (BK / 8)) * 8;
            cp_async16(&xs[stage][r][col], a.x + (size_t)r * k + kk + col, true);
        }
    };
    // The weights depend on no earlier kernel: the first stages load while it finishes.
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < tiles) load_weights(s, s);
        cp_async_commit();
    }
    pdl_wait();
    // Rows past m stay zero in every stage; the rows below m arrive with the weights.
    for (int e = lane; e < STAGES * XR * ROW / 2; e += 32) {
        const int s = e / (XR * ROW / 2), rest = e % (XR * ROW / 2);
        if (rest / (ROW / 2) >= m) reinterpret_cast<unsigned*>(&xs[s][0][0])[rest] = 0u;
    }
    // Stage s's activations are committed STAGES - 1 groups after its weights: each tile's
    // wait below covers both (cp.async groups complete in order).
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < tiles) load_x(s, s);
        cp_async_commit();
    }
    __syncwarp();

    float acc[MT][NG][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int q = 0; q < NG; q++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][q][e] = 0.f;
    for (int tile = 0; tile < tiles; tile++) {
        // Committed so far: STAGES - 1 groups of weights, STAGES - 1 of x, then one per tile;
        // this tile's weights and x are complete once at most STAGES - 2 groups are pending.
        cp_async_wait<STAGES - 2>();
        __syncwarp();
        const int next = tile + STAGES - 1;
        if (next < tiles) {
            load_weights(next % STAGES, next);
            load_x(next % STAGES, next);
        }
        cp_async_commit();
        const int st = tile % STAGES;
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            unsigned b[NG][2];
#pragma unroll
            for (int q = 0; q < NG; q++) ldmatrix_x2(b[q], &ws[st][q * 8 + (lane & 7)][ks + ((lane >> 3) & 1) * 8]);
#pragma unroll
            for (int i = 0; i < MT; i++) {
                const int r = i * 16 + (lane & 15), c = ks + (lane >> 4) * 8;
                unsigned af[4];
                if (XR == 8) {  // rows 0..7 only (m <= 8): the fragment's rows 8..15 are zeros
                    unsigned lo[2];
                    ldmatrix_x2(lo, &xs[st][lane & 7][ks + ((lane >> 3) & 1) * 8]);
                    af[0] = lo[0]; af[1] = 0u; af[2] = lo[1]; af[3] = 0u;
                } else {
                    ldmatrix_x4(af, &xs[st][r][c]);
                }
#pragma unroll
                for (int q = 0; q < NG; q++) mma_bf16(acc[i][q], af, b[q]);
            }
        }
    }
    // The next kernel may launch now (kernels.cu): after this kernel's wait, not before it as
    // the others release. Released first, PDL cost this mode's batch 1 (on an H100: 1.50
    // against 1.42 ms here), its few-row products' blocks filling the multiprocessors' shared
    // memory; anywhere after the wait, from the first tile to here, measured the same.
    pdl_release();
    cp_async_wait<0>();
    __syncthreads();  // every pipeline drained: its memory now holds the segment sums
    float* part = reinterpret_cast<float*>(dynamic_smem);
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int q = 0; q < NG; q++)
#pragma unroll
            for (int e = 0; e < 4; e++) part[(((warp * MT + i) * NG + q) * 32 + lane) * 4 + e] = acc[i][q][e];
    __syncthreads();
    // Fragment f = (i, q) of each segment, folded in segment order by one warp, then written.
    for (int f = warp; f < MT * NG; f += nseg) {
        const int i = f / NG, q = f % NG;
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; e++) v[e] = part[(f * 32 + lane) * 4 + e];
        for (int s = 1; s < nseg; s++)
#pragma unroll
            for (int e = 0; e < 4; e++) v[e] = __fadd_rn(v[e], part[((s * MT * NG + f) * 32 + lane) * 4 + e]);
        const int col = n0 + q * 8 + 2 * t, row = i * 16 + g;
        if (col >= n) continue;
        if (row < m) few_row_finish(a, y, n, row, col, v[0], v[1]);
        if (row + 8 < m) few_row_finish(a, y, n, row + 8, col, v[2], v[3]);
    }
}

#define IGEMV_VARIANT(XR, NG, STAGES, BK)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
    igemv_##XR##x##NG##_s##STAGES##_k##BK(const __nv_bfloat16* w, float* y, int m, int n, int k, int nseg,     \
                                          const GemvArgs a) {                                                 \
        igemv_impl<XR, NG, STAGES, BK>(w, y, m, n, k, nseg, a);                                               \
    }

// invariant.rs mirrors these (IGEMV_VARIANTS).
IGEMV_VARIANT(8, 4, 3, 64)
IGEMV_VARIANT(8, 8, 2, 64)
IGEMV_VARIANT(16, 4, 3, 64)
IGEMV_VARIANT(16, 8, 2, 64)
IGEMV_VARIANT(32, 4, 3, 64)
IGEMV_VARIANT(32, 8, 2, 64)
IGEMV_VARIANT(8, 2, 3, 32)
IGEMV_VARIANT(16, 2, 4, 32)
IGEMV_VARIANT(32, 4, 3, 32)
