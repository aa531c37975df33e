// Tests of llmc/structure.h: structure_resolve for a table of configs (GPT-2 124M and small widths,
// standard and mup, every projection) against the formulas of DESIGN 3 and contract B recomputed
// here, a few values written out by hand from DESIGN's text, the refusals of shapes that do not
// tile, and, where test/fixtures/structure_table.json exists (from the PyTorch reference), every
// case in it.
// Tolerance: the doubles are computed by the same formulas in a different order, so they agree to a
// few ulps: relative 1e-12.
#include "llmc/structure.h"
#include "test/test.h"

#define TOL_REL 1e-12

static int close_rel(double a, double b) {
    if (a == b) return 1;
    double s = fabs(a) > fabs(b) ? fabs(a) : fabs(b);
    return fabs(a - b) <= TOL_REL * s;
}

typedef struct {
    const char *type;
    int blocks, rank, in_blocks, out_blocks, experts, top_k;
    const char *weight_norm;  // "" absent
} Spec;

static void make_config(Config *c, int C, int n_layer, int base_width, const char *param, int which, const Spec *sp) {
    config_defaults(c);
    c->model.n_embd = C;
    c->model.n_layer = n_layer;
    c->model.base_width = base_width;
    snprintf(c->model.parametrization, sizeof c->model.parametrization, "%s", param);
    LinearSpec *ls = &c->model.linear[which];
    memset(ls, 0, sizeof *ls);
    snprintf(ls->type, sizeof ls->type, "%s", sp->type);
    ls->blocks = sp->blocks; ls->rank = sp->rank; ls->in_blocks = sp->in_blocks; ls->out_blocks = sp->out_blocks;
    ls->experts = sp->experts; ls->top_k = sp->top_k;
    snprintf(ls->weight_norm, sizeof ls->weight_norm, "%s", sp->weight_norm);
}

// What a layer should resolve to, from DESIGN section 3 and contract B.
typedef struct {
    int d_in, d_out, ncores, cores[2][3];   // cores as weight shapes (nb, q, p)
    int mid[3], out[3], rms_cap;
    long long params;
    double macs, init_std[2], mup_sigma[2], lr_mult[2], router_lr_mult;
} Expect;

