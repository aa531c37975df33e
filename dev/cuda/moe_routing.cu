// BTT-MoE on the GPU (llmc/moe.cuh): routing (top-k + softmax, per-expert counts, a scan for the
// offsets, a stable token permutation), the experts as grouped block-diagonal matmuls over the expert
// groups (fused two-stage kernel, x rows gathered in its loads), the gate-weighted combine, and the full
// backward with the router and aux-loss gradients; no float atomics anywhere.
// Checks against llmc/moe.h (fp32, the same bf16 inputs): the routing decisions and the grouping exactly,
// the aux loss and loads to 1e-3, y and every gradient to 1e-2 of their scale (bf16 outputs and z', and
// the gates applied to bf16 expert outputs), dG to 2e-2 (it sums products of the router's dlogits, which
// are differences of nearly equal terms). Also the all-experts baseline against moe.h's.
// Benchmark (GPT-2 124M, E=8, k=2, 16384 tokens, each projection): our layer forward and forward +
// backward against computing every expert with masking (the rank-E BTT on all tokens, its intermediate
// multiplied by the gates: what the BTT-MoE papers' code does); the routing's share of our forward.
// Targets: >= 2.5x the all-experts layer, routing <= 20% of the layer time.
#include "dev/cuda/common.h"
#include "llmc/moe.cuh"
#include "dev/cuda/cpu_ref.h"

// ----------------------------------------------------------------------------------------------
// The all-experts baseline: z' of the rank-E BTT for every token, multiplied by the dense gates.

// gd (N, E): the gate of each selected expert, 0 elsewhere
__global__ void dense_gates_kernel(float *gd, const int *sel, const float *gate, int N, int E, int k) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    for (int e = 0; e < E; e++) gd[(size_t)n * E + e] = 0.0f;
    for (int t = 0; t < k; t++) gd[(size_t)n * E + sel[(size_t)n * k + t]] = gate[(size_t)n * k + t];
}
// out[n][c] = in[n][c] * gd[n][c % E] (the expert index is the fastest one of z and z')
__global__ void gate_mask_kernel(bf16 *out, const bf16 *in, const float *gd, int N, int w, int E) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * w) return;
    size_t n = idx / w;
    out[idx] = __float2bfloat16(__bfloat162float(in[idx]) * gd[n * E + (idx % w) % E]);
}
// dgate[n][e] = sum over the columns c of expert e of dzg[n][c] z[n][c]
__global__ void dgate_kernel(float *dg, const bf16 *dzg, const bf16 *z, int N, int w, int E) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * E) return;
    int n = idx / E, e = idx % E;
    float s = 0.0f;
    for (int c = e; c < w; c += E) s += __bfloat162float(dzg[(size_t)n * w + c]) * __bfloat162float(z[(size_t)n * w + c]);
    dg[idx] = s;
}

typedef struct {
    float *probs, *lse, *gate, *gd, *dg;
    int *sel;
    bf16 *zp, *zpg, *dzpg;
    float *part;
} Baseline;

