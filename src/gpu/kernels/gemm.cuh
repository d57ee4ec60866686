// The batch-invariant matrix product (mma.sync) (included by ../kernels.cu).
#pragma once

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
#define GEMM_PAD 8

// A shared-memory address as the PTX instructions below take it.
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = smem_u32(smem);
    const int size = valid ? 16 : 0;  // 0: fill with zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* smem) {
    const unsigned s = smem_u32(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned* r, const void* smem) {
    const unsigned s = smem_u32(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Block tile BM x BN, warps WM x WN (warp tile (BM/WM) x (BN/WN)), STAGES k-tiles in flight
// (dynamic shared memory: STAGES * (BM + BN) * (GEMM_BK + GEMM_PAD) bf16, invariant.rs sizes it).
// Block z handles segments [z * segs_per_block, (z + 1) * segs_per_block). With `partial`,
// the block's single segment sum goes to partial[z][m][n]; otherwise the block sums all
// segments and writes y.
template <int BM, int BN, int WM, int WN, int STAGES>
__device__ void gemm_tile(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, float* __restrict__ y,
                          float* __restrict__ partial, int m, int n, int k, int nseg, int segs_per_block, int accumulate) {
    constexpr int THREADS = WM * WN * 32;
    constexpr int TM = BM / WM, TN = BN / WN;  // warp tile
    constexpr int MT = TM / 16, NT = TN / 8;   // mma tiles per warp
    constexpr int ROW = GEMM_BK + GEMM_PAD;    // smem row, in elements (80 bytes: ldmatrix rows stay 16-byte aligned)
    typedef __nv_bfloat16 ATile[BM][ROW];
    typedef __nv_bfloat16 BTile[BN][ROW];
    ATile* As = reinterpret_cast<ATile*>(dynamic_smem);
    BTile* Bs = reinterpret_cast<BTile*>(dynamic_smem + sizeof(ATile) * STAGES);

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
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < tiles) load(s, s);
        cp_async_commit();
    }
    for (int t = 0; t < tiles; t++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = t + STAGES - 1;
        if (next < tiles) load(next % STAGES, next);
        cp_async_commit();
        const int st = t % STAGES;
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

#define GEMM_VARIANT(NAME, BM, BN, WM, WN, STAGES, MIN_BLOCKS)                                                 \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32, MIN_BLOCKS)                                     \
    NAME(const __nv_bfloat16* x, const __nv_bfloat16* w, float* y, float* partial, int m, int n, int k,       \
         int nseg, int segs_per_block, int accumulate) {                                                      \
        pdl_enter();                                                                                          \
        gemm_tile<BM, BN, WM, WN, STAGES>(x, w, y, partial, m, n, k, nseg, segs_per_block, accumulate);      \
    }

// Names give the block tile (rows x columns); invariant.rs mirrors these shapes (GEMM_TILES).
GEMM_VARIANT(gemm_16x64, 16, 64, 1, 4, 4, 4)
GEMM_VARIANT(gemm_64x64, 64, 64, 2, 2, 4, 3)
GEMM_VARIANT(gemm_128x128, 128, 128, 2, 4, 4, 1)

// y = ((p0 + p1) + ...) (+ y): the segment sums of `gemm_*` with `partial`, in order.
extern "C" __global__ void gemm_reduce(const float* partial, float* y, uint64_t mn, int nseg, int accumulate) {
    pdl_enter();
    for (uint64_t e = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; e < mn; e += (uint64_t)gridDim.x * blockDim.x) {
        float t = partial[e];
        for (int s = 1; s < nseg; s++) t = __fadd_rn(t, partial[(uint64_t)s * mn + e]);
        y[e] = accumulate ? __fadd_rn(t, y[e]) : t;
    }
}
