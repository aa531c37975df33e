// CPU block-diagonal matmul (DESIGN section 3), fp32, and the structured linear layer built on it.
// One primitive serves every structure: nb blocks, block i maps p inputs at column offset i*p of a
// row-major (N, ldx) matrix to q outputs at column offset i*q of a row-major (N, ldy) matrix, so a
// block-diagonal layer, one stage of a BTT/Monarch, or a slice of a wider matrix all use it.
// Weights of one core: W (nb, q, p) contiguous, block i a row-major (q, p) matrix (llm.c's dense
// (d_out, d_in) layout per block).
// Results are bit-identical run to run for a fixed thread count (resume must be bit-exact): every
// sum is computed in an order fixed by the shapes and the thread count, never by scheduling.
#ifndef LLMC_BLOCKDIAG_H
#define LLMC_BLOCKDIAG_H

#include <cblas.h>
#include <omp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llmc/structure.h"

// ----------------------------------------------------------------------------
// Which code runs a core: cblas_sgemm only for a plain large matmul (one block, dense and lowrank
// cores: the same library call as the trainer's dense layers). Every block-diagonal core (nb > 1)
// and every small one runs on our own register-tiled kernel below, OpenMP-parallel over
// (token chunk, block): BLAS per block spends its time in call and threading overhead when blocks
// are small (3-8 GFLOP/s for 32 blocks of 24x24 on 2 cores), and where AVX-512 is available our
// kernel also beats this OpenBLAS (0.3.21 runs its AVX2 kernel on this Zen 5) on large blocks:
// measured 2x on monarch b=4 and blockdiag b=4 at GPT-2 shapes, one thread.

#define BD_SMALL 128
#if defined(__AVX512F__)
#define BD_VW 16        // floats per vector
#define BD_ACC 24       // accumulator vectors in a micro-tile (of 32 registers)
#else
#define BD_VW 8
#define BD_ACC 12       // (of 16 registers)
#endif
#define BD_TC 48        // tokens per work item: a multiple of every micro-tile height (12, 8, 6, 4, 3)
#define BD_KC 384       // tokens per step of backward_weight (a multiple of BD_TC): dW tiles are
                        // loaded and stored once per step
#define BD_GROUPS_PER_THREAD 4  // fused backward: chunk groups, each summing its own weight gradients
#define BD_FUSED_WEIGHTS (1 << 18)  // fused layers' cores (floats): their gradients are swept per chunk
typedef float bd_vec __attribute__((vector_size(BD_VW * 4), aligned(4), may_alias));

static int bd_round_up(int n, int m) { return (n + m - 1) / m * m; }
static int bd_is_small(int p, int q) { return p <= BD_SMALL && q <= BD_SMALL; }
static int bd_use_blas(int nb, int p, int q) { return nb == 1 && !bd_is_small(p, q); }

static float *bd_alloc(size_t n) {
    float *buf = aligned_alloc(64, (n * sizeof(float) / 64 + 1) * 64);
    if (!buf) { fprintf(stderr, "blockdiag: out of memory (%zu floats)\n", n); exit(1); }
    return buf;
}

// C (MR, nc) = beta*C + A (MR, K) B (K, nc): one micro-tile of MR rows and NV vectors (nc <= NV*BD_VW
// columns). A element (t, k) at a[t*rs_a + k*cs_a] (any strides: A is read by scalar broadcasts);
// B row k at b + k*ldb, readable for NV vectors (columns past nc are computed and dropped).
// Called with constant MR, NV so that the accumulators live in registers.
static inline __attribute__((always_inline)) void bd_micro(const int MR, const int NV, int K, const float *a,
                                                           ptrdiff_t rs_a, ptrdiff_t cs_a, const float *b, int ldb,
                                                           float *c, int ldc, int nc, float beta) {
    bd_vec acc[12][4];
    #pragma GCC unroll 12
    for (int t = 0; t < MR; t++) {
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[t][v] = (bd_vec){0};
    }
    for (int k = 0; k < K; k++) {
        bd_vec bv[4];
        const float *bk = b + (size_t)k * ldb;
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) bv[v] = *(const bd_vec *)(bk + v * BD_VW);
        const float *ak = a + k * cs_a;
        #pragma GCC unroll 12
        for (int t = 0; t < MR; t++) {
            bd_vec av = (bd_vec){0} + ak[t * rs_a];
            #pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[t][v] += av * bv[v];
        }
    }
    #pragma GCC unroll 12
    for (int t = 0; t < MR; t++) {
        float *ct = c + (size_t)t * ldc;
        #pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            int j0 = v * BD_VW;
            if (j0 + BD_VW <= nc) {
                bd_vec *cv = (bd_vec *)(ct + j0);
                if (beta == 0.0f) *cv = acc[t][v];
                else *cv = beta * *cv + acc[t][v];
            } else {
                float lanes[BD_VW];
                memcpy(lanes, &acc[t][v], sizeof lanes);
                for (int j = j0; j < nc; j++) ct[j] = beta == 0.0f ? lanes[j - j0] : beta * ct[j] + lanes[j - j0];
            }
        }
    }
}

