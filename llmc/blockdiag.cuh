// The block-diagonal matmul on the GPU (DESIGN sections 3 and 7), bf16 in and out, fp32 accumulation,
// and the structured linear layer built on it: the GPU twin of llmc/blockdiag.h.
//
// The primitive (contract A): weights W (nb, q, p), block i a row-major (q, p) matrix; block i reads
// p columns at i*p of a row-major input and writes q columns at i*q of a row-major output, rows of any
// stride. Three kernels, all tensor-core (mma.sync m16n8k16 bf16 -> fp32) on shared-memory tiles:
//   forward          y_i (rows, q) = x_i W_i^T              (+ bias, optional GELU: the layer's epilogue)
//   backward input   dx_i (rows, p) = dy_i W_i               (optional * gelu'(pre): the next layer's GELU)
//   backward weight  dW_i (q, p) (+)= dy_i^T x_i              (split over rows, partial sums, fixed-order sum)
// Every activation operand is read, and every output written, through a per-token permutation of its
// row (TokenPermute (a, b, r): the row viewed (a, b, r) -> (b, a, r)), which is how the BTT and Monarch
// permutations are folded into the loads and stores instead of separate transposes. Operands may also
// be gathered rows (row r is token rows[r] / rows_div, optionally scaled by scale[rows[r]]) and the rows
// may be cut into groups with their own weights (MoE experts, llmc/moe.cuh).
//
// Two-stage structures (lowrank, monarch, btt) run both stages in one kernel where TM tokens' whole
// intermediate z' fits in shared memory (bd_fused_forward: z' is written to HBM only because backward
// needs it); otherwise, and in backward, stage by stage. Stages with one block and no permutation (lowrank,
// dense under rms_cap) go to cuBLASLt (llmc/matmul.cuh), which is faster than our kernels for plain GEMMs.
//
// Determinism: no atomics. The weight gradient is summed over S fixed row ranges into fp32 partials and
// the partials are added in order; S, the tiles and every summation order depend only on the shapes.
// The dev programs dev/cuda/blockdiag_matmul.cu and btt_fused.cu check every kernel against
// llmc/blockdiag.h and time them against cuBLAS; dev/cuda/emu_check.cpp runs them on a CPU emulation.
#ifndef LLMC_BLOCKDIAG_CUH
#define LLMC_BLOCKDIAG_CUH
#include <stdint.h>
#include "llmc/cuda_common.cuh"
#include "llmc/structure.h"
#include "llmc/mma.cuh"   // LAUNCH, dyn_smem, mma_bf16_16816
#ifndef LLMC_CUDA_EMU
#include "llmc/matmul.cuh"
#endif

// ----------------------------------------------------------------------------------------------
// Small device helpers

