// Configuration: the JSON file of DESIGN section 4 read into a Config, validated completely before
// any work starts, and the command line of the trainers.
// Every error is one line "SOURCE: key.path: VALUE: what is wrong", SOURCE being the file (or the
// origin given for a JSON string, or "--set" for a command-line override); functions return -1 and
// never exit, so the trainer decides how to die and tests can check the message.
// All keys are described by one table (config_keys): path, C type, place in the struct, allowed
// range or choices. Parsing, --set, did-you-mean suggestions and config_to_json all walk it.
#ifndef LLMC_CONFIG_H
#define LLMC_CONFIG_H

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LIN_ATTN_QKV, LIN_ATTN_PROJ, LIN_MLP_FC, LIN_MLP_PROJ, NUM_LINEAR };
static const char *const linear_names[NUM_LINEAR] = {"attn_qkv", "attn_proj", "mlp_fc", "mlp_proj"};

typedef struct {
    char type[16];          // dense | blockdiag | lowrank | monarch | btt | btt_moe
    int blocks, rank, in_blocks, out_blocks, experts, top_k;  // 0 = "absent, use the structure's default"
    char weight_norm[16];   // "" (absent: structure default) | none | rms_cap
} LinearSpec;

typedef struct {
    struct { int n_layer, n_head, n_embd, block_size, vocab_size, padded_vocab_size, qk_norm;
             char attn_scale[16], parametrization[16]; int base_width;
             LinearSpec linear[NUM_LINEAR];            // resolved: the default applied where a projection has no entry
             float moe_aux_weight, moe_z_weight; } model;
    struct { float lr, beta1, beta2, eps, weight_decay, grad_clip; } optim;
    struct { char type[16]; int warmup_steps; float final_lr_frac; } schedule;
    struct { int micro_batch, seq_len; long batch_tokens; int max_steps; unsigned long long seed; } train;
    struct { char train[1024], val[1024], format[16]; } data;
    struct { int every, batches; } eval;
    struct { int every, tokens; } sample;
    struct { int every, keep; } checkpoint;
    struct { char dir[1024]; } run;
} Config;

// config_path is NULL when no CONFIG was given (the caller then uses configs/default.json if it exists).
typedef struct { const char *config_path; const char *sets[256]; int nsets; const char *resume_dir;
                 const char *init_from; const char *eval_shard; int help; } CliArgs;

// ----------------------------------------------------------------------------
// Defaults: GPT-2 124M, dense everywhere, the tinyshakespeare shards of `make data`.

static void linear_spec_dense(LinearSpec *s) {
    memset(s, 0, sizeof *s);
    strcpy(s->type, "dense");
}

static void config_defaults(Config *c) {
    memset(c, 0, sizeof *c);
    c->model.n_layer = 12; c->model.n_head = 12; c->model.n_embd = 768; c->model.block_size = 1024;
    c->model.vocab_size = 50257; c->model.padded_vocab_size = 50304; c->model.qk_norm = 0;
    strcpy(c->model.attn_scale, "standard"); strcpy(c->model.parametrization, "standard");
    c->model.base_width = 768;
    for (int p = 0; p < NUM_LINEAR; p++) linear_spec_dense(&c->model.linear[p]);
    c->model.moe_aux_weight = 0.01f; c->model.moe_z_weight = 0.1f;
    c->optim.lr = 6e-4f; c->optim.beta1 = 0.9f; c->optim.beta2 = 0.95f; c->optim.eps = 1e-8f;
    c->optim.weight_decay = 0.1f; c->optim.grad_clip = 1.0f;
    strcpy(c->schedule.type, "cosine"); c->schedule.warmup_steps = 700; c->schedule.final_lr_frac = 0.0f;
    c->train.micro_batch = 16; c->train.seq_len = 1024; c->train.batch_tokens = 524288;
    c->train.max_steps = 18865; c->train.seed = 1337;
    strcpy(c->data.train, "data/tinyshakespeare/tiny_shakespeare_train.bin");
    strcpy(c->data.val, "data/tinyshakespeare/tiny_shakespeare_val.bin");
    strcpy(c->data.format, "llmc");
    c->eval.every = 250; c->eval.batches = 20;
    c->sample.every = 500; c->sample.tokens = 144;
    c->checkpoint.every = 1000; c->checkpoint.keep = 2;
    strcpy(c->run.dir, "runs/default");
}

// ----------------------------------------------------------------------------
// The key table.

typedef enum { CK_INT, CK_LONG, CK_U64, CK_FLOAT, CK_BOOL, CK_STR, CK_LINEAR } CfgKind;
typedef struct {
    const char *path;      // dotted path in the JSON ("model.n_layer"); spec keys: the name only
    CfgKind kind;
    size_t off, size;      // where the value lives: in Config, or in LinearSpec for spec keys
    double lo, hi;         // allowed range of a number (hi = INFINITY: no upper bound)
    int lo_open, hi_open;  // 1: the bound itself is excluded
    const char *choices;   // CK_STR: "a|b|c" for an enum, NULL for any non-empty string
} CfgKey;

#define CFG_F(f) offsetof(Config, f), sizeof(((Config *)0)->f)
#define CFG_INT(p, f, lo)  {p, CK_INT, CFG_F(f), lo, INFINITY, 0, 0, NULL}
#define CFG_FLT(p, f, lo, lo_open, hi, hi_open) {p, CK_FLOAT, CFG_F(f), lo, hi, lo_open, hi_open, NULL}
#define CFG_STR(p, f, choices) {p, CK_STR, CFG_F(f), 0, 0, 0, 0, choices}

