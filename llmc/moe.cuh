// BTT-MoE on the GPU (DESIGN 3.6 and 7): the GPU twin of llmc/moe.h, bf16 activations and weights,
// fp32 routing and accumulation. Cores of the rank-E BTT (llmc/structure.h, STRUCT_BTT_MOE):
//   W0 (m1, n0*E, m0), W1 (n0, n1, m1*E), router G (E, d_in); expert e = the rank-1 BTT with cores
//   W0[:, (j0 e), :] and W1[j0, :, (i1 e)].  logits = x G^T (fp32); S_n = top-k (ties to the lower
//   index); g = softmax over S_n; y_n = sum_{e in S_n} g_e BTT_e(x_n) + b.
//
// Forward, all on the device, no host synchronization:
//   route      one warp per token: logits, full softmax and logsumexp (for the aux loss), top-k, gates
//   group      per chunk of 256 tokens the per-expert counts (warp ballots), one scan of (expert, chunk)
//              counts into offsets, then a stable scatter: grouped row r of expert e holds slot src[r] =
//              n*k + t, tokens ascending within the expert; pos[n*k + t] = r
//   pack       each expert's cores made contiguous: W0p (E, m1, n0, m0), W1p (E, n0, n1, m1)
//   experts    llmc/blockdiag.cuh's fused two-stage kernel over the grouped rows, one expert per row
//              tile, x rows gathered in its loads: z' (N*k, m1*n0) saved, out (N*k, d_out) ungated
//   combine    y_n = sum_t g_{n,t} out[pos[n*k + t]] + b in slot order (+ GELU for mlp_fc): no atomics
//   aux        E sum_e P_e f_e + z_weight mean_n lse_n^2 by one block, in a fixed order
// Backward (dy given; daux = d objective / d aux):
//   D_r = g dy_{token(r)} (gathered and gated in the kernels' loads); dW1p_e = D^T z'; dz' = D W1p_e;
//   h_r = dz'_r . z'_r (= g dL/dg); dz = dz' through the inverse permutation (read in the loads);
//   dW0p_e = dz^T x; dxg = dz W0p_e; router dlogits from h and the aux loss (moe.h's formula);
//   dx_n = sum_t dxg[pos[n*k + t]] + dlogits_n G (+ gelu'), dG += dlogits^T x (fixed row chunks);
//   dW0, dW1 (+)= the packed gradients put back in the strided layouts.
// Only the k selected experts run per token (FLOPs k/E of the rank-E BTT); dev/cuda/moe_routing.cu checks
// all of it against llmc/moe.h and times it against computing every expert with masking.
#ifndef LLMC_MOE_CUH
#define LLMC_MOE_CUH
#include "llmc/blockdiag.cuh"

#define MOE_CHUNK 256      // tokens per block of the grouping kernels
#define MOE_MAX_EXPERTS 64 // the router keeps a warp's logits in shared memory

static int moe_mid_gpu(const Structure *s) { return s->m1 * s->n0; }
static size_t moe_align(size_t b) { return (b + 255) / 256 * 256; }

// The layer's saved state (kept from forward for backward), one allocation of moe_gpu_saved_bytes.
typedef struct {
    bf16 *zp;        // (N*k, mid) z' of every grouped row
    float *probs;    // (N, E) full softmax of the logits
    float *lse;      // (N) logsumexp of the logits
    float *gate;     // (N*k) gate of slot n*k + t
    float *aux;      // (1 + E): the aux loss, then the load f_e (fraction of the N*k slots routed to e)
    int *sel;        // (N*k) expert of slot n*k + t, highest logit first
    int *pos;        // (N*k) grouped row of slot n*k + t
    int *src;        // (N*k) slot of grouped row r
    int *goff;       // (E + 1) expert e's grouped rows are [goff[e], goff[e+1])
} MoeGpuSaved;

