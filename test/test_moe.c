// Tests of llmc/moe.h, the BTT-MoE layer on the CPU (DESIGN 3.6), both implementations: the grouped
// path (moe_forward/moe_backward: only the selected experts run; with its passes as moe.h chooses,
// and forced to 1, 2 and all k positions each) and the baseline that computes all experts and masks
// them (moe_dense_masked_*).
//  - against a double-precision re-implementation written here from DESIGN 3.6's formulas, token by
//    token and expert by expert: y, the aux loss, the routing; every gradient (x, W0, W1, G) against
//    central differences of the double objective L = sum(y * dy) + aux_weight * aux at points away
//    from top-k ties (the routing margin is checked: FD steps move logits by far less than it);
//  - the aux loss's gradient alone (dy = 0) against central differences of the double aux;
//  - degenerate routing: every token to one expert (the others get none: their gradient slices stay
//    exactly 0), k = E, E = 1 (bit-identical to the rank-1 BTT of blockdiag.h), tied logits (lower
//    index first), k = E with G = 0 (y = the rank-E BTT / E);
//  - determinism: two runs bit-identical; gradients accumulate, dx is overwritten;
//  - the PyTorch reference's fixtures test/fixtures/linear_btt_moe*.safetensors (contract D).
//
// Tolerances (fp32 vs double, error relative to the tensor's scale max|ref|, as test_blockdiag.c):
// fp32 rounds at 6e-8 per operation; each output is a sum of <= ~100 products per stage here, two
// stages and a gate: typical error ~1e-6 of scale -> 1e-5 for forward values (y, aux, gates).
// Gradients go through one more stage (products of two such sums, sums over tokens, the softmax) ->
// 1e-4. The central differences themselves (double, step 1e-5) are exact to ~1e-9 relative.
// An indexing or routing mistake gives errors of order 1.
#include <dirent.h>
#include "llmc/moe.h"
#include "llmc/checkpoint.h"
#include "test/test.h"

#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4
#define FD_STEP 1e-5
#define MIN_MARGIN 1e-3   // an FD step moves a logit by <= FD_STEP * 20 (largest |x|, |G| entry) = 2e-4;
                          // fp32 logits differ from double ones by ~1e-6

static float *fill_buf(size_t n, float v) {
    float *b = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) b[i] = v;
    return b;
}
// A btt_moe Structure for projection `which` of a model of width C, through structure_resolve.
static int make_structure(Structure *s, const char *type, int which, int C, int E, int k, int m1, int n0, int rank) {
    Config c;
    config_defaults(&c);
    c.model.n_embd = C;
    c.model.n_head = 1;
    LinearSpec *sp = &c.model.linear[which];
    memset(sp, 0, sizeof *sp);
    snprintf(sp->type, sizeof sp->type, "%s", type);
    sp->experts = E; sp->top_k = k; sp->in_blocks = m1; sp->out_blocks = n0; sp->rank = rank;
    char err[512];
    int rc = structure_resolve(s, &c, which, err, sizeof err);
    if (rc) check(0, "structure_resolve", "%s", err);
    return rc == 0;
}

static size_t w0_size(const Structure *s) { return (size_t)s->core[0].nb * s->core[0].p * s->core[0].q; }
static size_t w1_size(const Structure *s) { return (size_t)s->core[1].nb * s->core[1].p * s->core[1].q; }

// ----------------------------------------------------------------------------
// The layer in double, from DESIGN 3.6, one token and one expert at a time.

typedef struct {
    double L, aux, margin;  // objective sum(y dy) + aw aux; aux; min gap between the k-th and (k+1)-th logit
    int *sel;               // (N, k) if not NULL
    double *y, *gates;      // (N, d_out), (N, k) if not NULL
} RefOut;

