// The block-diagonal matmul of contract A (llmc/blockdiag.cuh): forward y_i = x_i W_i^T, backward input
// dx_i = dy_i W_i, backward weight dW_i += dy_i^T x_i, W (nb, q, p), block i at column i*p of rows of
// stride ldx and i*q of rows of stride ldy. Versions:
//   v1 naive    one thread per output, fp32 sums in k order (llmc/blockdiag.cuh bd_naive_kernel; the
//               trainer's fallback LLMC_BLOCKDIAG=naive)
//   v2 tiled    64 x 64 shared-memory tiles, 4 x 4 outputs per thread, fp32 FMA (this file)
//   v3 tc       tensor cores: mma.sync m16n8k16 bf16 -> fp32 on 32-deep shared tiles, the next tile's
//               global loads in registers during the mma (llmc/blockdiag.cuh bd_tc_kernel; the trainer's)
//   cuBLAS      cublasGemmStridedBatchedEx with the blocks as the batch (batch strides p and q inside the
//               rows), the library alternative; deterministic (atomics disallowed)
// wgmma (sm_90's warpgroup MMA fed by TMA) is not attempted: its descriptors and shared-memory layouts
// are easy to get subtly wrong and this was written without a GPU to debug on; v3 is the mma.sync design.
//
// Checks: every version against llmc/blockdiag.h (fp32 on the same bf16-rounded inputs) on fresh random
// inputs, shapes that are not multiples of the tiles, rows of a wider matrix; v1 and v3 also through the
// per-token permutations (TokenPermute) of BTT and Monarch. Tolerance 1e-2 of the output's scale: the
// output is rounded to bf16 once (2^-9 relative), the sums are fp32 in a different order (~1e-6).
// Benchmark (bench: lines): GPT-2 124M's block shapes (blockdiag b=4, monarch b=4, btt rank 1 with the
// default factorization, lowrank rank 128), 16384 tokens: ms, TFLOP/s, GB/s and the roofline floor
// max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s) of an H100 SXM, and v3 / cuBLAS (target >= 1.0x).
#include "dev/cuda/common.h"
#include "llmc/blockdiag.cuh"
#include "dev/cuda/cpu_ref.h"

#define PEAK_FLOPS 989e12
#define PEAK_BYTES 3.35e12

