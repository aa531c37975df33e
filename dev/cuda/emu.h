// A CPU emulation of the small part of CUDA that the structured-layer kernels use, so that their
// index math, tiling, shared-memory layouts, warp-level mma fragments and barriers run (slowly) on a
// machine without a GPU, against the CPU references (dev/cuda/emu_check.cpp; test/test_cuda_build.sh).
//
// Compile with g++ -std=c++20 (not nvcc): include this header first, then the .cuh files. Each
// thread block runs as blockDim fibers (ucontext) on the calling OS thread, scheduled in thread
// order: a fiber runs until it reaches a barrier (__syncthreads, or the warp barrier behind
// __syncwarp, shuffles and mma.sync m16n8k16) or returns; a barrier releases its waiters once every
// live thread of its block (or warp) has arrived; a barrier that can never release is reported as a
// deadlock. No OS threads: the result is deterministic and does not depend on the machine's limits
// on threads. Blocks run one after another. Shared memory is one static buffer, filled with 0xFF
// bytes (bf16 NaN) before every block, so reading shared memory that the block did not write shows
// up as NaN. Not emulated here: memory ordering beyond barriers, races between blocks (blocks run
// one at a time), wgmma (no kernel uses it). ldmatrix and cp.async are emulated in llmc/mma.cuh
// (ldmatrix by exchanging the lanes' row pointers; cp.async as an immediate copy, so a missing wait
// cannot show up here). Kernels are launched with
// LAUNCH(grid, block, smem, stream, kernel)(args...), which is kernel<<<grid, block, smem, stream>>>
// under nvcc.
#ifndef DEV_CUDA_EMU_H
#define DEV_CUDA_EMU_H
#define LLMC_CUDA_EMU 1
#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tuple>
#include <ucontext.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

// llmc/cuda_common.cuh is replaced by the definitions below (it holds <<<>>> launches and cuBLAS).
#define LLMC_CUDA_COMMON_CUH
typedef __nv_bfloat16 bf16;

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

static uint3 emu_bid;
static dim3 emu_bdim, emu_gdim;
static uint3 emu_tid;                 // of the fiber that runs (set by the scheduler before it resumes one)
static int emu_linear;                // linear thread index in the block
#define threadIdx emu_tid
#define blockIdx emu_bid
#define blockDim emu_bdim
#define gridDim emu_gdim

#define EMU_SMEM_BYTES (227 * 1024)
alignas(128) static unsigned char emu_smem[EMU_SMEM_BYTES];
static unsigned char *dyn_smem() { return emu_smem; }

// One block's fibers. A fiber's state: running or ready, waiting at the block barrier, waiting at
// its warp's barrier, or done. block_arrived / warp_arrived count the waiters; live / warp_live the
// threads not done (a thread that returns leaves every barrier, as CUDA's exited threads do).
enum { EMU_READY, EMU_AT_BLOCK, EMU_AT_WARP, EMU_DONE };
#define EMU_STACK_BYTES (256 * 1024)
struct EmuBlock {
    int nt, live, block_arrived;
    int state[1024], warp_live[32], warp_arrived[32];
    ucontext_t sched, fiber[1024];
};
static EmuBlock emu_block;
static char *emu_stacks[1024];   // allocated on first use, reused by every block
struct EmuWarpBuf { uint32_t a[32][4], b[32][2]; uint64_t v[32]; };
static EmuWarpBuf emu_warp_buf[32];

