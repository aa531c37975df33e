// Shapes of every structured linear layer (DESIGN section 3): its cores (block-diagonal factors),
// the per-token permutations between them, parameter and MAC counts, init standard deviations and
// AdamW learning-rate multipliers (DESIGN 3.7). Everything about a layer that does not depend on its
// weights is decided here, once, from the config; the kernels (blockdiag.h, moe.h) only read it.
#ifndef LLMC_STRUCTURE_H
#define LLMC_STRUCTURE_H

#include <math.h>
#include <stdio.h>
#include <string.h>
#include "llmc/config.h"

enum { STRUCT_DENSE, STRUCT_BLOCKDIAG, STRUCT_LOWRANK, STRUCT_MONARCH, STRUCT_BTT, STRUCT_BTT_MOE };
static const char *const structure_names[] = {"dense", "blockdiag", "lowrank", "monarch", "btt", "btt_moe"};

typedef struct { int nb, p, q; } CoreShape;      // nb blocks each p -> q; weight (nb, q, p)
typedef struct { int a, b, r; } TokenPermute;    // per-token (a,b,r) -> (b,a,r); a == 0: none

typedef struct {
    int type, d_in, d_out, which, layer_is_residual;   // which: LIN_* projection index
    int ncores;               // 1: dense, blockdiag; 2: lowrank, monarch, btt, btt_moe
    CoreShape core[2];        // weight shapes (nb, q, p): dense (1, d_out, d_in); blockdiag (b, d_out/b, d_in/b);
                              // btt (m1, n0*r, m0), (n0, n1, m1*r); lowrank (1, r, d_in), (1, d_out, r);
                              // monarch (b, q, d_in/b), (b, d_out/b, q) (q = min(d_in,d_out)/b);
                              // btt_moe: the rank-E BTT (m1, n0*E, m0), (n0, n1, m1*E)
    TokenPermute mid;         // between stages: btt/lowrank/btt_moe {m1, n0, r}; monarch {q, b, 1}
    TokenPermute out;         // after stage 2: monarch {b, d_out/b, 1}; else a = 0
    int mid_width;            // per-token intermediate width = core[0].nb * core[0].q
    int m1, m0, n0, n1, rank; // btt/btt_moe (rank = E for btt_moe); lowrank: m1=n0=1, m0=d_in, n1=d_out
    int blocks;               // blockdiag, monarch
    int experts, top_k;       // btt_moe
    int rms_cap;              // weight_norm resolved (rms_cap default for btt, btt_moe under mup)
    double init_std[2];       // per core under the config's parametrization; 0 means zero init
    double mup_sigma[2];      // mup init std of each core (rms_cap's sigma), whatever the parametrization
    double lr_mult[2];        // AdamW lr multiplier per core (1 under standard)
    double router_lr_mult;    // btt_moe (0 for the types without a router)
    long long params;         // core (+ router) parameters; excludes bias and gamma
    double macs;              // forward MACs per token: cores (btt_moe: k/E of the cores) + router E*d_in
    double dense_macs;        // d_in * d_out
} Structure;

// The divisor f of n closest to sqrt(n) from below: n = (n/f) * f with f <= n/f (DESIGN 3.3's default
// BTT factorization: 768 = 32*24, 3072 = 64*48, 2304 = 48*48).
static int structure_square_divisor(int n) {
    int best = 1;
    for (int f = 1; (long long)f * f <= n; f++) if (n % f == 0) best = f;
    return best;
}

// "d: what (v) must divide d; valid: ..." lists of the divisors of g into buf.
static void structure_divisors(char *buf, size_t len, int g) {
    buf[0] = '\0';
    for (int b = 1; b <= g && strlen(buf) + 16 < len; b++)
        if (g % b == 0) snprintf(buf + strlen(buf), len - strlen(buf), "%s%d", *buf ? " " : "", b);
}

// Factorizations n = outer*inner as "outer x inner" pairs into buf.
static void structure_factorizations(char *buf, size_t len, int n) {
    buf[0] = '\0';
    for (int f = 1; f <= n && strlen(buf) + 24 < len; f++)
        if (n % f == 0) snprintf(buf + strlen(buf), len - strlen(buf), "%s%dx%d", *buf ? " " : "", f, n / f);
}

static int structure_gcd(int a, int b) { while (b) { int t = a % b; a = b; b = t; } return a; }

// mup init std of a core whose (rank-1) block maps fan_in -> fan_out (DESIGN 3.7).
static double structure_mup_sigma(int fan_in, int fan_out) {
    double ratio = sqrt((double)fan_out / fan_in);
    return (ratio < 1.0 ? ratio : 1.0) / sqrt((double)fan_in);
}

