// encoder.cuh against the CPU trainer's embedding forward/backward, then timed at GPT-2 124M's
// size. The batch repeats tokens (drawn from 50 ids) so the deterministic bucketed dwte sum is
// exercised. Tolerances 1e-2 of scale (bf16 outputs; fp32 sums of bf16 values).
#include "dev/cuda/common.h"
#include "llmc/encoder.cuh"

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    int B = 4, T = 64, C = 96, V = 512, N = B * T;
    float *wte, *wpe, *dout, *dwte0, *dwpe0;
    bf16 *dwte_w = dev_random_bf16((size_t)V * C, 1.0f, 1, &wte), *dwpe_w = dev_random_bf16((size_t)T * C, 1.0f, 2, &wpe);
    bf16 *ddout = dev_random_bf16((size_t)N * C, 1.0f, 3, &dout);
    bf16 *gwte = dev_random_bf16((size_t)V * C, 0.5f, 4, &dwte0), *gwpe = dev_random_bf16((size_t)T * C, 0.5f, 5, &dwpe0);
    int *inp = (int *)malloc(N * 4), *buckets = (int *)malloc((3 * N + 2) * 4), *counts = (int *)malloc(V * 4), *dinp, *dbuck;
    uint64_t seed = 7;
    for (int i = 0; i < N; i++) inp[i] = (int)((dev_uniform(&seed) + 1.0f) * 25.0f);
    cudaCheck(cudaMalloc(&dinp, N * 4));
    cudaCheck(cudaMalloc(&dbuck, (3 * N + 2) * 4));
    cudaCheck(cudaMemcpy(dinp, inp, N * 4, cudaMemcpyHostToDevice));
    bf16 *out;
    cudaCheck(cudaMalloc(&out, (size_t)N * C * 2));
    encoder_forward(out, dinp, dwte_w, dwpe_w, B, T, C, main_stream);
    float *ref = (float *)malloc((size_t)N * C * 4);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) ref[(size_t)n * C + c] = wte[(size_t)inp[n] * C + c] + wpe[(size_t)(n % T) * C + c];
    float *h = dev_to_host_bf16(out, (size_t)N * C);
    dev_check("encoder forward", ref_rel_err(h, ref, (size_t)N * C), 1e-2);
    free(h);

    int nints = encoder_buckets(buckets, counts, inp, N, V);
    cudaCheck(cudaMemcpy(dbuck, buckets, nints * 4, cudaMemcpyHostToDevice));
    encoder_backward(gwte, gwpe, ddout, dbuck, buckets[0], B, T, C, main_stream);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            dwte0[(size_t)inp[n] * C + c] += dout[(size_t)n * C + c];
            dwpe0[(size_t)(n % T) * C + c] += dout[(size_t)n * C + c];
        }
    h = dev_to_host_bf16(gwte, (size_t)V * C);
    dev_check("encoder backward dwte (bucketed, no atomics)", ref_rel_err(h, dwte0, (size_t)V * C), 1e-2);
    free(h);
    h = dev_to_host_bf16(gwpe, (size_t)T * C);
    dev_check("encoder backward dwpe", ref_rel_err(h, dwpe0, (size_t)T * C), 1e-2);
    free(h);

    // timing: B=16, T=1024, C=768, GPT-2 vocabulary, random tokens
    int BB = 16, BT = 1024, BC = 768, BV = 50304, BN = BB * BT;
    int *tin = (int *)malloc(BN * 4), *tb = (int *)malloc((3 * BN + 2) * 4), *tc = (int *)malloc(BV * 4), *dtin, *dtb;
    for (int i = 0; i < BN; i++) tin[i] = (int)((dev_uniform(&seed) + 1.0f) * 25000.0f);
    cudaCheck(cudaMalloc(&dtin, BN * 4));
    cudaCheck(cudaMalloc(&dtb, (3 * BN + 2) * 4));
    cudaCheck(cudaMemcpy(dtin, tin, BN * 4, cudaMemcpyHostToDevice));
    int ni = encoder_buckets(tb, tc, tin, BN, BV), U = tb[0];
    cudaCheck(cudaMemcpy(dtb, tb, ni * 4, cudaMemcpyHostToDevice));
    bf16 *E, *P, *O, *GE, *GP;
    cudaCheck(cudaMalloc(&E, (size_t)BV * BC * 2)); cudaCheck(cudaMemset(E, 0, (size_t)BV * BC * 2));
    cudaCheck(cudaMalloc(&GE, (size_t)BV * BC * 2)); cudaCheck(cudaMemset(GE, 0, (size_t)BV * BC * 2));
    cudaCheck(cudaMalloc(&P, (size_t)BT * BC * 2)); cudaCheck(cudaMemset(P, 0, (size_t)BT * BC * 2));
    cudaCheck(cudaMalloc(&GP, (size_t)BT * BC * 2)); cudaCheck(cudaMemset(GP, 0, (size_t)BT * BC * 2));
    cudaCheck(cudaMalloc(&O, (size_t)BN * BC * 2)); cudaCheck(cudaMemset(O, 0, (size_t)BN * BC * 2));
    float ms = dev_time_ms([&] { encoder_forward(O, dtin, E, P, BB, BT, BC, main_stream); }, 50);
    printf("bench: encoder forward B=%d T=%d C=%d: %.3f ms, %.0f GB/s\n", BB, BT, BC, ms, 3.0 * BN * BC * 2 / ms / 1e6);
    ms = dev_time_ms([&] { encoder_backward(GE, GP, O, dtb, U, BB, BT, BC, main_stream); }, 50);
    printf("bench: encoder backward (%d distinct tokens): %.3f ms, %.0f GB/s\n", U, ms, 3.0 * BN * BC * 2 / ms / 1e6);
    return dev_failures ? 1 : 0;
}