static void ref_layer(const Structure *s, int N, const double *x, const double *W0, const double *W1,
                      const double *G, const double *dy, double aw, double zw, RefOut *o) {
    int E = s->experts, k = s->top_k, m1 = s->m1, m0 = s->m0, n0 = s->n0, n1 = s->n1, d_in = s->d_in, d_out = s->d_out;
    double P[E], cnt[E], L = 0, zsum = 0, margin = INFINITY;
    for (int e = 0; e < E; e++) P[e] = cnt[e] = 0;
    double *z = malloc(sizeof(double) * m1 * n0), *y = malloc(sizeof(double) * d_out);
    for (int n = 0; n < N; n++) {
        const double *xn = x + (size_t)n * d_in;
        double l[E];
        int order[E];
        for (int e = 0; e < E; e++) {
            l[e] = 0;
            for (int i = 0; i < d_in; i++) l[e] += G[(size_t)e * d_in + i] * xn[i];
            order[e] = e;
        }
        for (int a = 1; a < E; a++)  // insertion sort, descending, equal logits keep index order
            for (int b = a; b > 0 && l[order[b]] > l[order[b - 1]]; b--) { int t = order[b]; order[b] = order[b - 1]; order[b - 1] = t; }
        if (k < E && l[order[k - 1]] - l[order[k]] < margin) margin = l[order[k - 1]] - l[order[k]];
        double mx = l[order[0]], sum = 0, gs = 0, g[k];
        for (int e = 0; e < E; e++) sum += exp(l[e] - mx);
        double lse = mx + log(sum);
        for (int e = 0; e < E; e++) P[e] += exp(l[e] - lse) / N;
        zsum += lse * lse / N;
        for (int t = 0; t < k; t++) { g[t] = exp(l[order[t]] - mx); gs += g[t]; }
        for (int c = 0; c < d_out; c++) y[c] = 0;
        for (int t = 0; t < k; t++) {
            int e = order[t];
            g[t] /= gs;
            cnt[e] += 1;
            if (o->sel) o->sel[(size_t)n * k + t] = e;
            if (o->gates) o->gates[(size_t)n * k + t] = g[t];
            for (int i1 = 0; i1 < m1; i1++)
                for (int j0 = 0; j0 < n0; j0++) {
                    double a = 0;
                    for (int i0 = 0; i0 < m0; i0++) a += W0[(((size_t)i1 * n0 + j0) * E + e) * m0 + i0] * xn[i1 * m0 + i0];
                    z[i1 * n0 + j0] = a;
                }
            for (int j0 = 0; j0 < n0; j0++)
                for (int j1 = 0; j1 < n1; j1++) {
                    double a = 0;
                    for (int i1 = 0; i1 < m1; i1++) a += W1[(((size_t)j0 * n1 + j1) * m1 + i1) * E + e] * z[i1 * n0 + j0];
                    y[j0 * n1 + j1] += g[t] * a;
                }
        }
        for (int c = 0; c < d_out; c++) {
            if (dy) L += y[c] * dy[(size_t)n * d_out + c];
            if (o->y) o->y[(size_t)n * d_out + c] = y[c];
        }
    }
    double bal = 0;
    for (int e = 0; e < E; e++) bal += P[e] * cnt[e] / ((double)N * k);
    o->aux = E * bal + zw * zsum;
    o->L = L + aw * o->aux;
    o->margin = margin;
    free(z); free(y);
}

// Central differences of the double objective in every entry of p (n values) into grad.
static void fd_grad(double *grad, double *p, size_t n, const Structure *s, int N, const double *x, const double *W0,
                    const double *W1, const double *G, const double *dy, double aw, double zw) {
    RefOut o = {0};
    for (size_t i = 0; i < n; i++) {
        double keep = p[i];
        p[i] = keep + FD_STEP; ref_layer(s, N, x, W0, W1, G, dy, aw, zw, &o); double lp = o.L;
        p[i] = keep - FD_STEP; ref_layer(s, N, x, W0, W1, G, dy, aw, zw, &o); double lm = o.L;
        p[i] = keep;
        grad[i] = (lp - lm) / (2 * FD_STEP);
    }
}

// ----------------------------------------------------------------------------
// One implementation of the layer, run on fp32 buffers.

typedef struct {
    const char *name;
    size_t (*saved_floats)(const Structure *, int);
    size_t (*scratch_floats)(const Structure *, int);
    float (*forward)(const Structure *, float *, const float *, const float *, const float *, const float *,
                     float, float *, float *, int, float *);
    void (*backward)(const Structure *, float *, float *, float *, float *, const float *, float, float,
                     const float *, const float *, const float *, const float *, const float *, float *, int);
} Impl;

// The grouped path with its passes forced (moe.h picks the positions per pass from N, E and k; these
// small tests would mostly get one position per pass): one position per pass (grouping by expert), two
// (with k = 4: a second pass of several positions, adding to y and dx), and all k positions in one
// pass (grouping by the set of experts).
#define MOE_FORCED_PASSES(NAME, POSITIONS)                                                                   \
    static float NAME##_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1, \
                                const float *G, float zw, float *saved, float *scratch, int N, float *load) {   \
        moe_pass_override = POSITIONS;                                                                      \
        float aux = moe_forward(s, y, x, W0, W1, G, zw, saved, scratch, N, load);                           \
        moe_pass_override = 0;                                                                              \
        return aux;                                                                                         \
    }                                                                                                       \
    static void NAME##_backward(const Structure *s, float *dx, float *dW0, float *dW1, float *dG, const float *dy, \
                                float daux, float zw, const float *x, const float *W0, const float *W1,         \
                                const float *G, const float *saved, float *scratch, int N) {                   \
        moe_pass_override = POSITIONS;                                                                      \
        moe_backward(s, dx, dW0, dW1, dG, dy, daux, zw, x, W0, W1, G, saved, scratch, N);                    \
        moe_pass_override = 0;                                                                              \
    }
MOE_FORCED_PASSES(by_expert, 1)
MOE_FORCED_PASSES(by_pair, 2)
MOE_FORCED_PASSES(by_set, 1 << 30)

static const Impl impls[] = {
    {"grouped", moe_saved_floats, moe_scratch_floats, moe_forward, moe_backward},
    {"grouped by expert", moe_saved_floats, moe_scratch_floats, by_expert_forward, by_expert_backward},
    {"grouped by 2 positions", moe_saved_floats, moe_scratch_floats, by_pair_forward, by_pair_backward},
    {"grouped by expert set", moe_saved_floats, moe_scratch_floats, by_set_forward, by_set_backward},
    {"dense_masked", moe_dense_masked_saved_floats, moe_dense_masked_scratch_floats, moe_dense_masked_forward,
     moe_dense_masked_backward},
};

typedef struct { float *y, *dx, *dW0, *dW1, *dG, *load, *saved; float aux; } Run;