// All rows of C with NV vectors each: micro-tiles of BD_ACC/NV (at most 12) rows, then 4, then 1.
#define BD_ROWS(NV)                                                                                       \
    static void bd_rows_##NV(int rows, int K, const float *a, ptrdiff_t rs_a, ptrdiff_t cs_a, const float *b, \
                             int ldb, float *c, int ldc, int nc, float beta) {                            \
        enum { MR = BD_ACC / NV > 12 ? 12 : BD_ACC / NV };                                                \
        int t = 0;                                                                                        \
        for (; t + MR <= rows; t += MR) bd_micro(MR, NV, K, a + t * rs_a, rs_a, cs_a, b, ldb, c + (size_t)t * ldc, ldc, nc, beta); \
        for (; t + 4 <= rows; t += 4) bd_micro(4, NV, K, a + t * rs_a, rs_a, cs_a, b, ldb, c + (size_t)t * ldc, ldc, nc, beta);   \
        for (; t < rows; t++) bd_micro(1, NV, K, a + t * rs_a, rs_a, cs_a, b, ldb, c + (size_t)t * ldc, ldc, nc, beta);            \
    }
BD_ROWS(1)
BD_ROWS(2)
BD_ROWS(3)
BD_ROWS(4)

// C (rows, ncols) = beta*C + A (rows, K) B (K, ncols); B rows readable up to ncols rounded up to
// BD_VW. Column tiles of up to 4 vectors.
static void bd_gemm(int rows, int ncols, int K, const float *a, ptrdiff_t rs_a, ptrdiff_t cs_a, const float *b,
                    int ldb, float *c, int ldc, float beta) {
    for (int j0 = 0; j0 < ncols; j0 += 4 * BD_VW) {
        int nc = ncols - j0 < 4 * BD_VW ? ncols - j0 : 4 * BD_VW, nv = (nc + BD_VW - 1) / BD_VW;
        const float *bj = b + j0;
        float *cj = c + j0;
        switch (nv) {
        case 1: bd_rows_1(rows, K, a, rs_a, cs_a, bj, ldb, cj, ldc, nc, beta); break;
        case 2: bd_rows_2(rows, K, a, rs_a, cs_a, bj, ldb, cj, ldc, nc, beta); break;
        case 3: bd_rows_3(rows, K, a, rs_a, cs_a, bj, ldb, cj, ldc, nc, beta); break;
        default: bd_rows_4(rows, K, a, rs_a, cs_a, bj, ldb, cj, ldc, nc, beta); break;
        }
    }
}

// The B operands of forward and backward_input, packed once per call with rows padded to BD_VW:
// forward B_i = W_i^T (p, q); backward_input B_i = W_i (q, p).
static float *bd_pack_wt(const float *W, int nb, int p, int q, int *ldb) {
    *ldb = bd_round_up(q, BD_VW);
    float *Wt = bd_alloc((size_t)nb * p * *ldb);
    for (int i = 0; i < nb; i++)
        for (int k = 0; k < p; k++)
            for (int j = 0; j < *ldb; j++) Wt[((size_t)i * p + k) * *ldb + j] = j < q ? W[((size_t)i * q + j) * p + k] : 0.0f;
    return Wt;
}
static float *bd_pack_w(const float *W, int nb, int p, int q, int *ldb) {
    *ldb = bd_round_up(p, BD_VW);
    float *Wp = bd_alloc((size_t)nb * q * *ldb);
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < q; j++)
            for (int k = 0; k < *ldb; k++) Wp[((size_t)i * q + j) * *ldb + k] = k < p ? W[((size_t)i * q + j) * p + k] : 0.0f;
    return Wp;
}

