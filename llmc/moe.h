// BTT-MoE on the CPU (DESIGN 3.6): a mixture of experts inside one linear layer, fp32.
// The layer's cores are those of the rank-E BTT (llmc/structure.h, STRUCT_BTT_MOE):
//   W0 (m1, n0*E, m0), W1 (n0, n1, m1*E), router G (E, d_in); d_in = m1*m0, d_out = n0*n1.
// Expert e is the rank-1 BTT with cores W0[:, (j0 e), :] and W1[j0, :, (i1 e)]:
//   logits = x G^T (N, E); S_n = top-k of logits_n (ties to the lower expert index);
//   g_n = softmax of logits_n over S_n;   y_n = sum_{e in S_n} g_{n,e} BTT_e(x_n)   (no bias).
//
// API (N tokens; E = s->experts, k = s->top_k; mid = m1*n0, one expert's intermediate width):
//   size_t moe_saved_floats(s, N)     kept from forward for backward: z' of every routed slot (k, N, mid),
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
// How: each token's k experts are taken in ascending order (positions 0..k-1), and the positions are
// processed in passes (moe_group, moe_pass_positions): a pass orders the tokens by their experts at its
// positions, so tokens sharing them are consecutive. A thread takes a chunk of BD_TC consecutive
// tokens of a pass: it gathers their x rows once, and for each of the pass's positions j runs each run
// of rows sharing their j-th expert through both stages of that expert while it is in cache, with
// blockdiag.h's chunk kernels (bd_apply_rows, bd_weight_rows, bd_transpose_rows) on the experts' cores
// packed once per call: stage 1, the permutation (z' saved), stage 2; y_n (+)= sum_j g_j out_j is
// summed in the chunk and each y row written once per pass. Backward likewise gathers a chunk's dy and
// x rows once per pass, sums the pass's experts' dx (and in the last pass the router's) in the chunk,
// and writes each dx row once per pass. Each token is in one chunk of a pass, so the threads write
// disjoint rows of y and dx. Weight and router gradients are summed per thread, then in thread order
// (as blockdiag.h's fused BTT).
// Few experts (E=8, k=2 at 4096 tokens): one pass, so memory sees x once for the router and once in
// each of forward and backward, dy, y, dx once, z' once per slot: less than k rank-1 BTTs on all
// tokens, which read x, dy and write y, dx k times. Many experts (E=64, k=4): one position per pass
// (grouping by expert), so that every run is long enough for the kernels. The y and dx rows of a first
// pass are streamed (non-temporal stores): written once, they are not read back soon.
// Measured (one thread, 2026-11-24, dev/bench/bench_moe ... cpu, grouped / k rank-1 BTTs): grouping
// by expert for every E, k (a pass per position, as before this grouping): 1.45 at E=8, k=2; the passes
// and the streamed rows: 1.21-1.23 (E=16, k=4: 1.47 -> 1.33; E=64, k=4: 2.2 -> 2.1). Random rows are
// not followed by the hardware prefetchers, and no software prefetch made their DRAM traffic overlap
// the compute (tried: the next chunk's rows during this chunk's kernels, rows read in place through
// token tables, token ranges kept in the last-level cache): the way to a lower overhead is fewer
// passes over the rows, not hiding them.
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
#include <stdint.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif
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

