// Tests of llmc/blockdiag.h: the block-diagonal primitives against naive double-precision loops,
// token_transpose against its index formula, and the structured layer of every one-/two-stage type
// against the dense matrix each structure stands for, formed here in double directly from DESIGN
// section 3's index formulas (not by running the layer on the identity).
// Weight gradients are checked against central differences in double of the linear functional
// L(W) = sum_n dy_n . (W_dense(W) x_n): L is linear in each core, so the difference with step 1 is
// its exact derivative up to double rounding.
// Where test/fixtures/linear_<tag>.safetensors exist (from the PyTorch reference), the layer is also
// compared with them.
//
// Tolerances (fp32 result vs double reference, error relative to the tensor's scale, max|ref|):
// fp32 rounds each product and partial sum at 2^-24 = 6e-8; a sum of K terms drifts like
// sqrt(K) * 6e-8 of its scale in the typical case, K * 6e-8 in the worst. Forward sums K <= 768
// terms (worst 4.6e-5, typical 1.7e-6) -> 1e-5, the project standard for forward values; gradients
// sum over tokens and go through two stages (a product of two such sums) -> 1e-4, the project's
// gradient standard. An indexing mistake gives errors of order 1, far above both.
#include <dirent.h>
#include "llmc/blockdiag.h"
#include "llmc/checkpoint.h"
#include "test/test.h"

#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4

static void fill(float *b, size_t n, float v) { for (size_t i = 0; i < n; i++) b[i] = v; }

// ----------------------------------------------------------------------------
// Primitives: every block of a column slice of wider matrices (row strides > slice width), the
// columns outside the slice left untouched.

typedef struct { int N, nb, p, q, padx, pady; } PrimCase;

#define SENTINEL 12345.0f

// Matrix (N, ld) whose columns [off, off + width) are the slice; the rest hold SENTINEL.
static float *slice_buf(int N, int ld, int off, int width, int random) {
    float *b = malloc((size_t)N * ld * sizeof(float));
    for (int n = 0; n < N; n++)
        for (int c = 0; c < ld; c++)
            b[(size_t)n * ld + c] = c >= off && c < off + width ? (random ? urand() : NAN) : SENTINEL;
    return b;
}
static int outside_untouched(const float *b, int N, int ld, int off, int width) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < ld; c++)
            if ((c < off || c >= off + width) && b[(size_t)n * ld + c] != SENTINEL) return 0;
    return 1;
}
// The slice of b as a contiguous (N, width) array.
static void gather(float *out, const float *b, int N, int ld, int off, int width) {
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * width, b + (size_t)n * ld + off, width * sizeof(float));
}