static MoeGpuSaved moe_gpu_saved_view(const Structure *s, void *saved, int N, size_t *bytes) {
    size_t Nk = (size_t)N * s->top_k, E = s->experts, o = 0;
    char *p = (char *)saved;
    MoeGpuSaved v;
#define MOE_TAKE(field, type, n) v.field = (type *)(p + o); o += moe_align((n) * sizeof(type));
    MOE_TAKE(zp, bf16, Nk * moe_mid_gpu(s));
    MOE_TAKE(probs, float, (size_t)N * E);
    MOE_TAKE(lse, float, (size_t)N);
    MOE_TAKE(gate, float, Nk);
    MOE_TAKE(aux, float, 1 + E);
    MOE_TAKE(sel, int, Nk);
    MOE_TAKE(pos, int, Nk);
    MOE_TAKE(src, int, Nk);
    MOE_TAKE(goff, int, E + 1);
#undef MOE_TAKE
    if (bytes) *bytes = o;
    return v;
}
static size_t moe_gpu_saved_bytes(const Structure *s, int N) {
    size_t b;
    moe_gpu_saved_view(s, NULL, N, &b);
    return b;
}
// The layer's aux loss and expert loads (device, 1 + E floats) inside its saved state.
static float *moe_gpu_aux(const Structure *s, void *saved, int N) { return moe_gpu_saved_view(s, saved, N, NULL).aux; }

// Temporaries of forward and backward, one allocation of moe_gpu_scratch_bytes (contents not kept).
typedef struct {
    bf16 *W0p, *W1p;   // (E, m1, n0, m0), (E, n0, n1, m1)
    bf16 *outg;        // (N*k, d_out) forward: the experts' outputs, grouped rows
    bf16 *dzp;         // (N*k, mid) backward: dz'
    bf16 *dxg;         // (N*k, d_in) backward: dz W0p of each grouped row
    float *dW0p, *dW1p;// packed weight gradients
    float *h;          // (N*k)
    float *dl;         // (N, E) router dlogits
    float *part;       // weight-gradient partial sums
    int *counts, *base;// (chunks, E) grouping
} MoeGpuScratch;

static int moe_dG_splits(int N) {
    int s = ceil_div(N, 256);
    return s > 64 ? 64 : s < 1 ? 1 : s;
}

static MoeGpuScratch moe_gpu_scratch_view(const Structure *s, void *scratch, int N, size_t *bytes) {
    size_t Nk = (size_t)N * s->top_k, E = s->experts, mid = moe_mid_gpu(s), o = 0;
    size_t n0 = (size_t)s->m1 * s->n0 * s->m0, n1 = (size_t)s->n0 * s->n1 * s->m1, nch = ceil_div(N, MOE_CHUNK);
    size_t part = bd_weight_scratch_floats((int)Nk, (int)E, s->m1, s->n0, s->m0);
    size_t p1 = bd_weight_scratch_floats((int)Nk, (int)E, s->n0, s->n1, s->m1);
    size_t pg = (size_t)moe_dG_splits(N) * E * s->d_in;
    if (p1 > part) part = p1;
    if (pg > part) part = pg;
    if (E * (n0 > n1 ? n0 : n1) > part) part = E * (n0 > n1 ? n0 : n1);   // the naive kernels' S = 1
    char *p = (char *)scratch;
    MoeGpuScratch v;
#define MOE_TAKE(field, type, n) v.field = (type *)(p + o); o += moe_align((n) * sizeof(type));
    MOE_TAKE(W0p, bf16, E * n0);
    MOE_TAKE(W1p, bf16, E * n1);
    MOE_TAKE(outg, bf16, Nk * s->d_out);
    MOE_TAKE(dzp, bf16, Nk * mid);
    MOE_TAKE(dxg, bf16, Nk * s->d_in);
    MOE_TAKE(dW0p, float, E * n0);
    MOE_TAKE(dW1p, float, E * n1);
    MOE_TAKE(h, float, Nk);
    MOE_TAKE(dl, float, (size_t)N * E);
    MOE_TAKE(part, float, part);
    MOE_TAKE(counts, int, nch * E);
    MOE_TAKE(base, int, nch * E);
#undef MOE_TAKE
    if (bytes) *bytes = o;
    return v;
}
static size_t moe_gpu_scratch_bytes(const Structure *s, int N) {
    size_t b;
    moe_gpu_scratch_view(s, NULL, N, &b);
    return b;
}

