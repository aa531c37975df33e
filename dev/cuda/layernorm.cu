// layernorm.cuh against a CPU fp32 reference (the CPU trainer's formulas), then timed at GPT-2
// 124M's size. Checked: residual + LayerNorm forward (residual, output, mean, rstd) and backward
// (dinp accumulated, dw, db). Tolerances: outputs 1e-2 of scale (one bf16 rounding, 2^-9, plus the
// residual rounded before normalizing); mean/rstd 1e-4 (fp32 statistics of identical inputs,
// summed in another order); parameter gradients 1e-2 (fp32 sums over N of bf16 products).
#include "dev/cuda/common.h"
#include "llmc/layernorm.cuh"

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    int N = 512, C = 192;
    size_t NC = (size_t)N * C;
    float *a, *b, *w, *bias, *dout, *dinp0;
    bf16 *da = dev_random_bf16(NC, 1.0f, 1, &a), *db_ = dev_random_bf16(NC, 1.0f, 2, &b);
    bf16 *dw = dev_random_bf16(C, 1.0f, 3, &w), *dbias = dev_random_bf16(C, 0.5f, 4, &bias);
    bf16 *ddout = dev_random_bf16(NC, 1.0f, 5, &dout), *ddinp = dev_random_bf16(NC, 0.5f, 6, &dinp0);
    bf16 *res, *out, *gw, *gb;
    float *mean, *rstd, *scratch;
    cudaCheck(cudaMalloc(&res, NC * 2));
    cudaCheck(cudaMalloc(&out, NC * 2));
    cudaCheck(cudaMalloc(&gw, C * 2));
    cudaCheck(cudaMalloc(&gb, C * 2));
    cudaCheck(cudaMemset(gw, 0, C * 2));
    cudaCheck(cudaMemset(gb, 0, C * 2));
    cudaCheck(cudaMalloc(&mean, N * 4));
    cudaCheck(cudaMalloc(&rstd, N * 4));
    cudaCheck(cudaMalloc(&scratch, (size_t)colsum_chunks(N) * 2 * C * 4));
    residual_layernorm_forward(res, out, mean, rstd, da, db_, dw, dbias, N, C, main_stream);

    float *r = (float *)malloc(NC * 4), *o = (float *)malloc(NC * 4), *m = (float *)malloc(N * 4), *s = (float *)malloc(N * 4);
    for (size_t i = 0; i < NC; i++) r[i] = bf16_to_float_host(__float2bfloat16(a[i] + b[i]));
    for (int n = 0; n < N; n++) {
        const float *x = r + (size_t)n * C;
        float mu = 0.0f, v = 0.0f;
        for (int i = 0; i < C; i++) mu += x[i];
        mu /= C;
        for (int i = 0; i < C; i++) v += (x[i] - mu) * (x[i] - mu);
        v /= C;
        m[n] = mu;
        s[n] = 1.0f / sqrtf(v + 1e-5f);
        for (int i = 0; i < C; i++) o[(size_t)n * C + i] = (x[i] - mu) * s[n] * w[i] + bias[i];
    }
    float *h = dev_to_host_bf16(res, NC);
    dev_check("residual = a + b", ref_rel_err(h, r, NC), 1e-2);
    free(h);
    h = dev_to_host_bf16(out, NC);
    dev_check("LayerNorm output", ref_rel_err(h, o, NC), 1e-2);
    free(h);
    h = dev_to_host_f32(mean, N);
    dev_check("mean", ref_rel_err(h, m, N), 1e-4);
    free(h);
    h = dev_to_host_f32(rstd, N);
    dev_check("rstd", ref_rel_err(h, s, N), 1e-4);
    free(h);

    layernorm_backward(ddinp, gw, gb, scratch, ddout, res, dw, mean, rstd, N, C, main_stream);
    float *rdx = (float *)malloc(NC * 4), *rdw = (float *)calloc(C, 4), *rdb = (float *)calloc(C, 4);
    for (int n = 0; n < N; n++) {
        const float *x = r + (size_t)n * C, *d = dout + (size_t)n * C;
        float dm = 0.0f, dnm = 0.0f;
        for (int i = 0; i < C; i++) { float nm = (x[i] - m[n]) * s[n], dn = w[i] * d[i]; dm += dn; dnm += dn * nm; }
        dm /= C;
        dnm /= C;
        for (int i = 0; i < C; i++) {
            float nm = (x[i] - m[n]) * s[n], dn = w[i] * d[i];
            rdb[i] += d[i];
            rdw[i] += nm * d[i];
            rdx[(size_t)n * C + i] = dinp0[(size_t)n * C + i] + (dn - dm - nm * dnm) * s[n];
        }
    }
    h = dev_to_host_bf16(ddinp, NC);
    dev_check("backward dinp (accumulated)", ref_rel_err(h, rdx, NC), 1e-2);
    free(h);
    h = dev_to_host_bf16(gw, C);
    dev_check("backward dweight", ref_rel_err(h, rdw, C), 1e-2);
    free(h);
    h = dev_to_host_bf16(gb, C);
    dev_check("backward dbias", ref_rel_err(h, rdb, C), 1e-2);
    free(h);

    // timing: 16 x 1024 tokens, C = 768
    int BN = 16 * 1024, BC = 768;
    bf16 *A, *Bb, *R, *O, *W, *Bi, *D, *DI, *GW, *GB;
    float *M, *S, *SC;
    size_t n = (size_t)BN * BC;
    bf16 **bufs[] = {&A, &Bb, &R, &O, &D, &DI};
    for (int i = 0; i < 6; i++) { cudaCheck(cudaMalloc(bufs[i], n * 2)); cudaCheck(cudaMemset(*bufs[i], 0, n * 2)); }
    cudaCheck(cudaMalloc(&W, BC * 2)); cudaCheck(cudaMalloc(&Bi, BC * 2));
    cudaCheck(cudaMalloc(&GW, BC * 2)); cudaCheck(cudaMalloc(&GB, BC * 2));
    cudaCheck(cudaMemset(W, 0, BC * 2)); cudaCheck(cudaMemset(Bi, 0, BC * 2));
    cudaCheck(cudaMalloc(&M, BN * 4)); cudaCheck(cudaMalloc(&S, BN * 4));
    cudaCheck(cudaMemset(M, 0, BN * 4)); cudaCheck(cudaMemset(S, 0, BN * 4));
    cudaCheck(cudaMalloc(&SC, (size_t)colsum_chunks(BN) * 2 * BC * 4));
    float ms = dev_time_ms([&] { residual_layernorm_forward(R, O, M, S, A, Bb, W, Bi, BN, BC, main_stream); }, 50);
    printf("bench: residual + LayerNorm forward, N=%d C=%d: %.3f ms, %.0f GB/s\n", BN, BC, ms, 4.0 * n * 2 / ms / 1e6);
    ms = dev_time_ms([&] { layernorm_backward(DI, GW, GB, SC, D, R, W, M, S, BN, BC, main_stream); }, 50);
    printf("bench: LayerNorm backward, N=%d C=%d: %.3f ms, %.0f GB/s\n", BN, BC, ms, 6.0 * n * 2 / ms / 1e6);
    return dev_failures ? 1 : 0;
}
