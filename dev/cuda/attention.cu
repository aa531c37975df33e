// Causal multi-head attention, qkv (B, T, 3C) -> out (B, T, C) and back to dqkv, in two versions:
//   v1 materialized  cuBLAS strided-batched GEMMs for q k^T and att v over permuted (B, NH, T, hs) copies,
//                    our causal softmax kernels in between; the (B, NH, T, T) fp32 scores and bf16
//                    probabilities go through HBM and the probabilities are kept for backward (llm.c's
//                    non-cuDNN path; the trainer's attention until the flash version replaced it; here only)
//   v2 flash         llmc/attention.cuh: flash-attention-2 style forward (online softmax, lse saved) and
//                    backward (D = rowsum(dout * out), a dk/dv kernel over key tiles and a dq kernel over
//                    query tiles, no atomics), mma.sync bf16 tensor cores, nothing (T, T) in HBM (the trainer's)
// Checks: both versions against the CPU trainer's attention in fp32 (train_gpt2.c's loops; lse added) on
// random bf16 inputs, for a T that is a multiple of the 64-row tiles and one that is not, and v2 at head
// sizes 64 and 128; v2's backward run twice gives the same bits. Tolerance 2e-2 of the largest reference
// value (outputs and gradients; lse 1e-4): q, k, v are the same bf16 values on both sides, but the GPU
// rounds the softmax probabilities to bf16 (2^-9 each) before the product with v (v1 also the permuted
// intermediates), and backward chains four products through bf16 operands (P, dS and the stored output
// in D); dev/cuda/emu_check.cpp measures 2e-3 to 5e-3 for v2 against double precision.
// Benchmark (bench: lines): GPT-2 124M's attention (B=16, T=1024, C=768, NH=12), forward and backward,
// ms and useful TFLOP/s of each version (the causal half of the four (T, T) products, as the trainer's
// MFU counts them: 2 * 2 * B * T * (T/2) * C in forward, twice that in backward) and v2's speedup.
#include "dev/cuda/common.h"
#include "llmc/attention.cuh"

// ----------------------------------------------------------------------------------------------
// v1: materialized (T, T) attention

// qkv (B, T, 3, NH, hs) -> q, k, v (B, NH, T, hs)
__global__ void attention_permute_kernel(bf16 *q, bf16 *k, bf16 *v, const bf16 *qkv, int B, int T, int NH, int hs) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)B * NH * T * hs;
    if (idx >= total) return;
    int d = idx % hs, t = (idx / hs) % T, h = (idx / ((size_t)hs * T)) % NH, b = idx / ((size_t)hs * T * NH);
    size_t src = ((size_t)b * T + t) * 3 * NH * hs + (size_t)h * hs + d;
    q[idx] = qkv[src];
    k[idx] = qkv[src + (size_t)NH * hs];
    v[idx] = qkv[src + 2 * (size_t)NH * hs];
}
// the reverse: dq, dk, dv (B, NH, T, hs) -> dqkv (B, T, 3, NH, hs)
__global__ void attention_permute_backward_kernel(bf16 *dqkv, const bf16 *dq, const bf16 *dk, const bf16 *dv,
                                                  int B, int T, int NH, int hs) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)B * NH * T * hs;
    if (idx >= total) return;
    int d = idx % hs, t = (idx / hs) % T, h = (idx / ((size_t)hs * T)) % NH, b = idx / ((size_t)hs * T * NH);
    size_t dst = ((size_t)b * T + t) * 3 * NH * hs + (size_t)h * hs + d;
    dqkv[dst] = dq[idx];
    dqkv[dst + (size_t)NH * hs] = dk[idx];
    dqkv[dst + 2 * (size_t)NH * hs] = dv[idx];
}
// y (B, NH, T, hs) -> out (B, T, NH, hs); with backward, dy (in y's layout) from dout (in out's)
__global__ void attention_unpermute_kernel(bf16 *out, bf16 *y, int B, int T, int NH, int hs, int backward) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)B * NH * T * hs;
    if (idx >= total) return;
    int d = idx % hs, t = (idx / hs) % T, h = (idx / ((size_t)hs * T)) % NH, b = idx / ((size_t)hs * T * NH);
    size_t o = ((size_t)b * T + t) * NH * hs + (size_t)h * hs + d;
    if (backward) y[idx] = out[o];
    else out[o] = y[idx];
}