// Order here is the order of config_to_json (DESIGN section 4's example).
static const CfgKey config_keys[] = {
    CFG_INT("model.n_layer", model.n_layer, 1),
    CFG_INT("model.n_head", model.n_head, 1),
    CFG_INT("model.n_embd", model.n_embd, 1),
    CFG_INT("model.block_size", model.block_size, 1),
    CFG_INT("model.vocab_size", model.vocab_size, 1),
    CFG_INT("model.padded_vocab_size", model.padded_vocab_size, 1),
    {"model.qk_norm", CK_BOOL, CFG_F(model.qk_norm), 0, 0, 0, 0, NULL},
    CFG_STR("model.attn_scale", model.attn_scale, "standard|mup"),
    CFG_STR("model.parametrization", model.parametrization, "standard|mup"),
    CFG_INT("model.base_width", model.base_width, 1),
    {"model.linear", CK_LINEAR, CFG_F(model.linear), 0, 0, 0, 0, NULL},
    CFG_FLT("model.moe.aux_weight", model.moe_aux_weight, 0, 0, INFINITY, 0),
    CFG_FLT("model.moe.z_weight", model.moe_z_weight, 0, 0, INFINITY, 0),
    CFG_FLT("optim.lr", optim.lr, 0, 1, INFINITY, 0),
    CFG_FLT("optim.beta1", optim.beta1, 0, 0, 1, 1),
    CFG_FLT("optim.beta2", optim.beta2, 0, 0, 1, 1),
    CFG_FLT("optim.eps", optim.eps, 0, 1, INFINITY, 0),
    CFG_FLT("optim.weight_decay", optim.weight_decay, 0, 0, INFINITY, 0),
    CFG_FLT("optim.grad_clip", optim.grad_clip, 0, 0, INFINITY, 0),
    CFG_STR("schedule.type", schedule.type, "cosine|linear|constant"),
    CFG_INT("schedule.warmup_steps", schedule.warmup_steps, 0),
    CFG_FLT("schedule.final_lr_frac", schedule.final_lr_frac, 0, 0, 1, 0),
    CFG_INT("train.micro_batch", train.micro_batch, 1),
    CFG_INT("train.seq_len", train.seq_len, 1),
    {"train.batch_tokens", CK_LONG, CFG_F(train.batch_tokens), 1, INFINITY, 0, 0, NULL},
    CFG_INT("train.max_steps", train.max_steps, 1),
    {"train.seed", CK_U64, CFG_F(train.seed), 0, INFINITY, 0, 0, NULL},
    CFG_STR("data.train", data.train, NULL),
    CFG_STR("data.val", data.val, NULL),
    CFG_STR("data.format", data.format, "llmc|nanogpt"),
    CFG_INT("eval.every", eval.every, 0),
    CFG_INT("eval.batches", eval.batches, 1),
    CFG_INT("sample.every", sample.every, 0),
    CFG_INT("sample.tokens", sample.tokens, 1),
    CFG_INT("checkpoint.every", checkpoint.every, 0),
    CFG_INT("checkpoint.keep", checkpoint.keep, 1),
    CFG_STR("run.dir", run.dir, NULL),
};
#define CFG_NKEYS ((int)(sizeof config_keys / sizeof config_keys[0]))

// The keys of one linear spec (model.linear.P.KEY), offsets into LinearSpec. Index order = LK_ bits.
#define SPEC_F(f) offsetof(LinearSpec, f), sizeof(((LinearSpec *)0)->f)
#define SPEC_INT(name, f) {name, CK_INT, SPEC_F(f), 1, INFINITY, 0, 0, NULL}
static const CfgKey linear_keys[] = {
    {"type", CK_STR, SPEC_F(type), 0, 0, 0, 0, "dense|blockdiag|lowrank|monarch|btt|btt_moe"},
    SPEC_INT("blocks", blocks), SPEC_INT("rank", rank), SPEC_INT("in_blocks", in_blocks),
    SPEC_INT("out_blocks", out_blocks), SPEC_INT("experts", experts), SPEC_INT("top_k", top_k),
    {"weight_norm", CK_STR, SPEC_F(weight_norm), 0, 0, 0, 0, "none|rms_cap"},
};
#define LIN_NKEYS ((int)(sizeof linear_keys / sizeof linear_keys[0]))
enum { LK_TYPE, LK_BLOCKS, LK_RANK, LK_IN, LK_OUT, LK_EXPERTS, LK_TOPK, LK_WNORM };
#define LKB(k) (1u << (k))
// Which keys each structure takes (DESIGN section 3); type and weight_norm go with every one.
static const struct { const char *type; unsigned keys; } linear_types[] = {
    {"dense", 0}, {"blockdiag", LKB(LK_BLOCKS)}, {"lowrank", LKB(LK_RANK)}, {"monarch", LKB(LK_BLOCKS)},
    {"btt", LKB(LK_RANK) | LKB(LK_IN) | LKB(LK_OUT)},
    {"btt_moe", LKB(LK_EXPERTS) | LKB(LK_TOPK) | LKB(LK_IN) | LKB(LK_OUT)},
};

// Integers above 2^53 do not survive JSON's doubles, so they are refused rather than rounded.
#define CFG_EXACT_INT 9007199254740992.0

// ----------------------------------------------------------------------------
// Messages.

static int cfg_err(char *err, size_t errlen, const char *origin, const char *path, const char *value,
                   const char *fmt, ...) {
    if (!err || !errlen) return -1;
    int n = snprintf(err, errlen, "%s: ", origin);
    if (path && n >= 0 && (size_t)n < errlen) n += snprintf(err + n, errlen - n, "%s: ", path);
    if (value && n >= 0 && (size_t)n < errlen) n += snprintf(err + n, errlen - n, "%s: ", value);
    if (n >= 0 && (size_t)n < errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + n, errlen - n, fmt, ap);
        va_end(ap);
    }
    return -1;
}

