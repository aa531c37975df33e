// matmul.cuh (cuBLASLt with fused bias / GELU epilogues) against a CPU fp32 reference, then timed
// on GPT-2 124M's shapes. Checked: forward with bias, forward with GELU (cuBLASLt's GELU must be
// the CPU trainer's tanh approximation), backward input with the fused GELU backward, weight and
// bias gradients. Tolerance 1e-2 of each output's scale: inputs are the same bf16 values on both
// sides, the GPU accumulates in fp32 too, so the difference is the final bf16 rounding (2^-9) plus
// GELU evaluated on a bf16-rounded pre-activation.
// Build: nvcc -O3 -arch=sm_90 -std=c++17 -I. dev/cuda/matmul.cu -lcublasLt -lcublas   (make cuda)
#include "dev/cuda/common.h"
#include "llmc/matmul.cuh"

static float gelu_ref(float x) { return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))); }
static float gelu_grad_ref(float x) {
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x), th = tanhf(u);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
}

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    // ---- correctness: N tokens, IC -> OC
    int N = 256, IC = 192, OC = 384;
    float *x, *W, *b, *dy;
    bf16 *dx_ = dev_random_bf16((size_t)N * IC, 1.0f, 1, &x);
    bf16 *dW_ = dev_random_bf16((size_t)OC * IC, 0.1f, 2, &W);
    bf16 *db_ = dev_random_bf16(OC, 0.1f, 3, &b);
    bf16 *ddy = dev_random_bf16((size_t)N * OC, 1.0f, 4, &dy);
    bf16 *out, *pre, *dinp, *gW, *gb;
    float *scratch;
    cudaCheck(cudaMalloc(&out, (size_t)N * OC * 2));
    cudaCheck(cudaMalloc(&pre, (size_t)N * OC * 2));
    cudaCheck(cudaMalloc(&dinp, (size_t)N * IC * 2));
    cudaCheck(cudaMalloc(&gW, (size_t)OC * IC * 2));
    cudaCheck(cudaMalloc(&gb, OC * 2));
    cudaCheck(cudaMalloc(&scratch, (size_t)colsum_chunks(N) * OC * 4));
    float *ref = (float *)malloc((size_t)N * OC * 4), *refg = (float *)malloc((size_t)N * OC * 4);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            float s = b[o];
            for (int i = 0; i < IC; i++) s += x[(size_t)n * IC + i] * W[(size_t)o * IC + i];
            ref[(size_t)n * OC + o] = s;
            refg[(size_t)n * OC + o] = gelu_ref(s);
        }
    matmul_forward(out, dx_, dW_, db_, NULL, N, IC, OC, main_stream);
    float *h = dev_to_host_bf16(out, (size_t)N * OC);
    dev_check("forward + bias epilogue", ref_rel_err(h, ref, (size_t)N * OC), 1e-2);
    free(h);
    matmul_forward(out, dx_, dW_, db_, pre, N, IC, OC, main_stream);
    h = dev_to_host_bf16(out, (size_t)N * OC);
    dev_check("forward + bias + GELU epilogue (tanh approximation)", ref_rel_err(h, refg, (size_t)N * OC), 1e-2);
    free(h);
    h = dev_to_host_bf16(pre, (size_t)N * OC);
    dev_check("GELU epilogue keeps the pre-activation", ref_rel_err(h, ref, (size_t)N * OC), 1e-2);
    float *pre_h = h;

    // backward of a layer whose input was gelu(pre): here the (N, OC) matrix plays the input of a
    // second layer OC -> IC, so dinp (N, OC) = (dy2 W2) * gelu'(pre) with W2 = W viewed (IC, OC)
    float *dy2;
    bf16 *ddy2 = dev_random_bf16((size_t)N * IC, 1.0f, 5, &dy2);
    bf16 *dgelu;
    cudaCheck(cudaMalloc(&dgelu, (size_t)N * OC * 2));
    float *refd = (float *)malloc((size_t)N * OC * 4);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            float s = 0.0f;
            for (int i = 0; i < IC; i++) s += dy2[(size_t)n * IC + i] * W[(size_t)i * OC + o];
            refd[(size_t)n * OC + o] = s * gelu_grad_ref(pre_h[(size_t)n * OC + o]);
        }
    cudaCheck(cudaMemset(gW, 0, (size_t)OC * IC * 2));
    cudaCheck(cudaMemset(gb, 0, IC * 2));
    matmul_backward(dgelu, gW, gb, ddy2, out, dW_, pre, scratch, N, OC, IC, main_stream);
    h = dev_to_host_bf16(dgelu, (size_t)N * OC);
    dev_check("backward input with fused GELU backward (DGELU epilogue)", ref_rel_err(h, refd, (size_t)N * OC), 2e-2);
    free(h);

    // weight and bias gradients of the first layer: dW (OC, IC) = dy^T x, db = sum dy
    cudaCheck(cudaMemset(gW, 0, (size_t)OC * IC * 2));
    cudaCheck(cudaMemset(gb, 0, OC * 2));
    matmul_backward(dinp, gW, gb, ddy, dx_, dW_, NULL, scratch, N, IC, OC, main_stream);
    float *rW = (float *)calloc((size_t)OC * IC, 4), *rb = (float *)calloc(OC, 4), *rx = (float *)calloc((size_t)N * IC, 4);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            float d = dy[(size_t)n * OC + o];
            rb[o] += d;
            for (int i = 0; i < IC; i++) { rW[(size_t)o * IC + i] += d * x[(size_t)n * IC + i]; rx[(size_t)n * IC + i] += d * W[(size_t)o * IC + i]; }
        }
    h = dev_to_host_bf16(dinp, (size_t)N * IC);
    dev_check("backward input", ref_rel_err(h, rx, (size_t)N * IC), 1e-2);
    free(h);
    h = dev_to_host_bf16(gW, (size_t)OC * IC);
    dev_check("weight gradient", ref_rel_err(h, rW, (size_t)OC * IC), 1e-2);
    free(h);
    h = dev_to_host_bf16(gb, OC);
    dev_check("bias gradient (deterministic column sums)", ref_rel_err(h, rb, OC), 1e-2);
    free(h);

    // ---- timing: GPT-2 124M mlp_fc (768 -> 3072) and mlp_proj, 16 x 1024 tokens
    int BN = 16 * 1024, C = 768;
    bf16 *A, *Wt, *bias, *Y, *P, *G, *DA, *GW, *GB;
    float *sc;
    cudaCheck(cudaMalloc(&A, (size_t)BN * C * 2));
    cudaCheck(cudaMalloc(&Wt, (size_t)4 * C * C * 2));
    cudaCheck(cudaMalloc(&bias, 4 * C * 2));
    cudaCheck(cudaMalloc(&Y, (size_t)BN * 4 * C * 2));
    cudaCheck(cudaMalloc(&P, (size_t)BN * 4 * C * 2));
    cudaCheck(cudaMalloc(&G, (size_t)BN * 4 * C * 2));
    cudaCheck(cudaMalloc(&DA, (size_t)BN * C * 2));
    cudaCheck(cudaMalloc(&GW, (size_t)4 * C * C * 2));
    cudaCheck(cudaMalloc(&GB, 4 * C * 2));
    cudaCheck(cudaMalloc(&sc, (size_t)colsum_chunks(BN) * 4 * C * 4));
    cudaCheck(cudaMemset(A, 0, (size_t)BN * C * 2));
    cudaCheck(cudaMemset(Wt, 0, (size_t)4 * C * C * 2));
    cudaCheck(cudaMemset(bias, 0, 4 * C * 2));
    cudaCheck(cudaMemset(G, 0, (size_t)BN * 4 * C * 2));
    double flops = 2.0 * BN * C * 4.0 * C;
    float ms = dev_time_ms([&] { matmul_forward(Y, A, Wt, bias, P, BN, C, 4 * C, main_stream); }, 20);
    printf("bench: forward 768->3072 + bias + GELU, N=%d: %.3f ms, %.1f TFLOP/s\n", BN, ms, flops / ms / 1e9);
    ms = dev_time_ms([&] { matmul_backward(DA, GW, GB, G, A, Wt, NULL, sc, BN, C, 4 * C, main_stream); }, 20);
    printf("bench: backward 768->3072 (dinp, dW, dbias), N=%d: %.3f ms, %.1f TFLOP/s\n", BN, ms, 2 * flops / ms / 1e9);
    ms = dev_time_ms([&] { bias_backward(GB, G, sc, BN, 4 * C, main_stream); }, 20);
    printf("bench: bias gradient (N=%d, 3072): %.3f ms, %.0f GB/s\n", BN, ms, (double)BN * 4 * C * 2 / ms / 1e6);
    return dev_failures ? 1 : 0;
}
