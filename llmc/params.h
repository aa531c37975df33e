// The parameter table both trainers lay their parameters out by: named tensors over one flat array,
// in checkpoint order, with each tensor's shape, weight decay, learning-rate multiplier and init.
// The names are the checkpoint names (DESIGN section 5), so initialization, saving, loading, weight
// decay and mup's per-tensor learning rates all read this one table, and the CPU trainer
// (train_gpt2.c, fp32) and the CUDA trainer (train_gpt2.cu, bf16 on the device, fp32 host copies for
// checkpoints) agree on every name, shape and offset order by construction. C and C++.
#ifndef LLMC_PARAMS_H
#define LLMC_PARAMS_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llmc/structure.h"
#include "llmc/checkpoint.h"
#include "llmc/rand.h"

#define MAX_TENSORS 1024
#define INIT_ONES -1.0f
typedef struct {
    char name[64];
    size_t offset, size;   // in elements, into the flat arrays (params, grads, AdamW moments, host copies)
    int ndim;
    long long shape[4];
    int decay;             // AdamW weight decay: matrices, cores, routers and embeddings; not biases, LayerNorm, gamma
    float lr_mult;         // AdamW lr = schedule lr * lr_mult (mup's per-core multipliers, else 1)
    float init_std;        // N(0, init_std^2); 0: zeros; INIT_ONES: ones (LayerNorm weights, gamma)
} ParamTensor;

typedef struct {
    ParamTensor t[MAX_TENSORS];
    int n;
    size_t num;            // flat length so far
    int align;             // offsets rounded up to this many elements (the GPU's 8: 16-byte rows)
} ParamTable;

// Adds a tensor of shape (d0[, d1[, d2]]) (ndim 1 to 3) and returns its index.
static int param_add(ParamTable *p, const char *name, int ndim, long long d0, long long d1, long long d2, int decay,
                     float init_std) {
    if (p->n == MAX_TENSORS) { fprintf(stderr, "error: more than %d tensors\n", MAX_TENSORS); exit(1); }
    ParamTensor *t = &p->t[p->n];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    long long d[3] = {d0, d1, d2};
    t->size = 1;
    for (int i = 0; i < ndim; i++) { t->shape[i] = d[i]; t->size *= (size_t)d[i]; }
    t->offset = p->num;
    t->decay = decay;
    t->lr_mult = 1.0f;
    t->init_std = init_std;
    size_t a = p->align > 1 ? (size_t)p->align : 1;
    p->num += (t->size + a - 1) / a * a;
    return p->n++;
}

static int param_find(const ParamTable *p, const char *name) {
    for (int i = 0; i < p->n; i++) if (!strcmp(p->t[i].name, name)) return i;
    return -1;
}

// "(a, b, c)" of a tensor's shape
static const char *shape_str(char *buf, size_t len, int ndim, const long long *shape) {
    int n = snprintf(buf, len, "(");
    for (int d = 0; d < ndim; d++) n += snprintf(buf + n, len - n, "%s%lld", d ? ", " : "", shape[d]);
    snprintf(buf + n, len - n, ")");
    return buf;
}

// A LayerNorm's weight (ones) and bias (zeros) of n channels, named PREFIX.w and PREFIX.b with PREFIX
// "h.LAYER.NAME" (layer >= 0) or NAME; their indices into *w and *b.
static void param_add_norm(ParamTable *p, int layer, const char *name, int n, int *w, int *b) {
    char full[64];
    if (layer >= 0) snprintf(full, sizeof full, "h.%d.%s.w", layer, name);
    else snprintf(full, sizeof full, "%s.w", name);
    *w = param_add(p, full, 1, n, 0, 0, 0, INIT_ONES);
    full[strlen(full) - 1] = 'b';
    *b = param_add(p, full, 1, n, 0, 0, 0, 0.0f);
}