// A JSON value as it appears in a message, cut short so an object cannot flood the line.
static void cfg_value_text(const cJSON *v, char *buf, size_t n) {
    char *s = cJSON_PrintUnformatted(v);
    if (!s) { snprintf(buf, n, "?"); return; }
    if (strlen(s) < n) snprintf(buf, n, "%s", s);
    else snprintf(buf, n, "%.*s...", (int)n - 4, s);
    free(s);
}

static const char *cfg_kind_name(const cJSON *v) {
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsArray(v)) return "an array";
    return "an object";
}

// Optimal string alignment distance (Levenshtein plus adjacent transpositions: "rnak" -> "rank" is 1).
static int cfg_edit_distance(const char *a, int la, const char *b, int lb) {
    if (la > 63) la = 63;
    if (lb > 63) lb = 63;
    int d[64][64];
    for (int i = 0; i <= la; i++) d[i][0] = i;
    for (int j = 0; j <= lb; j++) d[0][j] = j;
    for (int i = 1; i <= la; i++) {
        for (int j = 1; j <= lb; j++) {
            int cost = a[i - 1] != b[j - 1];
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best) best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

// ----------------------------------------------------------------------------
// Paths: what a dotted path names.

enum { CP_UNKNOWN, CP_ROOT, CP_SECTION, CP_KEY, CP_SPEC, CP_SPEC_KEY };
#define CFG_DEFAULT_SPEC NUM_LINEAR  // spec index of model.linear.default

static int cfg_find_key(const char *path) {
    for (int i = 0; i < CFG_NKEYS; i++) if (!strcmp(config_keys[i].path, path)) return i;
    return -1;
}

// Returns CP_*; *key is the index in config_keys (CP_KEY) or linear_keys (CP_SPEC_KEY), *spec the
// projection (CFG_DEFAULT_SPEC for "default").
static int cfg_classify(const char *path, int *key, int *spec) {
    if (!*path) return CP_ROOT;
    if ((*key = cfg_find_key(path)) >= 0) return CP_KEY;
    static const char lin[] = "model.linear.";
    if (!strncmp(path, lin, sizeof lin - 1)) {
        const char *name = path + sizeof lin - 1, *dot = strchr(name, '.');
        int len = dot ? (int)(dot - name) : (int)strlen(name);
        *spec = -1;
        if (len == 7 && !strncmp(name, "default", 7)) *spec = CFG_DEFAULT_SPEC;
        for (int p = 0; p < NUM_LINEAR; p++)
            if ((int)strlen(linear_names[p]) == len && !strncmp(name, linear_names[p], len)) *spec = p;
        if (*spec < 0) return CP_UNKNOWN;
        if (!dot) return CP_SPEC;
        for (int k = 0; k < LIN_NKEYS; k++) if (!strcmp(dot + 1, linear_keys[k].path)) { *key = k; return CP_SPEC_KEY; }
        return CP_UNKNOWN;
    }
    size_t n = strlen(path);
    for (int i = 0; i < CFG_NKEYS; i++)
        if (!strncmp(config_keys[i].path, path, n) && config_keys[i].path[n] == '.') return CP_SECTION;
    return CP_UNKNOWN;
}

// The names directly under parent (pointer + length into static strings), in table order.
static int cfg_children(const char *parent, const char **names, int *lens, int max) {
    int key, spec, n = 0, kind = cfg_classify(parent, &key, &spec);
    if (kind == CP_KEY && config_keys[key].kind == CK_LINEAR) {
        names[n] = "default"; lens[n++] = 7;
        for (int p = 0; p < NUM_LINEAR && n < max; p++) { names[n] = linear_names[p]; lens[n++] = (int)strlen(linear_names[p]); }
    } else if (kind == CP_SPEC) {
        for (int k = 0; k < LIN_NKEYS && n < max; k++) { names[n] = linear_keys[k].path; lens[n++] = (int)strlen(linear_keys[k].path); }
    } else if (kind == CP_ROOT || kind == CP_SECTION) {
        size_t pl = strlen(parent);
        for (int i = 0; i < CFG_NKEYS && n < max; i++) {
            const char *p = config_keys[i].path;
            if (pl && (strncmp(p, parent, pl) || p[pl] != '.')) continue;
            const char *name = pl ? p + pl + 1 : p, *dot = strchr(name, '.');
            int len = dot ? (int)(dot - name) : (int)strlen(name), seen = 0;
            for (int j = 0; j < n; j++) seen |= lens[j] == len && !strncmp(names[j], name, len);
            if (!seen) { names[n] = name; lens[n++] = len; }
        }
    }
    return n;
}

// " (did you mean X?)" for an unknown path, or "": the closest sibling by edit distance (or one the
// name is a prefix of: "warmup" -> "warmup_steps"), else a key of the same name in another section.
static void cfg_suggest(const char *path, char *out, size_t outlen) {
    out[0] = '\0';
    const char *dot = strrchr(path, '.'), *name = dot ? dot + 1 : path;
    char parent[256];
    snprintf(parent, sizeof parent, "%.*s", dot ? (int)(dot - path) : 0, path);
    const char *names[64]; int lens[64];
    int n = cfg_children(parent, names, lens, 64), nl = (int)strlen(name);
    int best = -1, best_d = nl <= 3 ? 2 : (nl / 3 > 2 ? nl / 3 : 2) + 1;  // strictly below this counts
    for (int i = 0; i < n; i++) {
        int d = cfg_edit_distance(name, nl, names[i], lens[i]);
        if (nl >= 3 && nl < lens[i] && !strncmp(names[i], name, nl)) d = 1;
        if (d < best_d) { best_d = d; best = i; }
    }
    if (best >= 0) {
        snprintf(out, outlen, " (did you mean %s%s%.*s?)", parent, *parent ? "." : "", lens[best], names[best]);
        return;
    }
    for (int i = 0; i < CFG_NKEYS; i++) {
        const char *last = strrchr(config_keys[i].path, '.');
        if (last && !strcmp(last + 1, name)) { snprintf(out, outlen, " (did you mean %s?)", config_keys[i].path); return; }
    }
}

// ----------------------------------------------------------------------------
// Loading: a JSON tree (the file, a checkpoint's string, or one --set) applied over the defaults.

typedef struct {
    Config *c;
    LinearSpec spec[NUM_LINEAR + 1];  // each projection's own entry, and [CFG_DEFAULT_SPEC] the default
    int own[NUM_LINEAR];              // 1: the projection has its own entry, else it takes the default
    // Which source last set each key (0 defaults, 1 the file, 2 --set), so a check between two keys
    // blames the source that made them disagree.
    int key_src[CFG_NKEYS], spec_src[NUM_LINEAR + 1], src;
    const char *file;                 // name of source 1
    char *err; size_t errlen;
} CfgLoad;

static const char *cfg_src_name(const CfgLoad *L, int src) {
    return src == 2 ? "--set" : src == 1 ? L->file : "(defaults)";
}

static int cfg_fail(const CfgLoad *L, int src, const char *path, const char *value, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return cfg_err(L->err, L->errlen, cfg_src_name(L, src), path, value, "%s", msg);
}

static int cfg_unknown(const CfgLoad *L, const char *path) {
    // Name the first unknown component (a --set path may go on below it).
    char prefix[256];
    int key, spec;
    for (const char *p = path;; p++) {
        if (*p != '.' && *p) continue;
        snprintf(prefix, sizeof prefix, "%.*s", (int)(p - path), path);
        if (!*p || cfg_classify(prefix, &key, &spec) == CP_UNKNOWN) break;
    }
    char hint[300];
    cfg_suggest(prefix, hint, sizeof hint);
    return cfg_fail(L, L->src, prefix, NULL, "unknown key%s", hint);
}

static int cfg_enum_has(const char *choices, const char *s) {
    size_t n = strlen(s);
    for (const char *p = choices; *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && !strncmp(p, s, n)) return 1;
        p += len + (bar != NULL);
    }
    return 0;
}

// One value into its place in base (a Config or a LinearSpec), type- and range-checked.
static int cfg_set_leaf(const CfgLoad *L, const CfgKey *k, void *base, const char *path, const cJSON *v) {
    char vt[96];
    cfg_value_text(v, vt, sizeof vt);
    void *dst = (char *)base + k->off;
    if (k->kind == CK_BOOL) {
        if (!cJSON_IsBool(v)) return cfg_fail(L, L->src, path, vt, "must be true or false (got %s)", cfg_kind_name(v));
        *(int *)dst = cJSON_IsTrue(v);
        return 0;
    }
    if (k->kind == CK_STR) {
        if (!cJSON_IsString(v)) return cfg_fail(L, L->src, path, vt, "must be a string (got %s)", cfg_kind_name(v));
        const char *s = v->valuestring;
        if (k->choices && !cfg_enum_has(k->choices, s)) {
            char list[128]; size_t n = 0;
            for (const char *p = k->choices; *p && n < sizeof list - 3; p++) {
                if (*p == '|') { list[n++] = ','; list[n++] = ' '; }
                else list[n++] = *p;
            }
            list[n] = '\0';
            return cfg_fail(L, L->src, path, vt, "must be one of %s", list);
        }
        if (!*s) return cfg_fail(L, L->src, path, vt, "must not be empty");
        if (strlen(s) >= k->size) return cfg_fail(L, L->src, path, vt, "too long (at most %zu bytes)", k->size - 1);
        strcpy((char *)dst, s);
        return 0;
    }
    const char *want = k->kind == CK_FLOAT ? "a number" : "an integer";
    if (!cJSON_IsNumber(v)) return cfg_fail(L, L->src, path, vt, "must be %s (got %s)", want, cfg_kind_name(v));
    double d = v->valuedouble;
    if (k->kind != CK_FLOAT && d != floor(d)) return cfg_fail(L, L->src, path, vt, "must be an integer");
    if (k->kind == CK_FLOAT) {
        if (!isfinite((float)d)) return cfg_fail(L, L->src, path, vt, "out of range of a 32-bit float");
        d = (float)d;  // range-check what will be used
    }
    int below = d < k->lo || (k->lo_open && d == k->lo), above = d > k->hi || (k->hi_open && d == k->hi);
    if (below || above) {
        if (isinf(k->hi)) return cfg_fail(L, L->src, path, vt, "must be %s %g", k->lo_open ? ">" : ">=", k->lo);
        return cfg_fail(L, L->src, path, vt, "must be in %c%g, %g%c", k->lo_open ? '(' : '[', k->lo, k->hi,
                        k->hi_open ? ')' : ']');
    }
    if (k->kind == CK_INT && d > INT_MAX) return cfg_fail(L, L->src, path, vt, "must be <= %d", INT_MAX);
    if (k->kind != CK_INT && k->kind != CK_FLOAT && d > CFG_EXACT_INT)
        return cfg_fail(L, L->src, path, vt, "must be <= 2^53 (larger integers are not exact in JSON)");
    switch (k->kind) {
    case CK_INT: *(int *)dst = (int)d; break;
    case CK_LONG: *(long *)dst = (long)d; break;
    case CK_U64: *(unsigned long long *)dst = (unsigned long long)d; break;
    default: *(float *)dst = (float)d; break;
    }
    return 0;
}

static int cfg_apply(CfgLoad *L, const char *path, const cJSON *v);

static int cfg_apply_members(CfgLoad *L, const char *path, const cJSON *obj) {
    if (!cJSON_IsObject(obj)) {
        char vt[96];
        cfg_value_text(obj, vt, sizeof vt);
        return cfg_fail(L, L->src, *path ? path : "(top level)", vt, "must be an object (got %s)", cfg_kind_name(obj));
    }
    for (const cJSON *m = obj->child; m; m = m->next) {
        char sub[256];
        snprintf(sub, sizeof sub, "%s%s%s", path, *path ? "." : "", m->string);
        for (const cJSON *p = obj->child; p != m; p = p->next)
            if (!strcmp(p->string, m->string)) return cfg_fail(L, L->src, sub, NULL, "duplicate key");
        if (strchr(m->string, '.')) return cfg_fail(L, L->src, sub, NULL, "a key name cannot contain '.' (nest objects)");
        if (cfg_apply(L, sub, m)) return -1;
    }
    return 0;
}

static int cfg_apply(CfgLoad *L, const char *path, const cJSON *v) {
    int key = -1, spec = -1;
    switch (cfg_classify(path, &key, &spec)) {
    case CP_ROOT: case CP_SECTION:
        return cfg_apply_members(L, path, v);
    case CP_KEY:
        L->key_src[key] = L->src;
        if (config_keys[key].kind == CK_LINEAR) return cfg_apply_members(L, path, v);
        return cfg_set_leaf(L, &config_keys[key], L->c, path, v);
    case CP_SPEC:
        // An entry replaces whatever the projection had (the default included) whole.
        linear_spec_dense(&L->spec[spec]);
        if (spec != CFG_DEFAULT_SPEC) L->own[spec] = 1;
        L->spec_src[spec] = L->src;
        return cfg_apply_members(L, path, v);
    case CP_SPEC_KEY:
        // One key of a projection that has no entry yet (only possible with --set): start from the default.
        if (spec != CFG_DEFAULT_SPEC && !L->own[spec]) { L->spec[spec] = L->spec[CFG_DEFAULT_SPEC]; L->own[spec] = 1; }
        L->spec_src[spec] = L->src;
        return cfg_set_leaf(L, &linear_keys[key], &L->spec[spec], path, v);
    default:
        return cfg_unknown(L, path);
    }
}

static int cfg_apply_text(CfgLoad *L, const char *text) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    if (!root) {
        int line = 1, col = 1;
        if (!end) end = text;
        for (const char *p = text; p < end && *p; p++) { if (*p == '\n') { line++; col = 1; } else col++; }
        char near[24]; int n = 0;
        for (const char *p = end; *p && *p != '\n' && n < 20; p++) near[n++] = *p;
        near[n] = '\0';
        char pos[64];
        snprintf(pos, sizeof pos, "line %d, column %d", line, col);
        if (!n) return cfg_fail(L, L->src, pos, NULL, "invalid JSON (unexpected end)");
        return cfg_fail(L, L->src, pos, NULL, "invalid JSON near '%s'", near);
    }
    int rc = cfg_apply(L, "", root);
    cJSON_Delete(root);
    return rc;
}