// Forward, then (dy != NULL) backward into zeroed gradients; y, dx and the scratch pre-filled with NaN
// (y, dx must be overwritten; scratch holds nothing from forward to backward).
static Run run_layer(const Impl *im, const Structure *s, int N, const float *x, const float *W0, const float *W1,
                     const float *G, const float *dy, float daux, float zw) {
    Run r;
    size_t nsv = im->saved_floats(s, N), nsc = im->scratch_floats(s, N);
    r.saved = fill_buf(nsv, NAN);
    float *scratch = fill_buf(nsc, NAN);
    r.y = fill_buf((size_t)N * s->d_out, NAN);
    r.load = fill_buf(s->experts, NAN);
    r.aux = im->forward(s, r.y, x, W0, W1, G, zw, r.saved, scratch, N, r.load);
    for (size_t i = 0; i < nsc; i++) scratch[i] = NAN;  // backward must not rely on forward's temporaries
    r.dx = fill_buf((size_t)N * s->d_in, NAN);
    r.dW0 = calloc(w0_size(s), sizeof(float));
    r.dW1 = calloc(w1_size(s), sizeof(float));
    r.dG = calloc((size_t)s->experts * s->d_in, sizeof(float));
    if (dy) im->backward(s, r.dx, r.dW0, r.dW1, r.dG, dy, daux, zw, x, W0, W1, G, r.saved, scratch, N);
    free(scratch);
    return r;
}
static void run_free(Run *r) { free(r->y); free(r->dx); free(r->dW0); free(r->dW1); free(r->dG); free(r->load); free(r->saved); }

// The routing as saved by forward (both implementations keep it after their intermediates).
static MoeSaved run_routing(const Impl *im, const Structure *s, const Run *r, int N) {
    size_t z = im->saved_floats(s, N) - moe_routing_floats(s, N);
    return moe_saved_view(s, r->saved, z, N);
}

// ----------------------------------------------------------------------------
// Random layers against the double reference and central differences

typedef struct {
    const char *what;
    int which, C, E, k, m1, n0, N;
    float gscale;        // router weights uniform in +-gscale (logits of order gscale * sqrt(d_in) / 2)
    float aw, zw;        // aux weight (daux) and z weight
    int one_expert;      // 1: x[:, 0] = 1 and G[one_expert - 1, 0] = 20: every token's first choice
} RandCase;

