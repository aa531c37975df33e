// attention.cuh (cuBLAS batched GEMMs + our permutes and causal softmax) against the CPU trainer's
// attention in fp32, then timed at GPT-2 124M's size. Tolerances 2e-2 of scale: q, k, v are the same
// bf16 values on both sides, but the GPU rounds the softmax probabilities and the permuted
// intermediates to bf16 (2^-9 each) before the second product, and backward chains four products.
#include "dev/cuda/common.h"
#include "llmc/attention.cuh"

// the CPU trainer's attention_forward / attention_backward, single-threaded
static void attn_ref(float *out, float *dqkv, const float *qkv, const float *dout, int B, int T, int C, int NH) {
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

static void alloc_scratch(AttentionScratch *s, int B, int T, int C, int NH) {
    size_t n = (size_t)B * T * C * 2, att = (size_t)B * NH * T * T;
    bf16 **bufs[] = {&s->q, &s->k, &s->v, &s->y, &s->dq, &s->dk, &s->dv, &s->dy};
    for (int i = 0; i < 8; i++) cudaCheck(cudaMalloc(bufs[i], n));
    cudaCheck(cudaMalloc(&s->scores, att * 4));
    cudaCheck(cudaMalloc(&s->dpreatt, att * 2));
}

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    int B = 2, T = 64, C = 128, NH = 4;
    size_t n3 = (size_t)B * T * 3 * C, n = (size_t)B * T * C;
    float *qkv, *dout;
    bf16 *dqkv_in = dev_random_bf16(n3, 1.0f, 1, &qkv), *ddout = dev_random_bf16(n, 1.0f, 2, &dout);
    bf16 *out, *att, *dqkv;
    cudaCheck(cudaMalloc(&out, n * 2));
    cudaCheck(cudaMalloc(&att, (size_t)B * NH * T * T * 2));
    cudaCheck(cudaMalloc(&dqkv, n3 * 2));
    AttentionScratch s;
    alloc_scratch(&s, B, T, C, NH);
    attention_forward(out, att, dqkv_in, &s, B, T, C, NH, 1.0f / sqrtf((float)(C / NH)), main_stream);
    attention_backward(dqkv, ddout, dqkv_in, att, &s, B, T, C, NH, 1.0f / sqrtf((float)(C / NH)), main_stream);
    float *rout = (float *)malloc(n * 4), *rdqkv = (float *)malloc(n3 * 4);
    attn_ref(rout, rdqkv, qkv, dout, B, T, C, NH);
    float *h = dev_to_host_bf16(out, n);
    dev_check("attention forward", dev_rel_err(h, rout, n), 2e-2);
    free(h);
    h = dev_to_host_bf16(dqkv, n3);
    dev_check("attention backward (dq, dk, dv)", dev_rel_err(h, rdqkv, n3), 2e-2);
    free(h);

    // timing: GPT-2 124M, B=16, T=1024, C=768, NH=12
    int BB = 16, BT = 1024, BC = 768, BNH = 12;
    bf16 *Q, *O, *A, *D, *DQ;
    size_t bn = (size_t)BB * BT * BC;
    cudaCheck(cudaMalloc(&Q, 3 * bn * 2)); cudaCheck(cudaMemset(Q, 0, 3 * bn * 2));
    cudaCheck(cudaMalloc(&O, bn * 2));
    cudaCheck(cudaMalloc(&D, bn * 2)); cudaCheck(cudaMemset(D, 0, bn * 2));
    cudaCheck(cudaMalloc(&DQ, 3 * bn * 2));
    cudaCheck(cudaMalloc(&A, (size_t)BB * BNH * BT * BT * 2));
    AttentionScratch S;
    alloc_scratch(&S, BB, BT, BC, BNH);
    // causal attention FLOPs as the trainer counts them: 2 matmuls of T/2 * C MACs per token
    double flops = 2.0 * 2.0 * BB * BT * (BT / 2.0) * BC;
    float ms = dev_time_ms([&] { attention_forward(O, A, Q, &S, BB, BT, BC, BNH, 1.0f / sqrtf((float)(BC / BNH)), main_stream); }, 10);
    printf("bench: attention forward B=%d T=%d C=%d NH=%d: %.3f ms, %.1f useful TFLOP/s\n", BB, BT, BC, BNH, ms, flops / ms / 1e9);
    ms = dev_time_ms([&] { attention_backward(DQ, D, Q, A, &S, BB, BT, BC, BNH, 1.0f / sqrtf((float)(BC / BNH)), main_stream); }, 10);
    printf("bench: attention backward: %.3f ms, %.1f useful TFLOP/s\n", ms, 2 * flops / ms / 1e9);
    return dev_failures ? 1 : 0;
}