// ----------------------------------------------------------------------------
// Checks that involve more than one key, run once everything is read.

// The latest source among src and those that set keys a and b (b may be NULL): the one that made
// them disagree.
static int cfg_src_max(const CfgLoad *L, int src, const char *a, const char *b) {
    int sa = L->key_src[cfg_find_key(a)], sb = b ? L->key_src[cfg_find_key(b)] : 0;
    if (sa > src) src = sa;
    return sb > src ? sb : src;
}

static void linear_dims(const Config *c, int p, int *d_in, int *d_out) {
    int C = c->model.n_embd;
    *d_in = p == LIN_MLP_PROJ ? 4 * C : C;
    *d_out = p == LIN_ATTN_QKV ? 3 * C : p == LIN_MLP_FC ? 4 * C : C;
}

static const char *cfg_spec_path(int spec) {
    return spec == CFG_DEFAULT_SPEC ? "default" : linear_names[spec];
}

// Keys of another structure type, and top_k against experts: per spec, as written.
static int cfg_check_spec(const CfgLoad *L, int s) {
    const LinearSpec *sp = &L->spec[s];
    unsigned allowed = 0;
    for (size_t t = 0; t < sizeof linear_types / sizeof linear_types[0]; t++)
        if (!strcmp(linear_types[t].type, sp->type)) allowed = linear_types[t].keys;
    for (int k = LK_BLOCKS; k <= LK_TOPK; k++) {
        int val = *(const int *)((const char *)sp + linear_keys[k].off);
        if (!val || (allowed & LKB(k))) continue;
        char path[128], vt[32], takes[96] = "";
        snprintf(path, sizeof path, "model.linear.%s.%s", cfg_spec_path(s), linear_keys[k].path);
        snprintf(vt, sizeof vt, "%d", val);
        for (int j = LK_BLOCKS; j <= LK_WNORM; j++)
            if ((allowed & LKB(j)) || j == LK_WNORM)
                snprintf(takes + strlen(takes), sizeof takes - strlen(takes), "%s%s", *takes ? ", " : "", linear_keys[j].path);
        return cfg_fail(L, L->spec_src[s], path, vt, "not a key of type \"%s\" (it takes: %s)", sp->type, takes);
    }
    int experts = sp->experts ? sp->experts : 8;
    if (sp->top_k > experts) {
        char path[128], vt[32];
        snprintf(path, sizeof path, "model.linear.%s.top_k", cfg_spec_path(s));
        snprintf(vt, sizeof vt, "%d", sp->top_k);
        return cfg_fail(L, L->spec_src[s], path, vt, "must be <= experts (%d)", experts);
    }
    return 0;
}

