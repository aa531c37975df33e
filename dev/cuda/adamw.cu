// adamw.cuh against the CPU trainer's AdamW and gradient norm, then timed on 124M parameters.
// Tolerances: master weights and moments 1e-6 of scale (the same fp32 formula; only fused
// multiply-adds may round differently), bf16 parameters exactly bf16(master); the norm 1e-4
// (fp32 sums of squares in another order, vs a double reference).
#include "dev/cuda/common.h"
#include "llmc/adamw.cuh"

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    size_t n = 100003;
    float *p, *m0, *v0, *g;
    float *dp = dev_random_f32(n, 0.1f, 1, &p), *dm = dev_random_f32(n, 0.01f, 2, &m0);
    float *dv = dev_random_f32(n, 1e-4f, 3, &v0);
    for (size_t i = 0; i < n; i++) v0[i] = fabsf(v0[i]);
    cudaCheck(cudaMemcpy(dv, v0, n * 4, cudaMemcpyHostToDevice));
    bf16 *dg = dev_random_bf16(n, 0.05f, 4, &g), *dparam;
    cudaCheck(cudaMalloc(&dparam, n * 2));
    float lr = 6e-4f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, scale = 0.7f;
    int t = 3;
    float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
    adamw_update(dparam, dp, dg, dm, dv, n, lr, b1, b2, bc1, bc2, eps, wd, scale, main_stream);
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] * scale;
        m0[i] = b1 * m0[i] + (1.0f - b1) * gi;
        v0[i] = b2 * v0[i] + (1.0f - b2) * gi * gi;
        float mhat = m0[i] / bc1, vhat = v0[i] / bc2;
        p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
    }
    float *h = dev_to_host_f32(dp, n);
    dev_check("AdamW master weights", ref_rel_err(h, p, n), 1e-6);
    float *hb = dev_to_host_bf16(dparam, n);
    int exact = 1;
    for (size_t i = 0; i < n; i++) exact &= bf16_to_float_host(__float2bfloat16(h[i])) == hb[i];
    dev_check("bf16 parameters are the master weights rounded to nearest", exact ? 0.0 : 1.0, 0.5);
    free(h);
    free(hb);
    h = dev_to_host_f32(dm, n);
    dev_check("AdamW m", ref_rel_err(h, m0, n), 1e-6);
    free(h);
    h = dev_to_host_f32(dv, n);
    dev_check("AdamW v", ref_rel_err(h, v0, n), 1e-6);
    free(h);

    float *scratch, *out;
    cudaCheck(cudaMalloc(&scratch, (NORM_BLOCKS + 1) * 4));
    out = scratch + NORM_BLOCKS;
    grad_sumsq(out, dg, n, scratch, main_stream);
    float got, got2;
    cudaCheck(cudaMemcpy(&got, out, 4, cudaMemcpyDeviceToHost));
    grad_sumsq(out, dg, n, scratch, main_stream);
    cudaCheck(cudaMemcpy(&got2, out, 4, cudaMemcpyDeviceToHost));
    double want = 0.0;
    for (size_t i = 0; i < n; i++) want += (double)g[i] * g[i];
    float wantf = (float)want;
    dev_check("gradient sum of squares", ref_rel_err(&got, &wantf, 1), 1e-4);
    dev_check("gradient sum of squares is deterministic", got == got2 ? 0.0 : 1.0, 0.5);

    // timing: GPT-2 124M
    size_t N = 124475904;
    float *P, *M, *V;
    bf16 *G, *PB;
    cudaCheck(cudaMalloc(&P, N * 4)); cudaCheck(cudaMalloc(&M, N * 4)); cudaCheck(cudaMalloc(&V, N * 4));
    cudaCheck(cudaMalloc(&G, N * 2)); cudaCheck(cudaMalloc(&PB, N * 2));
    cudaCheck(cudaMemset(P, 0, N * 4)); cudaCheck(cudaMemset(M, 0, N * 4)); cudaCheck(cudaMemset(V, 0, N * 4));
    cudaCheck(cudaMemset(G, 0, N * 2));
    float ms = dev_time_ms([&] { adamw_update(PB, P, G, M, V, N, lr, b1, b2, bc1, bc2, eps, wd, 1.0f, main_stream); }, 20);
    printf("bench: AdamW on %zu parameters: %.3f ms, %.0f GB/s\n", N, ms, N * 16.0 / ms / 1e6);
    ms = dev_time_ms([&] { grad_sumsq(out, G, N, scratch, main_stream); }, 20);
    printf("bench: gradient norm on %zu parameters: %.3f ms, %.0f GB/s\n", N, ms, N * 2.0 / ms / 1e6);
    return dev_failures ? 1 : 0;
}