// att[row, t2] = softmax over t2 <= t of scale * preatt[row, t2], 0 for t2 > t; row = (b, h, t).
// One warp per row; the CPU's order of operations (max, exp and sum, multiply by 1/sum).
__global__ void causal_softmax_forward_kernel(bf16 *att, const float *preatt, int rows, int T, float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % T;
    const float *p = preatt + (size_t)row * T;
    bf16 *a = att + (size_t)row * T;
    float maxv = -INFINITY;
    for (int i = lane; i <= t; i += 32) maxv = fmaxf(maxv, p[i] * scale);
    maxv = warp_max(maxv);
    float sum = 0.0f;
    for (int i = lane; i <= t; i += 32) sum += expf(p[i] * scale - maxv);
    float inv = 1.0f / warp_sum(sum);
    for (int i = lane; i < T; i += 32)
        a[i] = __float2bfloat16(i <= t ? expf(p[i] * scale - maxv) * inv : 0.0f);
}

// dpreatt[row, t2] = scale * att * (datt - sum_t3 att * datt) for t2 <= t, 0 above the diagonal.
__global__ void causal_softmax_backward_kernel(bf16 *dpreatt, const float *datt, const bf16 *att, int rows, int T,
                                               float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int t = row % T;
    const float *d = datt + (size_t)row * T;
    const bf16 *a = att + (size_t)row * T;
    float dot = 0.0f;
    for (int i = lane; i <= t; i += 32) dot += __bfloat162float(a[i]) * d[i];
    dot = warp_sum(dot);
    bf16 *o = dpreatt + (size_t)row * T;
    for (int i = lane; i < T; i += 32)
        o[i] = __float2bfloat16(i <= t ? __bfloat162float(a[i]) * (d[i] - dot) * scale : 0.0f);
}