// The block counts of a structure must divide the dimensions of the layer it is used for.
static int cfg_check_shape(const CfgLoad *L, int p) {
    const Config *c = L->c;
    const LinearSpec *sp = &c->model.linear[p];
    int s = L->own[p] ? p : CFG_DEFAULT_SPEC, d_in, d_out;
    linear_dims(c, p, &d_in, &d_out);
    const char *key = NULL;
    int val = 0, divides_in = 0, divides_out = 0, is_default = 0;
    if (!strcmp(sp->type, "blockdiag") || !strcmp(sp->type, "monarch")) {
        key = "blocks"; val = sp->blocks ? sp->blocks : 4; is_default = !sp->blocks;
        divides_in = divides_out = 1;
    } else if (!strcmp(sp->type, "btt") || !strcmp(sp->type, "btt_moe")) {
        if (sp->in_blocks && d_in % sp->in_blocks) { key = "in_blocks"; val = sp->in_blocks; divides_in = 1; }
        else if (sp->out_blocks && d_out % sp->out_blocks) { key = "out_blocks"; val = sp->out_blocks; divides_out = 1; }
    } else if (!strcmp(sp->type, "lowrank")) {
        int m = d_in < d_out ? d_in : d_out, r = sp->rank ? sp->rank : m / 4;
        if (r < 1 || r > m) {
            char path[128], vt[48];
            snprintf(path, sizeof path, "model.linear.%s.rank", cfg_spec_path(s));
            snprintf(vt, sizeof vt, sp->rank ? "%d" : "%d (default)", r);
            return cfg_fail(L, L->spec_src[s], path, vt, "must be in [1, %d] for %s (%d -> %d)", m, linear_names[p], d_in, d_out);
        }
    }
    if (!key || !((divides_in && d_in % val) || (divides_out && d_out % val))) return 0;
    // List what would work: the divisors of every dimension the value must divide.
    int g = divides_in ? d_in : d_out;
    for (int other = divides_in && divides_out ? d_out : g; other;) { int t = g % other; g = other; other = t; }
    char valid[256] = "", path[128], vt[48];
    for (int b = 1; b <= g && strlen(valid) < sizeof valid - 16; b++)
        if (g % b == 0) snprintf(valid + strlen(valid), sizeof valid - strlen(valid), "%s%d", *valid ? " " : "", b);
    snprintf(path, sizeof path, "model.linear.%s.%s", cfg_spec_path(s), key);
    snprintf(vt, sizeof vt, is_default ? "%d (default)" : "%d", val);
    int src = cfg_src_max(L, L->spec_src[s], "model.n_embd", NULL);
    return cfg_fail(L, src, path, vt, "must divide %s%s%s of %s (%d -> %d); valid: %s",
                    divides_in ? "d_in" : "", divides_in && divides_out ? " and " : "", divides_out ? "d_out" : "",
                    linear_names[p], d_in, d_out, valid);
}