// ----------------------------------------------------------------------------------------------
// Routing and grouping

// One warp per token n: logits (fp32, lane-strided sums and a butterfly: a fixed order), the full
// softmax probs (N, E) and lse (N); the top k (highest first, ties to the lower index, as a stable
// descending sort); the gates, softmax over the selected (moe.h's formulas).
__global__ void moe_route_kernel(float *probs, float *lse, int *sel, float *gate, const bf16 *x, const bf16 *G, int N,
                                 int d_in, int E, int k) {
    __shared__ float logits[8][MOE_MAX_EXPERTS];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n = blockIdx.x * 8 + warp;
    if (n >= N) return;
    const bf16 *xr = x + (size_t)n * d_in;
    for (int e = 0; e < E; e++) {
        const bf16 *g = G + (size_t)e * d_in;
        float s = 0.0f;
        for (int c = lane; c < d_in; c += 32) s += __bfloat162float(xr[c]) * __bfloat162float(g[c]);
        s = warp_sum(s);
        if (lane == 0) logits[warp][e] = s;
    }
    __syncwarp();
    if (lane != 0) return;
    const float *l = logits[warp];
    float mx = l[0], sum = 0.0f, gsum = 0.0f;
    for (int e = 1; e < E; e++) mx = fmaxf(mx, l[e]);
    for (int e = 0; e < E; e++) sum += expf(l[e] - mx);
    for (int e = 0; e < E; e++) probs[(size_t)n * E + e] = expf(l[e] - mx) / sum;
    lse[n] = mx + logf(sum);
    unsigned long long taken = 0;
    for (int t = 0; t < k; t++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!(taken >> e & 1) && (best < 0 || l[e] > l[best])) best = e;   // strict >: ties keep the lower index
        taken |= 1ull << best;
        sel[(size_t)n * k + t] = best;
        gsum += expf(l[best] - mx);
    }
    for (int t = 0; t < k; t++) gate[(size_t)n * k + t] = expf(l[sel[(size_t)n * k + t]] - mx) / gsum;
}

// The slot of token n routed to expert e (-1: none; a token selects an expert at most once).
__device__ __forceinline__ int moe_slot(const int *sel, int n, int N, int k, int e) {
    int slot = -1;
    if (n < N)
        for (int t = 0; t < k; t++)
            if (sel[(size_t)n * k + t] == e) slot = t;
    return slot;
}

// counts (chunks, E): tokens of chunk c (MOE_CHUNK of them) routed to each expert.
__global__ void moe_count_kernel(int *counts, const int *sel, int N, int k, int E) {
    __shared__ int warp_n[MOE_CHUNK / 32];
    int n = blockIdx.x * MOE_CHUNK + threadIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int e = 0; e < E; e++) {
        unsigned mask = __ballot_sync(0xffffffffu, moe_slot(sel, n, N, k, e) >= 0);
        if (lane == 0) warp_n[warp] = __popc(mask);
        __syncthreads();
        if (threadIdx.x == 0) {
            int c = 0;
            for (int w = 0; w < MOE_CHUNK / 32; w++) c += warp_n[w];
            counts[blockIdx.x * E + e] = c;
        }
        __syncthreads();
    }
}