static void test_primitives(const PrimCase *pc) {
    int N = pc->N, nb = pc->nb, p = pc->p, q = pc->q;
    int wx = nb * p, wy = nb * q, ldx = wx + pc->padx, ldy = wy + pc->pady, offx = pc->padx / 2, offy = pc->pady - pc->pady / 3;
    char name[160], what[200];
    snprintf(name, sizeof name, "N=%d nb=%d p=%d q=%d ldx=%d ldy=%d", N, nb, p, q, ldx, ldy);
    float *W = rand_buf((size_t)nb * q * p, 1.0f);
    float *x = slice_buf(N, ldx, offx, wx, 1), *dy = slice_buf(N, ldy, offy, wy, 1);
    double *ref_y = malloc((size_t)N * wy * sizeof(double)), *ref_dx = malloc((size_t)N * wx * sizeof(double));
    double *ref_dW = malloc((size_t)nb * q * p * sizeof(double));
    float *got = malloc(((size_t)N * (wx > wy ? wx : wy) + (size_t)nb * q * p) * sizeof(float));
    for (int beta = 0; beta <= 1; beta++) {
        // forward: y = beta*y0 + x W^T per block
        float *y = slice_buf(N, ldy, offy, wy, beta);  // beta 0: NaN inside the slice must not leak
        for (int n = 0; n < N; n++)
            for (int i = 0; i < nb; i++)
                for (int j = 0; j < q; j++) {
                    double s = beta ? y[(size_t)n * ldy + offy + i * q + j] : 0.0;
                    for (int k = 0; k < p; k++)
                        s += (double)x[(size_t)n * ldx + offx + i * p + k] * W[((size_t)i * q + j) * p + k];
                    ref_y[(size_t)n * wy + i * q + j] = s;
                }
        blockdiag_forward(y + offy, ldy, x + offx, ldx, W, N, nb, p, q, (float)beta);
        gather(got, y, N, ldy, offy, wy);
        double e = rel_err_d(got, ref_y, (size_t)N * wy);
        snprintf(what, sizeof what, "blockdiag_forward beta=%d %s", beta, name);
        check(e < TOL_FWD && outside_untouched(y, N, ldy, offy, wy), what, "rel err %.3g (tol %g) or wrote outside the slice", e, TOL_FWD);
        free(y);

        // backward_input: dx = beta*dx0 + dy W per block
        float *dx = slice_buf(N, ldx, offx, wx, beta);
        for (int n = 0; n < N; n++)
            for (int i = 0; i < nb; i++)
                for (int k = 0; k < p; k++) {
                    double s = beta ? dx[(size_t)n * ldx + offx + i * p + k] : 0.0;
                    for (int j = 0; j < q; j++)
                        s += (double)dy[(size_t)n * ldy + offy + i * q + j] * W[((size_t)i * q + j) * p + k];
                    ref_dx[(size_t)n * wx + i * p + k] = s;
                }
        blockdiag_backward_input(dx + offx, ldx, dy + offy, ldy, W, N, nb, p, q, (float)beta);
        gather(got, dx, N, ldx, offx, wx);
        e = rel_err_d(got, ref_dx, (size_t)N * wx);
        snprintf(what, sizeof what, "blockdiag_backward_input beta=%d %s", beta, name);
        check(e < TOL_GRAD && outside_untouched(dx, N, ldx, offx, wx), what, "rel err %.3g (tol %g) or wrote outside the slice", e, TOL_GRAD);
        free(dx);
    }
    // backward_weight: dW += dy^T x per block, onto a non-zero dW
    float *dW = rand_buf((size_t)nb * q * p, 1.0f);
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < q; j++)
            for (int k = 0; k < p; k++) {
                double s = dW[((size_t)i * q + j) * p + k];
                for (int n = 0; n < N; n++)
                    s += (double)dy[(size_t)n * ldy + offy + i * q + j] * x[(size_t)n * ldx + offx + i * p + k];
                ref_dW[((size_t)i * q + j) * p + k] = s;
            }
    blockdiag_backward_weight(dW, dy + offy, ldy, x + offx, ldx, N, nb, p, q);
    double e = rel_err_d(dW, ref_dW, (size_t)nb * q * p);
    snprintf(what, sizeof what, "blockdiag_backward_weight accumulates %s", name);
    check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
    free(dW); free(W); free(x); free(dy); free(ref_y); free(ref_dx); free(ref_dW); free(got);
}

static void test_token_transpose(int N, int a, int b, int r) {
    size_t row = (size_t)a * b * r;
    float *in = rand_buf(N * row, 1.0f), *out = malloc(N * row * sizeof(float)), *back = malloc(N * row * sizeof(float));
    fill(out, N * row, NAN);
    token_transpose(out, in, N, a, b, r);
    int bad = 0;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < a; i++)
            for (int j = 0; j < b; j++)
                for (int k = 0; k < r; k++)
                    bad += out[n * row + ((size_t)j * a + i) * r + k] != in[n * row + ((size_t)i * b + j) * r + k];
    token_transpose(back, out, N, b, a, r);  // (b,a,r) -> (a,b,r) undoes it
    char what[128];
    snprintf(what, sizeof what, "token_transpose N=%d (a,b,r)=(%d,%d,%d) and its inverse", N, a, b, r);
    check(!bad && !memcmp(back, in, N * row * sizeof(float)), what, "%d entries wrong", bad);
    free(in); free(out); free(back);
}

// ----------------------------------------------------------------------------
// The dense matrix of each structure, in double, from DESIGN section 3 (shapes derived here from
// the spec, independently of structure.h).

typedef struct {
    const char *type;
    int which, C, blocks, rank, in_blocks, out_blocks, N;
    int fd_all;   // 1: finite differences on every weight; 0: along random directions (larger layers)
} LayerCase;

typedef struct { int type, d_in, d_out, b, r, m1, m0, n0, n1; size_t n0w, n1w; } Dims;

static int largest_divisor_le_sqrt(int n) { int f = 1; for (int d = 1; d * d <= n; d++) if (n % d == 0) f = d; return f; }