__device__ __forceinline__ uint32_t bd_pack(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// The CPU trainer's GELU (tanh approximation) and its derivative.
#define BD_GELU_SCALE 0.7978845608028654f
__device__ __forceinline__ float bd_gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(BD_GELU_SCALE * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float bd_gelu_grad(float x) {
    float th = tanhf(BD_GELU_SCALE * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * BD_GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
}

// Position of logical column L in a row permuted by t: the row viewed (a, b, r), index (i j k), lands
// at (j i k) of the (b, a, r) view (llmc/blockdiag.h's token_transpose). t.a == 0: identity.
__host__ __device__ __forceinline__ int bd_perm(TokenPermute t, int L) {
    if (t.a == 0) return L;
    int k = L % t.r, ij = L / t.r, j = ij % t.b, i = ij / t.b;
    return (j * t.a + i) * t.r + k;
}
// The identity written as a == 0, so kernels can take the fast path.
static TokenPermute bd_perm_norm(TokenPermute t) {
    if (t.a <= 1 || t.b <= 1) t.a = 0;
    return t;
}
static const TokenPermute BD_NO_PERM = {0, 1, 1};

// ----------------------------------------------------------------------------------------------
// Operands and kernel arguments

// An activation operand: rows of a row-major matrix, columns through a permutation, rows possibly
// gathered (and scaled).
typedef struct {
    const bf16 *p;       // (rows, ld)
    int ld;
    TokenPermute perm;   // logical column L of a row is element perm(L)
    const int *rows;     // NULL: row r is row r of p; else row rows[r] / rows_div
    int rows_div;
    const float *scale;  // with rows, or NULL: row r multiplied by scale[rows[r]]
    int vec;             // set by bd_act_vec: whole 8-element chunks may be loaded as 16 bytes
} BdAct;

static BdAct bd_act(const bf16 *p, int ld, TokenPermute perm) {
    BdAct a;
    memset(&a, 0, sizeof a);
    a.p = p;
    a.ld = ld;
    a.perm = bd_perm_norm(perm);
    a.rows_div = 1;
    return a;
}
// Chunks of 8 columns starting at multiples of 8 of a block of width bw are contiguous and 16-byte
// aligned: no permutation, row stride, block width and base pointer all multiples of 8 elements.
static int bd_act_vec(const BdAct *a, int bw) {
    return a->perm.a == 0 && a->ld % 8 == 0 && bw % 8 == 0 && ((uintptr_t)a->p % 16) == 0;
}

enum { BD_FWD, BD_BWD_IN, BD_BWD_W };

typedef struct {
    BdAct a, b;          // a: x (forward), dy (backward input, backward weight); b: x (backward weight)
    const bf16 *W;       // group g's weights (nb, q, p) at W + g * wstride
    long long wstride;
    int nb, p, q;
    int nrows;           // rows in all groups together
    const int *goff;     // (G + 1) group row offsets (device), or NULL: one group of nrows rows
    int G;
    bf16 *y;             // forward, backward input: output (nrows, ldy), columns through yperm
    int ldy;
    TokenPermute yperm;
    int accumulate;      // y (+)=
    const bf16 *bias;    // forward: + bias[physical column]
    bf16 *gelu_pre;      // forward: y = gelu(v), gelu_pre = v (same layout as y)
    const bf16 *dgelu_pre; // backward input: y = v * gelu'(dgelu_pre)
    float *part;         // backward weight: partial sums (S, G, nb, q, p)
    int S;
    int vec_w;           // W rows are whole 16-byte chunks (p % 8 == 0, aligned)
    int pairs;           // set by bd_run: output columns (2c, 2c+1) are adjacent, 4-byte aligned elements
} BdArgs;

// Row tile `tile` of height BM: its group and rows [r0, r1). Tiles never straddle groups; with groups
// the grid has ceil(nrows / BM) + G tiles, of which the last ones may be empty.
__device__ __forceinline__ bool bd_row_tile(const int *goff, int G, int nrows, int tile, int BM, int *g, int *r0, int *r1) {
    if (!goff) {
        *g = 0;
        *r0 = tile * BM;
        *r1 = min(*r0 + BM, nrows);
        return *r0 < nrows;
    }
    for (int gg = 0; gg < G; gg++) {
        int lo = goff[gg], hi = goff[gg + 1], nt = (hi - lo + BM - 1) / BM;
        if (tile < nt) {
            *g = gg;
            *r0 = lo + tile * BM;
            *r1 = min(*r0 + BM, hi);
            return true;
        }
        tile -= nt;
    }
    return false;
}
static int bd_row_tiles(int nrows, int G, const int *goff, int BM) {
    return ceil_div(nrows, BM) + (goff ? G : 0);
}

// Row r of an operand: pointer and scale.
__device__ __forceinline__ const bf16 *bd_row(const BdAct &a, int r, float *s) {
    if (!a.rows) { *s = 1.0f; return a.p + (size_t)r * a.ld; }
    int v = a.rows[r];
    *s = a.scale ? a.scale[v] : 1.0f;
    return a.p + (size_t)(v / a.rows_div) * a.ld;
}

__device__ __forceinline__ void bd_scale8(uint4 &v, float s) {
    bf16 t[8];
    memcpy(t, &v, 16);
    #pragma unroll
    for (int e = 0; e < 8; e++) t[e] = __float2bfloat16(__bfloat162float(t[e]) * s);
    memcpy(&v, t, 16);
}

// 8 consecutive logical columns [col, col + 8) of row r (r < 0: none), the first nvalid of them real,
// the rest 0.
__device__ __forceinline__ uint4 bd_load8_act(const BdAct &a, int r, int col, int nvalid) {
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < 0 || nvalid <= 0) return v;
    float s;
    const bf16 *row = bd_row(a, r, &s);
    if (a.vec && nvalid >= 8) {
        v = *(const uint4 *)(row + col);
        if (s != 1.0f) bd_scale8(v, s);
        return v;
    }
    bf16 t[8];
    #pragma unroll
    for (int e = 0; e < 8; e++) {
        float x = e < nvalid ? __bfloat162float(row[bd_perm(a.perm, col + e)]) * s : 0.0f;
        t[e] = __float2bfloat16(x);
    }
    memcpy(&v, t, 16);
    return v;
}
// 8 consecutive weights from p, the first nvalid real.
__device__ __forceinline__ uint4 bd_load8_w(const bf16 *p, int nvalid, int vec) {
    uint4 v = make_uint4(0, 0, 0, 0);
    if (nvalid <= 0) return v;
    if (vec && nvalid >= 8) return *(const uint4 *)p;
    bf16 t[8];
    #pragma unroll
    for (int e = 0; e < 8; e++) t[e] = e < nvalid ? p[e] : __float2bfloat16(0.0f);
    memcpy(&v, t, 16);
    return v;
}

// The forward / backward-input epilogue of output value v at element o (physical column P) of y:
// returns what y gets; *pre the pre-activation (forward with GELU).
__device__ __forceinline__ float bd_epilogue(const BdArgs &g, int mode, size_t o, int P, float v, float *pre) {
    if (mode == BD_FWD) {
        if (g.bias) v += __bfloat162float(g.bias[P]);
        *pre = v;
        if (g.gelu_pre) v = bd_gelu(v);
    } else if (g.dgelu_pre) {
        v *= bd_gelu_grad(__bfloat162float(g.dgelu_pre[o]));
    }
    if (g.accumulate) v += __bfloat162float(g.y[o]);
    return v;
}
// One output value v at (row r, logical column L).
__device__ __forceinline__ void bd_store_out(const BdArgs &g, int mode, int r, int L, float v) {
    int P = bd_perm(g.yperm, L);
    size_t o = (size_t)r * g.ldy + P;
    float pre;
    v = bd_epilogue(g, mode, o, P, v, &pre);
    if (mode == BD_FWD && g.gelu_pre) g.gelu_pre[o] = __float2bfloat16(pre);
    g.y[o] = __float2bfloat16(v);
}
// Two values at logical columns L, L+1 of row r, stored as one 32-bit pair (g.pairs: no permutation).
__device__ __forceinline__ void bd_store_out2(const BdArgs &g, int mode, int r, int L, float v0, float v1) {
    size_t o = (size_t)r * g.ldy + L;
    float p0, p1;
    v0 = bd_epilogue(g, mode, o, L, v0, &p0);
    v1 = bd_epilogue(g, mode, o + 1, L + 1, v1, &p1);
    if (mode == BD_FWD && g.gelu_pre) *(uint32_t *)(g.gelu_pre + o) = bd_pack(__float2bfloat16(p0), __float2bfloat16(p1));
    *(uint32_t *)(g.y + o) = bd_pack(__float2bfloat16(v0), __float2bfloat16(v1));
}

// ----------------------------------------------------------------------------------------------
// The tensor-core kernel: one (BM x BN) output tile per block of 4 warps (2 x 2, each BM/2 x BN/2),
// K in steps of 32 through shared memory, the next step's global loads in registers while the tensor
// cores work on this one.
//   forward:         M = rows, N = q, K = p;  A (r, k) = x row r column i*p + k;  B (n, k) = W_i[n][k]
//   backward input:  M = rows, N = p, K = q;  A (r, k) = dy row r column i*q + k; B (n, k) = W_i[k][n]
//   backward weight: M = q, N = p, K = rows; A (j, r) = dy row r column i*q + j; B (c, r) = x row r column i*p + c
// Shared tiles are stored k-contiguous ([m][k], rows of BK + 8 elements: fragment loads hit 32
// different banks). Operands whose memory is contiguous along k (x, dy in the first two, W in
// forward) are copied in 16-byte chunks; the others (contiguous along m or n) are loaded in 8-element
// chunks along m/n with consecutive threads on consecutive k, and scattered into the tile.
// Grid: forward/backward input (row tiles, ceil(N/BN), nb); backward weight (ceil(q/BM), ceil(p/BN),
// S * G * nb) writing part[s][g][i] (q, p).
#define BD_BK 32
#define BD_BKP 40
#define BD_THREADS 128

template <int BM, int BN, int MODE>
__global__ void __launch_bounds__(BD_THREADS) bd_tc_kernel(BdArgs g) {
    constexpr int MI = BM / 32, NI = BN / 16;
    constexpr int ACH = BM * BD_BK / 8 / BD_THREADS, BCH = BN * BD_BK / 8 / BD_THREADS;
    static_assert(ACH >= 1 && BCH >= 1, "tile too small for the loaders");
    bf16 *As = (bf16 *)dyn_smem(), *Bs = As + BM * BD_BKP;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wm = warp / 2, wn = warp % 2;
    const int grp = lane / 4, t4 = lane % 4;

    int i, gg, s = 0, m0, n0 = blockIdx.y * BN, mend, ncols, K, klo = 0, khi = 0;
    if (MODE != BD_BWD_W) {
        i = blockIdx.z;
        if (!bd_row_tile(g.goff, g.G, g.nrows, blockIdx.x, BM, &gg, &m0, &mend)) return;
        ncols = MODE == BD_FWD ? g.q : g.p;
        K = MODE == BD_FWD ? g.p : g.q;
    } else {
        int z = blockIdx.z;
        i = z % g.nb;
        gg = (z / g.nb) % g.G;
        s = z / (g.nb * g.G);
        int lo = g.goff ? g.goff[gg] : 0, hi = g.goff ? g.goff[gg + 1] : g.nrows;
        int chunk = (hi - lo + g.S - 1) / g.S;
        klo = min(hi, lo + s * chunk);
        khi = min(hi, klo + chunk);
        K = khi - klo;
        m0 = blockIdx.x * BM;
        mend = g.q;
        ncols = g.p;
    }
    const bf16 *W = g.W + gg * g.wstride + (size_t)i * g.q * g.p;

    float acc[MI][NI][4];
    #pragma unroll
    for (int a = 0; a < MI; a++)
        #pragma unroll
        for (int b = 0; b < NI; b++)
            #pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;
    uint4 ra[ACH], rb[BCH];

    auto load = [&](int k0) {
        #pragma unroll
        for (int c = 0; c < ACH; c++) {
            int id = tid + c * BD_THREADS;
            if (MODE != BD_BWD_W) {   // k-contiguous: row id/4, columns (id%4)*8 ..
                int row = id / 4, kc = (id % 4) * 8, r = m0 + row;
                int kw = MODE == BD_FWD ? g.p : g.q;
                ra[c] = bd_load8_act(g.a, r < mend ? r : -1, i * kw + k0 + kc, K - (k0 + kc));
            } else {                  // m-contiguous: token k0 + id%32, columns j = m0 + (id/32)*8 ..
                int kk = id % BD_BK, mm = (id / BD_BK) * 8, r = klo + k0 + kk;
                ra[c] = bd_load8_act(g.a, r < khi ? r : -1, i * g.q + m0 + mm, g.q - (m0 + mm));
            }
        }
        #pragma unroll
        for (int c = 0; c < BCH; c++) {
            int id = tid + c * BD_THREADS;
            if (MODE == BD_FWD) {     // W_i row n, k-contiguous
                int row = id / 4, kc = (id % 4) * 8, j = n0 + row;
                rb[c] = bd_load8_w(W + (size_t)j * g.p + k0 + kc, j < g.q ? g.p - (k0 + kc) : 0, g.vec_w);
            } else if (MODE == BD_BWD_IN) {  // W_i row k0 + kk, columns n0 + nn .. (n-contiguous)
                int kk = id % BD_BK, nn = (id / BD_BK) * 8, j = k0 + kk;
                rb[c] = bd_load8_w(W + (size_t)j * g.p + n0 + nn, j < g.q ? g.p - (n0 + nn) : 0, g.vec_w);
            } else {                  // x row klo + k0 + kk, columns i*p + n0 + nn ..
                int kk = id % BD_BK, nn = (id / BD_BK) * 8, r = klo + k0 + kk;
                rb[c] = bd_load8_act(g.b, r < khi ? r : -1, i * g.p + n0 + nn, g.p - (n0 + nn));
            }
        }
    };
    auto store = [&]() {
        #pragma unroll
        for (int c = 0; c < ACH; c++) {
            int id = tid + c * BD_THREADS;
            if (MODE != BD_BWD_W) {
                *(uint4 *)(As + (id / 4) * BD_BKP + (id % 4) * 8) = ra[c];
            } else {
                bf16 t[8];
                memcpy(t, &ra[c], 16);
                int kk = id % BD_BK, mm = (id / BD_BK) * 8;
                #pragma unroll
                for (int e = 0; e < 8; e++) As[(mm + e) * BD_BKP + kk] = t[e];
            }
        }
        #pragma unroll
        for (int c = 0; c < BCH; c++) {
            int id = tid + c * BD_THREADS;
            if (MODE == BD_FWD) {
                *(uint4 *)(Bs + (id / 4) * BD_BKP + (id % 4) * 8) = rb[c];
            } else {
                bf16 t[8];
                memcpy(t, &rb[c], 16);
                int kk = id % BD_BK, nn = (id / BD_BK) * 8;
                #pragma unroll
                for (int e = 0; e < 8; e++) Bs[(nn + e) * BD_BKP + kk] = t[e];
            }
        }
    };

    if (K > 0) {
        load(0);
        store();
        __syncthreads();
    }
    for (int k0 = 0; k0 < K; k0 += BD_BK) {
        bool more = k0 + BD_BK < K;
        if (more) load(k0 + BD_BK);
        #pragma unroll
        for (int kk = 0; kk < BD_BK; kk += 16) {
            uint32_t af[MI][4], bfr[NI][2];
            #pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                const bf16 *p = As + (wm * (BM / 2) + mi * 16 + grp) * BD_BKP + kk + 2 * t4;
                af[mi][0] = *(const uint32_t *)p;
                af[mi][1] = *(const uint32_t *)(p + 8 * BD_BKP);
                af[mi][2] = *(const uint32_t *)(p + 8);
                af[mi][3] = *(const uint32_t *)(p + 8 * BD_BKP + 8);
            }
            #pragma unroll
            for (int ni = 0; ni < NI; ni++) {
                const bf16 *p = Bs + (wn * (BN / 2) + ni * 8 + grp) * BD_BKP + kk + 2 * t4;
                bfr[ni][0] = *(const uint32_t *)p;
                bfr[ni][1] = *(const uint32_t *)(p + 8);
            }
            #pragma unroll
            for (int mi = 0; mi < MI; mi++)
                #pragma unroll
                for (int ni = 0; ni < NI; ni++) mma_bf16_16816(acc[mi][ni], af[mi], bfr[ni]);
        }
        __syncthreads();
        if (more) {
            store();
            __syncthreads();
        }
    }

    #pragma unroll
    for (int mi = 0; mi < MI; mi++)
        #pragma unroll
        for (int ni = 0; ni < NI; ni++)
            #pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = m0 + wm * (BM / 2) + mi * 16 + grp + h * 8;
                int col = n0 + wn * (BN / 2) + ni * 8 + 2 * t4;
                const float *v = &acc[mi][ni][h * 2];
                if (row >= mend || col >= ncols) continue;
                if (MODE != BD_BWD_W && g.pairs && col + 1 < ncols) {
                    bd_store_out2(g, MODE, row, i * ncols + col, v[0], v[1]);
                    continue;
                }
                #pragma unroll
                for (int e = 0; e < 2; e++) {
                    if (col + e >= ncols) continue;
                    if (MODE == BD_BWD_W)
                        g.part[((((size_t)s * g.G + gg) * g.nb + i) * g.q + row) * g.p + col + e] = v[e];
                    else
                        bd_store_out(g, MODE, row, i * ncols + col + e, v[e]);
                }
            }
}

