// BTT-MoE on the CPU (DESIGN 3.6): a mixture of experts inside one linear layer, fp32.
// The layer's cores are those of the rank-E BTT (llmc/structure.h, STRUCT_BTT_MOE):
//   W0 (m1, n0*E, m0), W1 (n0, n1, m1*E), router G (E, d_in); d_in = m1*m0, d_out = n0*n1.
// Expert e is the rank-1 BTT with cores W0[:, (j0 e), :] and W1[j0, :, (i1 e)]:
//   logits = x G^T (N, E); S_n = top-k of logits_n (ties to the lower expert index);
//   g_n = softmax of logits_n over S_n;   y_n = sum_{e in S_n} g_{n,e} BTT_e(x_n)   (no bias).
//
// API (N tokens; E = s->experts, k = s->top_k; mid = m1*n0, one expert's intermediate width):
//   size_t moe_saved_floats(s, N)     kept from forward for backward: z' of every routed slot (N*k, mid),
//                                     the full softmax (N, E) and logsumexp (N) of the logits, the gates
//                                     (N, k), and the routing as ints in float slots
//   size_t moe_scratch_floats(s, N)   temporaries of forward and backward (contents not kept); depends
//                                     on omp_get_max_threads(), which must not grow before the layer runs
//   float moe_forward(s, y, x, W0, W1, G, z_weight, saved, scratch, N, load)
//       y (N, d_out) overwritten; x (N, d_in); returns the layer's aux loss
//         aux = E sum_e P_e f_e + z_weight mean_n lse(logits_n)^2
//       (P_e: mean over tokens of the full softmax over E; f_e: fraction of the N*k routed slots going
//       to e, a count: not differentiated); load (E) gets f (sums to 1), may be NULL.
//   void moe_backward(s, dx, dW0, dW1, dG, dy, daux, z_weight, x, W0, W1, G, saved, scratch, N)
//       dx (N, d_in) overwritten (experts and router); dW0, dW1, dG accumulated; dy (N, d_out);
//       daux = d(objective)/d(this layer's aux); x, W0, W1, G, saved as given to moe_forward.
// Results are bit-identical run to run for a fixed thread count (every sum has a fixed order).
//
// How: the N*k (token, slot) pairs are grouped by (slot, expert), a stable counting sort. Slot by slot,
// each group's rows are cut into chunks of BD_TC tokens, and a thread takes a chunk through both stages
// of its expert while it is in cache, with blockdiag.h's chunk kernels (bd_apply_rows, bd_weight_rows,
// bd_transpose_rows) on the expert's cores packed once per call: gather x's rows, stage 1, the
// permutation (z' saved), stage 2, then y_n (+)= g * out. Within one slot every token appears once, so
// the threads write disjoint rows of y (and dx in backward) and the slots are summed in slot order.
// Weight and router gradients are summed per thread, then in thread order (as blockdiag.h's fused BTT).
// Memory sees x once for the router and once per slot, z', y once per slot: close to what k rank-1
// BTTs on all tokens see (the gathers and the combine run on chunks in cache).
// The gathers and scatters are most of the routing overhead (one thread, mlp_proj shape: 32 ms of
// copies in a layer 36 ms slower than k rank-1 BTTs; 2026-11-23). Measured and not better, pinned to
// one core: reading and writing the rows in place through token tables in the chunk kernels (with
// and without prefetching the same rows' next block), grouping by ranges of 256..1024 tokens so that
// x and dx stay in the last-level cache (the kernels then reload every expert's cores per range), and
// prefetching the next chunk's rows while this one computes. Random rows are not followed by the
// hardware prefetchers, and on this machine no software prefetch made their DRAM traffic overlap the
// compute.
//
// Baseline, for tests and benchmarks (what the BTT-MoE papers' code does): all E experts computed on
// every token as the rank-E BTT, the intermediate masked by the gates; same routing, aux and API:
//   moe_dense_masked_saved_floats, moe_dense_masked_scratch_floats, moe_dense_masked_forward,
//   moe_dense_masked_backward.
#ifndef LLMC_MOE_H
#define LLMC_MOE_H

#include <math.h>
#include <stddef.h>
#include <string.h>
#include <cblas.h>
#include <omp.h>
#include "llmc/blockdiag.h"
#include "llmc/structure.h"

_Static_assert(sizeof(int) == sizeof(float), "moe.h keeps ints in float slots");

typedef float moe_vec __attribute__((vector_size(BD_VW * 4), aligned(4), may_alias));
// Pins a vector in a register (an empty asm): see moe_logits_tile. Only where such a register exists.
#if defined(__x86_64__) && defined(__OPTIMIZE__) && \
    ((defined(__AVX512F__) && BD_VW == 16) || (defined(__AVX__) && BD_VW == 8))
#define MOE_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define MOE_IN_REGISTER(v) ((void)0)
#endif

static int moe_mid(const Structure *s) { return s->m1 * s->n0; }

