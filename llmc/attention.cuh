// Causal multi-head self-attention: cuBLAS strided-batched GEMMs for q k^T and att v, with our
// kernels for the head permutes and the causal softmax (llm.c's non-cuDNN path). The softmax rows
// att (B, NH, T, T) are kept per layer for backward (bf16; entries above the diagonal are zero).
// cuDNN's fused flash attention needs its C++ frontend, which is not installed here; a flash-style
// kernel of our own (no T x T matrices) is the planned replacement, see dev/cuda/NOTES.md.
//
// Shapes: qkv (B, T, 3C) holds q, k, v each (NH, hs) per token; out (B, T, C). q, k, v permuted to
// (B, NH, T, hs). Scores are computed in fp32 (preatt), scaled by 1/sqrt(hs) inside the softmax
// exactly where the CPU trainer scales them.
#ifndef LLMC_ATTENTION_CUH
#define LLMC_ATTENTION_CUH
#include "llmc/cuda_common.cuh"

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
} AttentionScratch;

// out (B, T, C); att (B, NH, T, T) softmax rows kept for backward. scale: the softmax's logit scale,
// 1/sqrt(hs), or 8/hs under attn_scale "mup" (DESIGN section 2).
static void attention_forward(bf16 *out, bf16 *att, const bf16 *qkv, AttentionScratch *s, int B, int T, int C,
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
static void attention_backward(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const bf16 *att, AttentionScratch *s,
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

#endif
