// The batch-invariant matrix product on Hopper: warpgroup MMA (wgmma) fed by the tensor memory
// accelerator (TMA), for more than 32 rows (included by ../kernels.cu, after gemm.cuh).
#pragma once

// The same sums as gemm_tile, bit for bit (kernels/gemm.cuh: nseg segments of k, each summed
// from zero in 16-wide steps of increasing k, then folded in order, the old y last). Only the
// instruction differs: wgmma.m64n128k16 takes each 16-wide step where gemm_tile issues
// mma.m16n8k16, and the tensor cores give the same bits for both (the kernel tests compare
// every tile and the few-row form bit for bit). On an H100 the products of a 256-row decode
// step run 2.5-4x faster than in gemm_tile, at 0.6-0.8x cuBLAS's speed.
//
// A block is (64·WGS) x BN of y (BN 64 or 128). Warpgroup 0 produces: one thread issues each
// stage's two TMA box loads (x rows, w rows; 64 k each), which land in the 128-byte swizzle
// that wgmma's shared-memory descriptors name (16-byte chunk c of row r at chunk c ^ (r % 8)). Warpgroups
// 1..WGS consume, 64 rows each. Stages pass between them through mbarriers ("full": the bytes
// arrived; "empty": every consumer's products from it are done), so no consumer waits on a
// block-wide barrier, and no thread spends instructions on load addresses.
//
// Each consumer holds two sets of BN / 2 accumulators a thread: the segment being summed and
// the running total. That double set is what the fixed order costs; it caps the tile at
// 128 x 128.
//
// Compiled only for sm_90a (wgmma and these TMA forms are its architecture-specific features);
// elsewhere the kernels are empty and the host never launches them (`Gpu::has_wgmma`).

#define WG_BK 64        // k per stage: one 128-byte swizzled row of bf16
#define WG_ROW_BYTES 128

// A CUtensorMap (cuda.h), opaque: the host encodes it (invariant.rs, `TensorMap::rows`).
struct __align__(64) TensorMap {
    unsigned long long opaque[16];
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BRAID_WGMMA 1

// A shared-memory matrix descriptor for a K-major operand in 128-byte swizzled rows, 8-row
// groups 1024 bytes apart.
__device__ __forceinline__ uint64_t wg_descriptor(const void* smem) {
    const uint64_t address = smem_u32(smem);
    return ((address & 0x3FFFF) >> 4)     // start address
           | (uint64_t)1 << 16            // leading byte offset: unused by swizzled K-major layouts
           | (uint64_t)(1024 >> 4) << 32  // stride byte offset: one 8-row group
           | (uint64_t)1 << 62;           // 128-byte swizzle
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// d[64 x 128] += a[64 x 16] · b[128 x 16]ᵀ, both operands K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n128k16(float* d, uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b));
}

// d[64 x 64] += a[64 x 16] · b[64 x 16]ᵀ, likewise.
__device__ __forceinline__ void wgmma_m64n64k16(float* d, uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b));
}

// One 16-wide step of a consumer's 64 x BN.
template <int BN>
__device__ __forceinline__ void wgmma_step(float* d, uint64_t a, uint64_t b) {
    if constexpr (BN == 128) {
        wgmma_m64n128k16(d, a, b);
    } else {
        static_assert(BN == 64, "wgmma tiles are 64 or 128 columns wide");
        wgmma_m64n64k16(d, a, b);
    }
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nwait:\n"
        "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra wait;\n}\n" ::"r"(smem_u32(bar)), "r"(parity) : "memory");
}
// The box at (column, row) of a 2-D bf16 tensor into shared memory, counted on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const TensorMap* map, int column, int row, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(smem_u32(dst)), "l"((uint64_t)map), "r"(column), "r"(row), "r"(smem_u32(bar)) : "memory");
}
#endif