// One block: base (chunks, E) = first grouped row of chunk c's tokens of expert e; goff (E + 1).
__global__ void moe_scan_kernel(int *base, int *goff, const int *counts, int nch, int E) {
    __shared__ int total[MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int s = 0;
        for (int c = 0; c < nch; c++) { base[c * E + e] = s; s += counts[c * E + e]; }
        total[e] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        goff[0] = 0;
        for (int e = 0; e < E; e++) goff[e + 1] = goff[e] + total[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        for (int c = 0; c < nch; c++) base[c * E + e] += goff[e];
}

// pos (N*k), src (N*k): each chunk's tokens of expert e take consecutive grouped rows from base, in token order.
__global__ void moe_scatter_kernel(int *pos, int *src, const int *sel, const int *base, int N, int k, int E) {
    __shared__ int warp_n[MOE_CHUNK / 32];
    int n = blockIdx.x * MOE_CHUNK + threadIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int e = 0; e < E; e++) {
        int slot = moe_slot(sel, n, N, k, e);
        unsigned mask = __ballot_sync(0xffffffffu, slot >= 0);
        if (lane == 0) warp_n[warp] = __popc(mask);
        __syncthreads();
        if (slot >= 0) {
            int r = base[blockIdx.x * E + e] + __popc(mask & ((1u << lane) - 1u));
            for (int w = 0; w < warp; w++) r += warp_n[w];
            pos[(size_t)n * k + slot] = r;
            src[r] = n * k + slot;
        }
        __syncthreads();
    }
}

// W0p[e][i1][j0][i0] = W0[i1][(j0 e)][i0];  W1p[e][j0][j1][i1] = W1[j0][j1][(i1 e)]
__global__ void moe_pack_kernel(bf16 *W0p, bf16 *W1p, const bf16 *W0, const bf16 *W1, int E, int m1, int m0, int n0,
                                int n1) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, n0w = (size_t)E * m1 * n0 * m0, n1w = (size_t)E * n0 * n1 * m1;
    if (idx < n0w) {
        int i0 = idx % m0, j0 = (idx / m0) % n0, i1 = (idx / ((size_t)m0 * n0)) % m1, e = idx / ((size_t)m0 * n0 * m1);
        W0p[idx] = W0[(((size_t)i1 * n0 + j0) * E + e) * m0 + i0];
    } else if (idx < n0w + n1w) {
        idx -= n0w;
        int i1 = idx % m1, j1 = (idx / m1) % n1, j0 = (idx / ((size_t)m1 * n1)) % n0, e = idx / ((size_t)m1 * n1 * n0);
        W1p[idx] = W1[(((size_t)j0 * n1 + j1) * m1 + i1) * E + e];
    }
}
// dW0[i1][(j0 e)][i0] (+)= dW0p[e][i1][j0][i0];  dW1[j0][j1][(i1 e)] (+)= dW1p[e][j0][j1][i1]
__global__ void moe_unpack_grads_kernel(bf16 *dW0, bf16 *dW1, const float *dW0p, const float *dW1p, int E, int m1,
                                        int m0, int n0, int n1, int accumulate) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, n0w = (size_t)E * m1 * n0 * m0, n1w = (size_t)E * n0 * n1 * m1;
    bf16 *d;
    float v;
    if (idx < n0w) {
        int i0 = idx % m0, e = (idx / m0) % E, j0 = (idx / ((size_t)m0 * E)) % n0, i1 = idx / ((size_t)m0 * E * n0);
        d = dW0 + idx;
        v = dW0p[(((size_t)e * m1 + i1) * n0 + j0) * m0 + i0];
    } else if (idx < n0w + n1w) {
        idx -= n0w;
        int e = idx % E, i1 = (idx / E) % m1, j1 = (idx / ((size_t)E * m1)) % n1, j0 = idx / ((size_t)E * m1 * n1);
        d = dW1 + idx;
        v = dW1p[(((size_t)e * n0 + j0) * n1 + j1) * m1 + i1];
    } else {
        return;
    }
    *d = __float2bfloat16(accumulate ? __bfloat162float(*d) + v : v);
}