static Expect expected(int C, int n_layer, int base_width, const char *param, int which, const Spec *sp) {
    Expect e;
    memset(&e, 0, sizeof e);
    e.d_in = which == LIN_MLP_PROJ ? 4 * C : C;
    e.d_out = which == LIN_ATTN_QKV ? 3 * C : which == LIN_MLP_FC ? 4 * C : C;
    int di = e.d_in, dout = e.d_out, m = di < dout ? di : dout;
    int residual = which == LIN_ATTN_PROJ || which == LIN_MLP_PROJ, mup = !strcmp(param, "mup");
    int fan_in[2] = {0, 0}, fan_out[2] = {0, 0}, E = 0, k = 0;
    #define CORE(i, nb, q, p) (e.cores[i][0] = (nb), e.cores[i][1] = (q), e.cores[i][2] = (p), \
                               fan_in[i] = (p), fan_out[i] = (q))
    if (!strcmp(sp->type, "dense")) {
        e.ncores = 1; CORE(0, 1, dout, di);
    } else if (!strcmp(sp->type, "blockdiag")) {
        int b = sp->blocks ? sp->blocks : 4;
        e.ncores = 1; CORE(0, b, dout / b, di / b);
    } else if (!strcmp(sp->type, "lowrank")) {
        int r = sp->rank ? sp->rank : m / 4;
        e.ncores = 2; CORE(0, 1, r, di); CORE(1, 1, dout, r);
        e.mid[0] = 1; e.mid[1] = 1; e.mid[2] = r;
    } else if (!strcmp(sp->type, "monarch")) {
        int b = sp->blocks ? sp->blocks : 4, q = m / b;
        e.ncores = 2; CORE(0, b, q, di / b); CORE(1, b, dout / b, q);
        e.mid[0] = q; e.mid[1] = b; e.mid[2] = 1;
        e.out[0] = b; e.out[1] = dout / b; e.out[2] = 1;
    } else {
        // closest-to-square: the largest m0 <= sqrt(d_in) dividing it; n0 likewise for d_out
        int m0 = 1, n0 = 1;
        for (int f = 1; f * f <= di; f++) if (di % f == 0) m0 = f;
        for (int f = 1; f * f <= dout; f++) if (dout % f == 0) n0 = f;
        int m1 = sp->in_blocks ? sp->in_blocks : di / m0;
        m0 = di / m1;
        if (sp->out_blocks) n0 = sp->out_blocks;
        int n1 = dout / n0, r;
        if (!strcmp(sp->type, "btt")) r = sp->rank ? sp->rank : 1;
        else { E = sp->experts ? sp->experts : 8; k = sp->top_k ? sp->top_k : (E < 2 ? E : 2); r = E; }
        e.ncores = 2; CORE(0, m1, n0 * r, m0); CORE(1, n0, n1, m1 * r);
        e.mid[0] = m1; e.mid[1] = n0; e.mid[2] = r;
        if (E) { fan_out[0] = n0; fan_in[1] = m1; }  // one expert: the rank-1 BTT
    }
    #undef CORE
    double cp = 0;
    for (int i = 0; i < e.ncores; i++) cp += (double)e.cores[i][0] * e.cores[i][1] * e.cores[i][2];
    e.params = (long long)cp + (long long)E * di;
    e.macs = E ? cp * k / E + (double)E * di : cp;
    e.rms_cap = *sp->weight_norm ? !strcmp(sp->weight_norm, "rms_cap")
                                 : mup && (!strcmp(sp->type, "btt") || !strcmp(sp->type, "btt_moe"));
    double std_d = residual ? 0.02 / sqrt(2.0 * n_layer) : 0.02;
    for (int i = 0; i < e.ncores; i++) {
        double ratio = (double)fan_out[i] / fan_in[i];
        e.mup_sigma[i] = (ratio < 1 ? sqrt(ratio) : 1.0) / sqrt((double)fan_in[i]);
        if (mup) {
            e.init_std[i] = residual && i == e.ncores - 1 ? 0.0 : e.mup_sigma[i];
            e.lr_mult[i] = (double)base_width / C * di / fan_in[i] / e.ncores;
        } else {
            e.init_std[i] = e.ncores == 1 ? std_d * sqrt((double)di / fan_in[i])
                                          : sqrt(std_d * sqrt((double)di / fan_in[0] / fan_in[1]));
            e.lr_mult[i] = 1.0;
        }
    }
    if (E) e.router_lr_mult = mup ? (double)base_width / C : 1.0;
    return e;
}

// "" when s matches e, else what differs.
static void compare(const Structure *s, const Expect *e, char *diff, size_t len) {
    diff[0] = '\0';
    #define DIFF(...) snprintf(diff + strlen(diff), len - strlen(diff), __VA_ARGS__)
    if (s->d_in != e->d_in || s->d_out != e->d_out) DIFF(" dims %d->%d want %d->%d;", s->d_in, s->d_out, e->d_in, e->d_out);
    if (s->ncores != e->ncores) DIFF(" ncores %d want %d;", s->ncores, e->ncores);
    for (int i = 0; i < e->ncores && s->ncores == e->ncores; i++)
        if (s->core[i].nb != e->cores[i][0] || s->core[i].q != e->cores[i][1] || s->core[i].p != e->cores[i][2])
            DIFF(" core%d (%d,%d,%d) want (%d,%d,%d);", i, s->core[i].nb, s->core[i].q, s->core[i].p,
                 e->cores[i][0], e->cores[i][1], e->cores[i][2]);
    if (e->ncores == 2 && s->mid_width != e->cores[0][0] * e->cores[0][1]) DIFF(" mid_width %d;", s->mid_width);
    if (s->mid.a != e->mid[0] || (e->mid[0] && (s->mid.b != e->mid[1] || s->mid.r != e->mid[2])))
        DIFF(" mid (%d,%d,%d) want (%d,%d,%d);", s->mid.a, s->mid.b, s->mid.r, e->mid[0], e->mid[1], e->mid[2]);
    if (s->out.a != e->out[0] || (e->out[0] && (s->out.b != e->out[1] || s->out.r != e->out[2])))
        DIFF(" out (%d,%d,%d) want (%d,%d,%d);", s->out.a, s->out.b, s->out.r, e->out[0], e->out[1], e->out[2]);
    if (s->params != e->params) DIFF(" params %lld want %lld;", s->params, e->params);
    if (!close_rel(s->macs, e->macs)) DIFF(" macs %.17g want %.17g;", s->macs, e->macs);
    if (!close_rel(s->dense_macs, (double)e->d_in * e->d_out)) DIFF(" dense_macs %.17g;", s->dense_macs);
    if (s->rms_cap != e->rms_cap) DIFF(" rms_cap %d want %d;", s->rms_cap, e->rms_cap);
    for (int i = 0; i < e->ncores; i++) {
        if (!close_rel(s->init_std[i], e->init_std[i])) DIFF(" init_std[%d] %.17g want %.17g;", i, s->init_std[i], e->init_std[i]);
        if (!close_rel(s->mup_sigma[i], e->mup_sigma[i])) DIFF(" mup_sigma[%d] %.17g want %.17g;", i, s->mup_sigma[i], e->mup_sigma[i]);
        if (!close_rel(s->lr_mult[i], e->lr_mult[i])) DIFF(" lr_mult[%d] %.17g want %.17g;", i, s->lr_mult[i], e->lr_mult[i]);
    }
    if (!close_rel(s->router_lr_mult, e->router_lr_mult)) DIFF(" router_lr_mult %.17g want %.17g;", s->router_lr_mult, e->router_lr_mult);
    #undef DIFF
}