// Resolve projection `which` (LIN_*) of config c. Returns 0, or -1 with a one-line message in err
// naming the layer and what would be valid. Shapes are validated by config.h already; this repeats
// the checks so a Config built by hand (tests, tools) cannot produce a layer that does not tile.
static int structure_resolve(Structure *s, const Config *c, int which, char *err, size_t errlen) {
    memset(s, 0, sizeof *s);
    if (err && errlen) err[0] = '\0';
    const LinearSpec *sp = &c->model.linear[which];
    int d_in, d_out;
    linear_dims(c, which, &d_in, &d_out);
    s->which = which;
    s->d_in = d_in;
    s->d_out = d_out;
    s->layer_is_residual = which == LIN_ATTN_PROJ || which == LIN_MLP_PROJ;
    s->type = -1;
    for (int t = 0; t < (int)(sizeof structure_names / sizeof structure_names[0]); t++)
        if (!strcmp(sp->type, structure_names[t])) s->type = t;
    char valid[336];  // the divisor lists stop near 320 characters: one readable line
    const char *name = linear_names[which];
#define STRUCT_FAIL(...) do { if (err && errlen) { \
        int n_ = snprintf(err, errlen, "%s (%d -> %d): %s: ", name, d_in, d_out, sp->type); \
        if (n_ >= 0 && (size_t)n_ < errlen) snprintf(err + n_, errlen - n_, __VA_ARGS__); } return -1; } while (0)
    if (s->type < 0) STRUCT_FAIL("unknown structure type (valid: dense blockdiag lowrank monarch btt btt_moe)");
    if (d_in < 1 || d_out < 1) STRUCT_FAIL("empty layer");
    int m = d_in < d_out ? d_in : d_out;
    int p0 = d_in, p1 = 0;  // the cores' fan-ins for the standard init (btt_moe: rank 1)
    int fan_out0 = d_out, fan_out1 = 0;
    switch (s->type) {
    case STRUCT_DENSE:
        s->ncores = 1;
        s->core[0] = (CoreShape){1, d_in, d_out};
        break;
    case STRUCT_BLOCKDIAG:
    case STRUCT_MONARCH: {
        int b = sp->blocks ? sp->blocks : 4;
        if (b < 1 || d_in % b || d_out % b) {
            structure_divisors(valid, sizeof valid, structure_gcd(d_in, d_out));
            STRUCT_FAIL("blocks %d must divide d_in and d_out; valid blocks: %.335s", b, valid);
        }
        s->blocks = b;
        if (s->type == STRUCT_BLOCKDIAG) {
            s->ncores = 1;
            s->core[0] = (CoreShape){b, d_in / b, d_out / b};
            p0 = d_in / b; fan_out0 = d_out / b;
        } else {
            int q = m / b;
            s->ncores = 2;
            s->core[0] = (CoreShape){b, d_in / b, q};
            s->core[1] = (CoreShape){b, q, d_out / b};
            s->mid = (TokenPermute){q, b, 1};
            s->out = (TokenPermute){b, d_out / b, 1};
            p0 = d_in / b; fan_out0 = q;
            p1 = q; fan_out1 = d_out / b;
        }
        break;
    }
    case STRUCT_LOWRANK: {
        int r = sp->rank ? sp->rank : m / 4;
        if (r < 1 || r > m) STRUCT_FAIL("rank %d must be in [1, %d]", r, m);
        s->ncores = 2;
        s->m1 = 1; s->m0 = d_in; s->n0 = 1; s->n1 = d_out; s->rank = r;
        s->core[0] = (CoreShape){1, d_in, r};
        s->core[1] = (CoreShape){1, r, d_out};
        s->mid = (TokenPermute){1, 1, r};
        p0 = d_in; fan_out0 = r;
        p1 = r; fan_out1 = d_out;
        break;
    }
    case STRUCT_BTT:
    case STRUCT_BTT_MOE: {
        int m1 = sp->in_blocks ? sp->in_blocks : d_in / structure_square_divisor(d_in);
        int n0 = sp->out_blocks ? sp->out_blocks : structure_square_divisor(d_out);
        if (m1 < 1 || d_in % m1) {
            structure_factorizations(valid, sizeof valid, d_in);
            STRUCT_FAIL("in_blocks %d must divide d_in %d; valid in_blocks x m0: %.335s", m1, d_in, valid);
        }
        if (n0 < 1 || d_out % n0) {
            structure_factorizations(valid, sizeof valid, d_out);
            STRUCT_FAIL("out_blocks %d must divide d_out %d; valid out_blocks x n1: %.335s", n0, d_out, valid);
        }
        int r = 1;
        if (s->type == STRUCT_BTT) {
            r = sp->rank ? sp->rank : 1;
            if (r < 1) STRUCT_FAIL("rank %d must be >= 1", r);
        } else {
            s->experts = sp->experts ? sp->experts : 8;
            s->top_k = sp->top_k ? sp->top_k : (s->experts < 2 ? s->experts : 2);
            if (s->experts < 1 || s->top_k < 1 || s->top_k > s->experts)
                STRUCT_FAIL("top_k %d must be in [1, experts = %d]", s->top_k, s->experts);
            r = s->experts;
        }
        int m0 = d_in / m1, n1 = d_out / n0;
        s->ncores = 2;
        s->m1 = m1; s->m0 = m0; s->n0 = n0; s->n1 = n1; s->rank = r;
        s->core[0] = (CoreShape){m1, m0, n0 * r};
        s->core[1] = (CoreShape){n0, m1 * r, n1};
        s->mid = (TokenPermute){m1, n0, r};
        // The init and lr fan-ins are those of the layer's BTT; for btt_moe those of one expert.
        int rr = s->type == STRUCT_BTT ? r : 1;
        p0 = m0; fan_out0 = n0 * rr;
        p1 = m1 * rr; fan_out1 = n1;
        break;
    }
    }