static void test_random(const RandCase *rc) {
    Structure s;
    if (!make_structure(&s, "btt_moe", rc->which, rc->C, rc->E, rc->k, rc->m1, rc->n0, 0)) return;
    int N = rc->N, E = s.experts, k = s.top_k;
    size_t nx = (size_t)N * s.d_in, n0w = w0_size(&s), n1w = w1_size(&s), nG = (size_t)E * s.d_in, ny = (size_t)N * s.d_out;
    float *x = rand_buf(nx, 1.0f), *W0 = rand_buf(n0w, 0.5f), *W1 = rand_buf(n1w, 0.5f);
    float *G = rand_buf(nG, rc->gscale), *dy = rand_buf(ny, 1.0f);
    if (rc->one_expert) {
        for (int n = 0; n < N; n++) x[(size_t)n * s.d_in] = 1.0f;
        G[(size_t)(rc->one_expert - 1) * s.d_in] = 20.0f;
    }
    double *xd = to_double(x, nx), *W0d = to_double(W0, n0w), *W1d = to_double(W1, n1w), *Gd = to_double(G, nG);
    double *dyd = to_double(dy, ny);
    double *yref = malloc(ny * sizeof(double)), *gref = malloc((size_t)N * k * sizeof(double));
    int *selref = malloc((size_t)N * k * sizeof(int));
    RefOut ro = {.sel = selref, .y = yref, .gates = gref};
    ref_layer(&s, N, xd, W0d, W1d, Gd, dyd, rc->aw, rc->zw, &ro);
    char name[300], what[400], desc[200];
    snprintf(name, sizeof name, "%s: %s N=%d", rc->what, structure_describe(&s, desc, sizeof desc), N);
    snprintf(what, sizeof what, "%s: routing margin > %g (the case is away from top-k ties)", name, MIN_MARGIN);
    check(ro.margin > MIN_MARGIN, what, "margin %.3g", ro.margin);

    // gradients of the double objective by central differences
    double *fx = malloc(nx * sizeof(double)), *f0 = malloc(n0w * sizeof(double)), *f1 = malloc(n1w * sizeof(double));
    double *fG = malloc(nG * sizeof(double));
    fd_grad(fx, xd, nx, &s, N, xd, W0d, W1d, Gd, dyd, rc->aw, rc->zw);
    fd_grad(f0, W0d, n0w, &s, N, xd, W0d, W1d, Gd, dyd, rc->aw, rc->zw);
    fd_grad(f1, W1d, n1w, &s, N, xd, W0d, W1d, Gd, dyd, rc->aw, rc->zw);
    fd_grad(fG, Gd, nG, &s, N, xd, W0d, W1d, Gd, dyd, rc->aw, rc->zw);
    // the aux term alone (dy = 0): its gradient reaches only G and x
    double *ax = malloc(nx * sizeof(double)), *aG = malloc(nG * sizeof(double));
    fd_grad(ax, xd, nx, &s, N, xd, W0d, W1d, Gd, NULL, 1.0, rc->zw);
    fd_grad(aG, Gd, nG, &s, N, xd, W0d, W1d, Gd, NULL, 1.0, rc->zw);
    float *zero_dy = calloc(ny, sizeof(float));

    for (size_t i = 0; i < sizeof impls / sizeof impls[0]; i++) {
        const Impl *im = &impls[i];
        Run r = run_layer(im, &s, N, x, W0, W1, G, dy, rc->aw, rc->zw);
        MoeSaved sv = run_routing(im, &s, &r, N);
        int same_sel = 1;
        for (int j = 0; j < N * k; j++) same_sel &= sv.sel[j] == selref[j];
        snprintf(what, sizeof what, "%s [%s]: top-k experts, highest first", name, im->name);
        check(same_sel, what, "selected experts differ from the double reference");
        double e = rel_err_d(sv.gate, gref, (size_t)N * k);
        snprintf(what, sizeof what, "%s [%s]: gates", name, im->name);
        check(e < TOL_FWD, what, "rel err %.3g (tol %g)", e, TOL_FWD);
        e = rel_err_d(r.y, yref, ny);
        snprintf(what, sizeof what, "%s [%s]: y", name, im->name);
        check(e < TOL_FWD, what, "rel err %.3g (tol %g)", e, TOL_FWD);
        e = fabs(r.aux - ro.aux) / fabs(ro.aux);
        snprintf(what, sizeof what, "%s [%s]: aux loss", name, im->name);
        check(e < TOL_FWD, what, "aux %.9g vs %.9g, rel err %.3g (tol %g)", r.aux, ro.aux, e, TOL_FWD);
        double lsum = 0, lerr = 0;
        for (int ex = 0; ex < E; ex++) {
            int cnt = 0;
            for (int j = 0; j < N * k; j++) cnt += selref[j] == ex;
            lsum += r.load[ex];
            lerr = fmax(lerr, fabs(r.load[ex] - (double)cnt / (N * k)));
        }
        snprintf(what, sizeof what, "%s [%s]: load = fraction of routed slots per expert, sums to 1", name, im->name);
        check(lerr < 1e-7 && fabs(lsum - 1) < 1e-6, what, "max err %.3g, sum %.9g", lerr, lsum);
        const char *gn[4] = {"dx", "dW0", "dW1", "dG"};
        const float *got[4] = {r.dx, r.dW0, r.dW1, r.dG};
        const double *ref[4] = {fx, f0, f1, fG};
        size_t cnt[4] = {nx, n0w, n1w, nG};
        for (int g = 0; g < 4; g++) {
            e = rel_err_d(got[g], ref[g], cnt[g]);
            snprintf(what, sizeof what, "%s [%s]: %s vs central differences of the double objective", name, im->name, gn[g]);
            check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
        }
        if (rc->one_expert && k == 1) {  // every other expert got no token: its core slices' gradients stay 0
            int zero = 1;
            for (int i1 = 0; i1 < s.m1; i1++)
                for (int j0 = 0; j0 < s.n0; j0++)
                    for (int ex = 0; ex < E; ex++)
                        for (int i0 = 0; i0 < s.m0 && ex != rc->one_expert - 1; i0++)
                            zero &= r.dW0[(((size_t)i1 * s.n0 + j0) * E + ex) * s.m0 + i0] == 0.0f;
            for (size_t j = 0; j < n1w; j++) zero &= (int)(j % E) == rc->one_expert - 1 || r.dW1[j] == 0.0f;
            snprintf(what, sizeof what, "%s [%s]: load all on expert %d; the empty experts' dW0, dW1 slices exactly 0",
                     name, im->name, rc->one_expert - 1);
            check(zero && r.load[rc->one_expert - 1] == 1.0f, what, "load %g", r.load[rc->one_expert - 1]);
        }
        run_free(&r);
        // aux gradient alone
        r = run_layer(im, &s, N, x, W0, W1, G, zero_dy, 1.0f, rc->zw);
        e = fmax(rel_err_d(r.dx, ax, nx), rel_err_d(r.dG, aG, nG));
        snprintf(what, sizeof what, "%s [%s]: aux gradient alone (dy = 0, daux = 1): dx, dG vs central differences",
                 name, im->name);
        check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
        run_free(&r);
    }
    free(x); free(W0); free(W1); free(G); free(dy); free(xd); free(W0d); free(W1d); free(Gd); free(dyd);
    free(yref); free(gref); free(selref); free(fx); free(f0); free(f1); free(fG); free(ax); free(aG); free(zero_dy);
}

// ----------------------------------------------------------------------------
// E = 1 is the rank-1 BTT; k = E with tied logits is the rank-E BTT / E; ties; determinism

