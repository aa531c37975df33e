// LayerNorm over the last dimension (eps 1e-5), fused with the residual addition that precedes it
// in every GPT-2 block, and its backward. Statistics and arithmetic in fp32, tensors in bf16.
// One warp per row (token); the parameter gradients are deterministic column sums (no atomics).
#ifndef LLMC_LAYERNORM_CUH
#define LLMC_LAYERNORM_CUH
#include "llmc/cuda_common.cuh"

// With b: residual (N,C) = a + b (rounded to bf16), out = LN(residual). Without b (b and residual
// NULL): out = LN(a). The statistics are those of the rounded values that backward will read.
// mean, rstd (N) fp32 for backward.
__global__ void residual_layernorm_forward_kernel(bf16 *residual, bf16 *out, float *mean, float *rstd,
                                                  const bf16 *a, const bf16 *b, const bf16 *w,
                                                  const bf16 *bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const bf16 *ar = a + (size_t)row * C, *br = b ? b + (size_t)row * C : NULL;
    float sum = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float x = __bfloat162float(ar[i]);
        if (br) {
            bf16 r = __float2bfloat16(x + __bfloat162float(br[i]));
            residual[(size_t)row * C + i] = r;
            x = __bfloat162float(r);
        }
        sum += x;
    }
    const bf16 *xr = br ? residual + (size_t)row * C : ar;   // this lane's own writes: visible to it
    float m = warp_sum(sum) / C, var = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float d = __bfloat162float(xr[i]) - m;
        var += d * d;
    }
    var = warp_sum(var) / C;
    float s = 1.0f / sqrtf(var + 1e-5f);
    bf16 *o = out + (size_t)row * C;
    for (int i = lane; i < C; i += 32)
        o[i] = __float2bfloat16((__bfloat162float(xr[i]) - m) * s * __bfloat162float(w[i]) + __bfloat162float(bias[i]));
    if (lane == 0) { mean[row] = m; rstd[row] = s; }
}

static void residual_layernorm_forward(bf16 *residual, bf16 *out, float *mean, float *rstd, const bf16 *a,
                                       const bf16 *b, const bf16 *w, const bf16 *bias, int N, int C,
                                       cudaStream_t stream) {
    residual_layernorm_forward_kernel<<<ceil_div(N, 8), 256, 0, stream>>>(residual, out, mean, rstd, a, b, w, bias, N, C);
    cudaCheck(cudaGetLastError());
}
static void layernorm_forward(bf16 *out, float *mean, float *rstd, const bf16 *inp, const bf16 *w,
                              const bf16 *bias, int N, int C, cudaStream_t stream) {
    residual_layernorm_forward(NULL, out, mean, rstd, inp, NULL, w, bias, N, C, stream);
}

// dinp (N,C) += LN'(dout): one warp per row, the CPU trainer's formula.
__global__ void layernorm_backward_input_kernel(bf16 *dinp, const bf16 *dout, const bf16 *inp, const bf16 *w,
                                                const float *mean, const float *rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const bf16 *x = inp + (size_t)row * C, *d = dout + (size_t)row * C;
    float m = mean[row], s = rstd[row], dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float norm = (__bfloat162float(x[i]) - m) * s, dnorm = __bfloat162float(w[i]) * __bfloat162float(d[i]);
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean = warp_sum(dnorm_mean) / C;
    dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
    bf16 *dx = dinp + (size_t)row * C;
    for (int i = lane; i < C; i += 32) {
        float norm = (__bfloat162float(x[i]) - m) * s, dnorm = __bfloat162float(w[i]) * __bfloat162float(d[i]);
        float g = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        dx[i] = __float2bfloat16(__bfloat162float(dx[i]) + g);
    }
}

// Partial sums of dw = sum_n dout * norm and db = sum_n dout over each chunk of COLSUM_CHUNK rows:
// partial (S, 2C), dw in [0, C), db in [C, 2C). Same scheme as bias_backward in matmul.cuh.
__global__ void layernorm_backward_params_kernel(float *partial, const bf16 *dout, const bf16 *inp,
                                                 const float *mean, const float *rstd, int N, int C) {
    __shared__ float acc_w[8][33], acc_b[8][33];
    int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    int r0 = chunk * COLSUM_CHUNK, r1 = min(r0 + COLSUM_CHUNK, N);
    float sw = 0.0f, sb = 0.0f;
    if (c < C) {
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            float d = __bfloat162float(dout[(size_t)r * C + c]);
            float norm = (__bfloat162float(inp[(size_t)r * C + c]) - mean[r]) * rstd[r];
            sw += d * norm;
            sb += d;
        }
    }
    acc_w[threadIdx.y][threadIdx.x] = sw;
    acc_b[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float tw = 0.0f, tb = 0.0f;
        for (int y = 0; y < 8; y++) { tw += acc_w[y][threadIdx.x]; tb += acc_b[y][threadIdx.x]; }
        partial[(size_t)chunk * 2 * C + c] = tw;
        partial[(size_t)chunk * 2 * C + C + c] = tb;
    }
}

// dinp (N,C) += LN'(dout); dw, db (C) += parameter gradients. inp is the LayerNorm's input,
// mean/rstd from its forward. scratch: colsum_chunks(N) * 2C floats.
static void layernorm_backward(bf16 *dinp, bf16 *dw, bf16 *db, float *scratch, const bf16 *dout, const bf16 *inp,
                               const bf16 *w, const float *mean, const float *rstd, int N, int C,
                               cudaStream_t stream) {
    layernorm_backward_input_kernel<<<ceil_div(N, 8), 256, 0, stream>>>(dinp, dout, inp, w, mean, rstd, N, C);
    cudaCheck(cudaGetLastError());
    int S = colsum_chunks(N);
    layernorm_backward_params_kernel<<<dim3(ceil_div(C, 32), S), dim3(32, 8), 0, stream>>>(scratch, dout, inp, mean, rstd, N, C);
    cudaCheck(cudaGetLastError());
    colsum_finalize(dw, scratch, S, C, 2 * C, stream);
    colsum_finalize(db, scratch + C, S, C, 2 * C, stream);
}

#endif