// out_i (rows, nout) = beta*out_i + in_i (rows, nin) B_i for every block, B_i = packed + i*nin*ldb.
static void bd_apply_rows(float *out, int ldo, const float *in, int ldi, const float *packed, int ldb,
                          int rows, int nb, int nin, int nout, float beta) {
    for (int i = 0; i < nb; i++)
        bd_gemm(rows, nout, nin, in + (size_t)i * nin, ldi, 1, packed + (size_t)i * nin * ldb, ldb,
                out + (size_t)i * nout, ldo, beta);
}

// dW_i (q, p) += dy_i^T x_i over `rows` tokens, for the blocks [i0, i1) and dW rows [j0, j0 + nj).
// x_i is read in place when its width is whole vectors, else copied into xp (rows, ldb), zero-padded.
static void bd_weight_rows(float *dW, const float *dy, int ldy, const float *x, int ldx, int rows,
                           int i0, int i1, int j0, int nj, int p, int q, float *xp) {
    int ldb = bd_round_up(p, BD_VW);
    for (int i = i0; i < i1; i++) {
        const float *b = x + (size_t)i * p;
        int ld = ldx;
        if (p % BD_VW) {
            // Whole vectors where the row has them (the columns past p are dropped from the result),
            // else element by element; not memcpy: a call per 24-float row took 8% of a BTT layer.
            int whole = (size_t)i * p + ldb <= (size_t)ldx;
            for (int n = 0; n < rows; n++) {
                const float *src = x + (size_t)n * ldx + (size_t)i * p;
                float *dst = xp + (size_t)n * ldb;
                if (whole) {
                    for (int k = 0; k < ldb; k += BD_VW) *(bd_vec *)(dst + k) = *(const bd_vec *)(src + k);
                } else {
                    int k = 0;
                    for (; k < p; k++) dst[k] = src[k];
                    for (; k < ldb; k++) dst[k] = 0.0f;
                }
            }
            b = xp;
            ld = ldb;
        }
        bd_gemm(nj, p, rows, dy + (size_t)i * q + j0, 1, ldy, b, ld, dW + ((size_t)i * q + j0) * p, p, 1.0f);
    }
}

// ----------------------------------------------------------------------------
// The four primitives.

// y_i (N,q) = beta*y_i + x_i (N,p) W_i^T, for every block i   (beta 0: overwrite, 1: accumulate)
static void blockdiag_forward(float *y, int ldy, const float *x, int ldx, const float *W,
                              int N, int nb, int p, int q, float beta) {
    if (N <= 0) return;
    if (bd_use_blas(nb, p, q)) {
        for (int i = 0; i < nb; i++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, q, p, 1.0f, x + (size_t)i * p, ldx,
                        W + (size_t)i * q * p, p, beta, y + (size_t)i * q, ldy);
        return;
    }
    int ldb, nchunks = (N + BD_TC - 1) / BD_TC;
    float *Wt = bd_pack_wt(W, nb, p, q, &ldb);
    #pragma omp parallel for collapse(2) schedule(static)
    for (int ch = 0; ch < nchunks; ch++)
        for (int i = 0; i < nb; i++) {
            int n0 = ch * BD_TC, rows = N - n0 < BD_TC ? N - n0 : BD_TC;
            bd_gemm(rows, q, p, x + (size_t)n0 * ldx + (size_t)i * p, ldx, 1, Wt + (size_t)i * p * ldb, ldb,
                    y + (size_t)n0 * ldy + (size_t)i * q, ldy, beta);
        }
    free(Wt);
}

// dx_i (N,p) = beta*dx_i + dy_i (N,q) W_i (q,p)
static void blockdiag_backward_input(float *dx, int ldx, const float *dy, int ldy, const float *W,
                                     int N, int nb, int p, int q, float beta) {
    if (N <= 0) return;
    if (bd_use_blas(nb, p, q)) {
        for (int i = 0; i < nb; i++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, p, q, 1.0f, dy + (size_t)i * q, ldy,
                        W + (size_t)i * q * p, p, beta, dx + (size_t)i * p, ldx);
        return;
    }
    int ldb, nchunks = (N + BD_TC - 1) / BD_TC;
    float *Wp = bd_pack_w(W, nb, p, q, &ldb);
    #pragma omp parallel for collapse(2) schedule(static)
    for (int ch = 0; ch < nchunks; ch++)
        for (int i = 0; i < nb; i++) {
            int n0 = ch * BD_TC, rows = N - n0 < BD_TC ? N - n0 : BD_TC;
            bd_gemm(rows, p, q, dy + (size_t)n0 * ldy + (size_t)i * q, ldy, 1, Wp + (size_t)i * q * ldb, ldb,
                    dx + (size_t)n0 * ldx + (size_t)i * p, ldx, beta);
        }
    free(Wp);
}