// The tensors of one linear layer (DESIGN section 5 names), their indices into core, gamma, *G, *b
// (-1: absent): W (dense (d_out, d_in), blockdiag (b, d_out/b, d_in/b)) or W0 and W1 (the cores
// (nb, q, p)), G (btt_moe's router (E, d_in), zero-initialized, DESIGN 3.6), gamma0/gamma1
// (rms_cap), then b.
static void param_add_linear(ParamTable *p, const Structure *s, int layer, int core[2], int gamma[2], int *G, int *b) {
    char name[64];
    const char *proj = linear_names[s->which];
    core[0] = core[1] = gamma[0] = gamma[1] = *G = -1;
    for (int c = 0; c < s->ncores; c++) {
        const CoreShape *k = &s->core[c];
        if (s->type == STRUCT_DENSE) {
            snprintf(name, sizeof name, "h.%d.%s.W", layer, proj);
            core[c] = param_add(p, name, 2, k->q, k->p, 0, 1, (float)s->init_std[c]);
        } else {
            snprintf(name, sizeof name, s->ncores == 1 ? "h.%d.%s.W" : "h.%d.%s.W%d", layer, proj, c);
            core[c] = param_add(p, name, 3, k->nb, k->q, k->p, 1, (float)s->init_std[c]);
        }
        p->t[core[c]].lr_mult = (float)s->lr_mult[c];
    }
    if (s->type == STRUCT_BTT_MOE) {   // the router: the layer's lr
        snprintf(name, sizeof name, "h.%d.%s.G", layer, proj);
        *G = param_add(p, name, 2, s->experts, s->d_in, 0, 1, 0.0f);
        p->t[*G].lr_mult = (float)s->router_lr_mult;
    }
    for (int c = 0; s->rms_cap && c < s->ncores; c++) {
        snprintf(name, sizeof name, "h.%d.%s.gamma%d", layer, proj, c);
        gamma[c] = param_add(p, name, 1, 1, 0, 0, 0, INIT_ONES);
    }
    snprintf(name, sizeof name, "h.%d.%s.b", layer, proj);
    *b = param_add(p, name, 1, s->d_out, 0, 0, 0, 0.0f);
}

// Fills a flat fp32 array (p->num, zeroed by the caller) from each tensor's init_std: tensors drawn
// in table order from one generator seeded with seed; zero and one tensors draw nothing.
static void param_init(const ParamTable *p, float *flat, uint64_t seed) {
    Rng rng;
    rng_seed(&rng, seed);
    for (int i = 0; i < p->n; i++) {
        const ParamTensor *t = &p->t[i];
        float *x = flat + t->offset;
        if (t->init_std == INIT_ONES) {
            for (size_t j = 0; j < t->size; j++) x[j] = 1.0f;
        } else if (t->init_std != 0.0f) {
            rng_normal_fill(&rng, x, t->size, t->init_std);
        }
    }
}

// Writes a safetensors file (F32) of nbases flat arrays laid out by the table, tensor prefixes[i] + name
// from bases[i], with nmeta metadata pairs.
static int param_write_file(const ParamTable *p, const char *path, const char *const *prefixes,
                            float *const *bases, int nbases, const char *const *keys, const char *const *vals,
                            int nmeta, char *err, size_t errlen) {
    int n = p->n * nbases;
    StTensor *ts = (StTensor *)calloc((size_t)n, sizeof(StTensor));
    char (*names)[80] = (char (*)[80])calloc((size_t)n, sizeof *names);
    if (!ts || !names) {
        free(ts);
        free(names);
        snprintf(err, errlen, "%s: out of memory", path);
        return -1;
    }
    for (int k = 0; k < nbases; k++) {
        for (int i = 0; i < p->n; i++) {
            const ParamTensor *t = &p->t[i];
            StTensor *s = &ts[k * p->n + i];
            snprintf(names[k * p->n + i], sizeof names[0], "%s%s", prefixes[k], t->name);
            s->name = names[k * p->n + i];
            s->dtype = "F32";
            s->data = bases[k] + t->offset;
            s->ndim = t->ndim;
            for (int d = 0; d < 4; d++) s->shape[d] = t->shape[d];
        }
    }
    int rc = safetensors_write(path, ts, n, keys, vals, nmeta, err, errlen);
    free(ts);
    free(names);
    return rc;
}