#undef STRUCT_FAIL
    s->mid_width = s->ncores == 2 ? s->core[0].nb * s->core[0].q : 0;

    const char *wn = sp->weight_norm;
    int mup = !strcmp(c->model.parametrization, "mup");
    s->rms_cap = *wn ? !strcmp(wn, "rms_cap") : mup && (s->type == STRUCT_BTT || s->type == STRUCT_BTT_MOE);

    // Counts. A btt_moe token runs top_k of the E rank-1 experts, each 1/E of the cores' MACs.
    double core_params = 0;
    for (int k = 0; k < s->ncores; k++) core_params += (double)s->core[k].nb * s->core[k].p * s->core[k].q;
    double router = s->type == STRUCT_BTT_MOE ? (double)s->experts * d_in : 0;
    s->params = (long long)(core_params + router);
    s->macs = (s->type == STRUCT_BTT_MOE ? core_params * s->top_k / s->experts : core_params) + router;
    s->dense_macs = (double)d_in * d_out;

    // Init and learning rates (DESIGN 3.7).
    double std_d = 0.02 / (s->layer_is_residual ? sqrt(2.0 * c->model.n_layer) : 1.0);
    double width_mult = (double)c->model.base_width / c->model.n_embd;
    int fan_in[2] = {p0, p1}, fan_out[2] = {fan_out0, fan_out1};
    for (int k = 0; k < s->ncores; k++) {
        s->mup_sigma[k] = structure_mup_sigma(fan_in[k], fan_out[k]);
        if (mup) {
            int last = k == s->ncores - 1;
            s->init_std[k] = last && s->layer_is_residual ? 0.0 : s->mup_sigma[k];
            s->lr_mult[k] = width_mult * ((double)d_in / fan_in[k]) / s->ncores;
        } else {
            // Same output variance as the dense layer: one core std_d^2 d_in = p0 s^2; two cores
            // std_d^2 d_in = p0 p1 s^4 (each stage sums over its block's fan-in).
            s->init_std[k] = s->ncores == 1 ? std_d * sqrt((double)d_in / p0)
                                            : pow(std_d * std_d * d_in / ((double)p0 * p1), 0.25);
            s->lr_mult[k] = 1.0;
        }
    }
    if (s->type == STRUCT_BTT_MOE) s->router_lr_mult = mup ? width_mult : 1.0;
    return 0;
}

// One line for logs: "btt m1=32 m0=24 n0=24 n1=32 r=1 W0(32,24,24) W1(24,32,32) rms_cap".
static const char *structure_describe(const Structure *s, char *buf, size_t len) {
    int n = 0;
    switch (s->type) {
    case STRUCT_DENSE: n = snprintf(buf, len, "dense"); break;
    case STRUCT_BLOCKDIAG: n = snprintf(buf, len, "blockdiag b=%d", s->blocks); break;
    case STRUCT_MONARCH: n = snprintf(buf, len, "monarch b=%d", s->blocks); break;
    case STRUCT_LOWRANK: n = snprintf(buf, len, "lowrank r=%d", s->rank); break;
    case STRUCT_BTT: n = snprintf(buf, len, "btt m1=%d m0=%d n0=%d n1=%d r=%d", s->m1, s->m0, s->n0, s->n1, s->rank); break;
    default: n = snprintf(buf, len, "btt_moe m1=%d m0=%d n0=%d n1=%d E=%d k=%d", s->m1, s->m0, s->n0, s->n1,
                          s->experts, s->top_k); break;
    }
    for (int k = 0; k < s->ncores && n >= 0 && (size_t)n < len; k++)
        n += snprintf(buf + n, len - n, " %s(%d,%d,%d)", s->ncores == 1 ? "W" : k ? "W1" : "W0",
                      s->core[k].nb, s->core[k].q, s->core[k].p);
    if (s->type == STRUCT_BTT_MOE && n >= 0 && (size_t)n < len) n += snprintf(buf + n, len - n, " G(%d,%d)", s->experts, s->d_in);
    if (s->rms_cap && n >= 0 && (size_t)n < len) snprintf(buf + n, len - n, " rms_cap");
    return buf;
}

#endif