// The straightforward version, kept as the reference on the GPU and as a fallback (LLMC_BLOCKDIAG=naive):
// one thread per output value, fp32 sums in k order; the weight gradient one thread per weight summing
// all rows of its group in order (S = 1).
__global__ void bd_naive_kernel(BdArgs g, int mode) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (mode != BD_BWD_W) {
        int ncols = mode == BD_FWD ? g.q : g.p, K = mode == BD_FWD ? g.p : g.q;
        if (idx >= (size_t)g.nrows * g.nb * ncols) return;
        int r = idx / ((size_t)g.nb * ncols), i = (idx / ncols) % g.nb, c = idx % ncols, gg = 0;
        if (g.goff)
            while (gg + 1 < g.G && r >= g.goff[gg + 1]) gg++;
        const bf16 *W = g.W + gg * g.wstride + (size_t)i * g.q * g.p;
        float s;
        const bf16 *row = bd_row(g.a, r, &s);
        float sum = 0.0f;
        for (int k = 0; k < K; k++) {
            float a = __bfloat162float(__float2bfloat16(__bfloat162float(row[bd_perm(g.a.perm, i * K + k)]) * s));
            float w = __bfloat162float(mode == BD_FWD ? W[(size_t)c * g.p + k] : W[(size_t)k * g.p + c]);
            sum += a * w;
        }
        bd_store_out(g, mode, r, i * ncols + c, sum);
    } else {
        if (idx >= (size_t)g.G * g.nb * g.q * g.p) return;
        int c = idx % g.p, j = (idx / g.p) % g.q, i = (idx / ((size_t)g.p * g.q)) % g.nb;
        int gg = idx / ((size_t)g.p * g.q * g.nb);
        int lo = g.goff ? g.goff[gg] : 0, hi = g.goff ? g.goff[gg + 1] : g.nrows;
        float sum = 0.0f;
        for (int r = lo; r < hi; r++) {
            float sa, sb;
            const bf16 *ra = bd_row(g.a, r, &sa), *rb = bd_row(g.b, r, &sb);
            float a = __bfloat162float(__float2bfloat16(__bfloat162float(ra[bd_perm(g.a.perm, i * g.q + j)]) * sa));
            float b = __bfloat162float(__float2bfloat16(__bfloat162float(rb[bd_perm(g.b.perm, i * g.p + c)]) * sb));
            sum += a * b;
        }
        g.part[idx] = sum;
    }
}

