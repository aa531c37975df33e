// Both stages of a two-core structure in one kernel (llmc/blockdiag.cuh bd_fused_forward_kernel): a
// block of TM tokens computes stage 1 for all its blocks into shared memory at the permuted positions
// (z' never goes to HBM and back: it is written once, for backward, or not at all), then stage 2 from
// shared memory, with the output permutation (Monarch), bias and GELU in the epilogue. Compared with:
//   unfused   the same tensor-core kernels stage by stage, the permutation folded into stage 1's stores
//             (z' written, then read by stage 2)
//   cuBLAS    GEMM + transpose + GEMM: strided-batched GEMM for stage 1 into z, a transpose kernel z -> z',
//             strided-batched GEMM for stage 2 (and Monarch's output transpose): the library way
// Checks: fused, unfused and the cuBLAS path against llmc/blockdiag.h's structured_forward (fp32, the same
// bf16 inputs): tolerance 1e-2 of the output's scale (z' and y are rounded to bf16: 2 x 2^-9, and fp32
// sums in another order). Benchmark: GPT-2 124M's btt (rank 1 and 2, default factorization) and monarch
// b=4 layers, 16384 tokens; target fused >= 1.3x GEMM + transpose + GEMM.
#include "dev/cuda/common.h"
#include "llmc/blockdiag.cuh"
#include "dev/cuda/cpu_ref.h"

// out[n][t(L)] = in[n][L] for rows of w elements: a per-token transpose (a, b, r) -> (b, a, r)
__global__ void token_transpose_kernel(bf16 *out, const bf16 *in, int N, int w, TokenPermute t) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * w) return;
    size_t n = idx / w;
    int L = idx % w;
    out[n * w + bd_perm(t, L)] = in[idx];
}