static void test_table(void) {
    const struct { int C, n_layer, base_width; } widths[] = {{768, 12, 768}, {64, 2, 768}, {96, 4, 256}};
    const Spec specs[] = {
        {"dense", 0, 0, 0, 0, 0, 0, ""},
        {"blockdiag", 0, 0, 0, 0, 0, 0, ""}, {"blockdiag", 8, 0, 0, 0, 0, 0, ""},
        {"lowrank", 0, 0, 0, 0, 0, 0, ""}, {"lowrank", 0, 16, 0, 0, 0, 0, ""},
        {"monarch", 0, 0, 0, 0, 0, 0, ""}, {"monarch", 2, 0, 0, 0, 0, 0, "rms_cap"},
        {"btt", 0, 0, 0, 0, 0, 0, ""}, {"btt", 0, 2, 0, 0, 0, 0, "none"}, {"btt", 0, 3, 4, 8, 0, 0, ""},
        {"btt_moe", 0, 0, 0, 0, 0, 0, ""}, {"btt_moe", 0, 0, 2, 16, 4, 1, "none"},
    };
    const char *params[] = {"standard", "mup"};
    for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++)
        for (int pm = 0; pm < 2; pm++)
            for (size_t k = 0; k < sizeof specs / sizeof specs[0]; k++) {
                char diff[2048] = "", err[512] = "", name[256];
                int ok = 1;
                for (int which = 0; which < NUM_LINEAR && ok; which++) {
                    Config c;
                    make_config(&c, widths[w].C, widths[w].n_layer, widths[w].base_width, params[pm], which, &specs[k]);
                    Structure s;
                    if (structure_resolve(&s, &c, which, err, sizeof err)) { ok = 0; snprintf(diff, sizeof diff, " refused: %s", err); break; }
                    Expect e = expected(widths[w].C, widths[w].n_layer, widths[w].base_width, params[pm], which, &specs[k]);
                    compare(&s, &e, diff, sizeof diff);
                    if (*diff) { ok = 0; snprintf(err, sizeof err, "%s", diff); snprintf(diff, sizeof diff, " %s:%s", linear_names[which], err); }
                    if (s.which != which || s.layer_is_residual != (which == LIN_ATTN_PROJ || which == LIN_MLP_PROJ)) {
                        ok = 0; snprintf(diff, sizeof diff, " %s: which %d residual %d", linear_names[which], s.which, s.layer_is_residual);
                    }
                }
                snprintf(name, sizeof name, "structure_resolve C=%d L=%d base_width=%d %s %s b=%d r=%d in=%d out=%d E=%d k=%d wn=%s (4 projections)",
                         widths[w].C, widths[w].n_layer, widths[w].base_width, params[pm], specs[k].type, specs[k].blocks,
                         specs[k].rank, specs[k].in_blocks, specs[k].out_blocks, specs[k].experts, specs[k].top_k,
                         *specs[k].weight_norm ? specs[k].weight_norm : "-");
                check(ok, name, "%s", diff);
            }
}