// a . b over n floats: vector partial sums, then lanes and tail in a fixed order.
static float moe_dot(const float *a, const float *b, int n) {
    moe_vec s0 = {0}, s1 = {0};
    int i = 0;
    for (; i + 2 * BD_VW <= n; i += 2 * BD_VW) {
        s0 += *(const moe_vec *)(a + i) * *(const moe_vec *)(b + i);
        s1 += *(const moe_vec *)(a + i + BD_VW) * *(const moe_vec *)(b + i + BD_VW);
    }
    for (; i + BD_VW <= n; i += BD_VW) s0 += *(const moe_vec *)(a + i) * *(const moe_vec *)(b + i);
    s0 += s1;
    float lanes[BD_VW], sum = 0.0f;
    memcpy(lanes, &s0, sizeof lanes);
    for (int l = 0; l < BD_VW; l++) sum += lanes[l];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

// Views into the saved buffer: zfloats of intermediates first, then the routing.
typedef struct {
    float *z;       // grouped path: z' (N*k, mid) of each grouped row; baseline: z (N, mid*E)
    float *probs;   // (N, E) full softmax of the logits
    float *lse;     // (N) logsumexp of the logits
    float *gate;    // (N, k): slot t of token n at n*k + t
    int *sel;       // (N, k): selected experts, highest logit first
    int *src;       // (N*k): slot n*k + t of grouped row r (its token: src[r] / k)
    int *off;       // (k*E + 1): group (t, e) = grouped rows [off[t*E + e], off[t*E + e + 1])
} MoeSaved;

static size_t moe_routing_floats(const Structure *s, int N) {
    size_t Nk = (size_t)N * s->top_k;
    return (size_t)N * (s->experts + 1) + 3 * Nk + (size_t)s->top_k * s->experts + 1;
}

static MoeSaved moe_saved_view(const Structure *s, const float *saved, size_t zfloats, int N) {
    size_t Nk = (size_t)N * s->top_k;
    MoeSaved v;
    v.z = (float *)saved;
    v.probs = v.z + zfloats;
    v.lse = v.probs + (size_t)N * s->experts;
    v.gate = v.lse + N;
    v.sel = (int *)(v.gate + Nk);
    v.src = v.sel + Nk;
    v.off = v.src + Nk;
    return v;
}

// Routed slots of expert e over all k slots (f_e = this / (N*k)).
static int moe_count(const Structure *s, const int *off, int e) {
    int c = 0;
    for (int t = 0; t < s->top_k; t++) c += off[t * s->experts + e + 1] - off[t * s->experts + e];
    return c;
}

// ----------------------------------------------------------------------------
// Routing, grouping, aux loss and the router's backward (shared by the grouped path and the baseline)

// logits (rows, E) for `rows` consecutive tokens: out[t*E + e] = x_t . G_e, TB tokens x EB experts at a
// time (each x and G vector loaded once per tile), one vector accumulator per (token, expert): every
// logit is the same sequence of operations whatever its tile, so it does not depend on N or E.
static inline __attribute__((always_inline)) void moe_logits_tile(const int TB, const int EB, const float *x, const float *G,
                                                                  int d_in, float *out, int E) {
    moe_vec acc[4][4];
    #pragma GCC unroll 4
    for (int t = 0; t < TB; t++)
        #pragma GCC unroll 4
        for (int e = 0; e < EB; e++) acc[t][e] = (moe_vec){0};
    int c = 0;
    for (; c + BD_VW <= d_in; c += BD_VW) {
        moe_vec gv[4], xv[4];
        // Each operand loaded into a register once (the empty asm keeps gcc from re-reading them as
        // memory operands of every FMA, which made this 2.5x slower).
        #pragma GCC unroll 4
        for (int e = 0; e < EB; e++) { gv[e] = *(const moe_vec *)(G + (size_t)e * d_in + c); MOE_IN_REGISTER(gv[e]); }
        #pragma GCC unroll 4
        for (int t = 0; t < TB; t++) { xv[t] = *(const moe_vec *)(x + (size_t)t * d_in + c); MOE_IN_REGISTER(xv[t]); }
        #pragma GCC unroll 4
        for (int t = 0; t < TB; t++)
            #pragma GCC unroll 4
            for (int e = 0; e < EB; e++) acc[t][e] += xv[t] * gv[e];
    }
    for (int t = 0; t < TB; t++)
        for (int e = 0; e < EB; e++) {
            float lanes[BD_VW], sum = 0.0f;
            memcpy(lanes, &acc[t][e], sizeof lanes);
            for (int l = 0; l < BD_VW; l++) sum += lanes[l];
            for (int j = c; j < d_in; j++) sum += x[(size_t)t * d_in + j] * G[(size_t)e * d_in + j];
            out[(size_t)t * E + e] = sum;
        }
}

static void moe_logits(float *out, const float *x, const float *G, int rows, int d_in, int E) {
    for (int t = 0; t < rows; t += 4)
        for (int e = 0; e < E; e += 4) {
            const float *xt = x + (size_t)t * d_in, *Ge = G + (size_t)e * d_in;
            float *o = out + (size_t)t * E + e;
            if (t + 4 <= rows && e + 4 <= E) { moe_logits_tile(4, 4, xt, Ge, d_in, o, E); continue; }
            for (int tt = 0; tt < 4 && t + tt < rows; tt++)
                for (int ee = 0; ee < 4 && e + ee < E; ee++)
                    moe_logits_tile(1, 1, xt + (size_t)tt * d_in, Ge + (size_t)ee * d_in, d_in, o + (size_t)tt * E + ee, E);
        }
}

// Per token: logits = G x_n; probs, lse: the full softmax and logsumexp (max subtracted: stable); sel:
// the top k, highest first, ties to the lower index (what a stable descending sort gives); gate: the
// softmax over them (from the same exponentials: exp(l - max) / sum over the selected).
static void moe_route(const Structure *s, const MoeSaved *sv, const float *x, const float *G, int N) {
    int E = s->experts, k = s->top_k, d_in = s->d_in, nchunks = (N + BD_TC - 1) / BD_TC;
    #pragma omp parallel for schedule(static)
    for (int ch = 0; ch < nchunks; ch++) {
        int n0 = ch * BD_TC, rows = N - n0 < BD_TC ? N - n0 : BD_TC;
        float logits[BD_TC * E];
        moe_logits(logits, x + (size_t)n0 * d_in, G, rows, d_in, E);
        for (int n = n0; n < n0 + rows; n++) {
            float *l = logits + (size_t)(n - n0) * E, ex[E], mx = l[0], sum = 0.0f, gsum = 0.0f;
            int *sn = sv->sel + (size_t)n * k;
            for (int e = 1; e < E; e++) if (l[e] > mx) mx = l[e];
            for (int e = 0; e < E; e++) { ex[e] = expf(l[e] - mx); sum += ex[e]; }
            for (int e = 0; e < E; e++) sv->probs[(size_t)n * E + e] = ex[e] / sum;
            sv->lse[n] = mx + logf(sum);
            for (int t = 0; t < k; t++) {
                int best = -1;
                for (int e = 0; e < E; e++) {
                    int taken = 0;
                    for (int u = 0; u < t; u++) taken |= sn[u] == e;
                    if (!taken && (best < 0 || l[e] > l[best])) best = e;  // strict >: ties keep the lower index
                }
                sn[t] = best;
                gsum += ex[best];
            }
            for (int t = 0; t < k; t++) sv->gate[(size_t)n * k + t] = ex[sn[t]] / gsum;
        }
    }
}

// Stable grouping of the N*k slots by (slot, expert): off by an exclusive scan of the counts; within a
// group tokens ascend. src: grouped row -> slot. O(N*k), serial.
static void moe_group(const Structure *s, const MoeSaved *sv, int N) {
    int E = s->experts, k = s->top_k, G = k * E;
    int *off = sv->off, cursor[G];
    for (int g = 0; g <= G; g++) off[g] = 0;
    for (int i = 0; i < N * k; i++) off[(i % k) * E + sv->sel[i] + 1]++;
    for (int g = 0; g < G; g++) off[g + 1] += off[g];
    for (int g = 0; g < G; g++) cursor[g] = off[g];
    for (int i = 0; i < N * k; i++) sv->src[cursor[(i % k) * E + sv->sel[i]]++] = i;
}

// aux = E sum_e P_e f_e + z_weight mean_n lse_n^2, summed serially in double (a fixed order).
static float moe_aux_loss(const Structure *s, const MoeSaved *sv, int N, float z_weight, float *load) {
    int E = s->experts;
    double slots = (double)N * s->top_k, P[E], z = 0.0, aux = 0.0;
    for (int e = 0; e < E; e++) P[e] = 0.0;
    for (int n = 0; n < N; n++) {
        for (int e = 0; e < E; e++) P[e] += sv->probs[(size_t)n * E + e];
        z += (double)sv->lse[n] * sv->lse[n];
    }
    for (int e = 0; e < E; e++) {
        double f = moe_count(s, sv->off, e) / slots;
        aux += P[e] / N * f;
        if (load) load[e] = (float)f;
    }
    return (float)(E * aux + z_weight * z / N);
}

// dl (E) = d(objective)/d(logits of token n), from h (N*k): h_t = g_t * d/d(g_t), so that the
// softmax over the selected experts gives dl_j += h_j - g_j sum_t h_t (no division by a gate), plus
// daux times the aux loss's gradient
//   d aux / d l_j = (E/N) p_j (f_j - sum_e f_e p_e) + (2 z_weight / N) lse_n p_j   (p the full softmax).
// f (E): the routed fractions.
static void moe_router_dlogits(const Structure *s, float *dl, const MoeSaved *sv, const float *h, const double *f,
                               float daux, float z_weight, int n, int N) {
    int E = s->experts, k = s->top_k;
    const float *p = sv->probs + (size_t)n * E, *g = sv->gate + (size_t)n * k, *hn = h + (size_t)n * k;
    double fp = 0.0, hs = 0.0, zl = 2.0 * z_weight / N * sv->lse[n];
    for (int e = 0; e < E; e++) fp += f[e] * p[e];
    for (int e = 0; e < E; e++) dl[e] = (float)(daux * ((double)E / N * p[e] * (f[e] - fp) + zl * p[e]));
    for (int t = 0; t < k; t++) hs += hn[t];
    for (int t = 0; t < k; t++) dl[sv->sel[(size_t)n * k + t]] += (float)(hn[t] - g[t] * hs);
}

static void moe_fractions(const Structure *s, double *f, const int *off, int N) {
    for (int e = 0; e < s->experts; e++) f[e] = moe_count(s, off, e) / ((double)N * s->top_k);
}

// ----------------------------------------------------------------------------
// The grouped path: only the selected experts run

// Every expert's cores packed as bd_apply_rows reads them (B_i = P + i*nin*ldb, (nin, nout) row-major,
// rows of ldb >= nout rounded up to BD_VW, padding zero), straight from the strided slices:
// forward  P0 (E, m1, m0, ld n0): stage 1, W0_e^T;   P1 (E, n0, m1, ld n1): stage 2, W1_e^T
// backward Q1 (E, n0, n1, ld m1): W1_e for dz';      Q0 (E, m1, n0, ld m0): W0_e for dx
// with W0_e[i1, j0, i0] = W0[i1, (j0 e), i0] and W1_e[j0, j1, i1] = W1[j0, j1, (i1 e)].
typedef struct { int ld0, ld1; size_t e0, e1; } MoePack;  // row strides, floats per expert of each

static MoePack moe_pack_shape(const Structure *s, int backward) {
    int m1 = s->m1, m0 = s->m0, n0 = s->n0, n1 = s->n1;
    MoePack pk;
    pk.ld0 = bd_round_up(backward ? m0 : n0, BD_VW);
    pk.ld1 = bd_round_up(backward ? m1 : n1, BD_VW);
    pk.e0 = (size_t)m1 * (backward ? n0 : m0) * pk.ld0;
    pk.e1 = (size_t)n0 * (backward ? n1 : m1) * pk.ld1;
    return pk;
}

// Packed rows are written whole (contiguous), reading W0, W1 with strides from cache: the slices one
// block of each reads ((n0*E, m0) of W0, (n1, m1*E) of W1) are at most a few tens of KB.
static void moe_pack(const Structure *s, float *P0, float *P1, const float *W0, const float *W1, int backward) {
    int E = s->experts, m1 = s->m1, m0 = s->m0, n0 = s->n0, n1 = s->n1;
    MoePack pk = moe_pack_shape(s, backward);
    int rows0 = backward ? n0 : m0, cols0 = backward ? m0 : n0;   // per (e, i1): packed (rows0, ld0)
    int rows1 = backward ? n1 : m1, cols1 = backward ? m1 : n1;   // per (e, j0): packed (rows1, ld1)
    #pragma omp parallel for schedule(static)
    for (int i1 = 0; i1 < m1; i1++)
        for (int e = 0; e < E; e++) {  // experts inner: the block's slice of W0 is read from cache
            const float *w = W0 + (size_t)i1 * n0 * E * m0 + (size_t)e * m0;   // W0_e[i1, j0, i0] = w[j0*E*m0 + i0]
            float *p = P0 + e * pk.e0 + (size_t)i1 * rows0 * pk.ld0;
            for (int r = 0; r < rows0; r++) {
                float *q = p + (size_t)r * pk.ld0;
                if (backward) memcpy(q, w + (size_t)r * E * m0, (size_t)m0 * sizeof(float));  // row j0: W0_e[i1, j0, :]
                else for (int c = 0; c < n0; c++) q[c] = w[(size_t)c * E * m0 + r];              // row i0: W0_e[i1, :, i0]
                memset(q + cols0, 0, (size_t)(pk.ld0 - cols0) * sizeof(float));
            }
        }
    #pragma omp parallel for schedule(static)
    for (int j0 = 0; j0 < n0; j0++)
        for (int e = 0; e < E; e++) {
            const float *w = W1 + (size_t)j0 * n1 * m1 * E + e;   // W1_e[j0, j1, i1] = w[(j1*m1 + i1)*E]
            float *p = P1 + e * pk.e1 + (size_t)j0 * rows1 * pk.ld1;
            for (int r = 0; r < rows1; r++) {
                float *q = p + (size_t)r * pk.ld1;
                if (backward) for (int c = 0; c < m1; c++) q[c] = w[((size_t)r * m1 + c) * E];  // row j1
                else for (int c = 0; c < n1; c++) q[c] = w[((size_t)c * m1 + r) * E];           // row i1
                memset(q + cols1, 0, (size_t)(pk.ld1 - cols1) * sizeof(float));
            }
        }
}

// Work items: chunks of at most BD_TC rows of one (slot, expert) group, in group order: item i starts
// at grouped row items[2i] in group items[2i+1]; slot t's items are [first[t], first[t+1]).
static void moe_items(const Structure *s, const int *off, int *items, int *first) {
    int E = s->experts, n = 0;
    for (int t = 0; t < s->top_k; t++) {
        first[t] = n;
        for (int g = t * E; g < (t + 1) * E; g++)
            for (int r = off[g]; r < off[g + 1]; r += BD_TC) { items[2 * n] = r; items[2 * n + 1] = g; n++; }
    }
    first[s->top_k] = n;
}
static size_t moe_max_items(const Structure *s, int N) {
    return (size_t)N * s->top_k / BD_TC + (size_t)s->top_k * s->experts + 1;
}
// Item it: first grouped row, expert, row count.
static int moe_item(const Structure *s, const int *off, const int *items, int it, int *e, int *rows) {
    int r0 = items[2 * it], g = items[2 * it + 1];
    *e = g % s->experts;
    *rows = off[g + 1] - r0 < BD_TC ? off[g + 1] - r0 : BD_TC;
    return r0;
}

// Chunk rows are scattered over x, y, dy, dx, which the hardware prefetchers do not follow: a loop over
// them requests the lines of the row MOE_AHEAD rows ahead, so that several rows are in flight at once.
#define MOE_AHEAD 2
static void moe_prefetch_row(const float *row, int width, int for_write) {
    for (size_t b = 0; b < (size_t)width * sizeof(float); b += 64) {
        if (for_write) __builtin_prefetch((const char *)row + b, 1, 3);
        else __builtin_prefetch((const char *)row + b, 0, 3);
    }
}

// out (rows, width): row r = g_r * (base's row of the token of slot src[r]), g_r = gate[src[r]] (gate NULL: 1).
static void moe_gather_rows(float *out, const float *base, const int *src, const float *gate, int k, int rows,
                            int width) {
    for (int r = 0; r < rows; r++) {
        if (r + MOE_AHEAD < rows) moe_prefetch_row(base + (size_t)(src[r + MOE_AHEAD] / k) * width, width, 0);
        const float *in = base + (size_t)(src[r] / k) * width;
        float *o = out + (size_t)r * width;
        if (gate) { float g = gate[src[r]]; for (int c = 0; c < width; c++) o[c] = g * in[c]; }
        else memcpy(o, in, (size_t)width * sizeof(float));
    }
}

// The inverse, accumulating per slot: base's row of the token of slot src[r] = (add ? itself : 0) + g_r *
// row r of in (rows, width), g_r as above.
static void moe_scatter_rows(float *base, const float *in, const int *src, const float *gate, int k, int rows,
                             int width, int add) {
    for (int r = 0; r < rows; r++) {
        if (r + MOE_AHEAD < rows) moe_prefetch_row(base + (size_t)(src[r + MOE_AHEAD] / k) * width, width, 1);
        float *o = base + (size_t)(src[r] / k) * width, g = gate ? gate[src[r]] : 1.0f;
        const float *i = in + (size_t)r * width;
        if (add) for (int c = 0; c < width; c++) o[c] += g * i[c];
        else for (int c = 0; c < width; c++) o[c] = g * i[c];
    }
}

static size_t moe_saved_floats(const Structure *s, int N) {
    return (size_t)N * s->top_k * moe_mid(s) + moe_routing_floats(s, N);
}

// Per thread: forward x rows (BD_TC, d_in), z (BD_TC, mid), out (BD_TC, d_out); backward dy then dx
// rows (BD_TC, max(d_in, d_out)), x rows (BD_TC, d_in), dz' and dz (BD_TC, mid) each, the router's
// dlogits (BD_TC, E), bd_weight_rows' padded copy (BD_TC, max(m0, m1, d_in) rounded up), and the partial
// gradients: dW0, dW1 (E times one expert's) and dG (E, d_in).
static size_t moe_thread_floats(const Structure *s, int backward) {
    size_t E = s->experts, mid = moe_mid(s), d_in = s->d_in, d_out = s->d_out, wide = d_in > d_out ? d_in : d_out;
    if (!backward) return (size_t)BD_TC * (d_in + mid + d_out);
    int p = s->m0 > s->m1 ? s->m0 : s->m1;
    size_t xpw = bd_round_up(p > s->d_in ? p : s->d_in, BD_VW);
    size_t grads = E * ((size_t)s->m1 * s->n0 * s->m0 + (size_t)s->n0 * s->n1 * s->m1 + d_in);
    return (size_t)BD_TC * (wide + d_in + 2 * mid + E + xpw) + grads;
}

// Shared: packed cores (forward or backward), the work items (ints); in backward also h (N*k) and G
// padded to rows of d_in rounded up (E, ldG). Then the threads' own.
static size_t moe_scratch_floats(const Structure *s, int N) {
    size_t best = 0;
    for (int b = 0; b < 2; b++) {
        MoePack pk = moe_pack_shape(s, b);
        size_t n = s->experts * (pk.e0 + pk.e1) + 2 * moe_max_items(s, N) + s->top_k + 1 +
                   (b ? (size_t)N * s->top_k + (size_t)s->experts * bd_round_up(s->d_in, BD_VW) : 0) +
                   moe_thread_floats(s, b) * omp_get_max_threads();
        if (n > best) best = n;
    }
    return best;
}

static float moe_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1,
                         const float *G, float z_weight, float *saved, float *scratch, int N, float *load) {
    int E = s->experts, k = s->top_k, d_in = s->d_in, d_out = s->d_out, mid = moe_mid(s);
    int m1 = s->m1, m0 = s->m0, n0 = s->n0, n1 = s->n1, nth = omp_get_max_threads();
    MoeSaved sv = moe_saved_view(s, saved, (size_t)N * k * mid, N);
    if (N <= 0) return 0.0f;
    moe_route(s, &sv, x, G, N);
    moe_group(s, &sv, N);
    float aux = moe_aux_loss(s, &sv, N, z_weight, load);

    MoePack pk = moe_pack_shape(s, 0);
    float *P0 = scratch, *P1 = P0 + E * pk.e0;
    int *items = (int *)(P1 + E * pk.e1), *first = items + 2 * moe_max_items(s, N);
    float *per_thread = (float *)(first + k + 1);
    moe_pack(s, P0, P1, W0, W1, 0);
    moe_items(s, sv.off, items, first);
    #pragma omp parallel num_threads(nth)
    {
        float *xr = per_thread + (size_t)omp_get_thread_num() * moe_thread_floats(s, 0);
        float *zb = xr + (size_t)BD_TC * d_in, *ob = zb + (size_t)BD_TC * mid;
        for (int t = 0; t < k; t++) {
            // Items are independent (each writes its own rows of z' and y, summing nothing across
            // items): dynamic, as blockdiag.h's fused forward, so a thread the OS delays does not hold
            // up the others; the result does not depend on which thread takes an item.
            #pragma omp for schedule(dynamic, 1)
            for (int it = first[t]; it < first[t + 1]; it++) {
                int e, rows, r0 = moe_item(s, sv.off, items, it, &e, &rows);
                const int *src = sv.src + r0;
                float *zp = sv.z + (size_t)r0 * mid;
                moe_gather_rows(xr, x, src, NULL, k, rows, d_in);
                bd_apply_rows(zb, mid, xr, d_in, P0 + e * pk.e0, pk.ld0, rows, m1, m0, n0, 0.0f);
                bd_transpose_rows(zp, zb, rows, m1, n0, 1);
                bd_apply_rows(ob, d_out, zp, mid, P1 + e * pk.e1, pk.ld1, rows, n0, m1, n1, 0.0f);
                moe_scatter_rows(y, ob, src, sv.gate, k, rows, d_out, t > 0);  // slot 0 writes y_n, later slots add
            }
        }
    }
    return aux;
}