static Dims case_dims(const LayerCase *lc) {
    Dims d = {0};
    int C = lc->C;
    d.d_in = lc->which == LIN_MLP_PROJ ? 4 * C : C;
    d.d_out = lc->which == LIN_ATTN_QKV ? 3 * C : lc->which == LIN_MLP_FC ? 4 * C : C;
    int m = d.d_in < d.d_out ? d.d_in : d.d_out;
    if (!strcmp(lc->type, "dense")) { d.type = STRUCT_DENSE; d.n0w = (size_t)d.d_in * d.d_out; }
    else if (!strcmp(lc->type, "blockdiag")) { d.type = STRUCT_BLOCKDIAG; d.b = lc->blocks ? lc->blocks : 4; d.n0w = (size_t)d.d_in * d.d_out / d.b; }
    else if (!strcmp(lc->type, "lowrank")) {
        d.type = STRUCT_LOWRANK; d.r = lc->rank ? lc->rank : m / 4;
        d.n0w = (size_t)d.r * d.d_in; d.n1w = (size_t)d.d_out * d.r;
    } else if (!strcmp(lc->type, "monarch")) {
        d.type = STRUCT_MONARCH; d.b = lc->blocks ? lc->blocks : 4;
        d.n0w = (size_t)m * d.d_in / d.b; d.n1w = (size_t)d.d_out * m / d.b;
    } else {
        d.type = STRUCT_BTT; d.r = lc->rank ? lc->rank : 1;
        d.m0 = lc->in_blocks ? d.d_in / lc->in_blocks : largest_divisor_le_sqrt(d.d_in);
        d.m1 = d.d_in / d.m0;
        d.n0 = lc->out_blocks ? lc->out_blocks : largest_divisor_le_sqrt(d.d_out);
        d.n1 = d.d_out / d.n0;
        d.n0w = (size_t)d.m1 * d.n0 * d.r * d.m0; d.n1w = (size_t)d.n0 * d.n1 * d.m1 * d.r;
    }
    return d;
}

// Wd (d_out, d_in) from the cores W0 (and W1), as the formulas of DESIGN 3.1-3.5 say.
static void dense_of(const Dims *d, const double *W0, const double *W1, double *Wd) {
    int di = d->d_in, dout = d->d_out;
    memset(Wd, 0, (size_t)dout * di * sizeof(double));
    if (d->type == STRUCT_DENSE) {
        memcpy(Wd, W0, (size_t)dout * di * sizeof(double));
    } else if (d->type == STRUCT_BLOCKDIAG) {
        int b = d->b, p = di / b, q = dout / b;
        for (int i = 0; i < b; i++)
            for (int j = 0; j < q; j++)
                for (int k = 0; k < p; k++) Wd[(size_t)(i * q + j) * di + i * p + k] = W0[((size_t)i * q + j) * p + k];
    } else if (d->type == STRUCT_LOWRANK) {
        // W = U V, V = W0 (r, d_in), U = W1 (d_out, r)
        for (int o = 0; o < dout; o++)
            for (int i = 0; i < di; i++) {
                double s = 0;
                for (int a = 0; a < d->r; a++) s += W1[(size_t)o * d->r + a] * W0[(size_t)a * di + i];
                Wd[(size_t)o * di + i] = s;
            }
    } else if (d->type == STRUCT_MONARCH) {
        // y[(s l)] = sum_c W1[l, s, c] u[(c l)], u[(i c')] = sum_p W0[i, c', p] x[(i p)]
        int b = d->b, m = di < dout ? di : dout, q = m / b, pin = di / b, pout = dout / b;
        for (int s = 0; s < pout; s++)
            for (int l = 0; l < b; l++)
                for (int c = 0; c < q; c++) {
                    int flat = c * b + l, i = flat / q, cc = flat % q;
                    double w1 = W1[((size_t)l * pout + s) * q + c];
                    for (int pp = 0; pp < pin; pp++)
                        Wd[(size_t)(s * b + l) * di + i * pin + pp] += w1 * W0[((size_t)i * q + cc) * pin + pp];
                }
    } else {
        // y[(j0 j1)] = sum_(i1 a) W1[j0, j1, (i1 a)] sum_i0 W0[i1, (j0 a), i0] x[(i1 i0)]
        int m1 = d->m1, m0 = d->m0, n0 = d->n0, n1 = d->n1, r = d->r;
        for (int j0 = 0; j0 < n0; j0++)
            for (int j1 = 0; j1 < n1; j1++)
                for (int i1 = 0; i1 < m1; i1++)
                    for (int a = 0; a < r; a++) {
                        double w1 = W1[((size_t)j0 * n1 + j1) * m1 * r + i1 * r + a];
                        for (int i0 = 0; i0 < m0; i0++)
                            Wd[(size_t)(j0 * n1 + j1) * di + i1 * m0 + i0] += w1 * W0[((size_t)i1 * n0 * r + j0 * r + a) * m0 + i0];
                    }
    }
}

// L(W0, W1) = sum_{o,i} G[o,i] Wd[o,i] with G = dy^T x: the functional whose gradients are dW0, dW1.
static double functional(const Dims *d, const double *W0, const double *W1, const double *G, double *Wd) {
    dense_of(d, W0, W1, Wd);
    double s = 0;
    for (size_t k = 0; k < (size_t)d->d_out * d->d_in; k++) s += G[k] * Wd[k];
    return s;
}