// Releases a barrier whose waiters are all the live threads it covers.
static void emu_release(int kind, int first, int count) {
    for (int t = first; t < first + count; t++)
        if (emu_block.state[t] == kind) emu_block.state[t] = EMU_READY;
}
static void emu_check_barriers(int warp) {
    EmuBlock &b = emu_block;
    if (b.warp_live[warp] > 0 && b.warp_arrived[warp] == b.warp_live[warp]) {
        b.warp_arrived[warp] = 0;
        emu_release(EMU_AT_WARP, warp * 32, 32);
    }
    if (b.live > 0 && b.block_arrived == b.live) {
        b.block_arrived = 0;
        emu_release(EMU_AT_BLOCK, 0, b.nt);
    }
}
static void emu_wait(int kind) {
    EmuBlock &b = emu_block;
    int me = emu_linear, warp = me / 32;
    b.state[me] = kind;
    if (kind == EMU_AT_BLOCK) b.block_arrived++;
    else b.warp_arrived[warp]++;
    emu_check_barriers(warp);
    swapcontext(&b.fiber[me], &b.sched);
}
static void emu_syncthreads() { emu_wait(EMU_AT_BLOCK); }
static void emu_syncwarp() { emu_wait(EMU_AT_WARP); }
#define __syncthreads() emu_syncthreads()
#define __syncwarp(...) emu_syncwarp()

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 across the 32 lanes of the calling warp,
// with the fragment layout of the PTX ISA: lane = 4 * group + t;
//   A (16x16 row-major): a0 (group, 2t..2t+1), a1 (group+8, 2t..), a2 (group, 2t+8..), a3 (group+8, 2t+8..)
//   B (16x8, k by n):     b0 (k 2t..2t+1, n group), b1 (k 2t+8.., n group)
//   C (16x8):             c0 (group, 2t), c1 (group, 2t+1), c2 (group+8, 2t), c3 (group+8, 2t+1)
// the lower half of each 32-bit register holds the lower column (k) index.
static float emu_half(uint32_t reg, int hi) {
    uint32_t bits = (hi ? reg >> 16 : reg & 0xFFFFu) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static void emu_mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    int lane = emu_linear % 32;
    EmuWarpBuf &w = emu_warp_buf[emu_linear / 32];
    memcpy(w.a[lane], a, 16);
    memcpy(w.b[lane], b, 8);
    emu_syncwarp();
    int group = lane / 4, t = lane % 4;
    float out[4];
    for (int i = 0; i < 4; i++) {
        int row = group + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float s = c[i];
        for (int k = 0; k < 16; k++) {
            int al = (row % 8) * 4 + (k % 8) / 2, areg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
            int bl = col * 4 + (k % 8) / 2, breg = k >= 8 ? 1 : 0;
            s += emu_half(w.a[al][areg], k & 1) * emu_half(w.b[bl][breg], k & 1);
        }
        out[i] = s;
    }
    emu_syncwarp();
    memcpy(d, out, 16);
}

template <class T> static T emu_shfl(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    int lane = emu_linear % 32;
    EmuWarpBuf &w = emu_warp_buf[emu_linear / 32];
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    w.v[lane] = bits;
    emu_syncwarp();
    bits = w.v[src_lane & 31];
    emu_syncwarp();
    T r;
    memcpy(&r, &bits, sizeof(T));
    return r;
}
#define __shfl_xor_sync(mask, v, o) emu_shfl((v), (emu_linear % 32) ^ (o))
#define __shfl_sync(mask, v, src) emu_shfl((v), (src))
static unsigned emu_ballot(int pred) {
    EmuWarpBuf &w = emu_warp_buf[emu_linear / 32];
    w.v[emu_linear % 32] = pred != 0;
    emu_syncwarp();
    unsigned m = 0;
    for (int l = 0; l < 32; l++) m |= (unsigned)w.v[l] << l;
    emu_syncwarp();
    return m;
}
#define __ballot_sync(mask, pred) emu_ballot(pred)
#define __popc(x) __builtin_popcount(x)