// Batched row-major products over the B*NH heads, in cuBLAS's column-major terms:
//   scores (T, T) = X (T, hs) Y^T (T, hs): C^T = Y' ^T X'  -> gemm(T, N, m=T, n=T, k=hs), fp32 out
static void attn_gemm_xyt(float *out, const bf16 *x, const bf16 *y, int BNH, int T, int hs) {
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasGemmStridedBatchedEx(cublas_handle, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, &one,
                                           y, CUDA_R_16BF, hs, (long long)T * hs, x, CUDA_R_16BF, hs, (long long)T * hs,
                                           &zero, out, CUDA_R_32F, T, (long long)T * T, BNH,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
//   out (T, hs) = P (T, T) Z (T, hs), or with transp: P^T Z. bf16 out.
static void attn_gemm_pz(bf16 *out, const bf16 *p, const bf16 *z, int BNH, int T, int hs, int transp) {
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasGemmStridedBatchedEx(cublas_handle, CUBLAS_OP_N, transp ? CUBLAS_OP_T : CUBLAS_OP_N, hs, T, T,
                                           &one, z, CUDA_R_16BF, hs, (long long)T * hs, p, CUDA_R_16BF, T,
                                           (long long)T * T, &zero, out, CUDA_R_16BF, hs, (long long)T * hs, BNH,
                                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// Scratch shared by forward and backward (sizes for the largest B, T).
typedef struct {
    bf16 *q, *k, *v, *y;        // (B, NH, T, hs) each
    bf16 *dq, *dk, *dv, *dy;    // (B, NH, T, hs) each
    float *scores;              // (B, NH, T, T): preatt in forward, datt in backward
    bf16 *dpreatt;              // (B, NH, T, T)
} V1Scratch;

// out (B, T, C); att (B, NH, T, T) softmax rows kept for backward. scale: the softmax's logit scale,
// 1/sqrt(hs), or 8/hs under attn_scale "mup" (DESIGN section 2).
static void attention_forward_v1(bf16 *out, bf16 *att, const bf16 *qkv, V1Scratch *s, int B, int T, int C,
                                 int NH, float scale, cudaStream_t stream) {
    int hs = C / NH, rows = B * NH * T;
    size_t n = (size_t)B * T * C;
    attention_permute_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(s->q, s->k, s->v, qkv, B, T, NH, hs);
    cudaCheck(cudaGetLastError());
    attn_gemm_xyt(s->scores, s->q, s->k, B * NH, T, hs);
    causal_softmax_forward_kernel<<<ceil_div(rows, 8), 256, 0, stream>>>(att, s->scores, rows, T, scale);
    cudaCheck(cudaGetLastError());
    attn_gemm_pz(s->y, att, s->v, B * NH, T, hs, 0);
    attention_unpermute_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(out, s->y, B, T, NH, hs, 0);
    cudaCheck(cudaGetLastError());
}

// dqkv (B, T, 3C), overwritten, from dout (B, T, C); qkv and att from the forward.
static void attention_backward_v1(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const bf16 *att, V1Scratch *s,
                                  int B, int T, int C, int NH, float scale, cudaStream_t stream) {
    int hs = C / NH, rows = B * NH * T;
    size_t n = (size_t)B * T * C;
    // q, k, v of this layer (the scratch holds the last forward's layer)
    attention_permute_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(s->q, s->k, s->v, qkv, B, T, NH, hs);
    cudaCheck(cudaGetLastError());
    attention_unpermute_kernel<<<ceil_div(n, 256), 256, 0, stream>>>((bf16 *)dout, s->dy, B, T, NH, hs, 1);  // reads dout
    cudaCheck(cudaGetLastError());
    attn_gemm_xyt(s->scores, s->dy, s->v, B * NH, T, hs);   // datt = dy v^T
    attn_gemm_pz(s->dv, att, s->dy, B * NH, T, hs, 1);      // dv = att^T dy
    causal_softmax_backward_kernel<<<ceil_div(rows, 8), 256, 0, stream>>>(s->dpreatt, s->scores, att, rows, T, scale);
    cudaCheck(cudaGetLastError());
    attn_gemm_pz(s->dq, s->dpreatt, s->k, B * NH, T, hs, 0);  // dq = dpreatt k
    attn_gemm_pz(s->dk, s->dpreatt, s->q, B * NH, T, hs, 1);  // dk = dpreatt^T q
    attention_permute_backward_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(dqkv, s->dq, s->dk, s->dv, B, T, NH, hs);
    cudaCheck(cudaGetLastError());
}

// ----------------------------------------------------------------------------------------------
// Checks and benchmark

// the CPU trainer's attention_forward / attention_backward, single-threaded
// (and lse (B, NH, T), the log-sum-exp of each softmax row, which the flash version saves)
static void attn_ref(float *out, float *lse, float *dqkv, const float *qkv, const float *dout, int B, int T, int C, int NH) {
    int hs = C / NH, C3 = 3 * C;
    float scale = 1.0f / sqrtf((float)hs);
    float *att = (float *)malloc((size_t)T * T * 4), *dpre = (float *)malloc(T * 4);
    memset(dqkv, 0, (size_t)B * T * C3 * 4);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float *a = att + (size_t)t * T, maxv = -INFINITY, sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = qkv + ((size_t)b * T + t2) * C3 + C + h * hs;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) s += q[i] * k[i];
                    a[t2] = s * scale;
                    maxv = fmaxf(maxv, a[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++) { a[t2] = expf(a[t2] - maxv); sum += a[t2]; }
                lse[((size_t)b * NH + h) * T + t] = maxv + logf(sum);
                for (int t2 = 0; t2 <= t; t2++) a[t2] /= sum;
                float *o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) {
                    o[i] = 0.0f;
                    for (int t2 = 0; t2 <= t; t2++) o[i] += a[t2] * qkv[((size_t)b * T + t2) * C3 + 2 * C + h * hs + i];
                }
            }
            for (int t = 0; t < T; t++) {
                const float *a = att + (size_t)t * T, *d = dout + ((size_t)b * T + t) * C + h * hs;
                const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float *dq = dqkv + ((size_t)b * T + t) * C3 + h * hs, dot = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v = qkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs;
                    float *dv = dqkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs, s = 0.0f;
                    for (int i = 0; i < hs; i++) { s += d[i] * v[i]; dv[i] += a[t2] * d[i]; }
                    dpre[t2] = s;
                    dot += a[t2] * s;
                }
                for (int t2 = 0; t2 <= t; t2++) {
                    float g = a[t2] * (dpre[t2] - dot) * scale;
                    const float *k = qkv + ((size_t)b * T + t2) * C3 + C + h * hs;
                    float *dk = dqkv + ((size_t)b * T + t2) * C3 + C + h * hs;
                    for (int i = 0; i < hs; i++) { dq[i] += g * k[i]; dk[i] += g * q[i]; }
                }
            }
        }
    free(att);
    free(dpre);
}