// a . b over n floats: four vector partial sums (independent chains, so the FMAs overlap), then lanes
// and tail in a fixed order.
static float moe_dot(const float *a, const float *b, int n) {
    moe_vec s[4] = {{0}, {0}, {0}, {0}};
    int i = 0;
    for (; i + 4 * BD_VW <= n; i += 4 * BD_VW)
        for (int u = 0; u < 4; u++) s[u] += *(const moe_vec *)(a + i + u * BD_VW) * *(const moe_vec *)(b + i + u * BD_VW);
    for (; i + BD_VW <= n; i += BD_VW) s[0] += *(const moe_vec *)(a + i) * *(const moe_vec *)(b + i);
    s[0] += s[1];
    s[2] += s[3];
    s[0] += s[2];
    float lanes[BD_VW], sum = 0.0f;
    memcpy(lanes, &s[0], sizeof lanes);
    for (int l = 0; l < BD_VW; l++) sum += lanes[l];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

// Views into the saved buffer: zfloats of intermediates first, then the routing.
typedef struct {
    float *z;       // grouped path: z' (k, N, mid), row r of block j: grouped row r's j-th expert;
                    // baseline: z (N, mid*E)
    float *probs;   // (N, E) full softmax of the logits
    float *lse;     // (N) logsumexp of the logits
    float *gate;    // (N, k): slot t of token n at n*k + t
    int *sel;       // (N, k): selected experts, highest logit first
    int *src;       // (k, N), grouped path only: src[j*N + r] = the slot n*k + t of the j-th expert
                    // (ascending expert order) of row r of j's pass (moe_group; its token: n = slot / k)
    int *count;     // (E): routed slots per expert (f_e = count[e] / (N*k))
} MoeSaved;

static size_t moe_routing_floats(const Structure *s, int N) {
    size_t Nk = (size_t)N * s->top_k;
    return (size_t)N * (s->experts + 1) + 3 * Nk + (size_t)s->experts;
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
    v.count = v.src + Nk;
    return v;
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

// The k positions (each token's experts in ascending order) are processed in passes of
// moe_pass_positions(s, N) consecutive positions. A pass orders the tokens by their experts at its
// positions (lexicographic), so that tokens sharing them are consecutive rows; each token is one row
// of each pass, so its x and dy rows are read and its y and dx rows written once per pass. One pass of
// all k positions is best while its runs of rows sharing an expert stay long: the mean run at the
// pass's last position is at least N / C(E - k + m, m) for m positions (m consecutive order statistics
// of a k-subset of E experts: an m-subset of E - k + m values). With many experts, passes of fewer
// positions keep the runs long (one position per pass: grouping by expert).
#define MOE_MIN_RUN 24   // rows: half a chunk
static int moe_pass_override = 0;  // tests: positions per pass (0: chosen as below)
static int moe_pass_positions(const Structure *s, int N) {
    int k = s->top_k, free_ = s->experts - k, m = 1;
    if (moe_pass_override > 0) return moe_pass_override < k ? moe_pass_override : k;
    double tuples = free_ + 1;  // C(free_ + m, m)
    while (m < k && N >= MOE_MIN_RUN * (tuples * (free_ + m + 1) / (m + 1))) {
        tuples = tuples * (free_ + m + 1) / (m + 1);
        m++;
    }
    return m;
}
static int moe_pass_end(int j0, int m, int k) { return j0 + m < k ? j0 + m : k; }  // the pass [j0, end)

// Routed slots per expert (both implementations: the aux loss and the loads).
static void moe_count_routes(const Structure *s, const MoeSaved *sv, int N) {
    for (int e = 0; e < s->experts; e++) sv->count[e] = 0;
    for (size_t i = 0; i < (size_t)N * s->top_k; i++) sv->count[sv->sel[i]]++;
}

// src of every pass: each token's slots in ascending expert order, then per pass the tokens sorted
// stably by their experts at the pass's positions (an LSD radix sort: one counting sort per position,
// the last first). O(N*k + E*k), serial. tmp: N*k + 2N ints.
static void moe_group(const Structure *s, const MoeSaved *sv, int N, int *tmp) {
    int E = s->experts, k = s->top_k, m = moe_pass_positions(s, N), cnt[E + 1];
    int *ord = tmp, *a = ord + (size_t)N * k, *b = a + N;
    for (int n = 0; n < N; n++) {
        int *o = ord + (size_t)n * k;
        for (int t = 0; t < k; t++) {  // insertion sort of token n's k slots by expert
            int slot = n * k + t, u = t;
            for (; u > 0 && sv->sel[o[u - 1]] > sv->sel[slot]; u--) o[u] = o[u - 1];
            o[u] = slot;
        }
    }
    for (int j0 = 0; j0 < k; j0 += m) {
        int j1 = moe_pass_end(j0, m, k);
        for (int n = 0; n < N; n++) a[n] = n;
        for (int j = j1 - 1; j >= j0; j--) {
            for (int e = 0; e <= E; e++) cnt[e] = 0;
            for (int i = 0; i < N; i++) cnt[sv->sel[ord[(size_t)a[i] * k + j]] + 1]++;
            for (int e = 0; e < E; e++) cnt[e + 1] += cnt[e];
            for (int i = 0; i < N; i++) b[cnt[sv->sel[ord[(size_t)a[i] * k + j]]]++] = a[i];
            int *swap = a; a = b; b = swap;
        }
        for (int j = j0; j < j1; j++)
            for (int r = 0; r < N; r++) sv->src[(size_t)j * N + r] = ord[(size_t)a[r] * k + j];
    }
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
        double f = sv->count[e] / slots;
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

static void moe_fractions(const Structure *s, double *f, const int *count, int N) {
    for (int e = 0; e < s->experts; e++) f[e] = count[e] / ((double)N * s->top_k);
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

// Chunk rows are scattered over x, y, dy, dx, which the hardware prefetchers do not follow: a loop over
// them requests the lines of the row MOE_AHEAD rows ahead, so that several rows are in flight at once.
#define MOE_AHEAD 2
static void moe_prefetch_row(const float *row, int width) {
    for (size_t b = 0; b < (size_t)width * sizeof(float); b += 64) __builtin_prefetch((const char *)row + b, 0, 3);
}

// out (rows, width): row r = base's row tok[r].
static void moe_gather_rows(float *out, const float *base, const int *tok, int rows, int width) {
    for (int r = 0; r < rows; r++) {
        if (r + MOE_AHEAD < rows) moe_prefetch_row(base + (size_t)tok[r + MOE_AHEAD] * width, width);
        memcpy(out + (size_t)r * width, base + (size_t)tok[r] * width, (size_t)width * sizeof(float));
    }
}

// A vector stored to p: around the caches (non-temporal: the line is not read before it is written)
// where p is vector-aligned and the instruction exists, else a plain store.
static inline void moe_put(float *p, moe_vec v) {
#if defined(__AVX512F__) && BD_VW == 16
    if ((uintptr_t)p % 64 == 0) { _mm512_stream_ps(p, (__m512)v); return; }
#elif defined(__AVX__) && BD_VW == 8
    if ((uintptr_t)p % 32 == 0) { _mm256_stream_ps(p, (__m256)v); return; }
#endif
    *(moe_vec *)p = v;
}
static inline void moe_put_fence(void) {  // streamed stores are weakly ordered: visible before the barrier
#if defined(__SSE__)
    _mm_sfence();
#endif
}

// Row r of out (row tok[r] where tok is given, else row r) = (add ? itself : 0) + (acc ? ca[r] * acc's
// row r : 0) + g[r] * in's row r (ca, g NULL: 1). acc may be out itself (tok NULL). Rows of out through
// tok (y, dx: written once per pass, out of cache) go through moe_put (streamed where aligned: when the
// buffer is aligned to a vector, as every row is when width is a multiple of one). The arithmetic of
// an element depends only on its column (vectors from the row's start, then a scalar tail), never on
// the alignment, so results do not depend on where the buffers are.
static void moe_axpy_rows(float *out, const int *tok, int add, const float *acc, const float *ca, const float *g,
                          const float *in, int rows, int width) {
    for (int r = 0; r < rows; r++) {
        float *o = out + (size_t)(tok ? tok[r] : r) * width, gr = g ? g[r] : 1.0f, cr = ca ? ca[r] : 1.0f;
        const float *i = in + (size_t)r * width, *c = acc ? acc + (size_t)r * width : NULL;
        int j = 0;
        if (tok && add && r + MOE_AHEAD < rows) moe_prefetch_row(out + (size_t)tok[r + MOE_AHEAD] * width, width);
        for (; j + BD_VW <= width; j += BD_VW) {
            moe_vec v = gr * *(const moe_vec *)(i + j);
            if (c) v += cr * *(const moe_vec *)(c + j);
            if (add) v += *(const moe_vec *)(o + j);
            if (tok && !add) moe_put(o + j, v);
            else *(moe_vec *)(o + j) = v;
        }
        for (; j < width; j++) {
            float v = gr * i[j];
            if (c) v += cr * c[j];
            o[j] = add ? v + o[j] : v;
        }
    }
    if (tok) moe_put_fence();
}

// Chunks: BD_TC consecutive rows of a pass's order (tokens). Within a chunk, the rows whose j-th expert
// is the same form runs (consecutive, by the grouping); the chunk kernels run once per run.
static int moe_chunks(int N) { return (N + BD_TC - 1) / BD_TC; }
// Chunk ch of the pass starting at position j0: its row count; tok gets the rows' tokens.
static int moe_chunk(const MoeSaved *sv, int k, int j0, int ch, int N, int *tok) {
    int r0 = ch * BD_TC, rows = N - r0 < BD_TC ? N - r0 : BD_TC;
    for (int r = 0; r < rows; r++) tok[r] = sv->src[(size_t)j0 * N + r0 + r] / k;
    return rows;
}
// The run of the chunk's rows (from row r0) that starts at chunk row a and shares a's j-th expert: its
// end, its expert, and the gates of its rows.
static int moe_run(const MoeSaved *sv, int N, int r0, int j, int a, int rows, int *e, float *g) {
    const int *src = sv->src + (size_t)j * N + r0;
    int b = a;
    *e = sv->sel[src[a]];
    for (; b < rows && sv->sel[src[b]] == *e; b++) g[b - a] = sv->gate[src[b]];
    return b;
}

static size_t moe_saved_floats(const Structure *s, int N) {
    return (size_t)N * s->top_k * moe_mid(s) + moe_routing_floats(s, N);
}

// Per thread: forward x rows (BD_TC, d_in), z (BD_TC, mid), one expert's out and the sum over experts
// (BD_TC, d_out) each; backward dy rows and the gated dy of a run (BD_TC, d_out) each, x rows and dx
// (BD_TC, d_in) each, dz' and dz (BD_TC, mid) each, the router's dlogits (BD_TC, E), bd_weight_rows'
// padded copy (BD_TC, max(m0, m1, d_in) rounded up), and the partial gradients: dW0, dW1 (E times
// one expert's) and dG (E, d_in).
static size_t moe_thread_floats(const Structure *s, int backward) {
    size_t E = s->experts, mid = moe_mid(s), d_in = s->d_in, d_out = s->d_out;
    if (!backward) return (size_t)BD_TC * (d_in + mid + 2 * d_out);
    int p = s->m0 > s->m1 ? s->m0 : s->m1;
    size_t xpw = bd_round_up(p > s->d_in ? p : s->d_in, BD_VW);
    size_t grads = E * ((size_t)s->m1 * s->n0 * s->m0 + (size_t)s->n0 * s->n1 * s->m1 + d_in);
    return (size_t)BD_TC * (2 * d_out + 2 * d_in + 2 * mid + E + xpw) + grads;
}

// Shared: packed cores (forward or backward); in forward the grouping's N*k + 2N ints, in backward h
// (N*k) and G padded to rows of d_in rounded up (E, ldG). Then the threads' own.
static size_t moe_scratch_floats(const Structure *s, int N) {
    size_t best = 0;
    for (int b = 0; b < 2; b++) {
        MoePack pk = moe_pack_shape(s, b);
        size_t n = s->experts * (pk.e0 + pk.e1) +
                   (b ? (size_t)N * s->top_k + (size_t)s->experts * bd_round_up(s->d_in, BD_VW)
                      : (size_t)N * (s->top_k + 2)) +
                   moe_thread_floats(s, b) * omp_get_max_threads();
        if (n > best) best = n;
    }
    return best;
}

static float moe_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1,
                         const float *G, float z_weight, float *saved, float *scratch, int N, float *load) {
    int E = s->experts, k = s->top_k, d_in = s->d_in, d_out = s->d_out, mid = moe_mid(s);
    int m1 = s->m1, m0 = s->m0, n0 = s->n0, n1 = s->n1, nth = omp_get_max_threads(), m = moe_pass_positions(s, N);
    MoeSaved sv = moe_saved_view(s, saved, (size_t)N * k * mid, N);
    if (N <= 0) return 0.0f;
    MoePack pk = moe_pack_shape(s, 0);
    float *P0 = scratch, *P1 = P0 + E * pk.e0;
    int *group_tmp = (int *)(P1 + E * pk.e1);
    float *per_thread = (float *)(group_tmp + (size_t)N * (k + 2));
    moe_route(s, &sv, x, G, N);
    moe_count_routes(s, &sv, N);
    moe_group(s, &sv, N, group_tmp);
    float aux = moe_aux_loss(s, &sv, N, z_weight, load);
    moe_pack(s, P0, P1, W0, W1, 0);
    #pragma omp parallel num_threads(nth)
    {
        float *xr = per_thread + (size_t)omp_get_thread_num() * moe_thread_floats(s, 0);
        float *zb = xr + (size_t)BD_TC * d_in, *ob = zb + (size_t)BD_TC * mid, *yb = ob + (size_t)BD_TC * d_out;
        int tok[BD_TC];
        float g[BD_TC], g_first[BD_TC];
        for (int j0 = 0; j0 < k; j0 += m) {
            int j1 = moe_pass_end(j0, m, k);
            // Chunks are independent (each writes its own rows of z' and y): dynamic, as blockdiag.h's
            // fused forward, so a thread the OS delays does not hold up the others; the result does not
            // depend on which thread takes a chunk.
            #pragma omp for schedule(dynamic, 1)
            for (int ch = 0; ch < moe_chunks(N); ch++) {
                int r0 = ch * BD_TC, rows = moe_chunk(&sv, k, j0, ch, N, tok);
                moe_gather_rows(xr, x, tok, rows, d_in);
                for (int j = j0; j < j1; j++)
                    for (int a = 0, b, e; a < rows; a = b) {
                        b = moe_run(&sv, N, r0, j, a, rows, &e, g);
                        float *zp = sv.z + ((size_t)j * N + r0 + a) * mid, *ya = yb + (size_t)a * d_out;
                        bd_apply_rows(zb, mid, xr + (size_t)a * d_in, d_in, P0 + e * pk.e0, pk.ld0, b - a, m1, m0, n0, 0.0f);
                        bd_transpose_rows(zp, zb, b - a, m1, n0, 1);
                        // y_n (+)= the pass's sum of g_j out_j, in the chunk buffer yb: the first expert's
                        // out straight into it (its gate applied with the second term's), the last term
                        // straight into y
                        bd_apply_rows(j > j0 ? ob : ya, d_out, zp, mid, P1 + e * pk.e1, pk.ld1, b - a, n0, m1, n1, 0.0f);
                        const float *ca = j == j0 + 1 ? g_first + a : NULL;
                        if (j == j0) memcpy(g_first + a, g, (size_t)(b - a) * sizeof(float));
                        else if (j < j1 - 1) moe_axpy_rows(ya, NULL, 0, ya, ca, g, ob, b - a, d_out);
                        else moe_axpy_rows(y, tok + a, j0 > 0, ya, ca, g, ob, b - a, d_out);
                    }
                if (j1 - j0 == 1) moe_axpy_rows(y, tok, j0 > 0, NULL, NULL, g_first, yb, rows, d_out);
            }
        }
    }
    return aux;
}

// Per run of expert e in chunk position j, with D = g dy (gated from the chunk's dy rows) and z' saved:
//   dW1_e += D^T z';  dz' = D W1_e;  h = dz' . z' = g * d(objective)/dg  (dz' is already gated);
//   dz = dz' permuted back;  dW0_e += dz^T x;  dx (+)= dz W0_e   (the chunk's dx rows, in cache).
// In the last pass every h of the chunk's tokens is known: their router gradient dl (rows, E) gives
// dx += dl G and dG += dl^T x on the same chunk kernels. Then the chunk's dx rows are written.
static void moe_backward(const Structure *s, float *dx, float *dW0, float *dW1, float *dG, const float *dy,
                         float daux, float z_weight, const float *x, const float *W0, const float *W1,
                         const float *G, const float *saved, float *scratch, int N) {
    int E = s->experts, k = s->top_k, d_in = s->d_in, d_out = s->d_out, mid = moe_mid(s);
    int m1 = s->m1, m0 = s->m0, n0 = s->n0, n1 = s->n1, nth = omp_get_max_threads(), m = moe_pass_positions(s, N);
    size_t e0 = (size_t)m1 * n0 * m0, e1 = (size_t)n0 * n1 * m1;
    size_t per = moe_thread_floats(s, 1);
    size_t grads = E * (e0 + e1 + d_in), bufs = per - grads;
    if (N <= 0) return;
    MoeSaved sv = moe_saved_view(s, saved, (size_t)N * k * mid, N);
    MoePack pk = moe_pack_shape(s, 1);
    float *Q0 = scratch, *Q1 = Q0 + E * pk.e0;
    int ldG = bd_round_up(d_in, BD_VW);
    float *h = Q1 + E * pk.e1, *Gp = h + (size_t)N * k, *per_thread = Gp + (size_t)E * ldG;
    double f[E];
    moe_fractions(s, f, sv.count, N);
    moe_pack(s, Q0, Q1, W0, W1, 1);
    for (int e = 0; e < E; e++) {  // G as the B operand of dx += dlogits G: rows readable to ldG
        memcpy(Gp + (size_t)e * ldG, G + (size_t)e * d_in, (size_t)d_in * sizeof(float));
        memset(Gp + (size_t)e * ldG + d_in, 0, (size_t)(ldG - d_in) * sizeof(float));
    }
    #pragma omp parallel num_threads(nth)
    {
        float *mine = per_thread + (size_t)omp_get_thread_num() * per;
        float *dyr = mine, *dr = dyr + (size_t)BD_TC * d_out, *xr = dr + (size_t)BD_TC * d_out;
        float *dxb = xr + (size_t)BD_TC * d_in, *dzp = dxb + (size_t)BD_TC * d_in, *dz = dzp + (size_t)BD_TC * mid;
        float *dl = dz + (size_t)BD_TC * mid, *xp = dl + (size_t)BD_TC * E;
        float *g0 = mine + bufs, *g1 = g0 + E * e0, *gG = g1 + E * e1;  // this thread's dW0_e, dW1_e, dG
        int tok[BD_TC];
        float g[BD_TC];
        memset(g0, 0, grads * sizeof(float));
        for (int j0 = 0; j0 < k; j0 += m) {
            int j1 = moe_pass_end(j0, m, k), last = j1 == k;
            // Static: which chunks a thread sums into its partial gradients is fixed (bit-reproducible).
            #pragma omp for schedule(static)
            for (int ch = 0; ch < moe_chunks(N); ch++) {
                int r0 = ch * BD_TC, rows = moe_chunk(&sv, k, j0, ch, N, tok);
                moe_gather_rows(dyr, dy, tok, rows, d_out);
                moe_gather_rows(xr, x, tok, rows, d_in);
                for (int j = j0; j < j1; j++)
                    for (int a = 0, b, e; a < rows; a = b) {
                        b = moe_run(&sv, N, r0, j, a, rows, &e, g);
                        int n = b - a;
                        const float *zp = sv.z + ((size_t)j * N + r0 + a) * mid;
                        const int *src = sv.src + (size_t)j * N + r0 + a;
                        moe_axpy_rows(dr, NULL, 0, NULL, NULL, g, dyr + (size_t)a * d_out, n, d_out);
                        bd_weight_rows(g1 + e * e1, dr, d_out, zp, mid, n, 0, n0, 0, n1, m1, n1, xp);
                        bd_apply_rows(dzp, mid, dr, d_out, Q1 + e * pk.e1, pk.ld1, n, n0, n1, m1, 0.0f);
                        for (int r = 0; r < n; r++) h[src[r]] = moe_dot(dzp + (size_t)r * mid, zp + (size_t)r * mid, mid);
                        bd_transpose_rows(dz, dzp, n, n0, m1, 1);
                        bd_weight_rows(g0 + e * e0, dz, mid, xr + (size_t)a * d_in, d_in, n, 0, m1, 0, n0, m0, n0, xp);
                        bd_apply_rows(dxb + (size_t)a * d_in, d_in, dz, mid, Q0 + e * pk.e0, pk.ld0, n, m1, n0, m0,
                                      j > j0 ? 1.0f : 0.0f);
                    }
                if (last) {  // every h of the chunk's tokens is known (earlier passes wrote theirs)
                    for (int r = 0; r < rows; r++) moe_router_dlogits(s, dl + (size_t)r * E, &sv, h, f, daux, z_weight, tok[r], N);
                    bd_apply_rows(dxb, d_in, dl, E, Gp, ldG, rows, 1, E, d_in, 1.0f);
                    bd_weight_rows(gG, dl, E, xr, d_in, rows, 0, 1, 0, E, d_in, E, xp);
                }
                moe_axpy_rows(dx, tok, j0 > 0, NULL, NULL, NULL, dxb, rows, d_in);
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
    moe_count_routes(s, &sv, N);
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
    moe_fractions(s, f, sv.count, N);
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