// dW_i (q,p) += dy_i^T (q,N) x_i (N,p)   (always accumulates)
static void blockdiag_backward_weight(float *dW, const float *dy, int ldy, const float *x, int ldx,
                                      int N, int nb, int p, int q) {
    if (N <= 0) return;
    if (bd_use_blas(nb, p, q)) {
        for (int i = 0; i < nb; i++)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, q, p, N, 1.0f, dy + (size_t)i * q, ldy,
                        x + (size_t)i * p, ldx, 1.0f, dW + (size_t)i * q * p, p);
        return;
    }
    // Work items (block, group of dW_i's rows), each summing over all N tokens in chunk order, so no
    // sum is split across threads. Fewer blocks than 2 per thread: rows split into groups too.
    int nth = omp_get_max_threads(), groups = nb >= 2 * nth ? 1 : (2 * nth + nb - 1) / nb;
    int rows_per = bd_round_up((q + groups - 1) / groups, 12);
    groups = (q + rows_per - 1) / rows_per;
    #pragma omp parallel
    {
        float *xp = bd_alloc((size_t)BD_KC * bd_round_up(p, BD_VW));
        #pragma omp for collapse(2) schedule(static)
        for (int i = 0; i < nb; i++)
            for (int g = 0; g < groups; g++) {
                int j0 = g * rows_per, nj = q - j0 < rows_per ? q - j0 : rows_per;
                for (int n0 = 0; n0 < N; n0 += BD_KC) {
                    int rows = N - n0 < BD_KC ? N - n0 : BD_KC;
                    bd_weight_rows(dW, dy + (size_t)n0 * ldy, ldy, x + (size_t)n0 * ldx, ldx, rows, i, i + 1, j0, nj, p, q, xp);
                }
            }
        free(xp);
    }
}

// One row: src viewed (a, b) -> dst (b, a). Where a and b are multiples of 8 (btt's factors), by
// 8x8 tiles transposed in registers (3-5x faster than element by element on a chunk in cache);
// for a or b of 2 or 4 (monarch's block counts) by loops with that dimension constant, which the
// compiler vectorizes as interleaved loads or stores (2.5x).
typedef float bd_v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef int bd_v8i __attribute__((vector_size(32)));
static void bd_t_tiles8(float *restrict dst, const float *restrict src, int a, int b) {
    const bd_v8i lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
    const bd_v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const bd_v8i lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
    for (int i0 = 0; i0 < a; i0 += 8)
        for (int j0 = 0; j0 < b; j0 += 8) {
            bd_v8f r[8], t[8], u[8];  // rows i0.., pairs of rows interleaved, quads interleaved
            for (int i = 0; i < 8; i++) r[i] = *(const bd_v8f *)(src + (size_t)(i0 + i) * b + j0);
            for (int i = 0; i < 8; i += 2) {
                t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
                t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
            }
            for (int h = 0; h < 8; h += 4) {
                u[h] = __builtin_shuffle(t[h], t[h + 2], lo2);
                u[h + 1] = __builtin_shuffle(t[h], t[h + 2], hi2);
                u[h + 2] = __builtin_shuffle(t[h + 1], t[h + 3], lo2);
                u[h + 3] = __builtin_shuffle(t[h + 1], t[h + 3], hi2);
            }
            for (int c = 0; c < 4; c++) {  // u[c] holds columns c and c+4 of rows 0-3, u[c+4] of rows 4-7
                *(bd_v8f *)(dst + (size_t)(j0 + c) * a + i0) = __builtin_shuffle(u[c], u[c + 4], lo3);
                *(bd_v8f *)(dst + (size_t)(j0 + c + 4) * a + i0) = __builtin_shuffle(u[c], u[c + 4], hi3);
            }
        }
}
#define BD_T_SMALL_A(A)                                                                           \
    static void bd_t_a##A(float *restrict dst, const float *restrict src, int b) {                \
        for (int j = 0; j < b; j++) {                                                             \
            _Pragma("GCC unroll 8") for (int i = 0; i < A; i++) dst[j * A + i] = src[i * b + j];   \
        }                                                                                         \
    }