// Copies every tensor named prefix + name from a safetensors file into the flat array base, refusing
// (naming the file and tensor) one that is missing or of another dtype or shape.
static int param_load(const ParamTable *p, const SafeTensors *st, const char *path, const char *prefix, float *base,
                      char *err, size_t errlen) {
    for (int i = 0; i < p->n; i++) {
        const ParamTensor *t = &p->t[i];
        char name[80];
        snprintf(name, sizeof name, "%s%s", prefix, t->name);
        const char *dtype;
        int ndim;
        long long shape[4];
        const void *data = safetensors_find(st, name, &dtype, &ndim, shape);
        if (!data) {
            snprintf(err, errlen, "%s: tensor %s is missing (the config's model has it)", path, name);
            return -1;
        }
        int same = strcmp(dtype, "F32") == 0 && ndim == t->ndim;
        for (int d = 0; same && d < ndim; d++) same = shape[d] == t->shape[d];
        if (!same) {
            char have[96], want[96];
            snprintf(err, errlen, "%s: tensor %s: dtype %s shape %s but the config's model needs F32 %s", path, name,
                     dtype, shape_str(have, sizeof have, ndim, shape), shape_str(want, sizeof want, t->ndim, t->shape));
            return -1;
        }
        memcpy(base + t->offset, data, t->size * sizeof(float));
    }
    return 0;
}

// llm.c's model file (gpt2_124M.bin, magic 20240326) into the flat array base: the parameters in
// llm.c's order (wte, wpe, then each kind concatenated over the layers, then lnf), found here by
// name. Refused, naming the file: a config whose model is not dense GPT-2, or whose sizes differ.
static int param_load_llmc(const ParamTable *p, const Config *cfg, const char *path, float *base, char *err,
                           size_t errlen) {
    for (int k = 0; k < NUM_LINEAR; k++) {
        if (strcmp(cfg->model.linear[k].type, "dense") || cfg->model.qk_norm) {
            snprintf(err, errlen, "%s: an llm.c model is dense GPT-2, but the config's model.linear.%s is \"%s\"%s "
                     "(convert it first: dev/tools/project %s OUT.safetensors --to TYPE)", path, linear_names[k],
                     cfg->model.linear[k].type, cfg->model.qk_norm ? " with qk_norm" : "", path);
            return -1;
        }
    }
    int h[8];
    float *src;
    size_t n;
    if (llmc_model_read(path, h, &src, &n, err, errlen)) return -1;
    const char *what[6] = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "padded_vocab_size"};
    int ours[6] = {cfg->model.block_size, cfg->model.vocab_size, cfg->model.n_layer, cfg->model.n_head,
                   cfg->model.n_embd, cfg->model.padded_vocab_size};
    for (int i = 0; i < 6; i++) {
        if (h[2 + i] != ours[i]) {
            snprintf(err, errlen, "%s: the file's %s is %d but the config's model.%s is %d (use --set model.%s=%d)",
                     path, what[i], h[2 + i], what[i], ours[i], what[i], h[2 + i]);
            free(src);
            return -1;
        }
    }
    static const char *const kinds[] = {"ln1.w", "ln1.b", "attn_qkv.W", "attn_qkv.b", "attn_proj.W", "attn_proj.b",
                                        "ln2.w", "ln2.b", "mlp_fc.W", "mlp_fc.b", "mlp_proj.W", "mlp_proj.b"};
    int nk = (int)(sizeof kinds / sizeof kinds[0]), L = cfg->model.n_layer;
    size_t used = 0;
    for (int i = -2; i < nk * L + 2; i++) {   // -2, -1: wte, wpe; then kind i / L of layer i % L; then lnf
        char name[64];
        if (i < 0) snprintf(name, sizeof name, "%s", i == -2 ? "wte" : "wpe");
        else if (i < nk * L) snprintf(name, sizeof name, "h.%d.%s", i % L, kinds[i / L]);
        else snprintf(name, sizeof name, "%s", i == nk * L ? "lnf.w" : "lnf.b");
        int t = param_find(p, name);
        if (t < 0 || used + p->t[t].size > n) {
            snprintf(err, errlen, "%s: %s: %s", path, name, t < 0 ? "not in the config's model" : "the file ends first");
            free(src);
            return -1;
        }
        memcpy(base + p->t[t].offset, src + used, p->t[t].size * sizeof(float));
        used += p->t[t].size;
    }
    free(src);
    if (used != n) {
        snprintf(err, errlen, "%s: %zu parameters, but the config's model has %zu", path, n, used);
        return -1;
    }
    return 0;
}

// ----------------------------------------------------------------------------------------------
// What the model costs. st: the structure of each projection (the same in every block).