// out (n) (+)= sum over s < S of part[s * n + idx], in s order; bf16 or fp32 out.
__global__ void bd_weight_finalize_kernel(bf16 *out_bf, float *out_f, const float *part, int S, size_t n, int accumulate) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    float s = 0.0f;
    for (int k = 0; k < S; k++) s += part[(size_t)k * n + idx];
    if (out_f) out_f[idx] = accumulate ? out_f[idx] + s : s;
    else out_bf[idx] = __float2bfloat16(accumulate ? __bfloat162float(out_bf[idx]) + s : s);
}

// ----------------------------------------------------------------------------------------------
// Host side of the primitive

// Which kernels run (LLMC_BLOCKDIAG, read once): "tc" (default) the tensor-core kernels and the fused
// two-stage forward; "unfused" the same kernels stage by stage (the comparison of dev/cuda/btt_fused.cu);
// "naive" the straightforward kernels (bring-up on a new GPU: if "tc" fails the parity test and "naive"
// passes, the fault is in the tiled kernels).
enum { BD_KERNEL_TC, BD_KERNEL_UNFUSED, BD_KERNEL_NAIVE };
static int bd_kernel_choice = -1;
static int bd_kernel(void) {
    if (bd_kernel_choice < 0) {
        const char *e = getenv("LLMC_BLOCKDIAG");
        bd_kernel_choice = !e || !strcmp(e, "tc") ? BD_KERNEL_TC : !strcmp(e, "unfused") ? BD_KERNEL_UNFUSED
                         : !strcmp(e, "naive") ? BD_KERNEL_NAIVE : -1;
        if (bd_kernel_choice < 0) {
            fprintf(stderr, "error: LLMC_BLOCKDIAG=%s: expected tc, unfused or naive\n", e);
            exit(1);
        }
    }
    return bd_kernel_choice;
}

static int bd_tile(int n) { return n <= 32 ? 32 : n <= 64 ? 64 : 128; }

// Row ranges of the weight gradient's split: enough blocks to fill an H100 (about 1024 of 128 threads),
// at least 128 rows each; a function of the shapes only, so the sums are the same on every GPU.
static int bd_splits(int nrows, int G, int nb, int q, int p) {
    long tiles = (long)ceil_div(q, bd_tile(q)) * ceil_div(p, bd_tile(p)) * nb * G;
    long s = (1024 + tiles - 1) / tiles, most = nrows / (128L * G);
    if (s > most) s = most;
    return s < 1 ? 1 : (int)s;
}
// fp32 scratch floats of a backward weight call.
static size_t bd_weight_scratch_floats(int nrows, int G, int nb, int q, int p) {
    return (size_t)bd_splits(nrows, G, nb, q, p) * G * nb * q * p;
}

template <int BM, int BN, int MODE> static void bd_launch_tc(const BdArgs &g, dim3 grid, cudaStream_t st) {
    size_t smem = (size_t)(BM + BN) * BD_BKP * sizeof(bf16);
    LAUNCH(grid, BD_THREADS, smem, st, bd_tc_kernel<BM, BN, MODE>)(g);
    cudaCheck(cudaGetLastError());
}

// Runs one of the three kernels; for backward weight, then sums the partials into dW_out (bf16) or
// dWf_out (fp32), (+)= by accumulate. scratch: bd_weight_scratch_floats floats.
static void bd_run(BdArgs g, int mode, bf16 *dW_out, float *dWf_out, int accumulate, float *scratch, cudaStream_t st) {
    g.vec_w = g.p % 8 == 0 && g.wstride % 8 == 0 && ((uintptr_t)g.W % 16) == 0;
    g.pairs = g.yperm.a == 0 && g.ldy % 2 == 0 && (mode == BD_FWD ? g.q : g.p) % 2 == 0 && ((uintptr_t)g.y % 4) == 0 &&
              ((uintptr_t)g.gelu_pre % 4) == 0;
    if (mode == BD_FWD) g.a.vec = bd_act_vec(&g.a, g.p);
    else g.a.vec = bd_act_vec(&g.a, g.q);
    if (mode == BD_BWD_W) g.b.vec = bd_act_vec(&g.b, g.p);
    if (g.nrows <= 0 && mode != BD_BWD_W) return;
    if (bd_kernel() == BD_KERNEL_NAIVE) {
        size_t n;
        if (mode == BD_BWD_W) { g.S = 1; g.part = scratch; n = (size_t)g.G * g.nb * g.q * g.p; }
        else n = (size_t)g.nrows * g.nb * (mode == BD_FWD ? g.q : g.p);
        LAUNCH(ceil_div(n, 256), 256, 0, st, bd_naive_kernel)(g, mode);
        cudaCheck(cudaGetLastError());
    } else if (mode != BD_BWD_W) {
        int ncols = mode == BD_FWD ? g.q : g.p;
        dim3 grid(bd_row_tiles(g.nrows, g.G, g.goff, 128), ceil_div(ncols, bd_tile(ncols)), g.nb);
        switch (bd_tile(ncols) + mode) {
        case 32 + BD_FWD: bd_launch_tc<128, 32, BD_FWD>(g, grid, st); break;
        case 64 + BD_FWD: bd_launch_tc<128, 64, BD_FWD>(g, grid, st); break;
        case 128 + BD_FWD: bd_launch_tc<128, 128, BD_FWD>(g, grid, st); break;
        case 32 + BD_BWD_IN: bd_launch_tc<128, 32, BD_BWD_IN>(g, grid, st); break;
        case 64 + BD_BWD_IN: bd_launch_tc<128, 64, BD_BWD_IN>(g, grid, st); break;
        default: bd_launch_tc<128, 128, BD_BWD_IN>(g, grid, st); break;
        }
    } else {
        g.S = bd_splits(g.nrows, g.G, g.nb, g.q, g.p);
        g.part = scratch;
        int bm = bd_tile(g.q), bn = bd_tile(g.p);
        dim3 grid(ceil_div(g.q, bm), ceil_div(g.p, bn), g.S * g.G * g.nb);
        switch (bm * 1000 + bn) {
        case 32032: bd_launch_tc<32, 32, BD_BWD_W>(g, grid, st); break;
        case 32064: bd_launch_tc<32, 64, BD_BWD_W>(g, grid, st); break;
        case 32128: bd_launch_tc<32, 128, BD_BWD_W>(g, grid, st); break;
        case 64032: bd_launch_tc<64, 32, BD_BWD_W>(g, grid, st); break;
        case 64064: bd_launch_tc<64, 64, BD_BWD_W>(g, grid, st); break;
        case 64128: bd_launch_tc<64, 128, BD_BWD_W>(g, grid, st); break;
        case 128032: bd_launch_tc<128, 32, BD_BWD_W>(g, grid, st); break;
        case 128064: bd_launch_tc<128, 64, BD_BWD_W>(g, grid, st); break;
        default: bd_launch_tc<128, 128, BD_BWD_W>(g, grid, st); break;
        }
    }
    if (mode == BD_BWD_W) {
        size_t n = (size_t)g.G * g.nb * g.q * g.p;
        LAUNCH(ceil_div(n, 256), 256, 0, st, bd_weight_finalize_kernel)(dW_out, dWf_out, scratch, g.S, n, accumulate);
        cudaCheck(cudaGetLastError());
    }
}

