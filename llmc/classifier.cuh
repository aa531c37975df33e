// The classifier's softmax + cross-entropy, fused, over the logits of the tied LM head:
// per row, loss = logsumexp(z) - z[target] over the first V of Vp columns, and (for training) the
// logits are overwritten in place by dlogits = (softmax(z) - onehot(target)) * dloss, padded
// columns 0. One block per row, block-wide reductions in a fixed order.
#ifndef LLMC_CLASSIFIER_CUH
#define LLMC_CLASSIFIER_CUH
#include "llmc/cuda_common.cuh"

#define CLASSIFIER_THREADS 512

__global__ void fused_classifier_kernel(bf16 *logits, float *losses, const int *targets, int V, int Vp,
                                        float dloss, int write_dlogits) {
    __shared__ float shared[32];
    int row = blockIdx.x;
    bf16 *z = logits + (size_t)row * Vp;
    float maxv = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) maxv = fmaxf(maxv, __bfloat162float(z[i]));
    maxv = block_max(maxv, shared);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(__bfloat162float(z[i]) - maxv);
    sum = block_sum(sum, shared);
    int target = targets[row];
    // the CPU computes -log(p[target]) with p = exp(z - max) / sum; this is the same in logs
    if (threadIdx.x == 0) losses[row] = logf(sum) - (__bfloat162float(z[target]) - maxv);
    if (!write_dlogits) return;
    __syncthreads();   // z[target] is read above before any thread overwrites it
    float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float g = 0.0f;
        if (i < V) g = (expf(__bfloat162float(z[i]) - maxv) * inv - (i == target ? 1.0f : 0.0f)) * dloss;
        z[i] = __float2bfloat16(g);
    }
}

// logits (N, Vp) bf16, targets (N), losses (N) fp32 out.
static void fused_classifier(bf16 *logits, float *losses, const int *targets, int N, int V, int Vp, float dloss,
                             int write_dlogits, cudaStream_t stream) {
    fused_classifier_kernel<<<N, CLASSIFIER_THREADS, 0, stream>>>(logits, losses, targets, V, Vp, dloss, write_dlogits);
    cudaCheck(cudaGetLastError());
}

#endif