#define BD_T_SMALL_B(B)                                                                           \
    static void bd_t_b##B(float *restrict dst, const float *restrict src, int a) {                \
        for (int i = 0; i < a; i++) {                                                             \
            _Pragma("GCC unroll 8") for (int j = 0; j < B; j++) dst[j * a + i] = src[i * B + j];   \
        }                                                                                         \
    }
// src viewed (a, b, R) -> dst (b, a, R) for BTT ranks R: each move one fixed-size copy (a loop of
// r floats is 4-10x slower).
#define BD_T_RUN(R)                                                                               \
    static void bd_t_r##R(float *restrict dst, const float *restrict src, int a, int b) {         \
        for (int j = 0; j < b; j++)                                                               \
            for (int i = 0; i < a; i++) memcpy(dst + (j * a + i) * R, src + (i * b + j) * R, R * sizeof(float)); \
    }
BD_T_SMALL_A(2) BD_T_SMALL_A(4)
BD_T_SMALL_B(2) BD_T_SMALL_B(4)
BD_T_RUN(2) BD_T_RUN(3) BD_T_RUN(4) BD_T_RUN(8)

// out (rows, b*a*r) from in (rows, a*b*r): per row, in viewed (a, b, r) -> out (b, a, r).
static void bd_transpose_rows(float *restrict out, const float *restrict in, int rows, int a, int b, int r) {
    size_t row = (size_t)a * b * r;
    for (int n = 0; n < rows; n++) {
        const float *src = in + (size_t)n * row;
        float *dst = out + (size_t)n * row;
        if (r == 2) bd_t_r2(dst, src, a, b);
        else if (r == 3) bd_t_r3(dst, src, a, b);
        else if (r == 4) bd_t_r4(dst, src, a, b);
        else if (r == 8) bd_t_r8(dst, src, a, b);
        else if (r > 1) {
            for (int j = 0; j < b; j++)
                for (int i = 0; i < a; i++) {
                    const float *s = src + ((size_t)i * b + j) * r;
                    float *d = dst + ((size_t)j * a + i) * r;
                    for (int k = 0; k < r; k++) d[k] = s[k];
                }
        } else if (a % 8 == 0 && b % 8 == 0) bd_t_tiles8(dst, src, a, b);
        else if (a == 2) bd_t_a2(dst, src, b);
        else if (a == 4) bd_t_a4(dst, src, b);
        else if (b == 2) bd_t_b2(dst, src, a);
        else if (b == 4) bd_t_b4(dst, src, a);
        else {
            for (int j = 0; j < b; j++)
                for (int i = 0; i < a; i++) dst[(size_t)j * a + i] = src[(size_t)i * b + j];
        }
    }
}

// Per token n: in viewed (a, b, r) -> out (b, a, r): out[n, (j i k)] = in[n, (i j k)].
// Rows of in and out are contiguous, length a*b*r; out and in must not overlap.
static void token_transpose(float *out, const float *in, int N, int a, int b, int r) {
    size_t row = (size_t)a * b * r;
    int nchunks = (N + BD_TC - 1) / BD_TC;
    #pragma omp parallel for schedule(static)
    for (int ch = 0; ch < nchunks; ch++) {
        int n0 = ch * BD_TC, rows = N - n0 < BD_TC ? N - n0 : BD_TC;
        bd_transpose_rows(out + (size_t)n0 * row, in + (size_t)n0 * row, rows, a, b, r);
    }
}

// ----------------------------------------------------------------------------
// The structured layer: one stage (dense, blockdiag) or two stages with a per-token transpose
// between them (lowrank, btt: the BTT permutation; monarch: P, and P^T after stage 2).
// Not for btt_moe (moe.h runs its experts on the same primitives).
//
// Two-stage layers with few weights on our kernel (btt) are memory-bound, not compute-bound: run
// stage by stage over all N tokens, the intermediates (N, mid) would go to memory and back three
// times. They run fused instead: a thread takes a chunk of BD_TC tokens and does both stages and
// the transposes of it while it is in cache, so memory sees only x, saved (z') and y; in backward
// dy, saved, x and dx (weight gradients: see structured_backward_fused). The others run the
// primitives over all N tokens: lowrank (plain matmuls on BLAS) and monarch (more weights than
// BD_FUSED_WEIGHTS: sweeping their gradients once per chunk costs more than the intermediates).