// y[n, c] = sum_t g_{n,t} out[pos[n*k + t], c] + b[c], slots in order; gelu_pre: y = gelu(v), gelu_pre = v.
__global__ void moe_combine_kernel(bf16 *y, bf16 *gelu_pre, const bf16 *outg, const int *pos, const float *gate,
                                   const bf16 *bias, int N, int k, int d_out) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * d_out) return;
    int n = idx / d_out, c = idx % d_out;
    float v = 0.0f;
    for (int t = 0; t < k; t++)
        v += gate[(size_t)n * k + t] * __bfloat162float(outg[(size_t)pos[(size_t)n * k + t] * d_out + c]);
    if (bias) v += __bfloat162float(bias[c]);
    if (gelu_pre) {
        gelu_pre[idx] = __float2bfloat16(v);
        v = bd_gelu(v);
    }
    y[idx] = __float2bfloat16(v);
}

// aux[0] = E sum_e P_e f_e + z_weight mean_n lse_n^2, aux[1 + e] = f_e. One block of 256 threads: each
// thread sums a fixed stride of tokens, then a block tree (fixed order).
__global__ void moe_aux_kernel(float *aux, const float *probs, const float *lse, const int *goff, int N, int k, int E,
                               float z_weight) {
    __shared__ float sh[32];
    float total = 0.0f;
    for (int e = 0; e < E; e++) {
        float s = 0.0f;
        for (int n = threadIdx.x; n < N; n += blockDim.x) s += probs[(size_t)n * E + e];
        s = block_sum(s, sh);
        float f = (float)(goff[e + 1] - goff[e]) / ((float)N * k);
        total += s / N * f;
        if (threadIdx.x == 0) aux[1 + e] = f;
    }
    float z = 0.0f;
    for (int n = threadIdx.x; n < N; n += blockDim.x) z += lse[n] * lse[n];
    z = block_sum(z, sh);
    if (threadIdx.x == 0) aux[0] = E * total + z_weight * z / N;
}

// ----------------------------------------------------------------------------------------------
// Backward kernels

// h[src[r]] = dz'_r . z'_r, one warp per grouped row.
__global__ void moe_h_kernel(float *h, const bf16 *dzp, const bf16 *zp, const int *src, int rows, int mid) {
    int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;
    float s = 0.0f;
    for (int c = lane; c < mid; c += 32)
        s += __bfloat162float(dzp[(size_t)r * mid + c]) * __bfloat162float(zp[(size_t)r * mid + c]);
    s = warp_sum(s);
    if (lane == 0) h[src[r]] = s;
}

// dl (N, E) = d objective / d logits of token n (moe.h's moe_router_dlogits): with p the full softmax,
// f the routed fractions, h_t = g_t dL/dg_t:
//   dl_j = daux ((E/N) p_j (f_j - sum_e f_e p_e) + (2 z_weight / N) lse_n p_j) + [j = sel_t] (h_t - g_t sum_t' h_t')
__global__ void moe_dlogits_kernel(float *dl, const float *probs, const float *lse, const float *gate, const int *sel,
                                   const float *h, const int *goff, int N, int k, int E, float daux, float z_weight) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float *p = probs + (size_t)n * E;
    double fp = 0.0, hs = 0.0, zl = 2.0 * z_weight / N * lse[n], slots = (double)N * k;
    for (int e = 0; e < E; e++) fp += (goff[e + 1] - goff[e]) / slots * p[e];
    for (int e = 0; e < E; e++)
        dl[(size_t)n * E + e] = (float)(daux * ((double)E / N * p[e] * ((goff[e + 1] - goff[e]) / slots - fp) + zl * p[e]));
    for (int t = 0; t < k; t++) hs += h[(size_t)n * k + t];
    for (int t = 0; t < k; t++)
        dl[(size_t)n * E + sel[(size_t)n * k + t]] += (float)(h[(size_t)n * k + t] - gate[(size_t)n * k + t] * hs);
}