static void test_e1_is_btt(void) {
    Structure moe, btt;
    if (!make_structure(&moe, "btt_moe", LIN_ATTN_QKV, 16, 1, 1, 4, 6, 0)) return;
    if (!make_structure(&btt, "btt", LIN_ATTN_QKV, 16, 0, 0, 4, 6, 1)) return;
    int N = 37;
    size_t nx = (size_t)N * 16, ny = (size_t)N * 48, n0w = w0_size(&btt), n1w = w1_size(&btt);
    float *x = rand_buf(nx, 1), *W0 = rand_buf(n0w, 0.5f), *W1 = rand_buf(n1w, 0.5f), *G = rand_buf(16, 0.3f);
    float *dy = rand_buf(ny, 1);
    float *saved = malloc(structured_saved_floats(&btt, N) * sizeof(float));
    float *scratch = malloc(structured_scratch_floats(&btt, N) * sizeof(float));
    float *y = malloc(ny * sizeof(float)), *dx = malloc(nx * sizeof(float));
    float *dW0 = calloc(n0w, sizeof(float)), *dW1 = calloc(n1w, sizeof(float));
    structured_forward(&btt, y, x, W0, W1, saved, scratch, N);
    structured_backward(&btt, dx, dW0, dW1, dy, x, W0, W1, saved, scratch, N);
    // One expert: its rows are x's in order and its cores W0, W1, so both paths run blockdiag.h's kernels
    // on the same operands in the same token chunks (weight gradients summed per thread, then in thread
    // order, as the fused BTT does); the gate is exactly 1 and the router's gradient exactly 0 when
    // daux = 0: bit-identical. (A different chunking or summation order would differ in the last bits.)
    for (size_t i = 0; i < sizeof impls / sizeof impls[0]; i++) {
        Run r = run_layer(&impls[i], &moe, N, x, W0, W1, G, dy, 0.0f, 0.1f);
        char what[200];
        snprintf(what, sizeof what, "E = 1 [%s]: y, dx, dW0, dW1 bit-identical to the rank-1 BTT (structured_*)", impls[i].name);
        int same = !memcmp(r.y, y, ny * sizeof(float)) && !memcmp(r.dx, dx, nx * sizeof(float)) &&
                   !memcmp(r.dW0, dW0, n0w * sizeof(float)) && !memcmp(r.dW1, dW1, n1w * sizeof(float));
        check(same, what, "y err %.3g dx err %.3g dW0 err %.3g dW1 err %.3g",
              max_rel_err(r.y, y, ny, max_abs(y, ny)), max_rel_err(r.dx, dx, nx, max_abs(dx, nx)),
              max_rel_err(r.dW0, dW0, n0w, max_abs(dW0, n0w)), max_rel_err(r.dW1, dW1, n1w, max_abs(dW1, n1w)));
        run_free(&r);
    }
    free(x); free(W0); free(W1); free(G); free(dy); free(saved); free(scratch); free(y); free(dx); free(dW0); free(dW1);
}

// G = 0: every logit equal. Top-k must take experts 0..k-1 in order, gates 1/k; with k = E, y is the
// rank-E BTT (whose rank slices are the experts) divided by E.
static void test_ties(int E, int k) {
    Structure moe, btt;
    if (!make_structure(&moe, "btt_moe", LIN_MLP_PROJ, 8, E, k, 4, 2, 0)) return;
    if (!make_structure(&btt, "btt", LIN_MLP_PROJ, 8, 0, 0, 4, 2, E)) return;
    int N = 23;
    size_t nx = (size_t)N * moe.d_in, ny = (size_t)N * moe.d_out, n0w = w0_size(&moe), n1w = w1_size(&moe);
    float *x = rand_buf(nx, 1), *W0 = rand_buf(n0w, 0.5f), *W1 = rand_buf(n1w, 0.5f), *G = calloc((size_t)E * moe.d_in, sizeof(float));
    char what[200];
    for (size_t i = 0; i < sizeof impls / sizeof impls[0]; i++) {
        Run r = run_layer(&impls[i], &moe, N, x, W0, W1, G, NULL, 0, 0.1f);
        MoeSaved sv = run_routing(&impls[i], &moe, &r, N);
        int ok = 1;
        for (int n = 0; n < N; n++)
            for (int t = 0; t < k; t++) ok &= sv.sel[n * k + t] == t && sv.gate[n * k + t] == (float)(1.0 / k);
        snprintf(what, sizeof what, "tied logits E=%d k=%d [%s]: experts 0..k-1 in order (lower index wins), gates 1/k",
                 E, k, impls[i].name);
        check(ok, what, "wrong selection or gates");
        if (k == E) {
            float *saved = malloc(structured_saved_floats(&btt, N) * sizeof(float));
            float *scratch = malloc(structured_scratch_floats(&btt, N) * sizeof(float));
            float *y = malloc(ny * sizeof(float));
            structured_forward(&btt, y, x, W0, W1, saved, scratch, N);
            for (size_t j = 0; j < ny; j++) y[j] /= E;
            double e = max_rel_err(r.y, y, ny, max_abs(y, ny));
            snprintf(what, sizeof what, "k = E = %d, tied logits [%s]: y = rank-%d BTT / E", E, impls[i].name, E);
            check(e < TOL_FWD, what, "rel err %.3g (tol %g)", e, TOL_FWD);
            free(saved); free(scratch); free(y);
        }
        run_free(&r);
    }
    free(x); free(W0); free(W1); free(G);
}

