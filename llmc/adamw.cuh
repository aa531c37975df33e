// The optimizer side: global gradient norm (deterministic two-stage reduction), AdamW on fp32
// master weights with the bf16 copy rounded to nearest from them.
// Rounding to nearest (not stochastic rounding) makes the bf16 parameters a pure function of the
// fp32 master weights in the checkpoint, so a resumed run continues bit-for-bit.
#ifndef LLMC_ADAMW_CUH
#define LLMC_ADAMW_CUH
#include "llmc/cuda_common.cuh"

#define NORM_BLOCKS 512
#define NORM_THREADS 512

// partial[blockIdx.x] = sum of g^2 over a fixed grid-stride share of g (n values)
__global__ void sumsq_partial_kernel(float *partial, const bf16 *g, size_t n) {
    __shared__ float shared[32];
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = __bfloat162float(g[i]);
        s += x * x;
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
__global__ void sumsq_final_kernel(float *out, const float *partial, int nparts) {
    __shared__ float shared[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += partial[i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) *out = s;
}
// *out (device) = sum of squares of g (n values). scratch: NORM_BLOCKS floats.
static void grad_sumsq(float *out, const bf16 *g, size_t n, float *scratch, cudaStream_t stream) {
    sumsq_partial_kernel<<<NORM_BLOCKS, NORM_THREADS, 0, stream>>>(scratch, g, n);
    cudaCheck(cudaGetLastError());
    sumsq_final_kernel<<<1, NORM_THREADS, 0, stream>>>(out, scratch, NORM_BLOCKS);
    cudaCheck(cudaGetLastError());
}

// One AdamW step on n parameters (the CPU trainer's formula, in fp32):
//   g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2
//   master -= lr (m/bc1 / (sqrt(v/bc2) + eps) + wd master);  param = bf16(master)
__global__ void adamw_kernel(bf16 *param, float *master, const bf16 *grad, float *m, float *v, size_t n, float lr,
                             float b1, float b2, float bc1, float bc2, float eps, float wd, float grad_scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = __bfloat162float(grad[i]) * grad_scale;
    float mi = b1 * m[i] + (1.0f - b1) * g;
    float vi = b2 * v[i] + (1.0f - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float mhat = mi / bc1, vhat = vi / bc2, p = master[i];
    p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
    master[i] = p;
    param[i] = __float2bfloat16(p);
}
static void adamw_update(bf16 *param, float *master, const bf16 *grad, float *m, float *v, size_t n, float lr,
                         float b1, float b2, float bc1, float bc2, float eps, float wd, float grad_scale,
                         cudaStream_t stream) {
    if (n == 0) return;
    adamw_kernel<<<ceil_div((long)n, 256), 256, 0, stream>>>(param, master, grad, m, v, n, lr, b1, b2, bc1, bc2, eps,
                                                             wd, grad_scale);
    cudaCheck(cudaGetLastError());
}

#endif