// dx[n, c] = (sum_t dxg[pos[n*k + t], c] + sum_e dl[n, e] G[e, c]) (* gelu'(pre[n, c])), overwritten.
__global__ void moe_dx_kernel(bf16 *dx, const bf16 *dxg, const int *pos, const float *dl, const bf16 *G,
                              const bf16 *dgelu_pre, int N, int k, int E, int d_in) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * d_in) return;
    int n = idx / d_in, c = idx % d_in;
    float v = 0.0f;
    for (int t = 0; t < k; t++) v += __bfloat162float(dxg[(size_t)pos[(size_t)n * k + t] * d_in + c]);
    for (int e = 0; e < E; e++) v += dl[(size_t)n * E + e] * __bfloat162float(G[(size_t)e * d_in + c]);
    if (dgelu_pre) v *= bd_gelu_grad(__bfloat162float(dgelu_pre[idx]));
    dx[idx] = __float2bfloat16(v);
}

// part[s][e][c] = sum over tokens of chunk s of dl[n, e] x[n, c] (S chunks of ceil(N/S) tokens).
__global__ void moe_dG_partial_kernel(float *part, const float *dl, const bf16 *x, int N, int E, int d_in, int S) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (idx >= (size_t)E * d_in) return;
    int e = idx / d_in, c = idx % d_in, chunk = (N + S - 1) / S, lo = s * chunk, hi = min(N, lo + chunk);
    float sum = 0.0f;
    for (int n = lo; n < hi; n++) sum += dl[(size_t)n * E + e] * __bfloat162float(x[(size_t)n * d_in + c]);
    part[(size_t)s * E * d_in + idx] = sum;
}

// ----------------------------------------------------------------------------------------------
// The layer

// Routing, grouping and packing, shared by forward and backward's repacking.
static void moe_pack(const Structure *s, const MoeGpuScratch *sc, const bf16 *W0, const bf16 *W1, cudaStream_t st) {
    int E = s->experts;
    size_t n = (size_t)E * s->m1 * s->n0 * s->m0 + (size_t)E * s->n0 * s->n1 * s->m1;
    LAUNCH(ceil_div(n, 256), 256, 0, st, moe_pack_kernel)(sc->W0p, sc->W1p, W0, W1, E, s->m1, s->m0, s->n0, s->n1);
    cudaCheck(cudaGetLastError());
}

// The expert cores as blockdiag.cuh operands: stage 1 core {m1 blocks, m0 -> n0}, stage 2 {n0, m1 -> n1}.
static CoreShape moe_core0(const Structure *s) { CoreShape c = {s->m1, s->m0, s->n0}; return c; }
static CoreShape moe_core1(const Structure *s) { CoreShape c = {s->n0, s->m1, s->n1}; return c; }
static TokenPermute moe_mid_perm(const Structure *s) { TokenPermute t = {s->m1, s->n0, 1}; return t; }

