// Warp-level tensor-core building blocks (mma.sync, ldmatrix, cp.async) shared by our hand-written
// kernels (llmc/blockdiag.cuh, llmc/attention.cuh), and the launch macro that lets the same kernels run
// on the CPU emulation of dev/cuda/emu.h (compiled by g++ with LLMC_CUDA_EMU defined; emu.h provides
// LAUNCH, dyn_smem, emu_mma_16816 and the shuffles; ldmatrix and cp.async are emulated here).
//
// Fragment layout of mma.sync m16n8k16 (PTX ISA; lane = 4 * group + t, two bf16 per 32-bit register,
// the lower column in the lower half):
//   A (16x16, row-major): a0 (group, 2t..2t+1), a1 (group+8, 2t..), a2 (group, 2t+8..), a3 (group+8, 2t+8..)
//   B (16x8, k by n):     b0 (k 2t..2t+1, n group), b1 (k 2t+8.., n group)
//   C (16x8, fp32):       c0 (group, 2t), c1 (group, 2t+1), c2 (group+8, 2t), c3 (group+8, 2t+1)
// ldmatrix m8n8.x4 loads four 8x8 bf16 matrices from shared memory, lane l giving the address of row
// l % 8 of matrix l / 8; register j of lane l then holds matrix j's (row l / 4, cols 2(l % 4)..+1), or
// with .trans its (rows 2(l % 4)..+1, col l / 4): exactly an A, B or C-shaped fragment.
#ifndef LLMC_MMA_CUH
#define LLMC_MMA_CUH
#include <stdint.h>
#include "llmc/cuda_common.cuh"
#ifndef LLMC_CUDA_EMU
#define LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
__device__ __forceinline__ unsigned char *dyn_smem() {
    extern __shared__ __align__(16) unsigned char dyn_smem_[];
    return dyn_smem_;
}
#endif

// d (16x8 fp32) += a (16x16 bf16, row-major) b (16x8 bf16, k by n), one warp
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef LLMC_CUDA_EMU
    emu_mma_16816(d, a, b, d);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// two floats -> one register of two bf16 (round to nearest), lo in the lower half
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16(lo)) | ((uint32_t)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16; row: this lane's row address in shared memory
// (16-byte aligned). The emulation fetches the other lanes' addresses with shuffles.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const bf16 *row) {
#ifdef LLMC_CUDA_EMU
    int lane = threadIdx.x % 32;
    for (int j = 0; j < 4; j++) {
        const bf16 *src = __shfl_sync(0xffffffffu, row, j * 8 + lane / 4);
        memcpy(&r[j], src + 2 * (lane % 4), 4);
    }
#else
    uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const bf16 *row) {
#ifdef LLMC_CUDA_EMU
    int lane = threadIdx.x % 32;
    for (int j = 0; j < 4; j++) {
        const bf16 *r0 = __shfl_sync(0xffffffffu, row, j * 8 + 2 * (lane % 4));
        const bf16 *r1 = __shfl_sync(0xffffffffu, row, j * 8 + 2 * (lane % 4) + 1);
        r[j] = (uint32_t)__bfloat16_as_ushort(r0[lane / 4]) | ((uint32_t)__bfloat16_as_ushort(r1[lane / 4]) << 16);
    }
#else
    uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

// cp.async (sm_80+): 16 bytes global -> shared without a trip through registers, so a tile's loads
// overlap the work on the previous one. valid false writes 16 zero bytes (src is not read, but must be a
// mapped address). Copies are grouped by cp_async_commit; cp_async_wait<N> waits until at most N of this
// thread's groups are pending, and a __syncthreads after it makes every thread's copies visible.
// The emulation copies at once (commit and wait have nothing to do).
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
#ifdef LLMC_CUDA_EMU
    if (valid) memcpy(dst, src, 16);
    else memset(dst, 0, 16);
#else
    uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef LLMC_CUDA_EMU
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifndef LLMC_CUDA_EMU
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

#endif