static void alloc_v1(V1Scratch *s, bf16 **att, int B, int T, int C, int NH) {
    size_t n = (size_t)B * T * C * 2, tt = (size_t)B * NH * T * T;
    bf16 **bufs[] = {&s->q, &s->k, &s->v, &s->y, &s->dq, &s->dk, &s->dv, &s->dy};
    for (int i = 0; i < 8; i++) cudaCheck(cudaMalloc(bufs[i], n));
    cudaCheck(cudaMalloc(&s->scores, tt * 4));
    cudaCheck(cudaMalloc(&s->dpreatt, tt * 2));
    cudaCheck(cudaMalloc(att, tt * 2));
}
static void free_v1(V1Scratch *s, bf16 *att) {
    bf16 *bufs[] = {s->q, s->k, s->v, s->y, s->dq, s->dk, s->dv, s->dy};
    for (int i = 0; i < 8; i++) cudaCheck(cudaFree(bufs[i]));
    cudaCheck(cudaFree(s->scores));
    cudaCheck(cudaFree(s->dpreatt));
    cudaCheck(cudaFree(att));
}

// One result h (host copy, freed here) against the reference, named "<label> B=.. T=.. C=.. NH=..".
static void check_result(const char *label, float *h, const float *ref, size_t n, double tol, int B, int T, int C,
                         int NH) {
    char what[160];
    snprintf(what, sizeof what, "%s B=%d T=%d C=%d NH=%d", label, B, T, C, NH);
    dev_check(what, ref_rel_err(h, ref, n), tol);
    free(h);
}