// A permutation that moves nothing: (1, b, r) and (a, 1, r) views are already (b, a, r).
static int token_permute_is_identity(TokenPermute t) { return t.a == 0 || t.a == 1 || t.b == 1; }

static int structured_is_fused(const Structure *s) {
    const CoreShape *c0 = &s->core[0], *c1 = &s->core[1];
    return s->ncores == 2 && !bd_use_blas(c0->nb, c0->p, c0->q) && !bd_use_blas(c1->nb, c1->p, c1->q) &&
           (size_t)c0->nb * c0->p * c0->q + (size_t)c1->nb * c1->p * c1->q <= BD_FUSED_WEIGHTS;
}

// Floats kept from forward for backward: the permuted intermediate z' (N, mid_width).
static size_t structured_saved_floats(const Structure *s, int N) {
    return s->ncores == 2 ? (size_t)N * s->mid_width : 0;
}

// Temporary floats, forward and backward. Unfused: z before the permutation (N, mid) and, for
// monarch, the stage-2 output before its transpose (N, d_out); in backward dz' (N, mid) and dz or
// dv. Fused: per thread (omp_get_max_threads() when this is called, which must not grow before
// the layer runs) two chunk buffers and a packing buffer, and partial weight gradients of
// BD_GROUPS_PER_THREAD groups of chunks per thread.
static size_t structured_scratch_floats(const Structure *s, int N) {
    if (s->ncores == 1) return 0;
    size_t mid = s->mid_width, wide = s->out.a && (size_t)s->d_out > mid ? (size_t)s->d_out : mid;
    if (structured_is_fused(s)) {
        size_t xp = (size_t)bd_round_up(s->core[0].p > s->core[1].p ? s->core[0].p : s->core[1].p, BD_VW);
        size_t nw = (size_t)s->core[0].nb * s->core[0].p * s->core[0].q + (size_t)s->core[1].nb * s->core[1].p * s->core[1].q;
        size_t nth = omp_get_max_threads();
        return nth * BD_TC * (2 * wide + xp) + BD_GROUPS_PER_THREAD * nth * nw;
    }
    return (size_t)N * (mid + wide);
}

static void structured_forward_fused(const Structure *s, float *y, const float *x, const float *W0,
                                     const float *W1, float *saved, float *scratch, int N) {
    const CoreShape *c0 = &s->core[0], *c1 = &s->core[1];
    int mid = s->mid_width, d_in = s->d_in, d_out = s->d_out, ldb0, ldb1;
    int mid_perm = !token_permute_is_identity(s->mid), out_perm = !token_permute_is_identity(s->out);
    size_t wide = out_perm && d_out > mid ? (size_t)d_out : (size_t)mid;
    float *W0t = bd_pack_wt(W0, c0->nb, c0->p, c0->q, &ldb0), *W1t = bd_pack_wt(W1, c1->nb, c1->p, c1->q, &ldb1);
    int nchunks = (N + BD_TC - 1) / BD_TC, nth = omp_get_max_threads();
    #pragma omp parallel num_threads(nth)
    {
        float *buf = scratch + (size_t)omp_get_thread_num() * BD_TC * wide;  // z or v of one chunk
        // Chunks are independent: dynamic, so a thread the OS delays does not hold up the others.
        #pragma omp for schedule(dynamic, 1)
        for (int ch = 0; ch < nchunks; ch++) {
            int n0 = ch * BD_TC, rows = N - n0 < BD_TC ? N - n0 : BD_TC;
            float *zp = saved + (size_t)n0 * mid, *yc = y + (size_t)n0 * d_out;
            if (mid_perm) {
                bd_apply_rows(buf, mid, x + (size_t)n0 * d_in, d_in, W0t, ldb0, rows, c0->nb, c0->p, c0->q, 0.0f);
                bd_transpose_rows(zp, buf, rows, s->mid.a, s->mid.b, s->mid.r);
            } else {
                bd_apply_rows(zp, mid, x + (size_t)n0 * d_in, d_in, W0t, ldb0, rows, c0->nb, c0->p, c0->q, 0.0f);
            }
            if (out_perm) {
                bd_apply_rows(buf, d_out, zp, mid, W1t, ldb1, rows, c1->nb, c1->p, c1->q, 0.0f);
                bd_transpose_rows(yc, buf, rows, s->out.a, s->out.b, s->out.r);
            } else {
                bd_apply_rows(yc, d_out, zp, mid, W1t, ldb1, rows, c1->nb, c1->p, c1->q, 0.0f);
            }
        }
    }
    free(W0t);
    free(W1t);
}