static int cfg_finish(CfgLoad *L, int world_size) {
    Config *c = L->c;
    for (int p = 0; p < NUM_LINEAR; p++) c->model.linear[p] = L->spec[L->own[p] ? p : CFG_DEFAULT_SPEC];
    char vt[64];
    if (c->model.n_embd % c->model.n_head) {
        snprintf(vt, sizeof vt, "%d", c->model.n_embd);
        return cfg_fail(L, cfg_src_max(L, 0, "model.n_embd", "model.n_head"), "model.n_embd", vt,
                        "must be divisible by model.n_head (%d)", c->model.n_head);
    }
    if (c->model.padded_vocab_size < c->model.vocab_size) {
        snprintf(vt, sizeof vt, "%d", c->model.padded_vocab_size);
        return cfg_fail(L, cfg_src_max(L, 0, "model.padded_vocab_size", "model.vocab_size"), "model.padded_vocab_size", vt,
                        "must be >= model.vocab_size (%d)", c->model.vocab_size);
    }
    if (c->train.seq_len > c->model.block_size) {
        snprintf(vt, sizeof vt, "%d", c->train.seq_len);
        return cfg_fail(L, cfg_src_max(L, 0, "train.seq_len", "model.block_size"), "train.seq_len", vt,
                        "must be <= model.block_size (%d)", c->model.block_size);
    }
    if (world_size < 1) return cfg_err(L->err, L->errlen, "config", NULL, NULL, "world_size %d must be >= 1", world_size);
    // Gradient accumulation needs a whole number of micro-batches on every process per step.
    long long per_step = (long long)c->train.micro_batch * c->train.seq_len;
    if (per_step > c->train.batch_tokens || world_size > c->train.batch_tokens / per_step ||
        c->train.batch_tokens % (per_step * world_size)) {
        snprintf(vt, sizeof vt, "%ld", c->train.batch_tokens);
        int src = cfg_src_max(L, cfg_src_max(L, 0, "train.batch_tokens", "train.micro_batch"), "train.seq_len", NULL);
        return cfg_fail(L, src, "train.batch_tokens", vt,
                        "must be a multiple of micro_batch * seq_len * world_size = %d * %d * %d = %lld",
                        c->train.micro_batch, c->train.seq_len, world_size, per_step * world_size);
    }
    if (cfg_check_spec(L, CFG_DEFAULT_SPEC)) return -1;
    for (int p = 0; p < NUM_LINEAR; p++) if (L->own[p] && cfg_check_spec(L, p)) return -1;
    for (int p = 0; p < NUM_LINEAR; p++) if (cfg_check_shape(L, p)) return -1;
    return 0;
}