// Both versions (v2 only: v1 = 0) against attn_ref at (B, T, C, NH).
static void check(int B, int T, int C, int NH, int v1) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    size_t n3 = (size_t)B * T * 3 * C, n = (size_t)B * T * C, nl = (size_t)B * NH * T;
    float *qkv, *dout;
    bf16 *d_qkv = dev_random_bf16(n3, 1.0f, 1 + T, &qkv), *d_dout = dev_random_bf16(n, 1.0f, 2 + T, &dout);
    float *rout = (float *)malloc(n * 4), *rlse = (float *)malloc(nl * 4), *rdqkv = (float *)malloc(n3 * 4);
    attn_ref(rout, rlse, rdqkv, qkv, dout, B, T, C, NH);
    bf16 *out, *dqkv, *dqkv2;
    float *lse, *scratch;
    cudaCheck(cudaMalloc(&out, n * 2));
    cudaCheck(cudaMalloc(&dqkv, n3 * 2));
    cudaCheck(cudaMalloc(&dqkv2, n3 * 2));
    cudaCheck(cudaMalloc(&lse, nl * 4));
    cudaCheck(cudaMalloc(&scratch, attention_scratch_floats(B, T, NH) * 4));
    if (v1) {
        V1Scratch s;
        bf16 *att;
        alloc_v1(&s, &att, B, T, C, NH);
        attention_forward_v1(out, att, d_qkv, &s, B, T, C, NH, scale, main_stream);
        attention_backward_v1(dqkv, d_dout, d_qkv, att, &s, B, T, C, NH, scale, main_stream);
        check_result("v1 forward", dev_to_host_bf16(out, n), rout, n, 2e-2, B, T, C, NH);
        check_result("v1 backward (dq, dk, dv)", dev_to_host_bf16(dqkv, n3), rdqkv, n3, 2e-2, B, T, C, NH);
        free_v1(&s, att);
    }
    attention_forward(out, lse, d_qkv, B, T, C, NH, scale, main_stream);
    check_result("v2 forward", dev_to_host_bf16(out, n), rout, n, 2e-2, B, T, C, NH);
    check_result("v2 forward lse", dev_to_host_f32(lse, nl), rlse, nl, 1e-4, B, T, C, NH);
    cudaCheck(cudaMemset(dqkv, 0xFF, n3 * 2));   // NaN: every entry must be written
    attention_backward(dqkv, d_dout, d_qkv, out, lse, scratch, B, T, C, NH, scale, main_stream);
    float *h = dev_to_host_bf16(dqkv, n3);
    attention_backward(dqkv2, d_dout, d_qkv, out, lse, scratch, B, T, C, NH, scale, main_stream);
    float *h2 = dev_to_host_bf16(dqkv2, n3);
    int same = !memcmp(h, h2, n3 * 4);
    printf("%s - v2 backward is deterministic B=%d T=%d C=%d NH=%d\n", same ? "ok" : "FAIL", B, T, C, NH);
    dev_failures += !same;
    check_result("v2 backward (dq, dk, dv)", h, rdqkv, n3, 2e-2, B, T, C, NH);
    free(h2);
    cudaCheck(cudaFree(out)); cudaCheck(cudaFree(dqkv)); cudaCheck(cudaFree(dqkv2));
    cudaCheck(cudaFree(lse)); cudaCheck(cudaFree(scratch)); cudaCheck(cudaFree(d_qkv)); cudaCheck(cudaFree(d_dout));
    free(qkv); free(dout); free(rout); free(rlse); free(rdqkv);
}

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    check(2, 128, 128, 2, 1);    // hs 64, T a multiple of the tiles
    check(2, 100, 256, 4, 1);    // hs 64, T not a multiple
    check(1, 200, 256, 2, 0);    // hs 128 (the dk/dv kernel's 32-query tiles)

    // timing: GPT-2 124M, B=16, T=1024, C=768, NH=12
    int B = 16, T = 1024, C = 768, NH = 12;
    float scale = 1.0f / sqrtf((float)(C / NH));
    size_t n = (size_t)B * T * C;
    float *hq;
    bf16 *qkv = dev_random_bf16(3 * n, 1.0f, 7, &hq), *dout = dev_random_bf16(n, 1.0f, 8, &hq), *out, *dqkv, *att;
    float *lse, *scratch;
    cudaCheck(cudaMalloc(&out, n * 2));
    cudaCheck(cudaMalloc(&dqkv, 3 * n * 2));
    cudaCheck(cudaMalloc(&lse, (size_t)B * NH * T * 4));
    cudaCheck(cudaMalloc(&scratch, attention_scratch_floats(B, T, NH) * 4));
    V1Scratch s;
    alloc_v1(&s, &att, B, T, C, NH);
    double flops = 2.0 * 2.0 * B * T * (T / 2.0) * C;
    float f1 = dev_time_ms([&] { attention_forward_v1(out, att, qkv, &s, B, T, C, NH, scale, main_stream); }, 10);
    float b1 = dev_time_ms([&] { attention_backward_v1(dqkv, dout, qkv, att, &s, B, T, C, NH, scale, main_stream); }, 10);
    float f2 = dev_time_ms([&] { attention_forward(out, lse, qkv, B, T, C, NH, scale, main_stream); }, 10);
    float b2 = dev_time_ms([&] { attention_backward(dqkv, dout, qkv, out, lse, scratch, B, T, C, NH, scale, main_stream); }, 10);
    printf("bench: attention B=%d T=%d C=%d NH=%d, useful TFLOP/s (ms)\n", B, T, C, NH);
    printf("bench: forward   v1 materialized %6.1f (%.3f ms) | v2 flash %6.1f (%.3f ms) | v2/v1 %.2fx\n",
           flops / f1 / 1e9, f1, flops / f2 / 1e9, f2, f1 / f2);
    printf("bench: backward  v1 materialized %6.1f (%.3f ms) | v2 flash %6.1f (%.3f ms) | v2/v1 %.2fx\n",
           2 * flops / b1 / 1e9, b1, 2 * flops / b2 / 1e9, b2, b1 / b2);
    printf("bench: fwd+bwd   v1 materialized %6.1f (%.3f ms) | v2 flash %6.1f (%.3f ms) | v2/v1 %.2fx\n",
           3 * flops / (f1 + b1) / 1e9, f1 + b1, 3 * flops / (f2 + b2) / 1e9, f2 + b2, (f1 + b1) / (f2 + b2));
    return dev_failures ? 1 : 0;
}