// ----------------------------------------------------------------------------------------------
// v2: shared-memory tiles, SIMT. C (M x N) per block i = sum_k A(m, k) B(n, k), 64 x 64 per thread
// block of 256, k in steps of 16; operands as in bd_tc_kernel (plain layouts only: no permutations,
// row maps or groups). The weight gradient is split over row ranges like v3 (partials + finalize).
template <int MODE>
__global__ void __launch_bounds__(256) bd_tiled_kernel(BdArgs g) {
    __shared__ float As[16][64 + 4], Bs[16][64 + 4];
    int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, i, s = 0, m0, n0 = blockIdx.y * 64, mend, ncols, K;
    int klo = 0, khi = 0;
    if (MODE != BD_BWD_W) {
        i = blockIdx.z;
        m0 = blockIdx.x * 64;
        mend = g.nrows;
        ncols = MODE == BD_FWD ? g.q : g.p;
        K = MODE == BD_FWD ? g.p : g.q;
    } else {
        i = blockIdx.z % g.nb;
        s = blockIdx.z / g.nb;
        int chunk = (g.nrows + g.S - 1) / g.S;
        klo = min(g.nrows, s * chunk);
        khi = min(g.nrows, klo + chunk);
        K = khi - klo;
        m0 = blockIdx.x * 64;
        mend = g.q;
        ncols = g.p;
    }
    const bf16 *W = g.W + (size_t)i * g.q * g.p;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += 16) {
        for (int c = 0; c < 4; c++) {
            int e = tid + c * 256, kk, mm;
            float a = 0.0f, b = 0.0f;
            if (MODE != BD_BWD_W) {   // A k-contiguous: consecutive threads along k
                kk = e % 16; mm = e / 16;
                int r = m0 + mm, k = k0 + kk;
                if (r < mend && k < K) a = __bfloat162float(g.a.p[(size_t)r * g.a.ld + i * K + k]);
                As[kk][mm] = a;
            } else {                  // A(j, r) = dy[r][i*q + j]: consecutive threads along j
                mm = e % 64; kk = e / 64;
                int r = klo + k0 + kk, j = m0 + mm;
                if (r < khi && j < g.q) a = __bfloat162float(g.a.p[(size_t)r * g.a.ld + i * g.q + j]);
                As[kk][mm] = a;
            }
            if (MODE == BD_FWD) {     // B(n, k) = W_i[n][k]
                kk = e % 16; mm = e / 16;
                int j = n0 + mm, k = k0 + kk;
                if (j < g.q && k < K) b = __bfloat162float(W[(size_t)j * g.p + k]);
            } else if (MODE == BD_BWD_IN) {   // B(n, k) = W_i[k][n]
                mm = e % 64; kk = e / 64;
                int cc = n0 + mm, j = k0 + kk;
                if (cc < g.p && j < K) b = __bfloat162float(W[(size_t)j * g.p + cc]);
            } else {                  // B(c, r) = x[r][i*p + c]
                mm = e % 64; kk = e / 64;
                int r = klo + k0 + kk, cc = n0 + mm;
                if (r < khi && cc < g.p) b = __bfloat162float(g.b.p[(size_t)r * g.b.ld + i * g.p + cc]);
            }
            Bs[kk][mm] = b;
        }
        __syncthreads();
        for (int kk = 0; kk < 16; kk++) {
            float a[4], b[4];
            for (int u = 0; u < 4; u++) { a[u] = As[kk][ty * 4 + u]; b[u] = Bs[kk][tx * 4 + u]; }
            for (int u = 0; u < 4; u++)
                for (int v = 0; v < 4; v++) acc[u][v] += a[u] * b[v];
        }
        __syncthreads();
    }
    for (int u = 0; u < 4; u++)
        for (int v = 0; v < 4; v++) {
            int row = m0 + ty * 4 + u, col = n0 + tx * 4 + v;
            if (row >= mend || col >= ncols) continue;
            if (MODE == BD_BWD_W) g.part[(((size_t)s * g.nb + i) * g.q + row) * g.p + col] = acc[u][v];
            else bd_store_out(g, MODE, row, i * ncols + col, acc[u][v]);
        }
}

static void bd_run_tiled(BdArgs g, int mode, bf16 *dW, float *scratch, cudaStream_t st) {
    if (mode == BD_FWD) {
        bd_tiled_kernel<BD_FWD><<<dim3(ceil_div(g.nrows, 64), ceil_div(g.q, 64), g.nb), 256, 0, st>>>(g);
    } else if (mode == BD_BWD_IN) {
        bd_tiled_kernel<BD_BWD_IN><<<dim3(ceil_div(g.nrows, 64), ceil_div(g.p, 64), g.nb), 256, 0, st>>>(g);
    } else {
        g.S = bd_splits(g.nrows, 1, g.nb, g.q, g.p);
        g.part = scratch;
        bd_tiled_kernel<BD_BWD_W><<<dim3(ceil_div(g.q, 64), ceil_div(g.p, 64), g.S * g.nb), 256, 0, st>>>(g);
        cudaCheck(cudaGetLastError());
        size_t n = (size_t)g.nb * g.q * g.p;
        bd_weight_finalize_kernel<<<ceil_div(n, 256), 256, 0, st>>>(dW, NULL, scratch, g.S, n, 1);
    }
    cudaCheck(cudaGetLastError());
}