static BdArgs bd_args(const bf16 *W, int nb, int p, int q, int nrows) {
    BdArgs g;
    memset(&g, 0, sizeof g);
    g.W = W;
    g.nb = nb;
    g.p = p;
    g.q = q;
    g.nrows = nrows;
    g.G = 1;
    g.yperm = BD_NO_PERM;
    return g;
}

// The primitive of contract A on the GPU. Every function runs on stream st.
// y_i (N, q) = x_i W_i^T (+ bias) for every block; y columns through yperm; gelu_pre: y = gelu(v), gelu_pre = v.
static void blockdiag_forward_gpu(bf16 *y, int ldy, TokenPermute yperm, const bf16 *x, int ldx, TokenPermute xperm,
                                  const bf16 *W, int N, int nb, int p, int q, const bf16 *bias, bf16 *gelu_pre,
                                  cudaStream_t st) {
    BdArgs g = bd_args(W, nb, p, q, N);
    g.a = bd_act(x, ldx, xperm);
    g.y = y;
    g.ldy = ldy;
    g.yperm = bd_perm_norm(yperm);
    g.bias = bias;
    g.gelu_pre = gelu_pre;
    bd_run(g, BD_FWD, NULL, NULL, 0, NULL, st);
}
// dx_i (N, p) (+)= dy_i W_i; dy read through dyperm, dx written through dxperm; dgelu_pre: dx *= gelu'(pre).
static void blockdiag_backward_input_gpu(bf16 *dx, int ldx, TokenPermute dxperm, const bf16 *dy, int ldy,
                                         TokenPermute dyperm, const bf16 *W, int N, int nb, int p, int q,
                                         const bf16 *dgelu_pre, int accumulate, cudaStream_t st) {
    BdArgs g = bd_args(W, nb, p, q, N);
    g.a = bd_act(dy, ldy, dyperm);
    g.y = dx;
    g.ldy = ldx;
    g.yperm = bd_perm_norm(dxperm);
    g.dgelu_pre = dgelu_pre;
    g.accumulate = accumulate;
    bd_run(g, BD_BWD_IN, NULL, NULL, 0, NULL, st);
}
// dW_i (q, p) (+)= dy_i^T x_i, accumulate 1: +=, 0: =. scratch: bd_weight_scratch_floats(N, 1, nb, q, p).
static void blockdiag_backward_weight_gpu(bf16 *dW, const bf16 *dy, int ldy, TokenPermute dyperm, const bf16 *x,
                                          int ldx, TokenPermute xperm, int N, int nb, int p, int q, int accumulate,
                                          float *scratch, cudaStream_t st) {
    BdArgs g = bd_args(NULL, nb, p, q, N);
    g.a = bd_act(dy, ldy, dyperm);
    g.b = bd_act(x, ldx, xperm);
    bd_run(g, BD_BWD_W, dW, NULL, accumulate, scratch, st);
}

// ----------------------------------------------------------------------------------------------
// Both stages in one kernel: TM = 16*MI rows per block of 8 warps. The warps share out the (block,
// 32-column chunk) items of stage 1, each computing TM x 32 outputs with fragments read straight from
// x and W0 (global memory; the weights stay in L2), and write them to shared memory at their permuted
// position (z', rows of mid + 8 elements); after a barrier, stage 2's items read A from z' in shared
// memory and write y through the output permutation, with the bias and GELU epilogue. z' goes to HBM
// only if saved != NULL (backward needs it). Used for lowrank, monarch and btt when TM = 16 rows of
// z' fit (and for the MoE experts, with gathered rows and per-expert weights).
typedef struct {
    BdAct x;             // input rows (d_in wide)
    const bf16 *W0, *W1; // cores, per group at + g * w0stride / w1stride
    long long w0stride, w1stride;
    CoreShape c0, c1;
    TokenPermute mid, out;
    int mid_w;
    int nrows, G;
    const int *goff;
    bf16 *saved;         // (nrows, mid_w) z', or NULL
    bf16 *y;             // (nrows, ldy)
    int ldy;
    const bf16 *bias;
    bf16 *gelu_pre;
    int fast_x, fast_w0, fast_w1; // pairs of columns readable as 32 bits
    int pairs;                    // y columns (2c, 2c+1) adjacent and 4-byte aligned (no output permutation)
} BdFused;

#define BD_FUSED_THREADS 256
// z' rows in shared memory: mid_w rounded up to 8, plus 8 (16-byte rows; the 32-bit fragment reads of
// 8 consecutive rows then fall in different banks when mid_w is a multiple of 64)
__host__ __device__ __forceinline__ int bd_fused_stride(int mid_w) { return (mid_w + 7) / 8 * 8 + 8; }

// Two consecutive values (k, k+1) of a row through a permutation; nvalid < 2: zeros past the end.
__device__ __forceinline__ uint32_t bd_pair(const bf16 *row, TokenPermute perm, int col, int nvalid, int fast, float s) {
    if (!row || nvalid <= 0) return 0u;
    if (fast && nvalid >= 2 && s == 1.0f) return *(const uint32_t *)(row + col);
    bf16 lo = __float2bfloat16(__bfloat162float(row[bd_perm(perm, col)]) * s);
    bf16 hi = nvalid >= 2 ? __float2bfloat16(__bfloat162float(row[bd_perm(perm, col + 1)]) * s) : __float2bfloat16(0.0f);
    return bd_pack(lo, hi);
}