static void cfg_load_init(CfgLoad *L, Config *c, const char *file, char *err, size_t errlen) {
    memset(L, 0, sizeof *L);
    config_defaults(c);
    L->c = c;
    for (int s = 0; s <= NUM_LINEAR; s++) linear_spec_dense(&L->spec[s]);
    L->src = 1;
    L->file = file;
    L->err = err;
    L->errlen = errlen;
    if (err && errlen) err[0] = '\0';
}

static char *cfg_read_file(const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) { cfg_err(err, errlen, path, NULL, NULL, "cannot read: %s", strerror(errno)); return NULL; }
    size_t len = 0, cap = 4096;
    char *buf = (char *)malloc(cap);
    for (size_t got; buf && (got = fread(buf + len, 1, cap - len - 1, f)) > 0;) {
        len += got;
        if (cap - len < 2) { char *nb = (char *)realloc(buf, cap *= 2); if (!nb) { free(buf); buf = NULL; } else buf = nb; }
    }
    int e = errno, failed = ferror(f);
    fclose(f);
    if (!buf) { cfg_err(err, errlen, path, NULL, NULL, "cannot read: out of memory"); return NULL; }
    if (failed) { free(buf); cfg_err(err, errlen, path, NULL, NULL, "cannot read: %s", strerror(e)); return NULL; }
    buf[len] = '\0';
    return buf;
}

// --set key.path=value overrides, applied after the file (source 2 in messages).
static int cfg_apply_sets(CfgLoad *L, const char *const *sets, int nsets) {
    L->src = 2;
    for (int i = 0; i < nsets; i++) {
        const char *eq = strchr(sets[i], '=');
        if (!eq || eq == sets[i])
            return cfg_fail(L, 2, NULL, NULL, "\"%s\": expected key.path=value", sets[i]);
        char key[256];
        snprintf(key, sizeof key, "%.*s", (int)(eq - sets[i]), sets[i]);
        // The value is JSON when it parses as JSON (12, 3e-4, true, "x", {...}), else a plain string.
        cJSON *v = cJSON_ParseWithOpts(eq + 1, NULL, 1);
        if (!v) v = cJSON_CreateString(eq + 1);
        int rc = cfg_apply(L, key, v);
        cJSON_Delete(v);
        if (rc) return -1;
    }
    return 0;
}

// Load JSON (path may be NULL: defaults only), apply --set overrides, validate everything.
// world_size for the batch_tokens divisibility check.
static int config_load(Config *c, const char *path, const char *const *sets, int nsets, int world_size,
                       char *err, size_t errlen) {
    CfgLoad L;
    cfg_load_init(&L, c, path ? path : "(defaults)", err, errlen);
    if (path) {
        char *text = cfg_read_file(path, err, errlen);
        if (!text) return -1;
        int rc = cfg_apply_text(&L, text);
        free(text);
        if (rc) return -1;
    }
    if (cfg_apply_sets(&L, sets, nsets)) return -1;
    return cfg_finish(&L, world_size);
}

// A resolved config written by config_to_json (RUN/config.json, checkpoint metadata); origin names
// it in messages; --set overrides (sets, nsets; may be NULL, 0) apply on top, as on --resume.
static int config_from_json_string(Config *c, const char *json, const char *origin,
                                   const char *const *sets, int nsets, char *err, size_t errlen) {
    CfgLoad L;
    cfg_load_init(&L, c, origin, err, errlen);
    if (cfg_apply_text(&L, json) || cfg_apply_sets(&L, sets, nsets)) return -1;
    return cfg_finish(&L, 1);
}

// ----------------------------------------------------------------------------
// Writing the resolved config.

typedef struct { char *s; size_t len, cap; } CfgBuf;

static void cfgbuf_printf(CfgBuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (!b->s || n < 0) return;
    if (b->len + n + 1 > b->cap) {
        while (b->len + n + 1 > b->cap) b->cap *= 2;
        char *ns = (char *)realloc(b->s, b->cap);
        if (!ns) { free(b->s); b->s = NULL; return; }
        b->s = ns;
    }
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += n;
}

static void cfgbuf_string(CfgBuf *b, const char *s) {
    cfgbuf_printf(b, "\"");
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') cfgbuf_printf(b, "\\%c", ch);
        else if (ch < 0x20) cfgbuf_printf(b, "\\u%04x", ch);
        else cfgbuf_printf(b, "%c", ch);
    }
    cfgbuf_printf(b, "\"");
}

// The shortest decimal that reads back as exactly f (at most 9 significant digits always suffice),
// so 6e-4f prints as 0.0006, not 0.000600000028.
static void cfg_float_text(float f, char *buf, size_t n) {
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, n, "%.*g", prec, f);
        if (strtof(buf, NULL) == f) return;
    }
}

static void cfg_emit_spec(CfgBuf *b, const LinearSpec *sp) {
    cfgbuf_printf(b, "{\"type\": ");
    cfgbuf_string(b, sp->type);
    for (int k = LK_BLOCKS; k <= LK_TOPK; k++) {
        int val = *(const int *)((const char *)sp + linear_keys[k].off);
        if (val) cfgbuf_printf(b, ", \"%s\": %d", linear_keys[k].path, val);
    }
    if (*sp->weight_norm) { cfgbuf_printf(b, ", \"weight_norm\": "); cfgbuf_string(b, sp->weight_norm); }
    cfgbuf_printf(b, "}");
}