static void structured_backward_fused(const Structure *s, float *dx, float *dW0, float *dW1, const float *dy,
                                      const float *x, const float *W0, const float *W1, const float *saved,
                                      float *scratch, int N) {
    const CoreShape *c0 = &s->core[0], *c1 = &s->core[1];
    int mid = s->mid_width, d_in = s->d_in, d_out = s->d_out, ldb0, ldb1, nth = omp_get_max_threads();
    int mid_perm = !token_permute_is_identity(s->mid), out_perm = !token_permute_is_identity(s->out);
    size_t wide = out_perm && d_out > mid ? (size_t)d_out : (size_t)mid;
    size_t n0w = (size_t)c0->nb * c0->p * c0->q, nw = n0w + (size_t)c1->nb * c1->p * c1->q;
    size_t xpw = (size_t)bd_round_up(c0->p > c1->p ? c0->p : c1->p, BD_VW);
    size_t per_thread = (size_t)BD_TC * (2 * wide + xpw);
    float *partial = scratch + nth * per_thread;  // (groups, nw): dW0 then dW1 of each group
    float *W0p = bd_pack_w(W0, c0->nb, c0->p, c0->q, &ldb0), *W1p = bd_pack_w(W1, c1->nb, c1->p, c1->q, &ldb1);
    // The chunks are split into a fixed number of contiguous groups, each summing its own weight
    // gradients in chunk order; groups go to threads dynamically (a thread the OS delays does not
    // hold up the others) and are added to dW in group order, so the result depends only on nth.
    int nchunks = (N + BD_TC - 1) / BD_TC, groups = BD_GROUPS_PER_THREAD * nth;
    if (groups > nchunks) groups = nchunks;
    #pragma omp parallel num_threads(nth)
    {
        float *b1 = scratch + (size_t)omp_get_thread_num() * per_thread;  // chunk buffers
        float *b2 = b1 + BD_TC * wide, *xp = b2 + BD_TC * wide;
        #pragma omp for schedule(dynamic, 1)
        for (int g = 0; g < groups; g++) {
            float *g0 = partial + (size_t)g * nw, *g1 = g0 + n0w;
            memset(g0, 0, nw * sizeof(float));
            for (int ch = (int)((long)g * nchunks / groups); ch < (int)((long)(g + 1) * nchunks / groups); ch++) {
                int n0 = ch * BD_TC, rows = N - n0 < BD_TC ? N - n0 : BD_TC;
                const float *dv = dy + (size_t)n0 * d_out, *zp = saved + (size_t)n0 * mid, *xc = x + (size_t)n0 * d_in;
                if (out_perm) {  // y = transpose_(a,b)(v), so dv = transpose_(b,a)(dy)
                    bd_transpose_rows(b1, dv, rows, s->out.b, s->out.a, s->out.r);
                    dv = b1;
                }
                bd_weight_rows(g1, dv, d_out, zp, mid, rows, 0, c1->nb, 0, c1->q, c1->p, c1->q, xp);
                bd_apply_rows(b2, mid, dv, d_out, W1p, ldb1, rows, c1->nb, c1->q, c1->p, 0.0f);  // dz'
                const float *dz = b2;
                if (mid_perm) {
                    bd_transpose_rows(b1, b2, rows, s->mid.b, s->mid.a, s->mid.r);  // dv is no longer needed
                    dz = b1;
                }
                bd_weight_rows(g0, dz, mid, xc, d_in, rows, 0, c0->nb, 0, c0->q, c0->p, c0->q, xp);
                bd_apply_rows(dx + (size_t)n0 * d_in, d_in, dz, mid, W0p, ldb0, rows, c0->nb, c0->q, c0->p, 0.0f);
            }
        }
        #pragma omp for schedule(static)
        for (size_t k = 0; k < nw; k++) {
            float *d = k < n0w ? dW0 + k : dW1 + (k - n0w);
            float sum = *d;
            for (int g = 0; g < groups; g++) sum += partial[(size_t)g * nw + k];
            *d = sum;
        }
    }
    free(W0p);
    free(W1p);
}