// Gradient of L wrt core `which_core` by central differences (step 1; L is linear in each core).
// fd_all: every entry into ref; else ndir random directions: ref[k] = dL along dir k, got[k] = <grad, dir k>.
static double check_core_grad(const Dims *d, double *W0, double *W1, const double *G, double *Wd,
                              const float *grad, int which_core, int fd_all, int ndir) {
    double *Wc = which_core ? W1 : W0;
    size_t n = which_core ? d->n1w : d->n0w;
    if (fd_all) {
        double *ref = malloc(n * sizeof(double));
        for (size_t k = 0; k < n; k++) {
            double keep = Wc[k];
            Wc[k] = keep + 1; double lp = functional(d, W0, W1, G, Wd);
            Wc[k] = keep - 1; double lm = functional(d, W0, W1, G, Wd);
            Wc[k] = keep;
            ref[k] = (lp - lm) / 2;
        }
        double e = rel_err_d(grad, ref, n);
        free(ref);
        return e;
    }
    double *keep = malloc(n * sizeof(double));
    memcpy(keep, Wc, n * sizeof(double));
    double worst = 0, gnorm = 0;
    for (size_t k = 0; k < n; k++) gnorm += (double)grad[k] * grad[k];
    for (int t = 0; t < ndir; t++) {
        double *dir = malloc(n * sizeof(double)), dnorm = 0, dot = 0;
        for (size_t k = 0; k < n; k++) { dir[k] = urand(); dnorm += dir[k] * dir[k]; dot += dir[k] * grad[k]; }
        for (size_t k = 0; k < n; k++) Wc[k] = keep[k] + dir[k];
        double lp = functional(d, W0, W1, G, Wd);
        for (size_t k = 0; k < n; k++) Wc[k] = keep[k] - dir[k];
        double lm = functional(d, W0, W1, G, Wd);
        memcpy(Wc, keep, n * sizeof(double));
        // Error relative to |grad| |dir|: the scale of <grad, dir> for the fp32 rounding of grad.
        double scale = sqrt(gnorm * dnorm);
        double e = fabs(dot - (lp - lm) / 2) / (scale > 0 ? scale : 1);
        if (!(e <= worst)) worst = e;
        free(dir);
    }
    free(keep);
    return worst;
}

static void set_spec(Config *c, const LayerCase *lc) {
    config_defaults(c);
    c->model.n_embd = lc->C;
    c->model.n_head = 1;
    LinearSpec *sp = &c->model.linear[lc->which];
    memset(sp, 0, sizeof *sp);
    strcpy(sp->type, lc->type);
    sp->blocks = lc->blocks; sp->rank = lc->rank; sp->in_blocks = lc->in_blocks; sp->out_blocks = lc->out_blocks;
}