// Per chunk of expert e's rows of slot t, with D = g dy (gathered and gated) and z' saved:
//   dW1_e += D^T z';  dz' = D W1_e;  h = dz' . z' = g * d(objective)/dg  (dz' is already gated);
//   dz = dz' permuted back;  dW0_e += dz^T x;  dx_n (+)= dz W0_e.
// At the last slot every h of the chunk's tokens is known: their router gradient dl (rows, E) gives
// dx_n += dl G and dG += dl^T x (the x rows are in the chunk), on the same chunk kernels.
static void moe_backward(const Structure *s, float *dx, float *dW0, float *dW1, float *dG, const float *dy,
                         float daux, float z_weight, const float *x, const float *W0, const float *W1,
                         const float *G, const float *saved, float *scratch, int N) {
    int E = s->experts, k = s->top_k, d_in = s->d_in, d_out = s->d_out, mid = moe_mid(s);
    int m1 = s->m1, m0 = s->m0, n0 = s->n0, n1 = s->n1, nth = omp_get_max_threads();
    size_t e0 = (size_t)m1 * n0 * m0, e1 = (size_t)n0 * n1 * m1, wide = d_in > d_out ? d_in : d_out;
    size_t per = moe_thread_floats(s, 1);
    size_t grads = E * (e0 + e1 + d_in), bufs = per - grads;
    if (N <= 0) return;
    MoeSaved sv = moe_saved_view(s, saved, (size_t)N * k * mid, N);
    MoePack pk = moe_pack_shape(s, 1);
    int ldG = bd_round_up(d_in, BD_VW);
    float *Q0 = scratch, *Q1 = Q0 + E * pk.e0;
    int *items = (int *)(Q1 + E * pk.e1), *first = items + 2 * moe_max_items(s, N);
    float *h = (float *)(first + k + 1), *Gp = h + (size_t)N * k, *per_thread = Gp + (size_t)E * ldG;
    double f[E];
    moe_fractions(s, f, sv.off, N);
    moe_pack(s, Q0, Q1, W0, W1, 1);
    for (int e = 0; e < E; e++) {  // G as the B operand of dx += dlogits G: rows readable to ldG
        memcpy(Gp + (size_t)e * ldG, G + (size_t)e * d_in, (size_t)d_in * sizeof(float));
        memset(Gp + (size_t)e * ldG + d_in, 0, (size_t)(ldG - d_in) * sizeof(float));
    }
    moe_items(s, sv.off, items, first);
    #pragma omp parallel num_threads(nth)
    {
        float *mine = per_thread + (size_t)omp_get_thread_num() * per;
        float *dr = mine, *xr = dr + (size_t)BD_TC * wide, *dzp = xr + (size_t)BD_TC * d_in;
        float *dz = dzp + (size_t)BD_TC * mid, *dl = dz + (size_t)BD_TC * mid, *xp = dl + (size_t)BD_TC * E;
        float *g0 = mine + bufs, *g1 = g0 + E * e0, *gG = g1 + E * e1;  // this thread's dW0_e, dW1_e, dG
        memset(g0, 0, grads * sizeof(float));
        for (int t = 0; t < k; t++) {
            #pragma omp for schedule(static)
            for (int it = first[t]; it < first[t + 1]; it++) {
                int e, rows, r0 = moe_item(s, sv.off, items, it, &e, &rows);
                const int *src = sv.src + r0;
                const float *zp = sv.z + (size_t)r0 * mid;
                moe_gather_rows(dr, dy, src, sv.gate, k, rows, d_out);
                bd_weight_rows(g1 + e * e1, dr, d_out, zp, mid, rows, 0, n0, 0, n1, m1, n1, xp);
                bd_apply_rows(dzp, mid, dr, d_out, Q1 + e * pk.e1, pk.ld1, rows, n0, n1, m1, 0.0f);
                for (int r = 0; r < rows; r++) h[src[r]] = moe_dot(dzp + (size_t)r * mid, zp + (size_t)r * mid, mid);
                bd_transpose_rows(dz, dzp, rows, n0, m1, 1);
                moe_gather_rows(xr, x, src, NULL, k, rows, d_in);
                bd_weight_rows(g0 + e * e0, dz, mid, xr, d_in, rows, 0, m1, 0, n0, m0, n0, xp);
                bd_apply_rows(dr, d_in, dz, mid, Q0 + e * pk.e0, pk.ld0, rows, m1, n0, m0, 0.0f);
                if (t == k - 1) {  // the chunk's tokens have all their h: dx += dl G, dG += dl^T x
                    for (int r = 0; r < rows; r++)
                        moe_router_dlogits(s, dl + (size_t)r * E, &sv, h, f, daux, z_weight, src[r] / k, N);
                    bd_apply_rows(dr, d_in, dl, E, Gp, ldG, rows, 1, E, d_in, 1.0f);
                    bd_weight_rows(gG, dl, E, xr, d_in, rows, 0, 1, 0, E, d_in, E, xp);
                }
                moe_scatter_rows(dx, dr, src, NULL, k, rows, d_in, t > 0);
            }
        }
        // dW0, dW1, dG += the threads' partial sums, in thread order, back into the strided layouts.
        #pragma omp for collapse(2) schedule(static)
        for (int i1 = 0; i1 < m1; i1++)
            for (int j0 = 0; j0 < n0; j0++)
                for (int e = 0; e < E; e++) {
                    float *d = dW0 + (((size_t)i1 * n0 + j0) * E + e) * m0;
                    size_t o = e * e0 + ((size_t)i1 * n0 + j0) * m0;
                    for (int i0 = 0; i0 < m0; i0++) {
                        float sum = d[i0];
                        for (int th = 0; th < nth; th++) sum += per_thread[(size_t)th * per + bufs + o + i0];
                        d[i0] = sum;
                    }
                }
        #pragma omp for schedule(static)
        for (int row = 0; row < n0 * n1; row++)
            for (int i1 = 0; i1 < m1; i1++)
                for (int e = 0; e < E; e++) {
                    size_t o = E * e0 + e * e1 + (size_t)row * m1 + i1;
                    float sum = dW1[((size_t)row * m1 + i1) * E + e];
                    for (int th = 0; th < nth; th++) sum += per_thread[(size_t)th * per + bufs + o];
                    dW1[((size_t)row * m1 + i1) * E + e] = sum;
                }
        #pragma omp for schedule(static)
        for (int i = 0; i < E * d_in; i++) {
            float sum = dG[i];
            for (int th = 0; th < nth; th++) sum += per_thread[(size_t)th * per + bufs + E * (e0 + e1) + i];
            dG[i] = sum;
        }
    }
}