// Values written out from DESIGN's text for GPT-2 124M, not recomputed.
static void test_literal(void) {
    Config c;
    Structure s;
    char err[512];
    Spec btt = {"btt", 0, 0, 0, 0, 0, 0, ""};
    // DESIGN 3.3: 768 = 32 * 24 (m1, m0), 3072 = 64 * 48, 2304 = 48 * 48; params = r (d_in n0 + d_out m1)
    make_config(&c, 768, 12, 768, "standard", LIN_ATTN_QKV, &btt);
    int rc = structure_resolve(&s, &c, LIN_ATTN_QKV, err, sizeof err);
    check(rc == 0 && s.m1 == 32 && s.m0 == 24 && s.n0 == 48 && s.n1 == 48 && s.rank == 1 && s.params == 768 * 48 + 2304 * 32,
          "btt attn_qkv 768 -> 2304 defaults m1=32 m0=24 n0=48 n1=48, params 110592", "m1 %d m0 %d n0 %d n1 %d params %lld",
          s.m1, s.m0, s.n0, s.n1, s.params);
    make_config(&c, 768, 12, 768, "standard", LIN_MLP_PROJ, &btt);
    rc = structure_resolve(&s, &c, LIN_MLP_PROJ, err, sizeof err);
    check(rc == 0 && s.m1 == 64 && s.m0 == 48 && s.n0 == 24 && s.n1 == 32 && s.core[0].nb == 64 && s.core[0].q == 24 &&
          s.core[0].p == 48 && s.core[1].nb == 24 && s.core[1].q == 32 && s.core[1].p == 64,
          "btt mlp_proj 3072 -> 768: W0 (64,24,48), W1 (24,32,64)", "m1 %d m0 %d n0 %d n1 %d", s.m1, s.m0, s.n0, s.n1);
    // monarch b=4 on 768 -> 3072: m = 768, q = 192, params = m (d_in + d_out) / b = 737280
    Spec mon = {"monarch", 0, 0, 0, 0, 0, 0, ""};
    make_config(&c, 768, 12, 768, "standard", LIN_MLP_FC, &mon);
    rc = structure_resolve(&s, &c, LIN_MLP_FC, err, sizeof err);
    check(rc == 0 && s.params == 737280 && s.macs == 737280 && s.mid.a == 192 && s.mid.b == 4 && s.out.a == 4 && s.out.b == 768,
          "monarch mlp_fc 768 -> 3072: params 737280, P (192,4), P^T (4,768)", "params %lld", s.params);
    // lowrank default r = 768/4 = 192; dense std 0.02, residual 0.02/sqrt(24)
    Spec lr = {"lowrank", 0, 0, 0, 0, 0, 0, ""}, dense = {"dense", 0, 0, 0, 0, 0, 0, ""};
    make_config(&c, 768, 12, 768, "standard", LIN_ATTN_PROJ, &lr);
    rc = structure_resolve(&s, &c, LIN_ATTN_PROJ, err, sizeof err);
    check(rc == 0 && s.rank == 192 && s.params == 2 * 768 * 192, "lowrank attn_proj 768 -> 768 default r = 192", "r %d", s.rank);
    make_config(&c, 768, 12, 768, "standard", LIN_MLP_PROJ, &dense);
    rc = structure_resolve(&s, &c, LIN_MLP_PROJ, err, sizeof err);
    check(rc == 0 && close_rel(s.init_std[0], 0.02 / sqrt(24.0)) && s.lr_mult[0] == 1.0,
          "dense mlp_proj standard init 0.02/sqrt(2*12)", "std %.17g", s.init_std[0]);
    // mup dense mlp_proj (zero init, residual): sigma = min(1, sqrt(768/3072)) / sqrt(3072) = 0.5/sqrt(3072)
    make_config(&c, 768, 12, 768, "mup", LIN_MLP_PROJ, &dense);
    rc = structure_resolve(&s, &c, LIN_MLP_PROJ, err, sizeof err);
    check(rc == 0 && s.init_std[0] == 0.0 && close_rel(s.mup_sigma[0], 0.5 / sqrt(3072.0)) && close_rel(s.lr_mult[0], 1.0),
          "dense mlp_proj mup: zero init, sigma 0.5/sqrt(3072), lr_mult 1", "std %g sigma %g lr %g",
          s.init_std[0], s.mup_sigma[0], s.lr_mult[0]);
    // btt_moe defaults E = 8, k = 2; macs = 2/8 of the cores + router 8*768; mup width 384 -> lr x2
    Spec moe = {"btt_moe", 0, 0, 0, 0, 0, 0, ""};
    make_config(&c, 768, 12, 768, "standard", LIN_ATTN_PROJ, &moe);
    rc = structure_resolve(&s, &c, LIN_ATTN_PROJ, err, sizeof err);
    double cores = 32.0 * 24 * 8 * 24 + 24.0 * 32 * 32 * 8;
    check(rc == 0 && s.experts == 8 && s.top_k == 2 && s.params == (long long)cores + 8 * 768 && close_rel(s.macs, cores / 4 + 8 * 768),
          "btt_moe attn_proj defaults E=8 k=2, params and k/E macs", "E %d k %d params %lld macs %g", s.experts, s.top_k, s.params, s.macs);
    make_config(&c, 384, 12, 768, "mup", LIN_ATTN_PROJ, &moe);
    rc = structure_resolve(&s, &c, LIN_ATTN_PROJ, err, sizeof err);
    check(rc == 0 && close_rel(s.router_lr_mult, 2.0) && s.rms_cap, "btt_moe mup n_embd 384: router lr x2, rms_cap by default",
          "router %g rms_cap %d", s.router_lr_mult, s.rms_cap);
}