// Training FLOPs per token: 6 per MAC of every matmul (forward 2, backward 4) plus attention
// (q.k and P.v: 2 T C MACs per token per layer at full context, halved by the causal mask).
// The linear layers count their real MACs (llmc/structure.h), not those of the dense layer they replace.
static double model_flops_per_token(const Config *cfg, const Structure st[NUM_LINEAR], int T) {
    double macs = (double)cfg->model.padded_vocab_size * cfg->model.n_embd;   // LM head
    for (int k = 0; k < NUM_LINEAR; k++) macs += st[k].macs * cfg->model.n_layer;
    double attn = (double)cfg->model.n_layer * T * cfg->model.n_embd;         // causal: (T/2) * C * 2 matmuls per token
    return 6.0 * (macs + attn);
}

// The start-up summary (DESIGN 3): per projection its structure, core shapes, parameters and MACs
// per token next to the dense layer's, then the totals (parameters counted from the table, FLOPs at
// context T). Printed, and returned as one JSON record for log.jsonl (malloc'd).
static char *model_summary(const ParamTable *p, const Config *cfg, const Structure st[NUM_LINEAR], int T, int step) {
    int L = cfg->model.n_layer;
    printf("model: %d layers, %d heads, n_embd %d, block_size %d, vocab %d (padded %d)%s%s%s\n",
           L, cfg->model.n_head, cfg->model.n_embd, cfg->model.block_size, cfg->model.vocab_size, cfg->model.padded_vocab_size,
           cfg->model.qk_norm ? ", qk_norm" : "", strcmp(cfg->model.attn_scale, "mup") ? "" : ", attn_scale mup",
           strcmp(cfg->model.parametrization, "mup") ? "" : ", parametrization mup");
    int w = 36;   // the structure column fits the longest description
    for (int k = 0; k < NUM_LINEAR; k++) {
        char desc[256];
        int n = (int)strlen(structure_describe(&st[k], desc, sizeof desc));
        if (n > w) w = n;
    }
    printf("%-9s %-12s %-*s %11s %11s %11s %7s\n", "layer", "shape", w, "structure (cores (blocks, out, in))",
           "params", "MACs/token", "dense", "ratio");
    size_t cap = 4096, len = 0, total = 0;
    char *rec = (char *)malloc(cap);
    if (!rec) { fprintf(stderr, "error: out of memory\n"); exit(1); }
    len += snprintf(rec, cap, "{\"type\": \"model\", \"step\": %d, \"layers\": [", step);
    double macs = 0.0, dense_macs = 0.0, lin_params = 0.0;
    for (int k = 0; k < NUM_LINEAR; k++) {
        const Structure *s = &st[k];
        char shape[32], desc[256];
        snprintf(shape, sizeof shape, "%d -> %d", s->d_in, s->d_out);
        structure_describe(s, desc, sizeof desc);
        long long params = s->params + s->d_out + (s->rms_cap ? s->ncores : 0);   // + bias, gamma
        printf("%-9s %-12s %-*s %11lld %11.0f %11.0f %6.3fx\n", linear_names[k], shape, w, desc, params, s->macs,
               s->dense_macs, s->macs / s->dense_macs);
        len += snprintf(rec + len, cap - len, "%s{\"name\": \"%s\", \"d_in\": %d, \"d_out\": %d, \"structure\": \"%s\", "
                        "\"params\": %lld, \"macs\": %.0f, \"dense_macs\": %.0f}", k ? ", " : "", linear_names[k],
                        s->d_in, s->d_out, desc, params, s->macs, s->dense_macs);
        macs += s->macs * L;
        dense_macs += s->dense_macs * L;
        lin_params += (double)params * L;
    }
    for (int i = 0; i < p->n; i++) total += p->t[i].size;
    double fpt = model_flops_per_token(cfg, st, T);
    printf("totals (x%d layers): linear layers %.0f params, %.4g MACs/token (%.3fx dense); model %zu params; "
           "training FLOPs/token %.4g (T=%d)\n", L, lin_params, macs, macs / dense_macs, total, fpt, T);
    snprintf(rec + len, cap - len, "], \"linear_params\": %.0f, \"linear_macs\": %.0f, \"dense_linear_macs\": %.0f, "
             "\"params\": %zu, \"flops_per_token\": %.6g}", lin_params, macs, dense_macs, total, fpt);
    return rec;
}

#endif