// ----------------------------------------------------------------------------
// Baseline: the rank-E BTT on every token, its intermediate z (N, (i1 j0 e)) multiplied by the gates
// (0 for the experts not selected), as the BTT-MoE reference code does. E/k times the grouped FLOPs.

static size_t moe_dense_masked_saved_floats(const Structure *s, int N) {
    return (size_t)N * moe_mid(s) * s->experts + moe_routing_floats(s, N);
}

// Gated z and z' (N, mid*E) each; backward also h (N*k) and dlogits (N, E).
static size_t moe_dense_masked_scratch_floats(const Structure *s, int N) {
    return 2 * (size_t)N * moe_mid(s) * s->experts + (size_t)N * s->top_k + (size_t)N * s->experts;
}

// zg (N, (i1 j0 e)) = z * gate of (n, e), 0 where e is not selected.
static void moe_dense_masked_gate(const Structure *s, float *zg, const float *z, const MoeSaved *sv, int N) {
    int E = s->experts, k = s->top_k, mid = moe_mid(s);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float g[E];
        for (int e = 0; e < E; e++) g[e] = 0.0f;
        for (int t = 0; t < k; t++) g[sv->sel[(size_t)n * k + t]] = sv->gate[(size_t)n * k + t];
        const float *zn = z + (size_t)n * mid * E;
        float *o = zg + (size_t)n * mid * E;
        for (int c = 0; c < mid; c++)
            for (int e = 0; e < E; e++) o[(size_t)c * E + e] = zn[(size_t)c * E + e] * g[e];
    }
}