static void refuse(const char *name, int C, int which, const Spec *sp, const char *want) {
    Config c;
    make_config(&c, C, 2, 768, "standard", which, sp);
    Structure s;
    char err[1024] = "";
    int rc = structure_resolve(&s, &c, which, err, sizeof err);
    check(rc == -1 && !strcmp(err, want), name, "rc %d\n  got:  %s\n  want: %s", rc, err, want);
}

static void test_refusals(void) {
    Spec bd = {"blockdiag", 5, 0, 0, 0, 0, 0, ""};
    refuse("blockdiag blocks 5 refused with the valid block counts", 12, LIN_ATTN_QKV, &bd,
           "attn_qkv (12 -> 36): blockdiag: blocks 5 must divide d_in and d_out; valid blocks: 1 2 3 4 6 12");
    Spec mon = {"monarch", 8, 0, 0, 0, 0, 0, ""};
    refuse("monarch blocks 8 refused with the valid block counts", 12, LIN_MLP_PROJ, &mon,
           "mlp_proj (48 -> 12): monarch: blocks 8 must divide d_in and d_out; valid blocks: 1 2 3 4 6 12");
    Spec bin = {"btt", 0, 0, 5, 0, 0, 0, ""};
    refuse("btt in_blocks 5 refused with the factorizations of d_in", 12, LIN_ATTN_PROJ, &bin,
           "attn_proj (12 -> 12): btt: in_blocks 5 must divide d_in 12; valid in_blocks x m0: 1x12 2x6 3x4 4x3 6x2 12x1");
    Spec bout = {"btt_moe", 0, 0, 0, 7, 0, 0, ""};
    refuse("btt_moe out_blocks 7 refused with the factorizations of d_out", 4, LIN_MLP_FC, &bout,
           "mlp_fc (4 -> 16): btt_moe: out_blocks 7 must divide d_out 16; valid out_blocks x n1: 1x16 2x8 4x4 8x2 16x1");
    Spec lr = {"lowrank", 0, 13, 0, 0, 0, 0, ""};
    refuse("lowrank rank above min(d_in, d_out) refused", 12, LIN_ATTN_QKV, &lr,
           "attn_qkv (12 -> 36): lowrank: rank 13 must be in [1, 12]");
    Spec moe = {"btt_moe", 0, 0, 0, 0, 4, 5, ""};
    refuse("btt_moe top_k above experts refused", 12, LIN_ATTN_QKV, &moe,
           "attn_qkv (12 -> 36): btt_moe: top_k 5 must be in [1, experts = 4]");
    Spec bad = {"kronecker", 0, 0, 0, 0, 0, 0, ""};
    refuse("unknown type refused", 12, LIN_ATTN_QKV, &bad,
           "attn_qkv (12 -> 36): kronecker: unknown structure type (valid: dense blockdiag lowrank monarch btt btt_moe)");
    // The config loader refuses the same shapes first, naming the file and key (config.h's check).
    Config c;
    char err[1024] = "";
    const char *set = "model.linear.default={\"type\": \"monarch\", \"blocks\": 5}";
    int rc = config_load(&c, NULL, &set, 1, 1, err, sizeof err);
    check(rc == -1 && strstr(err, "model.linear.default.blocks: 5: must divide d_in and d_out") && strstr(err, "valid: 1 2 3 4 6 8"),
          "config_load refuses a block count that does not divide the layer", "rc %d: %s", rc, err);
}