static void test_layer(const LayerCase *lc) {
    Config c;
    set_spec(&c, lc);
    Structure s;
    char err[512], name[200], what[300], desc[256];
    if (structure_resolve(&s, &c, lc->which, err, sizeof err)) {
        snprintf(what, sizeof what, "structure_resolve %s %s C=%d", lc->type, linear_names[lc->which], lc->C);
        check(0, what, "%s", err);
        return;
    }
    Dims d = case_dims(lc);
    int N = lc->N, di = d.d_in, dout = d.d_out;
    snprintf(name, sizeof name, "%s (%d -> %d) N=%d", structure_describe(&s, desc, sizeof desc), di, dout, N);
    size_t n0w = d.n0w, n1w = d.n1w;
    size_t s0 = (size_t)s.core[0].nb * s.core[0].p * s.core[0].q;
    size_t s1 = s.ncores == 2 ? (size_t)s.core[1].nb * s.core[1].p * s.core[1].q : 0;
    snprintf(what, sizeof what, "core sizes agree with the test's shapes: %s", name);
    check(s0 == n0w && s1 == n1w && s.d_in == di && s.d_out == dout, what, "%zu %zu vs %zu %zu", s0, s1, n0w, n1w);
    if (s0 != n0w || s1 != n1w) return;

    float *x = rand_buf((size_t)N * di, 1.0f), *dy = rand_buf((size_t)N * dout, 1.0f);
    float *W0 = rand_buf(n0w, 1.0f), *W1 = n1w ? rand_buf(n1w, 1.0f) : NULL;
    size_t nsaved = structured_saved_floats(&s, N), nscratch = structured_scratch_floats(&s, N);
    float *saved = malloc((nsaved ? nsaved : 1) * sizeof(float)), *scratch = malloc((nscratch ? nscratch : 1) * sizeof(float));
    float *y = malloc((size_t)N * dout * sizeof(float)), *dx = malloc((size_t)N * di * sizeof(float));
    float *dW0 = calloc(n0w, sizeof(float)), *dW1 = calloc(n1w ? n1w : 1, sizeof(float));
    fill(y, (size_t)N * dout, NAN);   // outputs are overwritten: a NaN left anywhere fails the check
    fill(dx, (size_t)N * di, NAN);
    fill(scratch, nscratch, NAN);
    structured_forward(&s, y, x, W0, W1, saved, scratch, N);
    fill(scratch, nscratch, NAN);     // backward may not rely on scratch surviving forward
    structured_backward(&s, dx, dW0, dW1, dy, x, W0, W1, saved, scratch, N);

    // Double references: y = x Wd^T, dx = dy Wd, G = dy^T x.
    double *dW0d = to_double(W0, n0w), *dW1d = to_double(W1, n1w);
    double *Wd = malloc((size_t)dout * di * sizeof(double)), *Wtmp = malloc((size_t)dout * di * sizeof(double));
    dense_of(&d, dW0d, dW1d, Wd);
    double *ry = calloc((size_t)N * dout, sizeof(double)), *rdx = calloc((size_t)N * di, sizeof(double));
    double *G = calloc((size_t)dout * di, sizeof(double));
    for (int n = 0; n < N; n++)
        for (int o = 0; o < dout; o++)
            for (int i = 0; i < di; i++) {
                double w = Wd[(size_t)o * di + i], xv = x[(size_t)n * di + i], g = dy[(size_t)n * dout + o];
                ry[(size_t)n * dout + o] += xv * w;
                rdx[(size_t)n * di + i] += g * w;
                G[(size_t)o * di + i] += g * xv;
            }
    double e = rel_err_d(y, ry, (size_t)N * dout);
    snprintf(what, sizeof what, "structured_forward = x W_dense^T: %s", name);
    check(e < TOL_FWD, what, "rel err %.3g (tol %g)", e, TOL_FWD);
    e = rel_err_d(dx, rdx, (size_t)N * di);
    snprintf(what, sizeof what, "structured_backward dx = dy W_dense: %s", name);
    check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
    for (int k = 0; k < s.ncores; k++) {
        e = check_core_grad(&d, dW0d, dW1d, G, Wtmp, k ? dW1 : dW0, k, lc->fd_all, 3);
        snprintf(what, sizeof what, "structured_backward dW%d = finite differences of L (%s): %s", k,
                 lc->fd_all ? "every weight" : "3 random directions", name);
        check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
    }

    // Determinism: a second run into fresh buffers is bit-identical; dW accumulates (now 2 grads).
    float *y2 = malloc((size_t)N * dout * sizeof(float)), *dx2 = malloc((size_t)N * di * sizeof(float));
    float *saved2 = malloc((nsaved ? nsaved : 1) * sizeof(float));
    float *g0 = malloc(n0w * sizeof(float)), *g1 = malloc((n1w ? n1w : 1) * sizeof(float));
    memcpy(g0, dW0, n0w * sizeof(float));
    if (n1w) memcpy(g1, dW1, n1w * sizeof(float));
    fill(y2, (size_t)N * dout, -7.0f);
    fill(dx2, (size_t)N * di, -7.0f);
    structured_forward(&s, y2, x, W0, W1, saved2, scratch, N);
    structured_backward(&s, dx2, dW0, dW1, dy, x, W0, W1, saved2, scratch, N);
    int same = !memcmp(y, y2, (size_t)N * dout * sizeof(float)) && !memcmp(dx, dx2, (size_t)N * di * sizeof(float)) &&
               !memcmp(saved, saved2, nsaved * sizeof(float));
    snprintf(what, sizeof what, "second run bit-identical (y, dx, saved): %s", name);
    check(same, what, "outputs differ between two identical runs");
    // dW after two backward passes = g + g; fl(g + g) is exact, the tolerance only admits a
    // different summation order of the second pass (1e-6 of the scale, fp32 rounding of the add).
    double worst = 0, scale = max_abs(g0, n0w) + (n1w ? max_abs(g1, n1w) : 0);
    for (size_t k = 0; k < n0w; k++) { double t = fabs(dW0[k] - 2.0 * g0[k]); if (!(t <= worst)) worst = t; }
    for (size_t k = 0; k < n1w; k++) { double t = fabs(dW1[k] - 2.0 * g1[k]); if (!(t <= worst)) worst = t; }
    snprintf(what, sizeof what, "dW0/dW1 accumulate across backward calls: %s", name);
    check(worst <= 1e-6 * scale, what, "max |dW - 2g| = %.3g (scale %.3g)", worst, scale);

    free(x); free(dy); free(W0); free(W1); free(saved); free(scratch); free(y); free(dx); free(dW0); free(dW1);
    free(dW0d); free(dW1d); free(Wd); free(Wtmp); free(ry); free(rdx); free(G);
    free(y2); free(dx2); free(saved2); free(g0); free(g1);
}