static float moe_dense_masked_forward(const Structure *s, float *y, const float *x, const float *W0,
                                      const float *W1, const float *G, float z_weight, float *saved,
                                      float *scratch, int N, float *load) {
    int midE = moe_mid(s) * s->experts;
    MoeSaved sv = moe_saved_view(s, saved, (size_t)N * midE, N);
    float *zg = scratch, *zpg = zg + (size_t)N * midE;
    moe_route(s, &sv, x, G, N);
    moe_group(s, &sv, N);
    float aux = moe_aux_loss(s, &sv, N, z_weight, load);
    const CoreShape *c0 = &s->core[0], *c1 = &s->core[1];
    blockdiag_forward(sv.z, midE, x, s->d_in, W0, N, c0->nb, c0->p, c0->q, 0.0f);
    moe_dense_masked_gate(s, zg, sv.z, &sv, N);
    token_transpose(zpg, zg, N, s->mid.a, s->mid.b, s->mid.r);
    blockdiag_forward(y, s->d_out, zpg, midE, W1, N, c1->nb, c1->p, c1->q, 0.0f);
    return aux;
}

static void moe_dense_masked_backward(const Structure *s, float *dx, float *dW0, float *dW1, float *dG,
                                      const float *dy, float daux, float z_weight, const float *x,
                                      const float *W0, const float *W1, const float *G, const float *saved,
                                      float *scratch, int N) {
    int E = s->experts, k = s->top_k, midE = moe_mid(s) * s->experts;
    MoeSaved sv = moe_saved_view(s, saved, (size_t)N * midE, N);
    float *a = scratch, *b = a + (size_t)N * midE, *h = b + (size_t)N * midE, *dlogits = h + (size_t)N * k;
    const CoreShape *c0 = &s->core[0], *c1 = &s->core[1];
    moe_dense_masked_gate(s, a, sv.z, &sv, N);
    token_transpose(b, a, N, s->mid.a, s->mid.b, s->mid.r);                 // gated z'
    blockdiag_backward_weight(dW1, dy, s->d_out, b, midE, N, c1->nb, c1->p, c1->q);
    blockdiag_backward_input(a, midE, dy, s->d_out, W1, N, c1->nb, c1->p, c1->q, 0.0f);
    token_transpose(b, a, N, s->mid.b, s->mid.a, s->mid.r);                 // d(gated z) (N, (i1 j0 e))
    double f[E];
    moe_fractions(s, f, sv.off, N);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {  // dgate_e = sum_c d(gated z)_(c e) z_(c e); dz = gate * d(gated z)
        double dgate[E];
        float g[E];
        for (int e = 0; e < E; e++) { dgate[e] = 0.0; g[e] = 0.0f; }
        for (int t = 0; t < k; t++) g[sv.sel[(size_t)n * k + t]] = sv.gate[(size_t)n * k + t];
        float *d = b + (size_t)n * midE;
        const float *z = sv.z + (size_t)n * midE;
        for (int c = 0; c < midE; c++) { dgate[c % E] += (double)d[c] * z[c]; d[c] *= g[c % E]; }
        for (int t = 0; t < k; t++)
            h[(size_t)n * k + t] = (float)(sv.gate[(size_t)n * k + t] * dgate[sv.sel[(size_t)n * k + t]]);
        moe_router_dlogits(s, dlogits + (size_t)n * E, &sv, h, f, daux, z_weight, n, N);
    }
    blockdiag_backward_weight(dW0, b, midE, x, s->d_in, N, c0->nb, c0->p, c0->q);
    blockdiag_backward_input(dx, s->d_in, b, midE, W0, N, c0->nb, c0->p, c0->q, 0.0f);
    int d_in = s->d_in;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, E, d_in, N, 1.0f, dlogits, E, x, d_in, 1.0f, dG, d_in);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, d_in, E, 1.0f, dlogits, E, G, d_in, 1.0f, dx, d_in);
}

#endif