// ----------------------------------------------------------------------------
// test/fixtures/structure_table.json from the PyTorch reference (contract D).

static double jnum(const cJSON *o, const char *key, int *ok) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v)) { *ok = 0; return 0; }
    return v->valuedouble;
}

static int jarray_close(const cJSON *o, const char *key, const double *ours, int n, char *diff, size_t len) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != n) {
        snprintf(diff + strlen(diff), len - strlen(diff), " %s: not an array of %d;", key, n);
        return 0;
    }
    int ok = 1;
    for (int i = 0; i < n; i++) {
        const cJSON *v = cJSON_GetArrayItem(a, i);
        if (!cJSON_IsNumber(v) || !close_rel(v->valuedouble, ours[i])) {
            snprintf(diff + strlen(diff), len - strlen(diff), " %s[%d] ours %.17g ref %.17g;", key, i, ours[i],
                     cJSON_IsNumber(v) ? v->valuedouble : NAN);
            ok = 0;
        }
    }
    return ok;
}

static void test_fixture_table(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { printf("# %s absent: no reference cases compared\n", path); return; }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc(n + 1);
    size_t got = fread(text, 1, n, f);
    fclose(f);
    text[got] = '\0';
    cJSON *root = cJSON_Parse(text);
    free(text);
    check(cJSON_IsArray(root) && cJSON_GetArraySize(root) > 0, "structure_table.json is a non-empty JSON list", "not parsed");
    int i = 0;
    for (const cJSON *cs = root ? root->child : NULL; cs; cs = cs->next, i++) {
        char name[256], diff[2048] = "", err[512] = "";
        int ok = 1;
        const cJSON *spec = cJSON_GetObjectItemCaseSensitive(cs, "spec"), *wj = cJSON_GetObjectItemCaseSensitive(cs, "which");
        const cJSON *pj = cJSON_GetObjectItemCaseSensitive(cs, "parametrization"), *tj = spec ? cJSON_GetObjectItemCaseSensitive(spec, "type") : NULL;
        int which = -1;
        for (int p = 0; p < NUM_LINEAR && cJSON_IsString(wj); p++) if (!strcmp(wj->valuestring, linear_names[p])) which = p;
        Spec sp = {cJSON_IsString(tj) ? tj->valuestring : "?", 0, 0, 0, 0, 0, 0, ""};
        const char *wn_keys[] = {"blocks", "rank", "in_blocks", "out_blocks", "experts", "top_k"};
        int *wn_vals[] = {&sp.blocks, &sp.rank, &sp.in_blocks, &sp.out_blocks, &sp.experts, &sp.top_k};
        for (int k = 0; k < 6 && spec; k++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(spec, wn_keys[k]);
            if (cJSON_IsNumber(v)) *wn_vals[k] = v->valueint;
        }
        const cJSON *wn = spec ? cJSON_GetObjectItemCaseSensitive(spec, "weight_norm") : NULL;
        if (cJSON_IsString(wn)) sp.weight_norm = wn->valuestring;
        int C = (int)jnum(cs, "n_embd", &ok), L = (int)jnum(cs, "n_layer", &ok), bw = (int)jnum(cs, "base_width", &ok);
        char *spec_text = spec ? cJSON_PrintUnformatted(spec) : NULL;
        snprintf(name, sizeof name, "structure_table.json case %d: %s C=%d %s %s", i, cJSON_IsString(wj) ? wj->valuestring : "?",
                 C, cJSON_IsString(pj) ? pj->valuestring : "?", spec_text ? spec_text : "?");
        free(spec_text);
        if (!ok || which < 0 || !cJSON_IsString(pj) || !cJSON_IsObject(spec)) { check(0, name, "malformed case"); continue; }
        Config c;
        make_config(&c, C, L, bw, pj->valuestring, which, &sp);
        Structure s;
        if (structure_resolve(&s, &c, which, err, sizeof err)) { check(0, name, "refused: %s", err); continue; }
        if (s.d_in != (int)jnum(cs, "d_in", &ok) || s.d_out != (int)jnum(cs, "d_out", &ok)) {
            ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " d_in/d_out;");
        }
        const cJSON *cores = cJSON_GetObjectItemCaseSensitive(cs, "cores");
        if (!cJSON_IsArray(cores) || cJSON_GetArraySize(cores) != s.ncores) {
            ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " cores: not %d of them;", s.ncores);
        } else {
            for (int k = 0; k < s.ncores; k++) {
                const cJSON *cr = cJSON_GetArrayItem(cores, k);
                double ours[3] = {s.core[k].nb, s.core[k].q, s.core[k].p};
                char key[16];
                snprintf(key, sizeof key, "cores[%d]", k);
                cJSON *wrap = cJSON_CreateObject();
                cJSON_AddItemReferenceToObject(wrap, key, (cJSON *)cr);
                ok &= jarray_close(wrap, key, ours, 3, diff, sizeof diff);
                cJSON_Delete(wrap);
            }
        }
        if ((long long)jnum(cs, "params", &ok) != s.params) {
            ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " params ours %lld;", s.params);
        }
        if (!close_rel(jnum(cs, "macs", &ok), s.macs)) {
            ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " macs ours %.17g;", s.macs);
        }
        ok &= jarray_close(cs, "init_std", s.init_std, s.ncores, diff, sizeof diff);
        ok &= jarray_close(cs, "mup_sigma", s.mup_sigma, s.ncores, diff, sizeof diff);
        ok &= jarray_close(cs, "lr_mult", s.lr_mult, s.ncores, diff, sizeof diff);
        // Types without a router have router_lr_mult 0 on both sides.
        if (!close_rel(jnum(cs, "router_lr_mult", &ok), s.router_lr_mult)) {
            ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " router_lr_mult ours %.17g;", s.router_lr_mult);
        }
        if (!close_rel(jnum(cs, "dense_macs", &ok), s.dense_macs)) {
            ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " dense_macs ours %.17g;", s.dense_macs);
        }
        const cJSON *rms = cJSON_GetObjectItemCaseSensitive(cs, "rms_cap");
        if (!cJSON_IsBool(rms) || cJSON_IsTrue(rms) != s.rms_cap) {
            ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " rms_cap ours %d;", s.rms_cap);
        }
        // The resolved defaults the reference reports (which keys depends on the type).
        const cJSON *res = cJSON_GetObjectItemCaseSensitive(cs, "resolved");
        const char *rkeys[] = {"blocks", "rank", "m1", "m0", "n0", "n1", "experts", "top_k"};
        const int rvals[] = {s.blocks, s.rank, s.m1, s.m0, s.n0, s.n1, s.experts, s.top_k};
        for (int k = 0; k < 8 && cJSON_IsObject(res); k++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(res, rkeys[k]);
            if (v && (!cJSON_IsNumber(v) || v->valueint != rvals[k])) {
                ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " resolved.%s ours %d;", rkeys[k], rvals[k]);
            }
        }
        if (!cJSON_IsObject(res)) { ok = 0; snprintf(diff + strlen(diff), sizeof diff - strlen(diff), " no resolved object;"); }
        check(ok, name, "%s", diff);
    }
    cJSON_Delete(root);
}

int main(void) {
    test_table();
    test_literal();
    test_refusals();
    test_fixture_table("test/fixtures/structure_table.json");
    return test_exit();
}