// y (N, d_out) = the layer's output + bias (GELU with gelu_pre, as structured_forward_gpu), overwritten.
// saved: moe_gpu_saved_bytes (kept for backward; holds the aux loss and loads: moe_gpu_aux); scratch:
// moe_gpu_scratch_bytes.
static void moe_forward_gpu(const Structure *s, bf16 *y, const bf16 *x, const bf16 *W0, const bf16 *W1, const bf16 *G,
                            const bf16 *bias, bf16 *gelu_pre, float z_weight, void *saved, void *scratch, int N,
                            cudaStream_t st) {
    int E = s->experts, k = s->top_k, mid = moe_mid_gpu(s), nch = ceil_div(N, MOE_CHUNK), Nk = N * k;
    MoeGpuSaved sv = moe_gpu_saved_view(s, saved, N, NULL);
    MoeGpuScratch sc = moe_gpu_scratch_view(s, scratch, N, NULL);
    if (E > MOE_MAX_EXPERTS) { fprintf(stderr, "error: btt_moe on the GPU supports at most %d experts\n", MOE_MAX_EXPERTS); exit(1); }
    LAUNCH(ceil_div(N, 8), 256, 0, st, moe_route_kernel)(sv.probs, sv.lse, sv.sel, sv.gate, x, G, N, s->d_in, E, k);
    cudaCheck(cudaGetLastError());
    LAUNCH(nch, MOE_CHUNK, 0, st, moe_count_kernel)(sc.counts, sv.sel, N, k, E);
    cudaCheck(cudaGetLastError());
    LAUNCH(1, 64, 0, st, moe_scan_kernel)(sc.base, sv.goff, sc.counts, nch, E);
    cudaCheck(cudaGetLastError());
    LAUNCH(nch, MOE_CHUNK, 0, st, moe_scatter_kernel)(sv.pos, sv.src, sv.sel, sc.base, N, k, E);
    cudaCheck(cudaGetLastError());
    LAUNCH(1, 256, 0, st, moe_aux_kernel)(sv.aux, sv.probs, sv.lse, sv.goff, N, k, E, z_weight);
    cudaCheck(cudaGetLastError());
    moe_pack(s, &sc, W0, W1, st);

    BdAct xg = bd_act(x, s->d_in, BD_NO_PERM);
    xg.rows = sv.src;
    xg.rows_div = k;
    long long w0s = (long long)s->m1 * s->n0 * s->m0, w1s = (long long)s->n0 * s->n1 * s->m1;
    if (bd_kernel() == BD_KERNEL_TC && bd_fused_rows(mid) > 0 && s->m1 % 2 == 0) {
        BdFused f;
        memset(&f, 0, sizeof f);
        f.x = xg;
        f.W0 = sc.W0p;
        f.W1 = sc.W1p;
        f.w0stride = w0s;
        f.w1stride = w1s;
        f.c0 = moe_core0(s);
        f.c1 = moe_core1(s);
        f.mid = moe_mid_perm(s);
        f.out = BD_NO_PERM;
        f.mid_w = mid;
        f.nrows = Nk;
        f.G = E;
        f.goff = sv.goff;
        f.saved = sv.zp;
        f.y = sc.outg;
        f.ldy = s->d_out;
        bd_fused_launch(f, st);
    } else {
        CoreShape c0 = moe_core0(s), c1 = moe_core1(s);
        BdArgs g = bd_args(sc.W0p, c0.nb, c0.p, c0.q, Nk);
        g.wstride = w0s;
        g.goff = sv.goff;
        g.G = E;
        g.a = xg;
        g.y = sv.zp;
        g.ldy = mid;
        g.yperm = bd_perm_norm(moe_mid_perm(s));
        bd_run(g, BD_FWD, NULL, NULL, 0, NULL, st);
        g = bd_args(sc.W1p, c1.nb, c1.p, c1.q, Nk);
        g.wstride = w1s;
        g.goff = sv.goff;
        g.G = E;
        g.a = bd_act(sv.zp, mid, BD_NO_PERM);
        g.y = sc.outg;
        g.ldy = s->d_out;
        bd_run(g, BD_FWD, NULL, NULL, 0, NULL, st);
    }
    LAUNCH(ceil_div((long)N * s->d_out, 256), 256, 0, st, moe_combine_kernel)(y, gelu_pre, sc.outg, sv.pos, sv.gate, bias,
                                                                               N, k, s->d_out);
    cudaCheck(cudaGetLastError());
}