// acc (TM x 32) = A (TM x K) B^T for one item; A rows arow[mi][h] (row pointer, scale), columns acol + k;
// B rows brow0 + n (n < nq valid), k < K.
template <int MI>
__device__ __forceinline__ void bd_fused_item(float acc[MI][4][4], const bf16 *arow[MI][2], const float ascale[MI][2],
                                              TokenPermute aperm, int acol, int afast, const bf16 *brow0, int ldb,
                                              int nq, int bfast, int K) {
    const int lane = threadIdx.x % 32, grp = lane / 4, t4 = lane % 4;
    #pragma unroll
    for (int a = 0; a < MI; a++)
        #pragma unroll
        for (int b = 0; b < 4; b++)
            #pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += 16) {
        int k = k0 + 2 * t4;
        uint32_t af[MI][4], bfr[4][2];
        #pragma unroll
        for (int mi = 0; mi < MI; mi++) {
            af[mi][0] = bd_pair(arow[mi][0], aperm, acol + k, K - k, afast, ascale[mi][0]);
            af[mi][1] = bd_pair(arow[mi][1], aperm, acol + k, K - k, afast, ascale[mi][1]);
            af[mi][2] = bd_pair(arow[mi][0], aperm, acol + k + 8, K - k - 8, afast, ascale[mi][0]);
            af[mi][3] = bd_pair(arow[mi][1], aperm, acol + k + 8, K - k - 8, afast, ascale[mi][1]);
        }
        #pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            int n = ni * 8 + grp;
            const bf16 *br = n < nq ? brow0 + (size_t)n * ldb : NULL;
            bfr[ni][0] = bd_pair(br, BD_NO_PERM, k, K - k, bfast, 1.0f);
            bfr[ni][1] = bd_pair(br, BD_NO_PERM, k + 8, K - k - 8, bfast, 1.0f);
        }
        #pragma unroll
        for (int mi = 0; mi < MI; mi++)
            #pragma unroll
            for (int ni = 0; ni < 4; ni++) mma_bf16_16816(acc[mi][ni], af[mi], bfr[ni]);
    }
}

template <int MI>
__global__ void __launch_bounds__(BD_FUSED_THREADS) bd_fused_forward_kernel(BdFused f) {
    constexpr int TM = 16 * MI;
    bf16 *zs = (bf16 *)dyn_smem();
    const int ldz = bd_fused_stride(f.mid_w);
    const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32, lane = threadIdx.x % 32, grp = lane / 4, t4 = lane % 4;
    int gg, r0, r1;
    if (!bd_row_tile(f.goff, f.G, f.nrows, blockIdx.x, TM, &gg, &r0, &r1)) return;
    const bf16 *W0 = f.W0 + gg * f.w0stride, *W1 = f.W1 + gg * f.w1stride;
    const bf16 *xrow[MI][2], *zrow[MI][2];
    float xs[MI][2], ones[MI][2];
    #pragma unroll
    for (int mi = 0; mi < MI; mi++)
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            int row = mi * 16 + grp + 8 * h;
            xrow[mi][h] = r0 + row < r1 ? bd_row(f.x, r0 + row, &xs[mi][h]) : NULL;
            if (!xrow[mi][h]) xs[mi][h] = 1.0f;
            zrow[mi][h] = zs + (size_t)row * ldz;
            ones[mi][h] = 1.0f;
        }
    float acc[MI][4][4];

    // stage 1: z'[row, mid(i*q0 + j)] = sum_k x[row, i*p0 + k] W0_i[j][k]
    const CoreShape c0 = f.c0, c1 = f.c1;
    int nch = (c0.q + 31) / 32;
    for (int it = warp; it < c0.nb * nch; it += nwarps) {
        int i = it / nch, n0 = (it % nch) * 32;
        bd_fused_item<MI>(acc, xrow, xs, f.x.perm, i * c0.p, f.fast_x, W0 + ((size_t)i * c0.q + n0) * c0.p, c0.p,
                          c0.q - n0, f.fast_w0, c0.p);
        #pragma unroll
        for (int mi = 0; mi < MI; mi++)
            #pragma unroll
            for (int ni = 0; ni < 4; ni++)
                #pragma unroll
                for (int h = 0; h < 2; h++)
                    #pragma unroll
                    for (int e = 0; e < 2; e++) {
                        int row = mi * 16 + grp + 8 * h, j = n0 + ni * 8 + 2 * t4 + e;
                        if (j >= c0.q) continue;
                        zs[(size_t)row * ldz + bd_perm(f.mid, i * c0.q + j)] = __float2bfloat16(acc[mi][ni][h * 2 + e]);
                    }
    }
    __syncthreads();
    // z' to HBM for backward: whole rows, 16 bytes at a time where they are whole (stage 2 reads zs too)
    if (f.saved) {
        int rows = r1 - r0;
        if (f.mid_w % 8 == 0 && ((uintptr_t)f.saved % 16) == 0) {
            int chunks = f.mid_w / 8;
            for (int idx = threadIdx.x; idx < rows * chunks; idx += blockDim.x) {
                int row = idx / chunks, c = (idx % chunks) * 8;
                *(uint4 *)(f.saved + (size_t)(r0 + row) * f.mid_w + c) = *(const uint4 *)(zs + (size_t)row * ldz + c);
            }
        } else {
            for (int idx = threadIdx.x; idx < rows * f.mid_w; idx += blockDim.x)
                f.saved[(size_t)(r0 + idx / f.mid_w) * f.mid_w + idx % f.mid_w] = zs[(size_t)(idx / f.mid_w) * ldz + idx % f.mid_w];
        }
    }

    // stage 2: y[row, out(j0*q1 + j)] = sum_k z'[row, j0*p1 + k] W1_j0[j][k] (+ bias, GELU)
    nch = (c1.q + 31) / 32;
    for (int it = warp; it < c1.nb * nch; it += nwarps) {
        int j0 = it / nch, n0 = (it % nch) * 32;
        bd_fused_item<MI>(acc, zrow, ones, BD_NO_PERM, j0 * c1.p, 1, W1 + ((size_t)j0 * c1.q + n0) * c1.p, c1.p,
                          c1.q - n0, f.fast_w1, c1.p);
        #pragma unroll
        for (int mi = 0; mi < MI; mi++)
            #pragma unroll
            for (int ni = 0; ni < 4; ni++)
                #pragma unroll
                for (int h = 0; h < 2; h++) {
                    int row = mi * 16 + grp + 8 * h, j = n0 + ni * 8 + 2 * t4;
                    if (j >= c1.q || r0 + row >= r1) continue;
                    float v[2], pre[2];
                    size_t o[2];
                    #pragma unroll
                    for (int e = 0; e < 2; e++) {
                        int P = bd_perm(f.out, j0 * c1.q + j + e);
                        o[e] = (size_t)(r0 + row) * f.ldy + P;
                        v[e] = acc[mi][ni][h * 2 + e];
                        if (j + e < c1.q && f.bias) v[e] += __bfloat162float(f.bias[P]);
                        pre[e] = v[e];
                        if (f.gelu_pre) v[e] = bd_gelu(v[e]);
                    }
                    if (f.pairs && j + 1 < c1.q) {
                        if (f.gelu_pre) *(uint32_t *)(f.gelu_pre + o[0]) = bd_pack(__float2bfloat16(pre[0]), __float2bfloat16(pre[1]));
                        *(uint32_t *)(f.y + o[0]) = bd_pack(__float2bfloat16(v[0]), __float2bfloat16(v[1]));
                        continue;
                    }
                    #pragma unroll
                    for (int e = 0; e < 2; e++) {
                        if (j + e >= c1.q) continue;
                        if (f.gelu_pre) f.gelu_pre[o[e]] = __float2bfloat16(pre[e]);
                        f.y[o[e]] = __float2bfloat16(v[e]);
                    }
                }
    }
}