// Block (x, y, z): rows [64·WGS·x, +64·WGS), columns [BN·y, +BN) (row tiles vary fastest, so
// the blocks sharing a weight tile run together, while it is in L2), segments
// [z·segs_per_block, +segs_per_block); gemm_tile's contract for y, partial and accumulate.
template <int WGS, int BN, int STAGES>
__device__ void gemm_wgmma_tile(const TensorMap* x_map, const TensorMap* w_map, float* __restrict__ y, float* __restrict__ partial,
                                int m, int n, int k, int nseg, int segs_per_block, int accumulate) {
#ifdef BRAID_WGMMA
    constexpr int BM = 64 * WGS;
    constexpr int A_BYTES = BM * WG_ROW_BYTES, STAGE_BYTES = A_BYTES + BN * WG_ROW_BYTES, ACC = BN / 2;
    unsigned char* smem = reinterpret_cast<unsigned char*>(((uintptr_t)dynamic_smem + 1023) & ~(uintptr_t)1023);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * STAGE_BYTES);
    uint64_t* empty = full + STAGES;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int seg_tiles = k / nseg / WG_BK;
    const int tile_first = blockIdx.z * segs_per_block * seg_tiles;
    const int tiles = segs_per_block * seg_tiles;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], WGS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {  // the producer
        if (threadIdx.x == 0) {
            for (int t = 0; t < tiles; t++) {
                const int s = t % STAGES;
                if (t >= STAGES) mbar_wait(&empty[s], ((t / STAGES) - 1) & 1);
                mbar_expect_tx(&full[s], STAGE_BYTES);
                const int kk = (tile_first + t) * WG_BK;
                tma_load(smem + s * STAGE_BYTES, x_map, kk, m0, &full[s]);
                tma_load(smem + s * STAGE_BYTES + A_BYTES, w_map, kk, n0, &full[s]);
            }
        }
        return;
    }
    const int c = wg - 1;  // this consumer's 64 rows of the tile
    float seg[ACC], total[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) { seg[i] = 0.f; total[i] = 0.f; }
    // Each consumer frees a stage once its products from it are done: tile t - 1's after the
    // wait that leaves only tile t's in flight, and all at a segment's end.
    int held = -1;
    for (int segment = 0; segment < segs_per_block; segment++) {
        for (int t = segment * seg_tiles; t < (segment + 1) * seg_tiles; t++) {
            const int s = t % STAGES;
            mbar_wait(&full[s], (t / STAGES) & 1);
            unsigned char* stage = smem + s * STAGE_BYTES;
            const uint64_t a = wg_descriptor(stage + c * 64 * WG_ROW_BYTES), b = wg_descriptor(stage + A_BYTES);
            wg_fence();
#pragma unroll
            for (int ks = 0; ks < WG_BK / 16; ks++) wgmma_step<BN>(seg, a + 2 * ks, b + 2 * ks);
            wg_commit();
            wg_wait<1>();
            if (held >= 0 && threadIdx.x % 128 == 0) mbar_arrive(&empty[held % STAGES]);
            held = t;
        }
        wg_wait<0>();
        if (threadIdx.x % 128 == 0) mbar_arrive(&empty[held % STAGES]);
        held = -1;
        // The segment ends: fold it into the total, in order.
#pragma unroll
        for (int i = 0; i < ACC; i++) {
            total[i] = segment == 0 ? seg[i] : __fadd_rn(total[i], seg[i]);
            seg[i] = 0.f;
        }
    }

#pragma unroll
    for (int i = 0; i < ACC; i++) {
        const int r = m0 + c * 64 + warp * 16 + (lane >> 2) + ((i >> 1) & 1) * 8;
        const int col = n0 + (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
        if (r < m && col < n) {
            if (partial) {
                partial[((size_t)blockIdx.z * m + r) * n + col] = total[i];
            } else {
                float* out = y + (size_t)r * n + col;
                *out = accumulate ? __fadd_rn(total[i], *out) : total[i];
            }
        }
    }
#endif
}

#define GEMM_WGMMA_VARIANT(NAME, WGS, BN, STAGES)                                                      \
    extern "C" __global__ void __launch_bounds__((WGS + 1) * 128, 1)                                     \
    NAME(const __grid_constant__ TensorMap x_map, const __grid_constant__ TensorMap w_map, float* y,     \
         float* partial, int m, int n, int k, int nseg, int segs_per_block, int accumulate) {            \
        pdl_enter();                                                                                     \
        gemm_wgmma_tile<WGS, BN, STAGES>(&x_map, &w_map, y, partial, m, n, k, nseg, segs_per_block,      \
                                         accumulate);                                                    \
    }

// invariant.rs mirrors these (GEMM_TILES).
GEMM_WGMMA_VARIANT(gemm_wgmma_64x64, 1, 64, 6)
GEMM_WGMMA_VARIANT(gemm_wgmma_64x128, 1, 128, 6)
GEMM_WGMMA_VARIANT(gemm_wgmma_128x128, 2, 128, 4)