static void cfg_emit(CfgBuf *b, const Config *c, const char *prefix, int depth) {
    const char *names[64]; int lens[64];
    int n = cfg_children(prefix, names, lens, 64);
    cfgbuf_printf(b, "{");
    for (int i = 0; i < n; i++) {
        char path[256], num[32];
        // Table paths are short; the precisions only bound the lengths for the compiler.
        snprintf(path, sizeof path, "%.128s%s%.*s", prefix, *prefix ? "." : "", lens[i] < 64 ? lens[i] : 64, names[i]);
        cfgbuf_printf(b, "%s\n%*s\"%.*s\": ", i ? "," : "", 2 * (depth + 1), "", lens[i], names[i]);
        int key = cfg_find_key(path);
        if (key < 0) { cfg_emit(b, c, path, depth + 1); continue; }
        const CfgKey *k = &config_keys[key];
        const void *src = (const char *)c + k->off;
        switch (k->kind) {
        case CK_INT: cfgbuf_printf(b, "%d", *(const int *)src); break;
        case CK_LONG: cfgbuf_printf(b, "%ld", *(const long *)src); break;
        case CK_U64: cfgbuf_printf(b, "%llu", *(const unsigned long long *)src); break;
        case CK_FLOAT: cfg_float_text(*(const float *)src, num, sizeof num); cfgbuf_printf(b, "%s", num); break;
        case CK_BOOL: cfgbuf_printf(b, "%s", *(const int *)src ? "true" : "false"); break;
        case CK_STR: cfgbuf_string(b, (const char *)src); break;
        case CK_LINEAR:
            // Resolved: every projection explicit, so no "default" is needed to read it back.
            cfgbuf_printf(b, "{");
            for (int p = 0; p < NUM_LINEAR; p++) {
                cfgbuf_printf(b, "%s\n%*s\"%s\": ", p ? "," : "", 2 * (depth + 2), "", linear_names[p]);
                cfg_emit_spec(b, &c->model.linear[p]);
            }
            cfgbuf_printf(b, "\n%*s}", 2 * (depth + 1), "");
            break;
        }
    }
    cfgbuf_printf(b, "\n%*s}", 2 * depth, "");
}

// The resolved config, every key, as pretty JSON (malloc'd; NULL only when out of memory).
static char *config_to_json(const Config *c) {
    CfgBuf b = {(char *)malloc(4096), 0, 4096};
    cfg_emit(&b, c, "", 0);
    cfgbuf_printf(&b, "\n");
    return b.s;
}

// ----------------------------------------------------------------------------
// Command line.

static void cli_print_help(FILE *f, const char *prog) {
    fprintf(f,
        "usage: %s [CONFIG.json] [--set key.path=value]... [--resume RUN_DIR] [--init-from FILE] [--eval SHARD] [--help]\n"
        "Train a GPT-2 whose linear layers may be structured (dense, blockdiag, lowrank, monarch, btt, btt_moe).\n"
        "\n"
        "  CONFIG.json           the JSON config; every key has a default.\n"
        "                        With no CONFIG, configs/default.json (a small GPT on the embedded tinyshakespeare)\n"
        "  --set key.path=value  override one config key after the file is read (repeatable); e.g. --set optim.lr=3e-4\n"
        "  --resume RUN_DIR      continue the run in RUN_DIR from its newest complete checkpoint\n"
        "  --init-from FILE      start from the parameters of a checkpoint or of llm.c's gpt2_124M.bin\n"
        "  --eval SHARD          with --init-from or --resume: mean cross-entropy over SHARD in order, then exit\n"
        "  --help                print this help\n"
        "\n"
        "A --set value is read as JSON when it parses (12, 3e-4, true, \"text\", {\"type\": \"dense\"}),\n"
        "otherwise as a string (--set run.dir=runs/x).\n"
        "The resolved config is written to RUN_DIR/config.json and into every checkpoint.\n"
        "Environment: OMP_NUM_THREADS sets the thread count.\n",
        prog);
}

static int cli_parse(int argc, char **argv, CliArgs *args, char *err, size_t errlen) {
    memset(args, 0, sizeof *args);
    if (err && errlen) err[0] = '\0';
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], **slot = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { args->help = 1; continue; }
        if (!strcmp(a, "--set")) {
            if (args->nsets == (int)(sizeof args->sets / sizeof args->sets[0]))
                return cfg_err(err, errlen, a, NULL, NULL, "too many (at most %d)", args->nsets);
            slot = &args->sets[args->nsets++];
        } else if (!strcmp(a, "--resume")) slot = &args->resume_dir;
        else if (!strcmp(a, "--init-from")) slot = &args->init_from;
        else if (!strcmp(a, "--eval")) slot = &args->eval_shard;
        else if (a[0] == '-' && a[1]) return cfg_err(err, errlen, a, NULL, NULL, "unknown option (see --help)");
        else if (args->config_path) return cfg_err(err, errlen, a, NULL, NULL, "a second CONFIG (already %s)", args->config_path);
        else { args->config_path = a; continue; }
        if (i + 1 >= argc) return cfg_err(err, errlen, a, NULL, NULL, "needs a value (see --help)");
        if (*slot) return cfg_err(err, errlen, a, NULL, NULL, "given twice");
        *slot = argv[++i];
    }
    if (args->help) return 0;
    if (args->resume_dir && args->init_from)
        return cfg_err(err, errlen, "--init-from", NULL, NULL, "cannot be combined with --resume (which continues its run)");
    if (args->eval_shard && !args->resume_dir && !args->init_from)
        return cfg_err(err, errlen, "--eval", NULL, NULL, "needs --init-from FILE or --resume RUN_DIR (the model to evaluate)");
    return 0;
}

#endif