static void baseline_forward(const Structure *s, const Baseline *b, bf16 *y, const bf16 *x, const bf16 *W0, const bf16 *W1,
                             const bf16 *G, const bf16 *bias, int N) {
    int E = s->experts, k = s->top_k, w = s->mid_width;
    moe_route_kernel<<<ceil_div(N, 8), 256, 0, main_stream>>>(b->probs, b->lse, b->sel, b->gate, x, G, N, s->d_in, E, k);
    dense_gates_kernel<<<ceil_div(N, 256), 256, 0, main_stream>>>(b->gd, b->sel, b->gate, N, E, k);
    blockdiag_forward_gpu(b->zp, w, s->mid, x, s->d_in, BD_NO_PERM, W0, N, s->core[0].nb, s->core[0].p, s->core[0].q,
                          NULL, NULL, main_stream);
    gate_mask_kernel<<<ceil_div((long)N * w, 256), 256, 0, main_stream>>>(b->zpg, b->zp, b->gd, N, w, E);
    blockdiag_forward_gpu(y, s->d_out, BD_NO_PERM, b->zpg, w, BD_NO_PERM, W1, N, s->core[1].nb, s->core[1].p, s->core[1].q,
                          bias, NULL, main_stream);
    cudaCheck(cudaGetLastError());
}
// The expert part of the backward (the router's dlogits and dG are left out: it favours the baseline).
static void baseline_backward(const Structure *s, const Baseline *b, bf16 *dx, bf16 *dW0, bf16 *dW1, const bf16 *dy,
                              const bf16 *x, const bf16 *W0, const bf16 *W1, int N) {
    int E = s->experts, w = s->mid_width;
    const CoreShape *c0 = &s->core[0], *c1 = &s->core[1];
    blockdiag_backward_weight_gpu(dW1, dy, s->d_out, BD_NO_PERM, b->zpg, w, BD_NO_PERM, N, c1->nb, c1->p, c1->q, 1, b->part, main_stream);
    blockdiag_backward_input_gpu(b->dzpg, w, BD_NO_PERM, dy, s->d_out, BD_NO_PERM, W1, N, c1->nb, c1->p, c1->q, NULL, 0, main_stream);
    dgate_kernel<<<ceil_div(N * E, 256), 256, 0, main_stream>>>(b->dg, b->dzpg, b->zp, N, w, E);
    gate_mask_kernel<<<ceil_div((long)N * w, 256), 256, 0, main_stream>>>(b->dzpg, b->dzpg, b->gd, N, w, E);
    blockdiag_backward_weight_gpu(dW0, b->dzpg, w, s->mid, x, s->d_in, BD_NO_PERM, N, c0->nb, c0->p, c0->q, 1, b->part, main_stream);
    blockdiag_backward_input_gpu(dx, s->d_in, BD_NO_PERM, b->dzpg, w, s->mid, W0, N, c0->nb, c0->p, c0->q, NULL, 0, main_stream);
    cudaCheck(cudaGetLastError());
}
static Baseline baseline_alloc(const Structure *s, int N) {
    Baseline b;
    int E = s->experts, k = s->top_k;
    size_t w = s->mid_width, part = 0;
    for (int c = 0; c < 2; c++) {
        size_t n = bd_weight_scratch_floats(N, 1, s->core[c].nb, s->core[c].q, s->core[c].p);
        if (n > part) part = n;
    }
    cudaCheck(cudaMalloc(&b.probs, (size_t)N * E * 4));
    cudaCheck(cudaMalloc(&b.lse, (size_t)N * 4));
    cudaCheck(cudaMalloc(&b.gate, (size_t)N * k * 4));
    cudaCheck(cudaMalloc(&b.gd, (size_t)N * E * 4));
    cudaCheck(cudaMalloc(&b.dg, (size_t)N * E * 4));
    cudaCheck(cudaMalloc(&b.sel, (size_t)N * k * 4));
    cudaCheck(cudaMalloc(&b.zp, (size_t)N * w * 2));
    cudaCheck(cudaMalloc(&b.zpg, (size_t)N * w * 2));
    cudaCheck(cudaMalloc(&b.dzpg, (size_t)N * w * 2));
    cudaCheck(cudaMalloc(&b.part, part * 4));
    return b;
}
static void baseline_free(Baseline *b) {
    cudaFree(b->probs); cudaFree(b->lse); cudaFree(b->gate); cudaFree(b->gd); cudaFree(b->dg); cudaFree(b->sel);
    cudaFree(b->zp); cudaFree(b->zpg); cudaFree(b->dzpg); cudaFree(b->part);
}

// Our routing alone (what moe_forward_gpu does besides the experts): route, group, aux, pack, combine.
static void routing_only(const Structure *s, bf16 *y, const bf16 *x, const bf16 *W0, const bf16 *W1, const bf16 *G,
                         void *saved, void *scratch, int N) {
    int E = s->experts, k = s->top_k, nch = ceil_div(N, MOE_CHUNK);
    MoeGpuSaved sv = moe_gpu_saved_view(s, saved, N, NULL);
    MoeGpuScratch sc = moe_gpu_scratch_view(s, scratch, N, NULL);
    moe_route_kernel<<<ceil_div(N, 8), 256, 0, main_stream>>>(sv.probs, sv.lse, sv.sel, sv.gate, x, G, N, s->d_in, E, k);
    moe_count_kernel<<<nch, MOE_CHUNK, 0, main_stream>>>(sc.counts, sv.sel, N, k, E);
    moe_scan_kernel<<<1, 64, 0, main_stream>>>(sc.base, sv.goff, sc.counts, nch, E);
    moe_scatter_kernel<<<nch, MOE_CHUNK, 0, main_stream>>>(sv.pos, sv.src, sv.sel, sc.base, N, k, E);
    moe_aux_kernel<<<1, 256, 0, main_stream>>>(sv.aux, sv.probs, sv.lse, sv.goff, N, k, E, 0.1f);
    moe_pack(s, &sc, W0, W1, main_stream);
    moe_combine_kernel<<<ceil_div((long)N * s->d_out, 256), 256, 0, main_stream>>>(y, NULL, sc.outg, sv.pos, sv.gate, NULL,
                                                                                   N, k, s->d_out);
    cudaCheck(cudaGetLastError());
}