static void test_determinism(void) {
    Structure s;
    if (!make_structure(&s, "btt_moe", LIN_MLP_FC, 48, 8, 2, 0, 0, 0)) return;
    int N = 333;
    size_t nx = (size_t)N * s.d_in, ny = (size_t)N * s.d_out, n0w = w0_size(&s), n1w = w1_size(&s), nG = (size_t)8 * s.d_in;
    float *x = rand_buf(nx, 1), *W0 = rand_buf(n0w, 0.3f), *W1 = rand_buf(n1w, 0.3f), *G = rand_buf(nG, 0.3f);
    float *dy = rand_buf(ny, 1);
    char what[200];
    for (size_t i = 0; i < sizeof impls / sizeof impls[0]; i++) {
        const Impl *im = &impls[i];
        Run a = run_layer(im, &s, N, x, W0, W1, G, dy, 0.01f, 0.1f);
        Run b = run_layer(im, &s, N, x, W0, W1, G, dy, 0.01f, 0.1f);
        int same = a.aux == b.aux && !memcmp(a.y, b.y, ny * 4) && !memcmp(a.dx, b.dx, nx * 4) &&
                   !memcmp(a.dW0, b.dW0, n0w * 4) && !memcmp(a.dW1, b.dW1, n1w * 4) && !memcmp(a.dG, b.dG, nG * 4);
        snprintf(what, sizeof what, "determinism [%s] (%d threads): two runs bit-identical (y, aux, dx, dW0, dW1, dG)",
                 im->name, omp_get_max_threads());
        check(same, what, "results differ");
        // a second backward on the same saved state: weight gradients accumulate (exactly doubled), dx overwritten
        size_t nsc = im->scratch_floats(&s, N);
        float *scratch = malloc(nsc * sizeof(float)), *dx = fill_buf(nx, NAN);
        im->backward(&s, dx, b.dW0, b.dW1, b.dG, dy, 0.01f, 0.1f, x, W0, W1, G, b.saved, scratch, N);
        // (BLAS may add the old value in between partial sums: doubled up to rounding, 1e-6 of the scale)
        for (size_t j = 0; j < n0w; j++) a.dW0[j] *= 2;
        for (size_t j = 0; j < n1w; j++) a.dW1[j] *= 2;
        for (size_t j = 0; j < nG; j++) a.dG[j] *= 2;
        double e = fmax(max_rel_err(b.dW0, a.dW0, n0w, max_abs(a.dW0, n0w)), max_rel_err(b.dW1, a.dW1, n1w, max_abs(a.dW1, n1w)));
        e = fmax(e, max_rel_err(b.dG, a.dG, nG, max_abs(a.dG, nG)));
        snprintf(what, sizeof what, "backward [%s]: dW0, dW1, dG accumulate (doubled), dx is overwritten (same)", im->name);
        check(e < 1e-6 && !memcmp(dx, a.dx, nx * 4), what, "gradients rel err %.3g vs doubled, dx %s", e,
              memcmp(dx, a.dx, nx * 4) ? "differs" : "same");
        for (size_t j = 0; j < n0w; j++) a.dW0[j] /= 2;
        for (size_t j = 0; j < n1w; j++) a.dW1[j] /= 2;
        for (size_t j = 0; j < nG; j++) a.dG[j] /= 2;
        // the two implementations agree (the same layer computed two ways)
        if (i == 0) { run_free(&a); free(scratch); free(dx); run_free(&b); continue; }
        Run g = run_layer(&impls[0], &s, N, x, W0, W1, G, dy, 0.01f, 0.1f);
        e = fmax(max_rel_err(g.y, a.y, ny, max_abs(a.y, ny)), fabs(g.aux - a.aux) / fabs(a.aux));
        snprintf(what, sizeof what, "grouped vs %s on %s N=%d: y, aux", im->name, "mlp_fc 48 -> 192 E=8 k=2", N);
        check(e < TOL_FWD, what, "rel err %.3g (tol %g)", e, TOL_FWD);
        e = fmax(fmax(max_rel_err(g.dx, a.dx, nx, max_abs(a.dx, nx)), max_rel_err(g.dG, a.dG, nG, max_abs(a.dG, nG))),
                 fmax(max_rel_err(g.dW0, a.dW0, n0w, max_abs(a.dW0, n0w)), max_rel_err(g.dW1, a.dW1, n1w, max_abs(a.dW1, n1w))));
        snprintf(what, sizeof what, "grouped vs %s on %s N=%d: dx, dW0, dW1, dG", im->name, "mlp_fc 48 -> 192 E=8 k=2", N);
        check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
        run_free(&g); run_free(&a); run_free(&b); free(scratch); free(dx);
    }
    free(x); free(W0); free(W1); free(G); free(dy);
}

// ----------------------------------------------------------------------------
// The PyTorch reference's layer fixtures (contract D): y = S(x) + b, the gradients of
// sum(y * dy) + aux_weight * aux; rms_cap layers (mup) through the cap, computed here in double.

static const float *fx_tensor(const SafeTensors *st, const char *name, size_t want, int *ok) {
    const char *dtype;
    int ndim;
    long long shape[4];
    const float *p = safetensors_find(st, name, &dtype, &ndim, shape);
    size_t n = 1;
    if (p) for (int d = 0; d < ndim; d++) n *= (size_t)shape[d];
    if (!p || strcmp(dtype, !strcmp(name, "selected") ? "I32" : "F32") || n != want) *ok = 0;
    return p;
}
static int json_int(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valueint : 0;
}
static double json_num(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : 0.0;
}

// W_eff = gamma W / max(1, RMS(W) / sigma) (DESIGN 3.7) into weff; returns the divisor.
static double cap_div(const float *W, size_t n, double sigma) {
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)W[i] * W[i];
    double rms = sqrt(ss / n + 1e-8);
    return rms / sigma > 1 ? rms / sigma : 1;
}
// dW and dgamma from dweff through the cap: with c = RMS/sigma > 1, W_eff = gamma sigma W / RMS and
// d RMS / dW_i = W_i / (n RMS).
static void cap_backward(double *dW, double *dgamma, const float *dweff, const float *W, size_t n, double gamma, double sigma) {
    double c = cap_div(W, n, sigma), u = 0;
    for (size_t i = 0; i < n; i++) u += (double)dweff[i] * W[i];
    *dgamma = u / c;
    double rms = c * sigma;
    for (size_t i = 0; i < n; i++)
        dW[i] = c > 1 ? gamma * sigma / rms * (dweff[i] - u * W[i] / (n * rms * rms)) : gamma * dweff[i];
}

