// Token + position embeddings: out (B,T,C) = wte[inp] + wpe[t], and the backward into dwte, dwpe.
// The backward is deterministic without atomics: the host groups the positions of the batch by
// token (encoder_buckets, a counting sort it does while preparing the batch), and one thread per
// (token, channel) sums that token's positions in a fixed order.
#ifndef LLMC_ENCODER_CUH
#define LLMC_ENCODER_CUH
#include "llmc/cuda_common.cuh"

__global__ void encoder_forward_kernel(bf16 *out, const int *inp, const bf16 *wte, const bf16 *wpe, int N, int T, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    int n = idx / C, c = idx % C, t = n % T;
    out[idx] = __float2bfloat16(__bfloat162float(wte[(size_t)inp[n] * C + c]) + __bfloat162float(wpe[(size_t)t * C + c]));
}
static void encoder_forward(bf16 *out, const int *inp, const bf16 *wte, const bf16 *wpe, int B, int T, int C,
                            cudaStream_t stream) {
    encoder_forward_kernel<<<ceil_div((long)B * T * C, 256), 256, 0, stream>>>(out, inp, wte, wpe, B * T, T, C);
    cudaCheck(cudaGetLastError());
}

// The tokens of a batch grouped for encoder_backward, written by the host into one int array:
//   [0]            U, the number of distinct tokens
//   [1 .. U]       the distinct tokens, ascending
//   [U+1 .. 2U+1]  offsets: token j's positions are pos[off[j] .. off[j+1])
//   [2U+2 ..]      pos: the positions n = b*T + t (N of them), ascending within each token
// counts: scratch of vocab ints. Returns the number of ints written (at most 3N + 2).
static int encoder_buckets(int *out, int *counts, const int *inp, int N, int vocab) {
    memset(counts, 0, sizeof(int) * (size_t)vocab);
    for (int n = 0; n < N; n++) counts[inp[n]]++;
    int U = 0;
    for (int v = 0; v < vocab; v++) if (counts[v]) U++;
    int *tok = out + 1, *off = out + 1 + U, *pos = out + 2 + 2 * U;
    out[0] = U;
    int j = 0, o = 0;
    for (int v = 0; v < vocab; v++) {
        if (!counts[v]) continue;
        tok[j] = v;
        off[j++] = o;
        int c = counts[v];
        counts[v] = o;        // from here on: the next free slot of token v
        o += c;
    }
    off[U] = o;
    for (int n = 0; n < N; n++) pos[counts[inp[n]]++] = n;
    return 2 + 2 * U + N;
}

// grid (U, ceil(C/256)): dwte[tok, c] += sum over tok's positions of dout[pos, c]
__global__ void encoder_backward_wte_kernel(bf16 *dwte, const bf16 *dout, const int *buckets, int C) {
    int U = buckets[0], j = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= U || c >= C) return;
    const int *off = buckets + 1 + U, *pos = buckets + 2 + 2 * U;
    float s = 0.0f;
    for (int i = off[j]; i < off[j + 1]; i++) s += __bfloat162float(dout[(size_t)pos[i] * C + c]);
    bf16 *d = dwte + (size_t)buckets[1 + j] * C + c;
    *d = __float2bfloat16(__bfloat162float(*d) + s);
}
// dwpe[t, c] += sum over b of dout[b, t, c]
__global__ void encoder_backward_wpe_kernel(bf16 *dwpe, const bf16 *dout, int B, int T, int C) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * C) return;
    float s = 0.0f;
    for (int b = 0; b < B; b++) s += __bfloat162float(dout[(size_t)b * T * C + idx]);
    dwpe[idx] = __float2bfloat16(__bfloat162float(dwpe[idx]) + s);
}
// d_buckets: encoder_buckets' array on the device; U its count (the host knows it).
static void encoder_backward(bf16 *dwte, bf16 *dwpe, const bf16 *dout, const int *d_buckets, int U, int B, int T,
                             int C, cudaStream_t stream) {
    encoder_backward_wte_kernel<<<dim3(U, ceil_div(C, 256)), 256, 0, stream>>>(dwte, dout, d_buckets, C);
    cudaCheck(cudaGetLastError());
    encoder_backward_wpe_kernel<<<ceil_div((long)T * C, 256), 256, 0, stream>>>(dwpe, dout, B, T, C);
    cudaCheck(cudaGetLastError());
}

#endif