// ----------------------------------------------------------------------------
// Layer fixtures written by the PyTorch reference (contract D): y = S(x) + b and its gradients.

static int spec_int(const cJSON *spec, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(spec, key);
    return cJSON_IsNumber(v) ? v->valueint : 0;
}

static const float *fixture_tensor(const SafeTensors *st, const char *path, const char *tname, size_t want,
                                   int *ok) {
    const char *dtype;
    int ndim;
    long long shape[4];
    const float *p = safetensors_find(st, tname, &dtype, &ndim, shape);
    size_t n = 1;
    if (p) for (int k = 0; k < ndim; k++) n *= (size_t)shape[k];
    if (!p || strcmp(dtype, "F32") || n != want) {
        char what[1024];
        snprintf(what, sizeof what, "%s: tensor %s present, F32, %zu values", path, tname, want);
        check(0, what, p ? "dtype %s, %zu values" : "missing", p ? dtype : "", n);
        *ok = 0;
        return NULL;
    }
    return p;
}

static int test_fixture(const char *path) {
    SafeTensors st;
    char err[1024], what[1024];
    if (safetensors_read(&st, path, err, sizeof err)) {
        snprintf(what, sizeof what, "read %s", path);
        check(0, what, "%s", err);
        return 0;
    }
    const char *meta = safetensors_meta(&st, "config");
    cJSON *cfg = meta ? cJSON_Parse(meta) : NULL;
    const cJSON *spec = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "spec") : NULL;
    const cJSON *which_j = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "which") : NULL;
    int which = -1;
    for (int p = 0; p < NUM_LINEAR && cJSON_IsString(which_j); p++) if (!strcmp(which_j->valuestring, linear_names[p])) which = p;
    const cJSON *type = spec ? cJSON_GetObjectItemCaseSensitive(spec, "type") : NULL;
    if (!cJSON_IsObject(spec) || which < 0 || !cJSON_IsString(type)) {
        snprintf(what, sizeof what, "%s: metadata config has spec, which, spec.type", path);
        check(0, what, "config = %s", meta ? meta : "(absent)");
        cJSON_Delete(cfg); safetensors_free(&st);
        return 0;
    }
    Config c;
    config_defaults(&c);
    const cJSON *v;
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(cfg, "n_embd"))) c.model.n_embd = v->valueint;
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(cfg, "n_layer"))) c.model.n_layer = v->valueint;
    if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(cfg, "base_width"))) c.model.base_width = v->valueint;
    if (cJSON_IsString(v = cJSON_GetObjectItemCaseSensitive(cfg, "parametrization")))
        snprintf(c.model.parametrization, sizeof c.model.parametrization, "%s", v->valuestring);
    LinearSpec *sp = &c.model.linear[which];
    memset(sp, 0, sizeof *sp);
    snprintf(sp->type, sizeof sp->type, "%s", type->valuestring);
    sp->blocks = spec_int(spec, "blocks"); sp->rank = spec_int(spec, "rank");
    sp->in_blocks = spec_int(spec, "in_blocks"); sp->out_blocks = spec_int(spec, "out_blocks");
    sp->experts = spec_int(spec, "experts"); sp->top_k = spec_int(spec, "top_k");
    if (cJSON_IsString(v = cJSON_GetObjectItemCaseSensitive(spec, "weight_norm")))
        snprintf(sp->weight_norm, sizeof sp->weight_norm, "%s", v->valuestring);
    Structure s;
    int rc = structure_resolve(&s, &c, which, err, sizeof err);
    snprintf(what, sizeof what, "%s: structure_resolve", path);
    check(rc == 0, what, "%s", err);
    // rms_cap layers and btt_moe are tested with the model (test_gpt2) and moe.h: this header has neither.
    if (rc || s.rms_cap || s.type == STRUCT_BTT_MOE) {
        if (!rc) printf("# %s: %s layer not compared here (no rms_cap / routing in blockdiag.h)\n", path,
                        s.rms_cap ? "rms_cap" : "btt_moe");
        cJSON_Delete(cfg); safetensors_free(&st);
        return 0;
    }
    int N = 0, ndim;
    long long shape[4];
    const char *dtype;
    if (safetensors_find(&st, "x", &dtype, &ndim, shape) && ndim == 2 && shape[1] == s.d_in) N = (int)shape[0];
    snprintf(what, sizeof what, "%s: x is (N, d_in = %d)", path, s.d_in);
    check(N > 0, what, "absent or wrong shape");
    if (N <= 0) { cJSON_Delete(cfg); safetensors_free(&st); return 0; }
    int ok = 1;
    size_t n0w = (size_t)s.core[0].nb * s.core[0].p * s.core[0].q;
    size_t n1w = s.ncores == 2 ? (size_t)s.core[1].nb * s.core[1].p * s.core[1].q : 0;
    const char *w0name = s.ncores == 1 ? "W" : "W0";
    char g0name[16], g1name[16] = "grad.W1";
    snprintf(g0name, sizeof g0name, "grad.%s", w0name);
    const float *x = fixture_tensor(&st, path, "x", (size_t)N * s.d_in, &ok);
    const float *W0 = fixture_tensor(&st, path, w0name, n0w, &ok);
    const float *W1 = n1w ? fixture_tensor(&st, path, "W1", n1w, &ok) : NULL;
    const float *ry = fixture_tensor(&st, path, "y", (size_t)N * s.d_out, &ok);
    const float *dy = fixture_tensor(&st, path, "dy", (size_t)N * s.d_out, &ok);
    const float *rdx = fixture_tensor(&st, path, "dx", (size_t)N * s.d_in, &ok);
    const float *rg0 = fixture_tensor(&st, path, g0name, n0w, &ok);
    const float *rg1 = n1w ? fixture_tensor(&st, path, g1name, n1w, &ok) : NULL;
    const float *b = safetensors_find(&st, "b", NULL, NULL, NULL);
    if (!ok) { cJSON_Delete(cfg); safetensors_free(&st); return 0; }
    size_t nsaved = structured_saved_floats(&s, N), nscratch = structured_scratch_floats(&s, N);
    float *saved = malloc((nsaved ? nsaved : 1) * sizeof(float)), *scratch = malloc((nscratch ? nscratch : 1) * sizeof(float));
    float *y = malloc((size_t)N * s.d_out * sizeof(float)), *dx = malloc((size_t)N * s.d_in * sizeof(float));
    float *dW0 = calloc(n0w, sizeof(float)), *dW1 = calloc(n1w ? n1w : 1, sizeof(float));
    structured_forward(&s, y, x, W0, W1, saved, scratch, N);
    if (b) for (int n = 0; n < N; n++) for (int o = 0; o < s.d_out; o++) y[(size_t)n * s.d_out + o] += b[o];
    structured_backward(&s, dx, dW0, dW1, dy, x, W0, W1, saved, scratch, N);
    char desc[256];
    structure_describe(&s, desc, sizeof desc);
    double e = max_rel_err(y, ry, (size_t)N * s.d_out, max_abs(ry, (size_t)N * s.d_out));
    snprintf(what, sizeof what, "%s: y matches the PyTorch reference (%s)", path, desc);
    check(e < TOL_FWD, what, "rel err %.3g (tol %g)", e, TOL_FWD);
    e = max_rel_err(dx, rdx, (size_t)N * s.d_in, max_abs(rdx, (size_t)N * s.d_in));
    snprintf(what, sizeof what, "%s: dx matches the PyTorch reference", path);
    check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
    e = max_rel_err(dW0, rg0, n0w, max_abs(rg0, n0w));
    snprintf(what, sizeof what, "%s: %s matches the PyTorch reference", path, g0name);
    check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
    if (n1w) {
        e = max_rel_err(dW1, rg1, n1w, max_abs(rg1, n1w));
        snprintf(what, sizeof what, "%s: %s matches the PyTorch reference", path, g1name);
        check(e < TOL_GRAD, what, "rel err %.3g (tol %g)", e, TOL_GRAD);
    }
    free(saved); free(scratch); free(y); free(dx); free(dW0); free(dW1);
    cJSON_Delete(cfg);
    safetensors_free(&st);
    return 1;
}