// y (N, d_out) = S(x), overwritten, no bias; x (N, d_in). saved (N, mid_width) = z' for backward.
static void structured_forward(const Structure *s, float *y, const float *x, const float *W0,
                               const float *W1, float *saved, float *scratch, int N) {
    const CoreShape *c0 = &s->core[0], *c1 = &s->core[1];
    if (N <= 0) return;
    if (s->ncores == 1) {
        blockdiag_forward(y, s->d_out, x, s->d_in, W0, N, c0->nb, c0->p, c0->q, 0.0f);
        return;
    }
    if (structured_is_fused(s)) {
        structured_forward_fused(s, y, x, W0, W1, saved, scratch, N);
        return;
    }
    int mid = s->mid_width;
    if (token_permute_is_identity(s->mid)) {
        blockdiag_forward(saved, mid, x, s->d_in, W0, N, c0->nb, c0->p, c0->q, 0.0f);
    } else {
        float *z = scratch;  // (N, mid)
        blockdiag_forward(z, mid, x, s->d_in, W0, N, c0->nb, c0->p, c0->q, 0.0f);
        token_transpose(saved, z, N, s->mid.a, s->mid.b, s->mid.r);
    }
    if (token_permute_is_identity(s->out)) {
        blockdiag_forward(y, s->d_out, saved, mid, W1, N, c1->nb, c1->p, c1->q, 0.0f);
    } else {
        float *v = scratch + (size_t)N * mid;  // (N, d_out) before the output transpose
        blockdiag_forward(v, s->d_out, saved, mid, W1, N, c1->nb, c1->p, c1->q, 0.0f);
        token_transpose(y, v, N, s->out.a, s->out.b, s->out.r);
    }
}

// dx (N, d_in) overwritten; dW0, dW1 accumulated. dy (N, d_out); x, saved as given to forward.
static void structured_backward(const Structure *s, float *dx, float *dW0, float *dW1, const float *dy,
                                const float *x, const float *W0, const float *W1, const float *saved,
                                float *scratch, int N) {
    const CoreShape *c0 = &s->core[0], *c1 = &s->core[1];
    if (N <= 0) return;
    if (s->ncores == 1) {
        blockdiag_backward_weight(dW0, dy, s->d_out, x, s->d_in, N, c0->nb, c0->p, c0->q);
        blockdiag_backward_input(dx, s->d_in, dy, s->d_out, W0, N, c0->nb, c0->p, c0->q, 0.0f);
        return;
    }
    if (structured_is_fused(s)) {
        structured_backward_fused(s, dx, dW0, dW1, dy, x, W0, W1, saved, scratch, N);
        return;
    }
    int mid = s->mid_width;
    float *dzp = scratch;                      // dz' (N, mid)
    float *tmp = scratch + (size_t)N * mid;    // dv (N, d_out) for monarch, then dz (N, mid)
    const float *dv = dy;
    if (!token_permute_is_identity(s->out)) {
        token_transpose(tmp, dy, N, s->out.b, s->out.a, s->out.r);  // y = transpose_(a,b)(v)
        dv = tmp;
    }
    blockdiag_backward_weight(dW1, dv, s->d_out, saved, mid, N, c1->nb, c1->p, c1->q);
    blockdiag_backward_input(dzp, mid, dv, s->d_out, W1, N, c1->nb, c1->p, c1->q, 0.0f);
    const float *dz = dzp;
    if (!token_permute_is_identity(s->mid)) {
        token_transpose(tmp, dzp, N, s->mid.b, s->mid.a, s->mid.r);  // dv is no longer needed
        dz = tmp;
    }
    blockdiag_backward_weight(dW0, dz, mid, x, s->d_in, N, c0->nb, c0->p, c0->q);
    blockdiag_backward_input(dx, s->d_in, dz, mid, W0, N, c0->nb, c0->p, c0->q, 0.0f);
}

#endif