// ----------------------------------------------------------------------------------------------
// cuBLAS: column-major views of the row-major blocks (see llmc/matmul.cuh for the convention)
static const float ONE = 1.0f, ZERO = 0.0f;
static void cublas_forward(bf16 *y, int ldy, const bf16 *x, int ldx, const bf16 *W, int N, int nb, int p, int q) {
    // y_i^T (q, N) = W_i (q x p as col-major (p, q) transposed) x_i^T (p, N)
    cublasCheck(cublasGemmStridedBatchedEx(cublas_handle, CUBLAS_OP_T, CUBLAS_OP_N, q, N, p, &ONE, W, CUDA_R_16BF, p,
                                           (long long)q * p, x, CUDA_R_16BF, ldx, p, &ZERO, y, CUDA_R_16BF, ldy, q, nb,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
static void cublas_backward_input(bf16 *dx, int ldx, const bf16 *dy, int ldy, const bf16 *W, int N, int nb, int p, int q) {
    // dx_i^T (p, N) = W_i^T (p, q) dy_i^T (q, N)
    cublasCheck(cublasGemmStridedBatchedEx(cublas_handle, CUBLAS_OP_N, CUBLAS_OP_N, p, N, q, &ONE, W, CUDA_R_16BF, p,
                                           (long long)q * p, dy, CUDA_R_16BF, ldy, q, &ZERO, dx, CUDA_R_16BF, ldx, p, nb,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
static void cublas_backward_weight(bf16 *dW, const bf16 *dy, int ldy, const bf16 *x, int ldx, int N, int nb, int p, int q) {
    // dW_i^T (p, q) += x_i^T (p, N) dy_i (N, q)
    cublasCheck(cublasGemmStridedBatchedEx(cublas_handle, CUBLAS_OP_N, CUBLAS_OP_T, p, q, N, &ONE, x, CUDA_R_16BF, ldx, p,
                                           dy, CUDA_R_16BF, ldy, q, &ONE, dW, CUDA_R_16BF, p, (long long)q * p, nb,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ----------------------------------------------------------------------------------------------
// Checks

enum { V_NAIVE, V_TILED, V_TC, V_CUBLAS, NV };
static const char *vname[NV] = {"v1 naive", "v2 tiled", "v3 tc", "cuBLAS"};

// The three products of version v on device buffers; yperm / xperm only for v1 and v3.
static void run_version(int v, int mode, bf16 *out, const bf16 *a, int lda, TokenPermute aperm, const bf16 *b, int ldb,
                        TokenPermute bperm, const bf16 *W, int N, int nb, int p, int q, float *scratch) {
    if (v == V_CUBLAS) {
        if (mode == BD_FWD) cublas_forward(out, ldb, a, lda, W, N, nb, p, q);
        else if (mode == BD_BWD_IN) cublas_backward_input(out, ldb, a, lda, W, N, nb, p, q);
        else cublas_backward_weight(out, a, lda, b, ldb, N, nb, p, q);
        return;
    }
    if (v == V_TILED) {
        BdArgs g = bd_args(W, nb, p, q, N);
        g.a = bd_act(a, lda, BD_NO_PERM);
        g.b = bd_act(b, ldb, BD_NO_PERM);
        g.y = out;
        g.ldy = ldb;
        bd_run_tiled(g, mode, out, scratch, main_stream);
        return;
    }
    bd_kernel_choice = v == V_NAIVE ? BD_KERNEL_NAIVE : BD_KERNEL_TC;
    // forward: a = x, out = y (ld ldb, perm bperm); backward input: a = dy, out = dx; weight: a = dy, b = x
    if (mode == BD_FWD) blockdiag_forward_gpu(out, ldb, bperm, a, lda, aperm, W, N, nb, p, q, NULL, NULL, main_stream);
    else if (mode == BD_BWD_IN) blockdiag_backward_input_gpu(out, ldb, bperm, a, lda, aperm, W, N, nb, p, q, NULL, 0, main_stream);
    else blockdiag_backward_weight_gpu(out, a, lda, aperm, b, ldb, bperm, N, nb, p, q, 1, scratch, main_stream);
    bd_kernel_choice = BD_KERNEL_TC;
}

// plain[n][L] = m[n][perm(L)]
static float *gather_cols(const float *m, int N, int ld, int w, TokenPermute t) {
    float *o = (float *)malloc((size_t)N * w * sizeof(float));
    for (int n = 0; n < N; n++)
        for (int L = 0; L < w; L++) o[(size_t)n * w + L] = m[(size_t)n * ld + bd_perm(bd_perm_norm(t), L)];
    return o;
}

static void check_shape(int N, int nb, int p, int q, int padx, int pady, TokenPermute xp, TokenPermute yp, uint64_t seed) {
    int ldx = nb * p + padx, ldy = nb * q + pady, perm = bd_perm_norm(xp).a || bd_perm_norm(yp).a;
    float *x, *W, *dy, *dW0;
    bf16 *dx_ = dev_random_bf16((size_t)N * ldx, 1.0f, seed, &x), *dW_ = dev_random_bf16((size_t)nb * q * p, 0.5f, seed + 1, &W);
    bf16 *ddy_ = dev_random_bf16((size_t)N * ldy, 1.0f, seed + 2, &dy), *dWacc = dev_random_bf16((size_t)nb * q * p, 0.5f, seed + 3, &dW0);
    float *xl = gather_cols(x, N, ldx, nb * p, xp), *dyl = gather_cols(dy, N, ldy, nb * q, yp);
    float *ry = (float *)malloc((size_t)N * nb * q * 4), *rdx = (float *)malloc((size_t)N * nb * p * 4);
    float *rdW = (float *)malloc((size_t)nb * q * p * 4);
    memcpy(rdW, dW0, (size_t)nb * q * p * 4);
    ref_blockdiag_forward(ry, nb * q, xl, nb * p, W, N, nb, p, q, 0.0f);
    ref_blockdiag_backward_input(rdx, nb * p, dyl, nb * q, W, N, nb, p, q, 0.0f);
    ref_blockdiag_backward_weight(rdW, dyl, nb * q, xl, nb * p, N, nb, p, q);
    bf16 *y, *dxo, *gW;
    float *scratch;
    size_t sn = bd_weight_scratch_floats(N, 1, nb, q, p) + (size_t)nb * q * p;
    cudaCheck(cudaMalloc(&y, (size_t)N * ldy * 2));
    cudaCheck(cudaMalloc(&dxo, (size_t)N * ldx * 2));
    cudaCheck(cudaMalloc(&gW, (size_t)nb * q * p * 2));
    cudaCheck(cudaMalloc(&scratch, sn * 4));
    char what[200];
    for (int v = 0; v < NV; v++) {
        if (perm && (v == V_TILED || v == V_CUBLAS)) continue;   // plain layouts only
        cudaCheck(cudaMemset(y, 0, (size_t)N * ldy * 2));
        cudaCheck(cudaMemset(dxo, 0, (size_t)N * ldx * 2));
        cudaCheck(cudaMemcpy(gW, dWacc, (size_t)nb * q * p * 2, cudaMemcpyDeviceToDevice));
        run_version(v, BD_FWD, y, dx_, ldx, xp, NULL, ldy, yp, dW_, N, nb, p, q, scratch);
        run_version(v, BD_BWD_IN, dxo, ddy_, ldy, yp, NULL, ldx, xp, dW_, N, nb, p, q, scratch);
        run_version(v, BD_BWD_W, gW, ddy_, ldy, yp, dx_, ldx, xp, NULL, N, nb, p, q, scratch);
        cudaCheck(cudaDeviceSynchronize());
        float *hy = dev_to_host_bf16(y, (size_t)N * ldy), *hdx = dev_to_host_bf16(dxo, (size_t)N * ldx);
        float *hW = dev_to_host_bf16(gW, (size_t)nb * q * p);
        float *gy = gather_cols(hy, N, ldy, nb * q, yp), *gdx = gather_cols(hdx, N, ldx, nb * p, xp);
        const char *pd = perm ? " through permutations" : "";
        snprintf(what, sizeof what, "%s forward N=%d nb=%d %d->%d ldx=%d ldy=%d%s", vname[v], N, nb, p, q, ldx, ldy, pd);
        dev_check(what, ref_rel_err(gy, ry, (size_t)N * nb * q), 1e-2);
        snprintf(what, sizeof what, "%s backward input N=%d nb=%d %d->%d%s", vname[v], N, nb, p, q, pd);
        dev_check(what, ref_rel_err(gdx, rdx, (size_t)N * nb * p), 1e-2);
        snprintf(what, sizeof what, "%s backward weight (+=) N=%d nb=%d %d->%d%s", vname[v], N, nb, p, q, pd);
        dev_check(what, ref_rel_err(hW, rdW, (size_t)nb * q * p), 1e-2);
        free(hy); free(hdx); free(hW); free(gy); free(gdx);
    }
    cudaFree(dx_); cudaFree(dW_); cudaFree(ddy_); cudaFree(dWacc); cudaFree(y); cudaFree(dxo); cudaFree(gW); cudaFree(scratch);
    free(x); free(W); free(dy); free(dW0); free(xl); free(dyl); free(ry); free(rdx); free(rdW);
}

// ----------------------------------------------------------------------------------------------
// Benchmark of one core shape at N tokens: every version and product.
static void bench_core(const char *what, int N, int nb, int p, int q) {
    bf16 *x, *y, *W, *dW;
    float *scratch;
    size_t sn = bd_weight_scratch_floats(N, 1, nb, q, p) + (size_t)nb * q * p;
    cudaCheck(cudaMalloc(&x, (size_t)N * nb * p * 2));
    cudaCheck(cudaMalloc(&y, (size_t)N * nb * q * 2));
    cudaCheck(cudaMalloc(&W, (size_t)nb * q * p * 2));
    cudaCheck(cudaMalloc(&dW, (size_t)nb * q * p * 2));
    cudaCheck(cudaMalloc(&scratch, sn * 4));
    cudaCheck(cudaMemset(x, 0, (size_t)N * nb * p * 2));
    cudaCheck(cudaMemset(y, 0, (size_t)N * nb * q * 2));
    cudaCheck(cudaMemset(W, 0, (size_t)nb * q * p * 2));
    cudaCheck(cudaMemset(dW, 0, (size_t)nb * q * p * 2));
    double flops = 2.0 * N * nb * p * q, wbytes = 2.0 * nb * p * q;
    const char *ops[3] = {"forward", "backward input", "backward weight"};
    double bytes[3] = {2.0 * N * nb * (p + q) + wbytes, 2.0 * N * nb * (p + q) + wbytes, 2.0 * N * nb * (p + q) + 2 * wbytes};
    for (int mode = 0; mode < 3; mode++) {
        float ms[NV];
        for (int v = 0; v < NV; v++) {
            int reps = v == V_NAIVE ? 2 : 20;
            if (mode == BD_FWD) ms[v] = dev_time_ms([&] { run_version(v, mode, y, x, nb * p, BD_NO_PERM, NULL, nb * q, BD_NO_PERM, W, N, nb, p, q, scratch); }, reps);
            else if (mode == BD_BWD_IN) ms[v] = dev_time_ms([&] { run_version(v, mode, x, y, nb * q, BD_NO_PERM, NULL, nb * p, BD_NO_PERM, W, N, nb, p, q, scratch); }, reps);
            else ms[v] = dev_time_ms([&] { run_version(v, mode, dW, y, nb * q, BD_NO_PERM, x, nb * p, BD_NO_PERM, NULL, N, nb, p, q, scratch); }, reps);
        }
        double floor_ms = fmax(flops / PEAK_FLOPS, bytes[mode] / PEAK_BYTES) * 1e3;
        printf("bench: %-28s %-15s nb=%-3d %4d->%-4d roofline %.4f ms |", what, ops[mode], nb, p, q, floor_ms);
        for (int v = 0; v < NV; v++)
            printf(" %s %.4f ms %.0f TFLOP/s %.0f GB/s |", vname[v], ms[v], flops / ms[v] / 1e9, bytes[mode] / ms[v] / 1e6);
        printf(" v3/cuBLAS %.2fx (target >= 1.0x)\n", ms[V_CUBLAS] / ms[V_TC]);
    }
    cudaFree(x); cudaFree(y); cudaFree(W); cudaFree(dW); cudaFree(scratch);
}

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    TokenPermute none = {0, 1, 1}, xp = {4, 6, 2}, yp = {5, 8, 1};
    check_shape(1000, 3, 24, 40, 8, 16, none, none, 11);
    check_shape(777, 2, 20, 12, 3, 1, none, none, 22);
    check_shape(300, 4, 192, 576, 0, 0, none, none, 33);
    check_shape(513, 1, 768, 136, 0, 0, none, none, 44);
    check_shape(257, 2, 24, 20, 0, 0, xp, yp, 55);

    int N = 16384, C = 768;
    const char *types[4] = {"blockdiag", "monarch", "btt", "lowrank"};
    for (int t = 0; t < 4; t++) {
        CoreShape seen[16];
        int nseen = 0;
        for (int k = 0; k < NUM_LINEAR; k++) {
            Structure s = dev_structure(C, k, types[t], t < 2 ? 4 : 0, t == 3 ? 128 : 0, 0, 0, 0, 0);
            for (int c = 0; c < s.ncores; c++) {
                int dup = 0;
                for (int u = 0; u < nseen; u++)
                    dup |= seen[u].nb == s.core[c].nb && seen[u].p == s.core[c].p && seen[u].q == s.core[c].q;
                if (dup) continue;
                seen[nseen++] = s.core[c];
                char what[64];
                snprintf(what, sizeof what, "%s %s W%d", types[t], linear_names[k], c);
                bench_core(what, N, s.core[c].nb, s.core[c].p, s.core[c].q);
            }
        }
    }
    return dev_failures ? 1 : 0;
}