// ----------------------------------------------------------------------------------------------
// Checks against moe.h

static void check_moe(const Structure *s, int N, int kernel, float daux, uint64_t seed) {
    char desc[200], what[320];
    structure_describe(s, desc, sizeof desc);
    bd_kernel_choice = kernel;
    const char *kn = kernel == BD_KERNEL_UNFUSED ? "unfused" : "fused";
    int E = s->experts, k = s->top_k, mid = s->m1 * s->n0;
    size_t n0 = (size_t)s->core[0].nb * s->core[0].p * s->core[0].q, n1 = (size_t)s->core[1].nb * s->core[1].p * s->core[1].q;
    float *x, *W0, *W1, *G, *dy;
    bf16 *dx_ = dev_random_bf16((size_t)N * s->d_in, 1.0f, seed, &x), *dW0_ = dev_random_bf16(n0, 0.4f, seed + 1, &W0);
    bf16 *dW1_ = dev_random_bf16(n1, 0.4f, seed + 2, &W1), *dG_ = dev_random_bf16((size_t)E * s->d_in, 0.5f, seed + 3, &G);
    bf16 *ddy_ = dev_random_bf16((size_t)N * s->d_out, 1.0f, seed + 4, &dy);
    float zw = 0.1f, *load = (float *)malloc(E * 4);
    float *y = (float *)malloc((size_t)N * s->d_out * 4), *saved = (float *)malloc(ref_moe_saved_floats(s, N) * 4);
    float *scratch = (float *)malloc(ref_moe_scratch_floats(s, N) * 4);
    float aux = ref_moe_forward(s, y, x, W0, W1, G, zw, saved, scratch, N, load);
    float *dx = (float *)malloc((size_t)N * s->d_in * 4), *gW0 = (float *)calloc(n0, 4), *gW1 = (float *)calloc(n1, 4);
    float *gG = (float *)calloc((size_t)E * s->d_in, 4);
    ref_moe_backward(s, dx, gW0, gW1, gG, dy, daux, zw, x, W0, W1, G, saved, scratch, N);
    const int *ref_sel = (const int *)(saved + (size_t)N * k * mid + (size_t)N * E + N + (size_t)N * k);

    void *gsaved, *gscratch;
    bf16 *gy, *gdx, *gdW0, *gdW1, *gdG;
    cudaCheck(cudaMalloc(&gsaved, moe_gpu_saved_bytes(s, N)));
    cudaCheck(cudaMalloc(&gscratch, moe_gpu_scratch_bytes(s, N)));
    cudaCheck(cudaMalloc(&gy, (size_t)N * s->d_out * 2));
    cudaCheck(cudaMalloc(&gdx, (size_t)N * s->d_in * 2));
    cudaCheck(cudaMalloc(&gdW0, n0 * 2));
    cudaCheck(cudaMalloc(&gdW1, n1 * 2));
    cudaCheck(cudaMalloc(&gdG, (size_t)E * s->d_in * 2));
    cudaCheck(cudaMemset(gdW0, 0, n0 * 2));
    cudaCheck(cudaMemset(gdW1, 0, n1 * 2));
    cudaCheck(cudaMemset(gdG, 0, (size_t)E * s->d_in * 2));
    moe_forward_gpu(s, gy, dx_, dW0_, dW1_, dG_, NULL, NULL, zw, gsaved, gscratch, N, main_stream);
    moe_backward_gpu(s, gdx, gdW0, gdW1, gdG, 1, ddy_, daux, zw, dx_, dW0_, dW1_, dG_, gsaved, NULL, gscratch, N, main_stream);
    cudaCheck(cudaDeviceSynchronize());
    MoeGpuSaved sv = moe_gpu_saved_view(s, gsaved, N, NULL);
    int *sel = (int *)malloc((size_t)N * k * 4), *src = (int *)malloc((size_t)N * k * 4), *pos = (int *)malloc((size_t)N * k * 4);
    int *goff = (int *)malloc((E + 1) * 4);
    float *haux = (float *)malloc((1 + E) * 4);
    cudaCheck(cudaMemcpy(sel, sv.sel, (size_t)N * k * 4, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(src, sv.src, (size_t)N * k * 4, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(pos, sv.pos, (size_t)N * k * 4, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(goff, sv.goff, (E + 1) * 4, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(haux, sv.aux, (1 + E) * 4, cudaMemcpyDeviceToHost));
    int same = !memcmp(sel, ref_sel, (size_t)N * k * 4), grouped = goff[E] == N * k;
    for (int e = 0; e < E && grouped; e++)
        for (int r = goff[e]; r < goff[e + 1]; r++)
            grouped &= sel[src[r]] == e && pos[src[r]] == r && (r == goff[e] || src[r] / k > src[r - 1] / k);
    snprintf(what, sizeof what, "%s %s N=%d: routing (top-k) as moe.h", kn, desc, N);
    printf("%s - %s\n", same ? "ok" : "FAIL", what);
    dev_failures += !same;
    snprintf(what, sizeof what, "%s %s N=%d: grouping is a stable permutation of the slots", kn, desc, N);
    printf("%s - %s\n", grouped ? "ok" : "FAIL", what);
    dev_failures += !grouped;
    snprintf(what, sizeof what, "%s %s: aux loss (gpu %.6f cpu %.6f)", kn, desc, haux[0], aux);
    dev_check(what, fabs(haux[0] - aux) / fabs(aux), 1e-3);
    snprintf(what, sizeof what, "%s %s: expert loads", kn, desc);
    dev_check(what, ref_rel_err(haux + 1, load, E), 1e-3);
    struct { const char *name; bf16 *d; float *ref; size_t n; double tol; } outs[] = {
        {"forward y", gy, y, (size_t)N * s->d_out, 1e-2}, {"backward dx", gdx, dx, (size_t)N * s->d_in, 1e-2},
        {"backward dW0", gdW0, gW0, n0, 1e-2}, {"backward dW1", gdW1, gW1, n1, 1e-2},
        {"backward dG (router and aux loss)", gdG, gG, (size_t)E * s->d_in, 2e-2}};
    for (int i = 0; i < 5; i++) {
        float *h = dev_to_host_bf16(outs[i].d, outs[i].n);
        snprintf(what, sizeof what, "%s %s: %s", kn, desc, outs[i].name);
        dev_check(what, ref_rel_err(h, outs[i].ref, outs[i].n), outs[i].tol);
        free(h);
    }
    // the baseline computes the same layer (forward, no bias)
    if (kernel == BD_KERNEL_TC) {
        Baseline b = baseline_alloc(s, N);
        baseline_forward(s, &b, gy, dx_, dW0_, dW1_, dG_, NULL, N);
        float *h = dev_to_host_bf16(gy, (size_t)N * s->d_out);
        snprintf(what, sizeof what, "all-experts baseline %s: forward y vs moe.h", desc);
        dev_check(what, ref_rel_err(h, y, (size_t)N * s->d_out), 1e-2);
        free(h);
        baseline_free(&b);
    }
    bd_kernel_choice = BD_KERNEL_TC;
    cudaFree(dx_); cudaFree(dW0_); cudaFree(dW1_); cudaFree(dG_); cudaFree(ddy_); cudaFree(gsaved); cudaFree(gscratch);
    cudaFree(gy); cudaFree(gdx); cudaFree(gdW0); cudaFree(gdW1); cudaFree(gdG);
    free(x); free(W0); free(W1); free(G); free(dy); free(load); free(y); free(saved); free(scratch); free(dx);
    free(gW0); free(gW1); free(gG); free(sel); free(src); free(pos); free(goff); free(haux);
}

// ----------------------------------------------------------------------------------------------
// Benchmark of one btt_moe layer at N tokens

static void bench_moe(const Structure *s, int N) {
    char desc[200];
    structure_describe(s, desc, sizeof desc);
    int E = s->experts;
    size_t n0 = (size_t)s->core[0].nb * s->core[0].p * s->core[0].q, n1 = (size_t)s->core[1].nb * s->core[1].p * s->core[1].q;
    float *hx, *hG;
    bf16 *x = dev_random_bf16((size_t)N * s->d_in, 1.0f, 1, &hx), *G = dev_random_bf16((size_t)E * s->d_in, 0.1f, 2, &hG);
    bf16 *y, *dy, *dx, *W0, *W1, *dW0, *dW1, *dG;
    void *saved, *scratch;
    cudaCheck(cudaMalloc(&y, (size_t)N * s->d_out * 2));
    cudaCheck(cudaMalloc(&dy, (size_t)N * s->d_out * 2));
    cudaCheck(cudaMalloc(&dx, (size_t)N * s->d_in * 2));
    cudaCheck(cudaMalloc(&W0, n0 * 2));
    cudaCheck(cudaMalloc(&W1, n1 * 2));
    cudaCheck(cudaMalloc(&dW0, n0 * 2));
    cudaCheck(cudaMalloc(&dW1, n1 * 2));
    cudaCheck(cudaMalloc(&dG, (size_t)E * s->d_in * 2));
    cudaCheck(cudaMalloc(&saved, moe_gpu_saved_bytes(s, N)));
    cudaCheck(cudaMalloc(&scratch, moe_gpu_scratch_bytes(s, N)));
    cudaCheck(cudaMemset(dy, 0, (size_t)N * s->d_out * 2));
    cudaCheck(cudaMemset(W0, 0, n0 * 2));
    cudaCheck(cudaMemset(W1, 0, n1 * 2));
    Baseline b = baseline_alloc(s, N);
    float f_ours = dev_time_ms([&] { moe_forward_gpu(s, y, x, W0, W1, G, NULL, NULL, 0.1f, saved, scratch, N, main_stream); }, 10);
    float fb_ours = dev_time_ms([&] {
        moe_forward_gpu(s, y, x, W0, W1, G, NULL, NULL, 0.1f, saved, scratch, N, main_stream);
        moe_backward_gpu(s, dx, dW0, dW1, dG, 1, dy, 0.01f, 0.1f, x, W0, W1, G, saved, NULL, scratch, N, main_stream);
    }, 10);
    float r_ours = dev_time_ms([&] { routing_only(s, y, x, W0, W1, G, saved, scratch, N); }, 10);
    float f_base = dev_time_ms([&] { baseline_forward(s, &b, y, x, W0, W1, G, NULL, N); }, 10);
    float fb_base = dev_time_ms([&] {
        baseline_forward(s, &b, y, x, W0, W1, G, NULL, N);
        baseline_backward(s, &b, dx, dW0, dW1, dy, x, W0, W1, N);
    }, 10);
    printf("bench: %-70s N=%d | ours fwd %.3f ms, fwd+bwd %.3f ms; routing %.3f ms = %.0f%% of fwd (target <= 20%%) | "
           "all experts fwd %.3f ms, fwd+bwd %.3f ms | speedup fwd %.2fx, fwd+bwd %.2fx (target >= 2.5x)\n",
           desc, N, f_ours, fb_ours, r_ours, 100.0 * r_ours / f_ours, f_base, fb_base, f_base / f_ours, fb_base / fb_ours);
    baseline_free(&b);
    cudaFree(x); cudaFree(G); cudaFree(y); cudaFree(dy); cudaFree(dx); cudaFree(W0); cudaFree(W1); cudaFree(dW0);
    cudaFree(dW1); cudaFree(dG); cudaFree(saved); cudaFree(scratch);
    free(hx); free(hG);
}

int main(void) {
    cuda_setup(0);
    printf("# %s\n", device_prop.name);
    Structure checks[] = {
        dev_structure(64, LIN_ATTN_QKV, "btt_moe", 0, 0, 0, 0, 8, 2),
        dev_structure(64, LIN_MLP_PROJ, "btt_moe", 0, 0, 0, 0, 4, 2),
        dev_structure(128, LIN_MLP_FC, "btt_moe", 0, 0, 0, 0, 8, 1),
        dev_structure(64, LIN_ATTN_PROJ, "btt_moe", 0, 0, 0, 0, 3, 3),
    };
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        check_moe(&checks[i], 3000 + 11 * (int)i, BD_KERNEL_TC, 0.5f, 10 * i + 1);
        check_moe(&checks[i], 1000, BD_KERNEL_UNFUSED, 0.0f, 10 * i + 2);
    }
    for (int k = 0; k < NUM_LINEAR; k++) {
        Structure s = dev_structure(768, k, "btt_moe", 0, 0, 0, 0, 8, 2);
        bench_moe(&s, 16384);
    }
    return dev_failures ? 1 : 0;
}