static int test_fixture(const char *path) {
    SafeTensors st;
    char err[1024], what[512], desc[256];
    if (safetensors_read(&st, path, err, sizeof err)) {
        snprintf(what, sizeof what, "read %s", path);
        check(0, what, "%s", err);
        return 0;
    }
    const char *meta = safetensors_meta(&st, "config");
    cJSON *cfg = meta ? cJSON_Parse(meta) : NULL;
    const cJSON *spec = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "spec") : NULL;
    const cJSON *wj = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "which") : NULL;
    const cJSON *pj = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "parametrization") : NULL;
    int which = -1;
    for (int p = 0; p < NUM_LINEAR && cJSON_IsString(wj); p++) if (!strcmp(wj->valuestring, linear_names[p])) which = p;
    Config c;
    config_defaults(&c);
    c.model.n_embd = cfg ? json_int(cfg, "n_embd") : 0;
    c.model.n_layer = cfg ? json_int(cfg, "n_layer") : 0;
    c.model.base_width = cfg ? json_int(cfg, "base_width") : 0;
    if (cJSON_IsString(pj)) snprintf(c.model.parametrization, sizeof c.model.parametrization, "%s", pj->valuestring);
    Structure s;
    int rc = -1;
    if (which >= 0 && cJSON_IsObject(spec)) {
        LinearSpec *sp = &c.model.linear[which];
        memset(sp, 0, sizeof *sp);
        snprintf(sp->type, sizeof sp->type, "btt_moe");
        sp->experts = json_int(spec, "experts"); sp->top_k = json_int(spec, "top_k");
        sp->in_blocks = json_int(spec, "in_blocks"); sp->out_blocks = json_int(spec, "out_blocks");
        const cJSON *wn = cJSON_GetObjectItemCaseSensitive(spec, "weight_norm");
        if (cJSON_IsString(wn)) snprintf(sp->weight_norm, sizeof sp->weight_norm, "%s", wn->valuestring);
        rc = structure_resolve(&s, &c, which, err, sizeof err);
    }
    snprintf(what, sizeof what, "%s: metadata config resolves to a btt_moe layer", path);
    check(rc == 0, what, "config %s: %s", meta ? meta : "(absent)", rc == -1 && which >= 0 ? err : "bad config");
    if (rc) { cJSON_Delete(cfg); safetensors_free(&st); return 0; }
    double aw = json_num(cfg, "aux_weight"), zw = json_num(cfg, "z_weight");
    int E = s.experts, k = s.top_k, N = 0, ndim, ok = 1;
    long long shape[4];
    if (safetensors_find(&st, "x", NULL, &ndim, shape) && ndim == 2) N = (int)shape[0];
    size_t nx = (size_t)N * s.d_in, ny = (size_t)N * s.d_out, n0w = w0_size(&s), n1w = w1_size(&s), nG = (size_t)E * s.d_in;
    const float *x = fx_tensor(&st, "x", nx, &ok), *W0 = fx_tensor(&st, "W0", n0w, &ok), *W1 = fx_tensor(&st, "W1", n1w, &ok);
    const float *G = fx_tensor(&st, "G", nG, &ok), *b = fx_tensor(&st, "b", s.d_out, &ok);
    const float *ry = fx_tensor(&st, "y", ny, &ok), *dy = fx_tensor(&st, "dy", ny, &ok), *rdx = fx_tensor(&st, "dx", nx, &ok);
    const float *rg0 = fx_tensor(&st, "grad.W0", n0w, &ok), *rg1 = fx_tensor(&st, "grad.W1", n1w, &ok);
    const float *rgG = fx_tensor(&st, "grad.G", nG, &ok), *raux = fx_tensor(&st, "aux", 1, &ok);
    const float *rgates = fx_tensor(&st, "gates", (size_t)N * E, &ok);
    const int *rsel = (const int *)fx_tensor(&st, "selected", (size_t)N * k, &ok);
    const float *gam[2] = {NULL, NULL}, *rgam[2] = {NULL, NULL};
    if (s.rms_cap) {
        gam[0] = fx_tensor(&st, "gamma0", 1, &ok); gam[1] = fx_tensor(&st, "gamma1", 1, &ok);
        rgam[0] = fx_tensor(&st, "grad.gamma0", 1, &ok); rgam[1] = fx_tensor(&st, "grad.gamma1", 1, &ok);
    }
    snprintf(what, sizeof what, "%s: tensors of contract D present with the layer's shapes (N = %d)", path, N);
    check(ok && N > 0, what, "missing or misshapen tensor");
    if (!ok || N <= 0) { cJSON_Delete(cfg); safetensors_free(&st); return 0; }

    const float *W[2] = {W0, W1};
    size_t nw[2] = {n0w, n1w};
    float *weff[2];
    for (int cc = 0; cc < 2; cc++) {  // the weights the forward multiplies by
        weff[cc] = malloc(nw[cc] * sizeof(float));
        float m = s.rms_cap ? (float)(*gam[cc] / cap_div(W[cc], nw[cc], s.mup_sigma[cc])) : 1.0f;
        for (size_t i = 0; i < nw[cc]; i++) weff[cc][i] = m * W[cc][i];
    }
    structure_describe(&s, desc, sizeof desc);
    for (size_t i = 0; i < sizeof impls / sizeof impls[0]; i++) {
        const Impl *im = &impls[i];
        Run r = run_layer(im, &s, N, x, weff[0], weff[1], G, dy, (float)aw, (float)zw);
        MoeSaved sv = run_routing(im, &s, &r, N);
        for (size_t j = 0; j < ny; j++) r.y[j] += b[j % s.d_out];
        int same_sel = !memcmp(sv.sel, rsel, (size_t)N * k * sizeof(int));
        float *gfull = calloc((size_t)N * E, sizeof(float));
        for (int n = 0; n < N; n++) for (int t = 0; t < k; t++) gfull[n * E + sv.sel[n * k + t]] = sv.gate[n * k + t];
        snprintf(what, sizeof what, "%s [%s] (%s): selected experts equal the reference's", path, im->name, desc);
        check(same_sel, what, "differ");
        double e = max_rel_err(gfull, rgates, (size_t)N * E, max_abs(rgates, (size_t)N * E));
        snprintf(what, sizeof what, "%s [%s]: gates", path, im->name);
        check(e < TOL_FWD, what, "rel err %.3g (tol %g)", e, TOL_FWD);
        e = max_rel_err(r.y, ry, ny, max_abs(ry, ny));
        snprintf(what, sizeof what, "%s [%s]: y", path, im->name);
        check(e < TOL_FWD, what, "rel err %.3g (tol %g)", e, TOL_FWD);
        e = fabs(r.aux - *raux) / fabs(*raux);
        snprintf(what, sizeof what, "%s [%s]: aux loss", path, im->name);
        check(e < TOL_FWD, what, "%.9g vs %.9g, rel err %.3g (tol %g)", r.aux, *raux, e, TOL_FWD);
        e = fmax(max_rel_err(r.dx, rdx, nx, max_abs(rdx, nx)), max_rel_err(r.dG, rgG, nG, max_abs(rgG, nG)));
        snprintf(what, sizeof what, "%s [%s]: dx, grad.G (aux_weight %g included)", path, im->name, aw);
        check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
        const float *dweff[2] = {r.dW0, r.dW1}, *rgw[2] = {rg0, rg1};
        for (int cc = 0; cc < 2; cc++) {
            double *dW = malloc(nw[cc] * sizeof(double)), dgam = 0;
            if (s.rms_cap) cap_backward(dW, &dgam, dweff[cc], W[cc], nw[cc], *gam[cc], s.mup_sigma[cc]);
            else for (size_t j = 0; j < nw[cc]; j++) dW[j] = dweff[cc][j];
            double *rd = to_double(rgw[cc], nw[cc]);
            float *dWf = malloc(nw[cc] * sizeof(float));
            for (size_t j = 0; j < nw[cc]; j++) dWf[j] = (float)dW[j];
            e = rel_err_d(dWf, rd, nw[cc]);
            if (s.rms_cap) e = fmax(e, fabs(dgam - *rgam[cc]) / fabs(*rgam[cc]));
            snprintf(what, sizeof what, "%s [%s]: grad.W%d%s", path, im->name, cc, s.rms_cap ? " and grad.gamma (through rms_cap)" : "");
            check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
            free(dW); free(rd); free(dWf);
        }
        free(gfull);
        run_free(&r);
    }
    free(weff[0]); free(weff[1]);
    cJSON_Delete(cfg);
    safetensors_free(&st);
    return 1;
}