// Rows per block of the fused kernel for an intermediate of mid_w: the most (64, 32, 16) whose z' tile
// leaves room for two blocks per SM (~113 KB each), else one (~227 KB); 0: the kernel does not apply.
static int bd_fused_rows(int mid_w) {
    size_t row = (size_t)bd_fused_stride(mid_w) * sizeof(bf16);
    for (int tm = 64; tm >= 16; tm /= 2)
        if (tm * row <= 110 * 1024) return tm;
    return 16 * row <= 220 * 1024 ? 16 : 0;
}

static void bd_fused_launch(BdFused f, cudaStream_t st) {
    int tm = bd_fused_rows(f.mid_w);
    size_t smem = (size_t)tm * bd_fused_stride(f.mid_w) * sizeof(bf16);
    f.mid = bd_perm_norm(f.mid);
    f.out = bd_perm_norm(f.out);
    f.fast_x = f.x.perm.a == 0 && f.x.ld % 2 == 0 && f.c0.p % 2 == 0 && ((uintptr_t)f.x.p % 4) == 0;
    f.fast_w0 = f.c0.p % 2 == 0 && f.w0stride % 2 == 0 && ((uintptr_t)f.W0 % 4) == 0;
    f.fast_w1 = f.c1.p % 2 == 0 && f.w1stride % 2 == 0 && ((uintptr_t)f.W1 % 4) == 0;
    f.pairs = f.out.a == 0 && f.ldy % 2 == 0 && f.c1.q % 2 == 0 && ((uintptr_t)f.y % 4) == 0 &&
              ((uintptr_t)f.gelu_pre % 4) == 0;
    if (f.c1.p % 2) {
        fprintf(stderr, "error: bd_fused_forward needs an even stage-2 block width (got %d)\n", f.c1.p);
        exit(1);
    }
    dim3 grid(bd_row_tiles(f.nrows, f.G, f.goff, tm));
    switch (tm) {
    case 64:
        cudaCheck(cudaFuncSetAttribute(bd_fused_forward_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        LAUNCH(grid, BD_FUSED_THREADS, smem, st, bd_fused_forward_kernel<4>)(f);
        break;
    case 32:
        cudaCheck(cudaFuncSetAttribute(bd_fused_forward_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        LAUNCH(grid, BD_FUSED_THREADS, smem, st, bd_fused_forward_kernel<2>)(f);
        break;
    default:
        cudaCheck(cudaFuncSetAttribute(bd_fused_forward_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        LAUNCH(grid, BD_FUSED_THREADS, smem, st, bd_fused_forward_kernel<1>)(f);
        break;
    }
    cudaCheck(cudaGetLastError());
}

// ----------------------------------------------------------------------------------------------
// The structured linear layer (not btt_moe: llmc/moe.cuh), the GPU twin of structured_forward /
// structured_backward of llmc/blockdiag.h: y = S(x) + b with the bias (and mlp_fc's GELU) fused into
// the last stage, the permutations folded into loads and stores.

// A stage that is one block with no permutation is a plain GEMM: cuBLASLt (dims multiples of 8 for its
// alignment rules). Not in the CPU emulation, which has no cuBLAS.
static int bd_use_cublas(const CoreShape *c, TokenPermute in, TokenPermute out) {
#ifdef LLMC_CUDA_EMU
    return 0;
#else
    return c->nb == 1 && bd_perm_norm(in).a == 0 && bd_perm_norm(out).a == 0 && c->p % 8 == 0 && c->q % 8 == 0 &&
           bd_kernel() != BD_KERNEL_NAIVE;
#endif
}
static int structured_gpu_fused(const Structure *s) {
    return s->ncores == 2 && s->core[1].p % 2 == 0 && bd_fused_rows(s->mid_width) > 0 &&
           !(bd_use_cublas(&s->core[0], BD_NO_PERM, s->mid) && bd_use_cublas(&s->core[1], BD_NO_PERM, s->out)) &&
           bd_kernel() == BD_KERNEL_TC;
}

// bf16 elements kept from forward for backward: z' (N, mid) of a two-core layer.
static size_t structured_gpu_saved(const Structure *s, int N) {
    return s->ncores == 2 ? (size_t)N * s->mid_width : 0;
}
// Scratch bytes of forward and backward: dz' (N, mid) bf16 and the weight gradients' partial sums.
static size_t structured_gpu_scratch_bytes(const Structure *s, int N) {
    size_t w = 0;
    for (int c = 0; c < s->ncores; c++) {
        const CoreShape *k = &s->core[c];
        size_t n = bd_weight_scratch_floats(N, 1, k->nb, k->q, k->p);
        if (bd_kernel() == BD_KERNEL_NAIVE || n < (size_t)k->nb * k->q * k->p) n = (size_t)k->nb * k->q * k->p;
        if (n > w) w = n;
    }
    size_t dz = s->ncores == 2 ? (size_t)N * s->mid_width * sizeof(bf16) : 0;
    return (dz + 255) / 256 * 256 + w * sizeof(float);
}

// One stage's forward: y = x W^T through the permutations, with the bias / GELU epilogue.
static void structured_stage_forward(const CoreShape *c, bf16 *y, int ldy, TokenPermute yperm, const bf16 *x, int ldx,
                                     const bf16 *W, const bf16 *bias, bf16 *gelu_pre, int N, cudaStream_t st) {
#ifndef LLMC_CUDA_EMU
    if (bd_use_cublas(c, BD_NO_PERM, yperm) && ldy == c->q && ldx == c->p) {
        matmul_forward(y, x, W, bias, gelu_pre, N, c->p, c->q, st);
        return;
    }
#endif
    blockdiag_forward_gpu(y, ldy, yperm, x, ldx, BD_NO_PERM, W, N, c->nb, c->p, c->q, bias, gelu_pre, st);
}

// y (N, d_out) = S(x) + bias, overwritten; x (N, d_in). gelu_pre != NULL: y = gelu(S(x) + b) and gelu_pre
// = S(x) + b. saved (N, mid) = z' for backward (two-core layers).
static void structured_forward_gpu(const Structure *s, bf16 *y, const bf16 *x, const bf16 *W0, const bf16 *W1,
                                   const bf16 *bias, bf16 *gelu_pre, bf16 *saved, int N, cudaStream_t st) {
    if (N <= 0) return;
    if (s->ncores == 1) {
        structured_stage_forward(&s->core[0], y, s->d_out, BD_NO_PERM, x, s->d_in, W0, bias, gelu_pre, N, st);
        return;
    }
    if (structured_gpu_fused(s)) {
        BdFused f;
        memset(&f, 0, sizeof f);
        f.x = bd_act(x, s->d_in, BD_NO_PERM);
        f.W0 = W0;
        f.W1 = W1;
        f.c0 = s->core[0];
        f.c1 = s->core[1];
        f.mid = s->mid;
        f.out = s->out;
        f.mid_w = s->mid_width;
        f.nrows = N;
        f.G = 1;
        f.saved = saved;
        f.y = y;
        f.ldy = s->d_out;
        f.bias = bias;
        f.gelu_pre = gelu_pre;
        bd_fused_launch(f, st);
        return;
    }
    structured_stage_forward(&s->core[0], saved, s->mid_width, s->mid, x, s->d_in, W0, NULL, NULL, N, st);
    structured_stage_forward(&s->core[1], y, s->d_out, s->out, saved, s->mid_width, W1, bias, gelu_pre, N, st);
}

// One stage's backward: dW (+)= dv^T in, din = dv W (* gelu'(dgelu_pre)); dv read through dvperm,
// din (N, ldin) written plain.
static void structured_stage_backward(const CoreShape *c, bf16 *din, int ldin, bf16 *dW, int accumulate,
                                      const bf16 *dv, int ldv, TokenPermute dvperm, const bf16 *in, const bf16 *W,
                                      const bf16 *dgelu_pre, float *wscratch, int N, cudaStream_t st) {
#ifndef LLMC_CUDA_EMU
    if (bd_use_cublas(c, dvperm, BD_NO_PERM) && ldv == c->q && ldin == c->p) {
        if (!accumulate) cudaCheck(cudaMemsetAsync(dW, 0, (size_t)c->q * c->p * sizeof(bf16), st));
        matmul_backward(din, dW, NULL, dv, in, W, dgelu_pre, NULL, N, c->p, c->q, st);
        return;
    }
#endif
    blockdiag_backward_weight_gpu(dW, dv, ldv, dvperm, in, ldin, BD_NO_PERM, N, c->nb, c->p, c->q, accumulate, wscratch, st);
    blockdiag_backward_input_gpu(din, ldin, BD_NO_PERM, dv, ldv, dvperm, W, N, c->nb, c->p, c->q, dgelu_pre, 0, st);
}

// dx (N, d_in) overwritten (times gelu'(dgelu_pre) when given); dW0, dW1 accumulated (accumulate 1) or
// overwritten (0). dy (N, d_out); x, saved as given to forward. scratch: structured_gpu_scratch_bytes.
static void structured_backward_gpu(const Structure *s, bf16 *dx, bf16 *dW0, bf16 *dW1, int accumulate, const bf16 *dy,
                                    const bf16 *x, const bf16 *W0, const bf16 *W1, const bf16 *saved,
                                    const bf16 *dgelu_pre, void *scratch, int N, cudaStream_t st) {
    if (N <= 0) return;
    if (s->ncores == 1) {
        structured_stage_backward(&s->core[0], dx, s->d_in, dW0, accumulate, dy, s->d_out, BD_NO_PERM, x, W0,
                                  dgelu_pre, (float *)scratch, N, st);
        return;
    }
    int mid = s->mid_width;
    bf16 *dzp = (bf16 *)scratch;   // dz' (N, mid)
    float *ws = (float *)((char *)scratch + ((size_t)N * mid * sizeof(bf16) + 255) / 256 * 256);
    // y = out(v): dv[L] = dy[out(L)];  z' = mid(z): dz[L] = dz'[mid(L)]
    structured_stage_backward(&s->core[1], dzp, mid, dW1, accumulate, dy, s->d_out, s->out, saved, W1, NULL, ws, N, st);
    structured_stage_backward(&s->core[0], dx, s->d_in, dW0, accumulate, dzp, mid, s->mid, x, W0, dgelu_pre, ws, N, st);
}

// ----------------------------------------------------------------------------------------------
// weight_norm "rms_cap" (DESIGN 3.7) on one core W (n values): W_eff = gamma W / c, c = max(1, rms / sigma),
// rms = sqrt(mean(W^2) + 1e-8), and its backward. Sums of squares in fp32 over RMS_BLOCKS fixed grid-stride
// shares, each block then adding the same partials in the same order (deterministic).
#define RMS_BLOCKS 64
#define RMS_THREADS 256

__global__ void rmscap_partial_kernel(float *partial, const bf16 *a, const bf16 *b, size_t n) {
    __shared__ float sh[32];
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += __bfloat162float(a[i]) * __bfloat162float(b[i]);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
__device__ __forceinline__ float rmscap_total(const float *partial) {
    float s = 0.0f;
    for (int k = 0; k < RMS_BLOCKS; k++) s += partial[k];
    return s;
}
// weff = gamma / c * W; stats[0] = rms (for backward)
__global__ void rmscap_forward_kernel(bf16 *weff, float *stats, const bf16 *W, const bf16 *gamma, const float *partial,
                                      size_t n, float sigma) {
    float rms = sqrtf(rmscap_total(partial) / n + 1e-8f), c = fmaxf(1.0f, rms / sigma);
    float k = __bfloat162float(gamma[0]) / c;
    if (blockIdx.x == 0 && threadIdx.x == 0) stats[0] = rms;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        weff[i] = __float2bfloat16(k * __bfloat162float(W[i]));
}
// From dweff = dL/dW_eff, with u = sum(dweff * W) (the CPU trainer's rms_cap_backward):
//   rms <= sigma: dW += gamma dweff,                      dgamma += u
//   rms > sigma:  dW += gamma sigma / rms (dweff - u W / (n rms^2)),  dgamma += u sigma / rms
__global__ void rmscap_backward_kernel(bf16 *dW, bf16 *dgamma, const bf16 *dweff, const bf16 *W, const bf16 *gamma,
                                       const float *stats, const float *partial, size_t n, float sigma) {
    float u = rmscap_total(partial), rms = stats[0], g = __bfloat162float(gamma[0]);
    float k = rms <= sigma ? g : g * sigma / rms, kw = rms <= sigma ? 0.0f : u / ((float)n * rms * rms);
    if (blockIdx.x == 0 && threadIdx.x == 0)
        dgamma[0] = __float2bfloat16(__bfloat162float(dgamma[0]) + (rms <= sigma ? u : u * sigma / rms));
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float d = k * (__bfloat162float(dweff[i]) - kw * __bfloat162float(W[i]));
        dW[i] = __float2bfloat16(__bfloat162float(dW[i]) + d);
    }
}
// partial: RMS_BLOCKS floats; stats: 1 float kept for backward.
static void rmscap_forward(bf16 *weff, float *stats, const bf16 *W, const bf16 *gamma, size_t n, double sigma,
                           float *partial, cudaStream_t st) {
    LAUNCH(RMS_BLOCKS, RMS_THREADS, 0, st, rmscap_partial_kernel)(partial, W, W, n);
    cudaCheck(cudaGetLastError());
    LAUNCH(RMS_BLOCKS, RMS_THREADS, 0, st, rmscap_forward_kernel)(weff, stats, W, gamma, partial, n, (float)sigma);
    cudaCheck(cudaGetLastError());
}
static void rmscap_backward(bf16 *dW, bf16 *dgamma, const bf16 *dweff, const bf16 *W, const bf16 *gamma,
                            const float *stats, size_t n, double sigma, float *partial, cudaStream_t st) {
    LAUNCH(RMS_BLOCKS, RMS_THREADS, 0, st, rmscap_partial_kernel)(partial, dweff, W, n);
    cudaCheck(cudaGetLastError());
    LAUNCH(RMS_BLOCKS, RMS_THREADS, 0, st, rmscap_backward_kernel)(dW, dgamma, dweff, W, gamma, stats, partial, n,
                                                                  (float)sigma);
    cudaCheck(cudaGetLastError());
}

#endif