static void test_fixtures(void) {
    int found = each_fixture("linear_", test_fixture);
    printf("# %d layer fixture(s) test/fixtures/linear_*.safetensors compared\n", found);
}

int main(void) {
    const PrimCase prims[] = {
        {7, 3, 5, 4, 0, 0},      // small, odd
        {1, 1, 1, 1, 0, 0},      // p = q = 1, one token
        {9, 2, 1, 6, 3, 2},      // p = 1, slices of wider matrices
        {5, 4, 6, 1, 1, 5},      // q = 1
        {33, 1, 17, 13, 0, 0},   // nb = 1 (a dense matmul)
        {64, 8, 24, 32, 5, 7},   // BTT-like small blocks
        {130, 32, 24, 24, 0, 3}, // many small square blocks
        {97, 3, 96, 80, 4, 0},   // large blocks
        {200, 2, 192, 576, 0, 0},// monarch / blockdiag at GPT-2 block sizes
        {100, 1, 192, 300, 3, 1},// one large block: the cblas_sgemm path
        {65, 6, 64, 1, 2, 3},    // q = 1 with many tokens
    };
    for (size_t i = 0; i < sizeof prims / sizeof prims[0]; i++) test_primitives(&prims[i]);
    test_token_transpose(3, 4, 5, 1);
    test_token_transpose(2, 1, 7, 3);
    test_token_transpose(4, 6, 1, 2);
    test_token_transpose(5, 3, 4, 2);
    test_token_transpose(17, 32, 24, 1);
    test_token_transpose(9, 24, 32, 8);
    // every path of bd_transpose_rows: 8x8 tiles; a or b of 2, 4 (r = 1); r of 2, 3, 4, 8 and other
    test_token_transpose(3, 16, 24, 1);
    test_token_transpose(3, 8, 8, 1);
    test_token_transpose(3, 2, 9, 1);
    test_token_transpose(3, 9, 2, 1);
    test_token_transpose(3, 7, 4, 1);
    test_token_transpose(3, 8, 12, 1);
    test_token_transpose(4, 5, 6, 4);
    test_token_transpose(2, 3, 4, 5);

    const LayerCase layers[] = {
        {"dense", LIN_ATTN_QKV, 8, 0, 0, 0, 0, 5, 1},
        {"dense", LIN_MLP_PROJ, 40, 0, 0, 0, 0, 20, 0},        // 160 -> 40: the cblas_sgemm path
        {"blockdiag", LIN_MLP_FC, 8, 0, 0, 0, 0, 6, 1},        // default b = 4, 8 -> 32
        {"blockdiag", LIN_MLP_PROJ, 6, 1, 0, 0, 0, 4, 1},      // b = 1: dense through the block path
        {"blockdiag", LIN_ATTN_QKV, 6, 3, 0, 0, 0, 7, 1},      // 6 -> 18
        {"lowrank", LIN_MLP_PROJ, 8, 0, 0, 0, 0, 5, 1},        // default r = 8/4 = 2, 32 -> 8
        {"lowrank", LIN_ATTN_QKV, 8, 0, 5, 0, 0, 3, 1},        // r = 5, 8 -> 24
        {"monarch", LIN_ATTN_QKV, 8, 0, 0, 0, 0, 5, 1},        // b = 4, q = 2 (b does not divide q)
        {"monarch", LIN_MLP_PROJ, 8, 2, 0, 0, 0, 6, 1},        // 32 -> 8, q = 4
        {"monarch", LIN_ATTN_PROJ, 16, 4, 0, 0, 0, 4, 1},      // square, q = b = 4
        {"btt", LIN_MLP_FC, 8, 0, 0, 0, 0, 5, 1},              // defaults: m1=4 m0=2 n0=4 n1=8, r = 1
        {"btt", LIN_ATTN_QKV, 12, 0, 2, 3, 4, 4, 1},           // explicit m1=3, n0=4, r = 2
        {"btt", LIN_MLP_PROJ, 6, 0, 3, 6, 2, 5, 1},            // 24 -> 6, m1=6 n0=2 r=3
        {"btt", LIN_ATTN_PROJ, 8, 0, 1, 1, 0, 4, 1},           // m1 = 1: the permutation is the identity
        {"btt", LIN_ATTN_QKV, 96, 0, 0, 0, 0, 300, 0},         // 96 -> 288 defaults, many token chunks
        {"btt", LIN_MLP_PROJ, 64, 0, 2, 0, 0, 33, 0},          // 256 -> 64, r = 2
        {"monarch", LIN_MLP_FC, 64, 0, 0, 0, 0, 301, 0},       // 64 -> 256, b = 4, many token chunks
        {"lowrank", LIN_MLP_FC, 96, 0, 0, 0, 0, 30, 0},        // 96 -> 384, r = 24
        {"blockdiag", LIN_MLP_PROJ, 96, 0, 0, 0, 0, 30, 0},    // 384 -> 96
        {"monarch", LIN_MLP_FC, 256, 2, 0, 0, 0, 20, 0},       // 256 -> 1024: stage 2 blocks 128 -> 512
        {"monarch", LIN_MLP_FC, 512, 0, 0, 0, 0, 60, 0},       // 512 -> 2048: too many weights to fuse
        {"btt", LIN_MLP_FC, 256, 0, 0, 4, 4, 50, 0},           // 256 -> 1024: W0 (4, 4, 64), W1 (4, 256, 4)
    };
    for (size_t i = 0; i < sizeof layers / sizeof layers[0]; i++) test_layer(&layers[i]);
    test_fixtures();
    return test_exit();
}