static void test_fixtures(void) {
    int found = each_fixture("linear_btt_moe", test_fixture);
    // dev/reference/make_fixtures.py writes four btt_moe layers (E=4 k=2, E=1, k=E, mup k=1)
    check(found >= 4, "the PyTorch reference's btt_moe layer fixtures were all compared", "%d of 4 found", found);
}

int main(void) {
    test_rng_state = 0x2545F4914F6CDD1Dull;   // this test's seed
    const RandCase cases[] = {
        // what, which, C, E, k, m1, n0, N, gscale, aw, zw, one_expert
        {"E=4 k=2", LIN_ATTN_PROJ, 12, 4, 2, 3, 4, 11, 0.6f, 0.5f, 0.1f, 0},
        {"E=5 k=1, n0 > n1", LIN_ATTN_QKV, 6, 5, 1, 2, 6, 9, 0.8f, 0.5f, 0.2f, 0},
        {"k = E = 3", LIN_MLP_PROJ, 4, 3, 3, 4, 2, 7, 0.4f, 0.5f, 0.1f, 0},
        {"E = 1", LIN_ATTN_PROJ, 8, 1, 1, 2, 4, 6, 0.5f, 0.5f, 0.1f, 0},
        {"every token to expert 2 (k=1: experts 0,1,3 empty)", LIN_ATTN_PROJ, 8, 4, 1, 4, 2, 10, 0.2f, 0.5f, 0.1f, 3},
        {"every token's first choice expert 0 (k=2)", LIN_MLP_FC, 6, 4, 2, 3, 4, 8, 0.2f, 0.5f, 0.1f, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) test_random(&cases[i]);
    test_e1_is_btt();
    test_ties(4, 2);
    test_ties(3, 3);
    test_determinism();
    test_fixtures();
    return test_exit();
}
