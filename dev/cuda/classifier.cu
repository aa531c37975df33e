// classifier.cuh (fused softmax + cross-entropy, dlogits in place) against the CPU trainer's
// softmax_crossentropy forward/backward, then timed at GPT-2 124M's size. Tolerances: losses 1e-5
// relative (the same fp32 math on identical bf16 logits), dlogits 1e-2 of scale (rounded to bf16).
#include "dev/cuda/common.h"
#include "llmc/classifier.cuh"

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    int N = 64, V = 1000, Vp = 1024;
    float *z;
    bf16 *dz = dev_random_bf16((size_t)N * Vp, 4.0f, 1, &z);
    int *tg = (int *)malloc(N * 4), *dtg;
    uint64_t seed = 3;
    for (int i = 0; i < N; i++) tg[i] = (int)((dev_uniform(&seed) + 1.0f) * 0.5f * V);
    cudaCheck(cudaMalloc(&dtg, N * 4));
    cudaCheck(cudaMemcpy(dtg, tg, N * 4, cudaMemcpyHostToDevice));
    float *losses, dloss = 1.0f / N;
    cudaCheck(cudaMalloc(&losses, N * 4));
    fused_classifier(dz, losses, dtg, N, V, Vp, dloss, 1, main_stream);
    float *rl = (float *)malloc(N * 4), *rd = (float *)malloc((size_t)N * Vp * 4);
    for (int n = 0; n < N; n++) {
        const float *r = z + (size_t)n * Vp;
        float maxv = -INFINITY, sum = 0.0f;
        for (int i = 0; i < V; i++) maxv = fmaxf(maxv, r[i]);
        for (int i = 0; i < V; i++) sum += expf(r[i] - maxv);
        for (int i = 0; i < Vp; i++) rd[(size_t)n * Vp + i] = i < V ? (expf(r[i] - maxv) / sum - (i == tg[n])) * dloss : 0.0f;
        rl[n] = -logf(expf(r[tg[n]] - maxv) / sum);
    }
    float *h = dev_to_host_f32(losses, N);
    double worst = 0.0;
    for (int n = 0; n < N; n++) worst = fmax(worst, fabs(h[n] - rl[n]) / fabs(rl[n]));
    dev_check("losses", worst, 1e-5);
    free(h);
    h = dev_to_host_bf16(dz, (size_t)N * Vp);
    dev_check("dlogits in place (padded columns zero)", ref_rel_err(h, rd, (size_t)N * Vp), 1e-2);
    free(h);

    int BN = 16 * 1024, BV = 50257, BVp = 50304;
    bf16 *Z;
    int *T;
    float *L;
    cudaCheck(cudaMalloc(&Z, (size_t)BN * BVp * 2)); cudaCheck(cudaMemset(Z, 0, (size_t)BN * BVp * 2));
    cudaCheck(cudaMalloc(&T, BN * 4)); cudaCheck(cudaMemset(T, 0, BN * 4));
    cudaCheck(cudaMalloc(&L, BN * 4));
    float ms = dev_time_ms([&] { fused_classifier(Z, L, T, BN, BV, BVp, 1.0f / BN, 1, main_stream); }, 10);
    printf("bench: fused classifier N=%d V=%d: %.3f ms, %.0f GB/s\n", BN, BV, ms, 4.0 * BN * BVp * 2 / ms / 1e6);
    return dev_failures ? 1 : 0;
}