// Runs every block of the grid, one after another, each as blockDim fibers.
template <class... P> struct EmuLaunch {
    dim3 grid, block;
    size_t smem;
    void (*kernel)(P...);
    void operator()(P... args) const {
        int nt = (int)(block.x * block.y * block.z);
        if (nt % 32 || nt > 1024 || smem > EMU_SMEM_BYTES) {
            fprintf(stderr, "emu: bad launch (%d threads, %zu bytes of shared memory)\n", nt, smem);
            exit(1);
        }
        emu_gdim = grid;
        emu_bdim = block;
        std::tuple<P...> tup(args...);
        run_kernel = kernel;
        run_args = &tup;
        EmuBlock &b = emu_block;
        for (int t = 0; t < nt; t++)
            if (!emu_stacks[t] && !(emu_stacks[t] = (char *)malloc(EMU_STACK_BYTES))) {
                fprintf(stderr, "emu: out of memory for %d fiber stacks\n", nt);
                exit(1);
            }
        for (unsigned z = 0; z < grid.z; z++)
            for (unsigned y = 0; y < grid.y; y++)
                for (unsigned x = 0; x < grid.x; x++) {
                    emu_bid = make_uint3(x, y, z);
                    memset(emu_smem, 0xFF, smem);
                    b.nt = b.live = nt;
                    b.block_arrived = 0;
                    for (int w = 0; w < nt / 32; w++) b.warp_live[w] = 32, b.warp_arrived[w] = 0;
                    for (int t = 0; t < nt; t++) {
                        b.state[t] = EMU_READY;
                        getcontext(&b.fiber[t]);
                        b.fiber[t].uc_stack.ss_sp = emu_stacks[t];
                        b.fiber[t].uc_stack.ss_size = EMU_STACK_BYTES;
                        b.fiber[t].uc_link = &b.sched;
                        makecontext(&b.fiber[t], (void (*)())entry, 0);
                    }
                    // round-robin over the ready fibers in thread order until all are done
                    for (int done = 0; done < nt;) {
                        int progressed = 0;
                        for (int t = 0; t < nt; t++) {
                            if (b.state[t] != EMU_READY) continue;
                            emu_linear = t;
                            emu_tid = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                            swapcontext(&b.sched, &b.fiber[t]);
                            progressed = 1;
                            if (b.state[t] == EMU_DONE) done++;
                        }
                        if (!progressed) {
                            fprintf(stderr, "emu: deadlock in block (%u, %u, %u): %d of %d threads wait at "
                                            "__syncthreads, the others at a warp barrier or done\n",
                                    x, y, z, b.block_arrived, nt);
                            exit(1);
                        }
                    }
                }
    }
    // what the fibers run (kernels launch no kernels, so one launch at a time)
    static inline void (*run_kernel)(P...);
    static inline std::tuple<P...> *run_args;
    // a fiber's entry point: run the kernel as thread emu_linear, then leave every barrier
    static void entry() {
        std::apply(run_kernel, *run_args);
        EmuBlock &b = emu_block;
        int me = emu_linear, warp = me / 32;
        b.state[me] = EMU_DONE;
        b.live--;
        b.warp_live[warp]--;
        emu_check_barriers(warp);
    }
};
template <class... P> static EmuLaunch<P...> emu_launch(dim3 g, dim3 b, size_t smem, void (*k)(P...)) {
    return EmuLaunch<P...>{g, b, smem, k};
}
#define LAUNCH(grid, block, smem, stream, ...) emu_launch((grid), (block), (smem), __VA_ARGS__)

// The host API the kernels' wrappers call: synchronous, on host memory.
#define cudaGetLastError() cudaSuccess
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaMemsetAsync(p, v, n, s) (memset((p), (v), (n)), cudaSuccess)
#define cudaMemcpyAsync(d, s_, n, kind, st) (memcpy((d), (s_), (n)), cudaSuccess)
#define cudaCheck(x) do { if ((x) != cudaSuccess) { fprintf(stderr, "emu: CUDA call failed at %s:%d\n", __FILE__, __LINE__); exit(1); } } while (0)
static cudaStream_t main_stream = 0;

// CUDA's integer min/max, and what the kernels use from llmc/cuda_common.cuh.
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }
static float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
static float block_sum(float v, float *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : 0.0f;
    return warp_sum(v);
}
static inline float bf16_to_float_host(bf16 x) { return __bfloat162float(x); }

#endif