// dx (N, d_in) overwritten (* gelu'(dgelu_pre) when given); dW0, dW1 accumulated (accumulate 1) or
// overwritten (0: rms_cap's dW_eff); dG accumulated. daux = d objective / d (this layer's aux loss). x, W0, W1, G, saved as in forward.
static void moe_backward_gpu(const Structure *s, bf16 *dx, bf16 *dW0, bf16 *dW1, bf16 *dG, int accumulate,
                             const bf16 *dy, float daux, float z_weight, const bf16 *x, const bf16 *W0, const bf16 *W1,
                             const bf16 *G, void *saved, const bf16 *dgelu_pre, void *scratch, int N, cudaStream_t st) {
    int E = s->experts, k = s->top_k, mid = moe_mid_gpu(s), Nk = N * k;
    MoeGpuSaved sv = moe_gpu_saved_view(s, saved, N, NULL);
    MoeGpuScratch sc = moe_gpu_scratch_view(s, scratch, N, NULL);
    CoreShape c0 = moe_core0(s), c1 = moe_core1(s);
    long long w0s = (long long)s->m1 * s->n0 * s->m0, w1s = (long long)s->n0 * s->n1 * s->m1;
    moe_pack(s, &sc, W0, W1, st);
    BdAct D = bd_act(dy, s->d_out, BD_NO_PERM);   // D_r = g dy of grouped row r
    D.rows = sv.src;
    D.rows_div = k;
    D.scale = sv.gate;
    BdAct dz = bd_act(sc.dzp, mid, moe_mid_perm(s));   // dz[L] = dz'[mid(L)]
    BdAct xg = bd_act(x, s->d_in, BD_NO_PERM);
    xg.rows = sv.src;
    xg.rows_div = k;

    // stage 2: dW1p = D^T z', dz' = D W1p
    BdArgs g = bd_args(NULL, c1.nb, c1.p, c1.q, Nk);
    g.goff = sv.goff;
    g.G = E;
    g.a = D;
    g.b = bd_act(sv.zp, mid, BD_NO_PERM);
    bd_run(g, BD_BWD_W, NULL, sc.dW1p, 0, sc.part, st);
    g = bd_args(sc.W1p, c1.nb, c1.p, c1.q, Nk);
    g.wstride = w1s;
    g.goff = sv.goff;
    g.G = E;
    g.a = D;
    g.y = sc.dzp;
    g.ldy = mid;
    bd_run(g, BD_BWD_IN, NULL, NULL, 0, NULL, st);
    LAUNCH(ceil_div(Nk, 8), 256, 0, st, moe_h_kernel)(sc.h, sc.dzp, sv.zp, sv.src, Nk, mid);
    cudaCheck(cudaGetLastError());
    // stage 1: dW0p = dz^T x, dxg = dz W0p
    g = bd_args(NULL, c0.nb, c0.p, c0.q, Nk);
    g.goff = sv.goff;
    g.G = E;
    g.a = dz;
    g.b = xg;
    bd_run(g, BD_BWD_W, NULL, sc.dW0p, 0, sc.part, st);
    g = bd_args(sc.W0p, c0.nb, c0.p, c0.q, Nk);
    g.wstride = w0s;
    g.goff = sv.goff;
    g.G = E;
    g.a = dz;
    g.y = sc.dxg;
    g.ldy = s->d_in;
    bd_run(g, BD_BWD_IN, NULL, NULL, 0, NULL, st);
    // router, dx, dG
    LAUNCH(ceil_div(N, 256), 256, 0, st, moe_dlogits_kernel)(sc.dl, sv.probs, sv.lse, sv.gate, sv.sel, sc.h, sv.goff, N,
                                                             k, E, daux, z_weight);
    cudaCheck(cudaGetLastError());
    LAUNCH(ceil_div((long)N * s->d_in, 256), 256, 0, st, moe_dx_kernel)(dx, sc.dxg, sv.pos, sc.dl, G, dgelu_pre, N, k, E,
                                                                         s->d_in);
    cudaCheck(cudaGetLastError());
    int S = moe_dG_splits(N);
    LAUNCH(dim3(ceil_div((long)E * s->d_in, 256), S), 256, 0, st, moe_dG_partial_kernel)(sc.part, sc.dl, x, N, E, s->d_in, S);
    cudaCheck(cudaGetLastError());
    LAUNCH(ceil_div((long)E * s->d_in, 256), 256, 0, st, bd_weight_finalize_kernel)(dG, NULL, sc.part, S,
                                                                                     (size_t)E * s->d_in, 1);
    cudaCheck(cudaGetLastError());
    size_t n = (size_t)E * (s->m1 * s->n0 * s->m0 + (size_t)s->n0 * s->n1 * s->m1);
    LAUNCH(ceil_div(n, 256), 256, 0, st, moe_unpack_grads_kernel)(dW0, dW1, sc.dW0p, sc.dW1p, E, s->m1, s->m0, s->n0,
                                                                 s->n1, accumulate);
    cudaCheck(cudaGetLastError());
}

#endif