static const float ONE = 1.0f, ZERO = 0.0f;
// y_i (N, q) = x_i W_i^T, contiguous rows (see dev/cuda/blockdiag_matmul.cu)
static void cublas_stage(bf16 *y, const bf16 *x, const bf16 *W, int N, const CoreShape *c) {
    cublasCheck(cublasGemmStridedBatchedEx(cublas_handle, CUBLAS_OP_T, CUBLAS_OP_N, c->q, N, c->p, &ONE, W, CUDA_R_16BF,
                                           c->p, (long long)c->q * c->p, x, CUDA_R_16BF, c->nb * c->p, c->p, &ZERO, y,
                                           CUDA_R_16BF, c->nb * c->q, c->q, c->nb, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
// GEMM + transpose + GEMM (+ transpose); z, v: scratch (N, mid), (N, d_out); z' written to saved
static void cublas_path(const Structure *s, bf16 *y, const bf16 *x, const bf16 *W0, const bf16 *W1, bf16 *z, bf16 *zp,
                        bf16 *v, int N) {
    size_t nm = (size_t)N * s->mid_width, no = (size_t)N * s->d_out;
    cublas_stage(z, x, W0, N, &s->core[0]);
    token_transpose_kernel<<<ceil_div(nm, 256), 256, 0, main_stream>>>(zp, z, N, s->mid_width, bd_perm_norm(s->mid));
    cudaCheck(cudaGetLastError());
    if (bd_perm_norm(s->out).a) {
        cublas_stage(v, zp, W1, N, &s->core[1]);
        token_transpose_kernel<<<ceil_div(no, 256), 256, 0, main_stream>>>(y, v, N, s->d_out, bd_perm_norm(s->out));
        cudaCheck(cudaGetLastError());
    } else {
        cublas_stage(y, zp, W1, N, &s->core[1]);
    }
}

enum { P_FUSED, P_FUSED_NOSAVE, P_UNFUSED, P_CUBLAS, NP };
static const char *pname[NP] = {"fused", "fused (no z')", "unfused", "GEMM+transpose+GEMM"};

static void run_path(int path, const Structure *s, bf16 *y, const bf16 *x, const bf16 *W0, const bf16 *W1, bf16 *saved,
                     bf16 *z, bf16 *v, int N) {
    if (path == P_CUBLAS) { cublas_path(s, y, x, W0, W1, z, saved, v, N); return; }
    bd_kernel_choice = path == P_UNFUSED ? BD_KERNEL_UNFUSED : BD_KERNEL_TC;
    structured_forward_gpu(s, y, x, W0, W1, NULL, NULL, path == P_FUSED_NOSAVE ? NULL : saved, N, main_stream);
    bd_kernel_choice = BD_KERNEL_TC;
}

static void check_structure(const Structure *s, int N, uint64_t seed) {
    char desc[200], what[300];
    structure_describe(s, desc, sizeof desc);
    size_t n0 = (size_t)s->core[0].nb * s->core[0].p * s->core[0].q, n1 = (size_t)s->core[1].nb * s->core[1].p * s->core[1].q;
    float *x, *W0, *W1;
    bf16 *dx = dev_random_bf16((size_t)N * s->d_in, 1.0f, seed, &x), *dW0 = dev_random_bf16(n0, 0.3f, seed + 1, &W0);
    bf16 *dW1 = dev_random_bf16(n1, 0.3f, seed + 2, &W1);
    float *ry = (float *)malloc((size_t)N * s->d_out * 4), *rs = (float *)malloc(ref_structured_saved_floats(s, N) * 4);
    float *rsc = (float *)malloc((ref_structured_scratch_floats(s, N) + 1) * 4);
    ref_structured_forward(s, ry, x, W0, W1, rs, rsc, N);
    bf16 *y, *saved, *z, *v;
    cudaCheck(cudaMalloc(&y, (size_t)N * s->d_out * 2));
    cudaCheck(cudaMalloc(&saved, (size_t)N * s->mid_width * 2));
    cudaCheck(cudaMalloc(&z, (size_t)N * s->mid_width * 2));
    cudaCheck(cudaMalloc(&v, (size_t)N * s->d_out * 2));
    for (int path = 0; path < NP; path++) {
        if ((path == P_FUSED || path == P_FUSED_NOSAVE) && !structured_gpu_fused(s)) continue;
        cudaCheck(cudaMemset(y, 0, (size_t)N * s->d_out * 2));
        cudaCheck(cudaMemset(saved, 0, (size_t)N * s->mid_width * 2));
        run_path(path, s, y, dx, dW0, dW1, saved, z, v, N);
        float *hy = dev_to_host_bf16(y, (size_t)N * s->d_out), *hs = dev_to_host_bf16(saved, (size_t)N * s->mid_width);
        snprintf(what, sizeof what, "%s %s: y vs blockdiag.h (N=%d)", pname[path], desc, N);
        dev_check(what, ref_rel_err(hy, ry, (size_t)N * s->d_out), 1e-2);
        if (path != P_FUSED_NOSAVE) {
            snprintf(what, sizeof what, "%s %s: z' vs blockdiag.h", pname[path], desc);
            dev_check(what, ref_rel_err(hs, rs, (size_t)N * s->mid_width), 1e-2);
        }
        free(hy); free(hs);
    }
    cudaFree(dx); cudaFree(dW0); cudaFree(dW1); cudaFree(y); cudaFree(saved); cudaFree(z); cudaFree(v);
    free(x); free(W0); free(W1); free(ry); free(rs); free(rsc);
}

static void bench_structure(const Structure *s, int N) {
    char desc[200];
    structure_describe(s, desc, sizeof desc);
    size_t n0 = (size_t)s->core[0].nb * s->core[0].p * s->core[0].q, n1 = (size_t)s->core[1].nb * s->core[1].p * s->core[1].q;
    bf16 *x, *y, *W0, *W1, *saved, *z, *v;
    cudaCheck(cudaMalloc(&x, (size_t)N * s->d_in * 2));
    cudaCheck(cudaMalloc(&y, (size_t)N * s->d_out * 2));
    cudaCheck(cudaMalloc(&W0, n0 * 2));
    cudaCheck(cudaMalloc(&W1, n1 * 2));
    cudaCheck(cudaMalloc(&saved, (size_t)N * s->mid_width * 2));
    cudaCheck(cudaMalloc(&z, (size_t)N * s->mid_width * 2));
    cudaCheck(cudaMalloc(&v, (size_t)N * s->d_out * 2));
    cudaCheck(cudaMemset(x, 0, (size_t)N * s->d_in * 2));
    cudaCheck(cudaMemset(W0, 0, n0 * 2));
    cudaCheck(cudaMemset(W1, 0, n1 * 2));
    float ms[NP];
    for (int path = 0; path < NP; path++) {
        if ((path == P_FUSED || path == P_FUSED_NOSAVE) && !structured_gpu_fused(s)) { ms[path] = NAN; continue; }
        ms[path] = dev_time_ms([&] { run_path(path, s, y, x, W0, W1, saved, z, v, N); }, 20);
    }
    double flops = 2.0 * N * (n0 + n1), bytes = 2.0 * N * (s->d_in + s->d_out + s->mid_width) + 2.0 * (n0 + n1);
    printf("bench: %-58s N=%d (%.1f GFLOP, %.0f MB with z' written once) |", desc, N, flops / 1e9, bytes / 1e6);
    for (int path = 0; path < NP; path++)
        printf(" %s %.4f ms %.0f TFLOP/s |", pname[path], ms[path], flops / ms[path] / 1e9);
    printf(" fused/cuBLAS %.2fx (target >= 1.3x), fused/unfused %.2fx\n", ms[P_CUBLAS] / ms[P_FUSED], ms[P_UNFUSED] / ms[P_FUSED]);
    cudaFree(x); cudaFree(y); cudaFree(W0); cudaFree(W1); cudaFree(saved); cudaFree(z); cudaFree(v);
}

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    Structure checks[] = {
        dev_structure(64, LIN_ATTN_PROJ, "btt", 0, 1, 0, 0, 0, 0),
        dev_structure(64, LIN_MLP_FC, "btt", 0, 2, 4, 8, 0, 0),
        dev_structure(96, LIN_MLP_PROJ, "btt", 0, 3, 0, 0, 0, 0),
        dev_structure(64, LIN_ATTN_QKV, "monarch", 4, 0, 0, 0, 0, 0),
        dev_structure(768, LIN_MLP_FC, "monarch", 4, 0, 0, 0, 0, 0),
        dev_structure(768, LIN_MLP_PROJ, "btt", 0, 1, 0, 0, 0, 0),
        dev_structure(64, LIN_MLP_PROJ, "lowrank", 0, 12, 0, 0, 0, 0),
    };
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) check_structure(&checks[i], 1000 + 7 * (int)i, 100 + i);

    int N = 16384;
    for (int k = 0; k < NUM_LINEAR; k++) {
        Structure a = dev_structure(768, k, "btt", 0, 1, 0, 0, 0, 0), b = dev_structure(768, k, "btt", 0, 2, 0, 0, 0, 0);
        Structure c = dev_structure(768, k, "monarch", 4, 0, 0, 0, 0, 0);
        bench_structure(&a, N);
        bench_structure(&b, N);
        bench_structure(&c, N);
    }
    return dev_failures ? 1 : 0;
}
