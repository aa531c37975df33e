/*
GPT-2 training on NVIDIA GPUs: bf16 parameters, activations and gradients; fp32 master weights and
AdamW state; fp32 accumulation everywhere. The twin of train_gpt2.c (the CPU reference): the same
command line, JSON config, checkpoints (fp32 safetensors, same names and metadata) and log format,
so a run started on one trainer resumes or evaluates on the other.

Read top to bottom: the parameter table, the model (forward and backward over the kernels of
llmc/*.cuh), the optimizer (ZeRO-1 data parallel over NCCL), checkpoints, evaluation and sampling,
then the training loop (a copy of the CPU trainer's, plus ranks).

Data parallel (ZeRO-1): every rank holds all bf16 parameters and gradients, but only its shard of
the fp32 master weights and AdamW moments. After the micro-batches of a step the gradients are
reduce-scattered (averaged), each rank updates its shard, and the new bf16 parameters are
all-gathered. World size 1 runs the same code. Ranks come from the launcher (llmc/distributed.cuh).

Determinism: no kernel uses atomics; cuBLAS(Lt) picks the same algorithm for the same shapes; the
bf16 parameters are rounded to nearest from the fp32 master weights. So a run resumed on the same GPU
kind and world size continues bit-for-bit (NCCL's reductions are deterministic for a fixed world
size and topology).

Only dense linear layers exist in this version; structured ones (DESIGN section 3) come next and are
refused by gpt2_check_supported until then.

Shapes: B batch, T time, C channels, NH heads, hs = C/NH, V vocab, Vp padded vocab, L layers,
N = B*T tokens. Every linear layer stores W as (d_out, d_in) and computes y = x W^T + b.
*/
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "llmc/config.h"
#include "llmc/schedule.h"
#include "llmc/logger.h"
#include "llmc/checkpoint.h"
#include "llmc/dataloader.h"
#include "llmc/tokenizer.h"
#include "llmc/rand.h"

#include "llmc/cuda_common.cuh"
#include "llmc/distributed.cuh"
#include "llmc/encoder.cuh"
#include "llmc/layernorm.cuh"
#include "llmc/matmul.cuh"
#include "llmc/attention.cuh"
#include "llmc/classifier.cuh"
#include "llmc/adamw.cuh"

#define ERRLEN 1024
#define H100_BF16_PEAK 989e12   // dense bf16 tensor-core FLOP/s of an H100 SXM (and H200)

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "error: out of memory allocating %zu bytes\n", n); exit(1); }
    return p;
}
static void *xcalloc(size_t n) {
    void *p = calloc(1, n ? n : 1);
    if (!p) { fprintf(stderr, "error: out of memory allocating %zu bytes\n", n); exit(1); }
    return p;
}

// ----------------------------------------------------------------------------------------------
// Parameters: a table of named tensors over one flat allocation, in the CPU trainer's order (so
// initialization draws the same numbers). Offsets are rounded up to 8 elements so every tensor
// starts 16-byte aligned, as cuBLASLt and vector loads want; the gaps stay zero.

#define MAX_TENSORS 1024
typedef struct {
    char name[64];
    size_t offset, size;   // in elements, into params / grads and the host fp32 arrays
    int ndim;
    long long shape[4];
    int decay;             // AdamW weight decay: matrices and embeddings yes; biases, LayerNorm no
} ParamTensor;

typedef struct {
    int d_in, d_out;
    int W, b;              // tensor indices
} Linear;

typedef struct {
    int ln1w, ln1b, ln2w, ln2b;
    Linear lin[NUM_LINEAR];  // attn_qkv, attn_proj, mlp_fc, mlp_proj
} LayerParams;

// Device activations, one allocation; per-layer buffers hold L slices sized for (Bmax, Tmax).
typedef struct {
    bf16 *encoded;                    // (B,T,C)
    bf16 *ln1; float *ln1_mean, *ln1_rstd;  // (L,B,T,C), (L,B,T) x2
    bf16 *qkv;                        // (L,B,T,3C)
    bf16 *att;                        // (L,B,NH,T,T) softmax rows
    bf16 *atty;                       // (L,B,T,C) attention output, input of attn_proj
    bf16 *res2;                       // (L,B,T,C) residual stream after attention
    bf16 *ln2; float *ln2_mean, *ln2_rstd;  // (L,B,T,C), (L,B,T) x2
    bf16 *fch, *fch_gelu;             // (L,B,T,4C) mlp_fc pre-activation and GELU output
    bf16 *res3;                       // (L,B,T,C) residual stream after the MLP
    bf16 *lnf; float *lnf_mean, *lnf_rstd;  // (B,T,C), (B,T) x2
    bf16 *logits;                     // (B,T,Vp); dlogits in backward
    float *losses;                    // (B,T)
    bf16 *branch;                     // (B,T,C) attn_proj / mlp_proj output before the residual add
    bf16 *dres, *dln, *datty;         // (B,T,C) backward scratch, reused by every layer
    bf16 *dqkv;                       // (B,T,3C)
    bf16 *dfch;                       // (B,T,4C)
    float *colsum;                    // bias / LayerNorm gradient partial sums (colsum_chunks(N), 4C)
    float *norm;                      // NORM_BLOCKS partial sums, then the result
    int *tokens;                      // inputs (N), targets (N), encoder buckets (3N + 2)
    AttentionScratch attn;
} Activations;

typedef struct {
    Config cfg;
    Dist *dist;
    int L, C, NH, V, Vp, maxT;
    ParamTensor tensors[MAX_TENSORS];
    int ntensors;
    size_t num_params;                // padded flat length: a multiple of 128 * world
    size_t shard_begin, shard_size;   // this rank's slice of the flat layout (ZeRO-1)
    bf16 *params, *grads;             // device, num_params each
    float *master, *m, *v;            // device, shard_size each
    float *gather;                    // device, num_params fp32 (world > 1): checkpoint all-gathers
    int wte, wpe, lnfw, lnfb;
    LayerParams *layers;              // (L)
    Activations acts;
    void *act_memory;
    int Bmax, Tmax;
    int B, T;                         // shape of the last forward
    int have_targets, buckets_U;      // of the last forward
    int *h_tokens, *h_counts;         // pinned host staging for tokens; counting-sort scratch (Vp)
    float *h_losses;                  // (Bmax*Tmax) pinned
    float mean_loss;                  // of the last forward with targets, else -1
} GPT2;

static bf16 *PB(GPT2 *m, int t) { return m->params + m->tensors[t].offset; }
static bf16 *GB(GPT2 *m, int t) { return m->grads + m->tensors[t].offset; }

static int add_tensor(GPT2 *m, const char *name, int ndim, long long d0, long long d1, int decay) {
    if (m->ntensors == MAX_TENSORS) { fprintf(stderr, "error: more than %d tensors\n", MAX_TENSORS); exit(1); }
    ParamTensor *t = &m->tensors[m->ntensors];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->size = (size_t)d0 * (ndim > 1 ? (size_t)d1 : 1);
    t->offset = m->num_params;
    t->decay = decay;
    m->num_params += (t->size + 7) / 8 * 8;
    return m->ntensors++;
}

static Linear add_linear(GPT2 *m, int layer, int which, int d_in, int d_out) {
    char name[64];
    Linear lin;
    lin.d_in = d_in;
    lin.d_out = d_out;
    snprintf(name, sizeof name, "h.%d.%s.W", layer, linear_names[which]);
    lin.W = add_tensor(m, name, 2, d_out, d_in, 1);
    snprintf(name, sizeof name, "h.%d.%s.b", layer, linear_names[which]);
    lin.b = add_tensor(m, name, 1, d_out, 0, 0);
    return lin;
}

// What this version of the GPU trainer runs; everything else is refused before any work, naming
// the key. (The CPU trainer's config.h refuses non-dense types too, for now; this check stays
// when that one goes, until the structured kernels land here.)
static int gpt2_check_supported(const Config *c, int world, char *err) {
    for (int p = 0; p < NUM_LINEAR; p++) {
        if (strcmp(c->model.linear[p].type, "dense")) {
            snprintf(err, ERRLEN, "model.linear.%s.type: \"%s\": not implemented in the CUDA trainer yet (only \"dense\"; "
                     "use the CPU trainer train_gpt2 for structured layers)", linear_names[p], c->model.linear[p].type);
            return -1;
        }
    }
    if (c->model.qk_norm) { snprintf(err, ERRLEN, "model.qk_norm: true: not implemented in the CUDA trainer yet"); return -1; }
    if (strcmp(c->model.attn_scale, "standard")) {
        snprintf(err, ERRLEN, "model.attn_scale: \"%s\": not implemented in the CUDA trainer yet (only \"standard\")",
                 c->model.attn_scale);
        return -1;
    }
    if (strcmp(c->model.parametrization, "standard")) {
        snprintf(err, ERRLEN, "model.parametrization: \"%s\": not implemented in the CUDA trainer yet (only \"standard\")",
                 c->model.parametrization);
        return -1;
    }
    // bf16 rows of n_embd and padded_vocab_size elements must start 16-byte aligned for cuBLASLt
    if (c->model.n_embd % 8) {
        snprintf(err, ERRLEN, "model.n_embd: %d: the CUDA trainer needs a multiple of 8", c->model.n_embd);
        return -1;
    }
    if (c->model.padded_vocab_size % 8) {
        snprintf(err, ERRLEN, "model.padded_vocab_size: %d: the CUDA trainer needs a multiple of 8 (e.g. %d)",
                 c->model.padded_vocab_size, (c->model.padded_vocab_size + 127) / 128 * 128);
        return -1;
    }
    long long per_step = (long long)c->train.micro_batch * c->train.seq_len * world;
    if (c->train.batch_tokens % per_step) {
        snprintf(err, ERRLEN, "train.batch_tokens: %ld: must be a multiple of micro_batch * seq_len * world_size = "
                 "%d * %d * %d = %lld", c->train.batch_tokens, c->train.micro_batch, c->train.seq_len, world, per_step);
        return -1;
    }
    return 0;
}

// Lays out every parameter and allocates parameters, gradients, this rank's optimizer shard and
// the activations for micro-batches up to (Bmax, Tmax). Weights are left zero: load them next.
static void gpt2_build(GPT2 *m, const Config *cfg, Dist *dist, int Bmax, int Tmax) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->dist = dist;
    int L = m->L = cfg->model.n_layer, C = m->C = cfg->model.n_embd;
    m->NH = cfg->model.n_head;
    m->V = cfg->model.vocab_size;
    int Vp = m->Vp = cfg->model.padded_vocab_size;
    m->maxT = cfg->model.block_size;
    m->wte = add_tensor(m, "wte", 2, Vp, C, 1);
    m->wpe = add_tensor(m, "wpe", 2, m->maxT, C, 1);
    m->layers = (LayerParams *)xcalloc((size_t)L * sizeof(LayerParams));
    const int d_in[NUM_LINEAR] = {C, C, C, 4 * C}, d_out[NUM_LINEAR] = {3 * C, C, 4 * C, C};
    for (int l = 0; l < L; l++) {
        LayerParams *lp = &m->layers[l];
        char name[64];
        snprintf(name, sizeof name, "h.%d.ln1.w", l); lp->ln1w = add_tensor(m, name, 1, C, 0, 0);
        snprintf(name, sizeof name, "h.%d.ln1.b", l); lp->ln1b = add_tensor(m, name, 1, C, 0, 0);
        snprintf(name, sizeof name, "h.%d.ln2.w", l); lp->ln2w = add_tensor(m, name, 1, C, 0, 0);
        snprintf(name, sizeof name, "h.%d.ln2.b", l); lp->ln2b = add_tensor(m, name, 1, C, 0, 0);
        for (int k = 0; k < NUM_LINEAR; k++) lp->lin[k] = add_linear(m, l, k, d_in[k], d_out[k]);
    }
    m->lnfw = add_tensor(m, "lnf.w", 1, C, 0, 0);
    m->lnfb = add_tensor(m, "lnf.b", 1, C, 0, 0);
    // ZeRO-1 shards: equal, 128-element aligned slices of the padded flat layout
    size_t unit = (size_t)128 * dist->world;
    m->num_params = (m->num_params + unit - 1) / unit * unit;
    m->shard_size = m->num_params / dist->world;
    m->shard_begin = m->shard_size * dist->rank;
    m->params = (bf16 *)cuda_malloc_or_die(m->num_params * sizeof(bf16), "parameters");
    m->grads = (bf16 *)cuda_malloc_or_die(m->num_params * sizeof(bf16), "gradients");
    m->master = (float *)cuda_malloc_or_die(m->shard_size * sizeof(float), "master weights");
    m->m = (float *)cuda_malloc_or_die(m->shard_size * sizeof(float), "AdamW m");
    m->v = (float *)cuda_malloc_or_die(m->shard_size * sizeof(float), "AdamW v");
    cudaCheck(cudaMemset(m->params, 0, m->num_params * sizeof(bf16)));
    cudaCheck(cudaMemset(m->grads, 0, m->num_params * sizeof(bf16)));
    cudaCheck(cudaMemset(m->master, 0, m->shard_size * sizeof(float)));
    cudaCheck(cudaMemset(m->m, 0, m->shard_size * sizeof(float)));
    cudaCheck(cudaMemset(m->v, 0, m->shard_size * sizeof(float)));
    if (dist->world > 1) m->gather = (float *)cuda_malloc_or_die(m->num_params * sizeof(float), "checkpoint gather");

    // activations: the table order is the layout order of the one allocation; every entry is
    // rounded up to 256 bytes so each buffer is aligned for cuBLAS and vector loads
    m->Bmax = Bmax;
    m->Tmax = Tmax;
    size_t BT = (size_t)Bmax * Tmax, NH = m->NH, att = (size_t)Bmax * NH * Tmax * Tmax;
    Activations *a = &m->acts;
    struct { void **p; size_t bytes; } table[] = {
        {(void **)&a->encoded, BT * C * 2},
        {(void **)&a->ln1, L * BT * C * 2}, {(void **)&a->ln1_mean, L * BT * 4}, {(void **)&a->ln1_rstd, L * BT * 4},
        {(void **)&a->qkv, L * BT * 3 * C * 2}, {(void **)&a->att, L * att * 2}, {(void **)&a->atty, L * BT * C * 2},
        {(void **)&a->res2, L * BT * C * 2},
        {(void **)&a->ln2, L * BT * C * 2}, {(void **)&a->ln2_mean, L * BT * 4}, {(void **)&a->ln2_rstd, L * BT * 4},
        {(void **)&a->fch, L * BT * 4 * C * 2}, {(void **)&a->fch_gelu, L * BT * 4 * C * 2},
        {(void **)&a->res3, L * BT * C * 2},
        {(void **)&a->lnf, BT * C * 2}, {(void **)&a->lnf_mean, BT * 4}, {(void **)&a->lnf_rstd, BT * 4},
        {(void **)&a->logits, BT * Vp * 2}, {(void **)&a->losses, BT * 4},
        {(void **)&a->branch, BT * C * 2},
        {(void **)&a->dres, BT * C * 2}, {(void **)&a->dln, BT * C * 2}, {(void **)&a->datty, BT * C * 2},
        {(void **)&a->dqkv, BT * 3 * C * 2}, {(void **)&a->dfch, BT * 4 * C * 2},
        {(void **)&a->colsum, (size_t)colsum_chunks((int)BT) * 4 * C * 4},
        {(void **)&a->norm, (NORM_BLOCKS + 1) * 4},
        {(void **)&a->tokens, (5 * BT + 2) * 4},
        {(void **)&a->attn.q, BT * C * 2}, {(void **)&a->attn.k, BT * C * 2}, {(void **)&a->attn.v, BT * C * 2},
        {(void **)&a->attn.y, BT * C * 2}, {(void **)&a->attn.dq, BT * C * 2}, {(void **)&a->attn.dk, BT * C * 2},
        {(void **)&a->attn.dv, BT * C * 2}, {(void **)&a->attn.dy, BT * C * 2},
        {(void **)&a->attn.scores, att * 4}, {(void **)&a->attn.dpreatt, att * 2},
    };
    size_t total = 0, n = sizeof table / sizeof table[0];
    for (size_t i = 0; i < n; i++) total += (table[i].bytes + 255) / 256 * 256;
    m->act_memory = cuda_malloc_or_die(total, "activations");
    cudaCheck(cudaMemset(m->act_memory, 0, total));
    char *p = (char *)m->act_memory;
    for (size_t i = 0; i < n; i++) { *table[i].p = p; p += (table[i].bytes + 255) / 256 * 256; }
    cudaCheck(cudaMallocHost((void **)&m->h_tokens, (5 * BT + 2) * sizeof(int)));
    cudaCheck(cudaMallocHost((void **)&m->h_losses, BT * sizeof(float)));
    m->h_counts = (int *)xmalloc((size_t)Vp * sizeof(int));
    m->mean_loss = -1.0f;
}

static void gpt2_free(GPT2 *m) {
    cudaCheck(cudaStreamSynchronize(main_stream));
    cudaFree(m->params); cudaFree(m->grads); cudaFree(m->master); cudaFree(m->m); cudaFree(m->v);
    cudaFree(m->gather); cudaFree(m->act_memory);
    cudaFreeHost(m->h_tokens); cudaFreeHost(m->h_losses);
    free(m->h_counts); free(m->layers);
}

// Host fp32 parameters (num_params, the padded layout) -> this rank's master shard and the bf16
// parameters (rounded to nearest on the host, as the device rounds).
static void gpt2_upload_params(GPT2 *m, const float *host) {
    bf16 *tmp = (bf16 *)xmalloc(m->num_params * sizeof(bf16));
    for (size_t i = 0; i < m->num_params; i++) tmp[i] = __float2bfloat16(host[i]);
    cudaCheck(cudaMemcpy(m->params, tmp, m->num_params * sizeof(bf16), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(m->master, host + m->shard_begin, m->shard_size * sizeof(float), cudaMemcpyHostToDevice));
    free(tmp);
}

// GPT-2 init on the host, exactly as the CPU trainer: N(0, 0.02) matrices and embeddings, the
// residual projections scaled by 1/sqrt(2 L); biases 0; LayerNorm weight 1. Tensors in table order.
static void gpt2_init_weights(GPT2 *m, uint64_t seed) {
    float *h = (float *)xcalloc(m->num_params * sizeof(float));
    Rng rng;
    rng_seed(&rng, seed);
    float resid_std = 0.02f / sqrtf(2.0f * m->L);
    for (int i = 0; i < m->ntensors; i++) {
        ParamTensor *t = &m->tensors[i];
        float *p = h + t->offset;
        const char *n = t->name;
        size_t len = strlen(n);
        if (len > 2 && !strcmp(n + len - 2, ".w") && strstr(n, "ln")) {
            for (size_t j = 0; j < t->size; j++) p[j] = 1.0f;
        } else if (t->decay) {
            int resid = strstr(n, ".attn_proj.") || strstr(n, ".mlp_proj.");
            rng_normal_fill(&rng, p, t->size, resid ? resid_std : 0.02f);
        }
    }
    gpt2_upload_params(m, h);
    free(h);
}

// ----------------------------------------------------------------------------------------------
// Forward and backward

// Per-layer activation pointers for the current (B, T): layer l's slice of each (L, ...) buffer.
typedef struct { bf16 *ln1; float *ln1_mean, *ln1_rstd; bf16 *qkv, *att, *atty, *res2, *ln2; float *ln2_mean, *ln2_rstd;
                 bf16 *fch, *fch_gelu, *res3; } LayerActs;
static LayerActs layer_acts(GPT2 *m, int l) {
    Activations *a = &m->acts;
    size_t BT = (size_t)m->B * m->T, C = m->C;
    LayerActs la = {
        a->ln1 + l * BT * C, a->ln1_mean + l * BT, a->ln1_rstd + l * BT, a->qkv + l * BT * 3 * C,
        a->att + l * (size_t)m->B * m->NH * m->T * m->T, a->atty + l * BT * C, a->res2 + l * BT * C,
        a->ln2 + l * BT * C, a->ln2_mean + l * BT, a->ln2_rstd + l * BT,
        a->fch + l * BT * 4 * C, a->fch_gelu + l * BT * 4 * C, a->res3 + l * BT * C};
    return la;
}
static const bf16 *layer_input(GPT2 *m, int l) {
    return l == 0 ? m->acts.encoded : layer_acts(m, l - 1).res3;
}

// inputs, targets (B,T) host arrays; targets may be NULL (then acts.logits holds the logits
// (B,T,Vp)). With targets: acts.losses (B,T) and m->mean_loss (the stream is synchronized).
static void gpt2_forward(GPT2 *m, const int *inputs, const int *targets, int B, int T) {
    if (B > m->Bmax || T > m->Tmax || T > m->maxT) {
        fprintf(stderr, "error: forward (B=%d, T=%d) exceeds the allocation (%d, %d)\n", B, T, m->Bmax, m->Tmax);
        exit(1);
    }
    cudaStream_t st = main_stream;
    m->B = B; m->T = T;
    int C = m->C, N = B * T, L = m->L;
    Activations *a = &m->acts;
    // the previous forward's copy out of the pinned staging buffer must be done before we refill it
    cudaCheck(cudaStreamSynchronize(st));
    int nints = N;
    memcpy(m->h_tokens, inputs, (size_t)N * sizeof(int));
    m->have_targets = targets != NULL;
    if (targets) {
        memcpy(m->h_tokens + N, targets, (size_t)N * sizeof(int));
        nints = 2 * N + encoder_buckets(m->h_tokens + 2 * N, m->h_counts, inputs, N, m->Vp);
        m->buckets_U = m->h_tokens[2 * N];
    }
    cudaCheck(cudaMemcpyAsync(a->tokens, m->h_tokens, (size_t)nints * sizeof(int), cudaMemcpyHostToDevice, st));

    encoder_forward(a->encoded, a->tokens, PB(m, m->wte), PB(m, m->wpe), B, T, C, st);
    layernorm_forward(layer_acts(m, 0).ln1, layer_acts(m, 0).ln1_mean, layer_acts(m, 0).ln1_rstd, a->encoded,
                      PB(m, m->layers[0].ln1w), PB(m, m->layers[0].ln1b), N, C, st);
    for (int l = 0; l < L; l++) {
        LayerParams *lp = &m->layers[l];
        LayerActs la = layer_acts(m, l);
        const bf16 *x = layer_input(m, l);
        Linear *qkv = &lp->lin[LIN_ATTN_QKV], *proj = &lp->lin[LIN_ATTN_PROJ];
        Linear *fc = &lp->lin[LIN_MLP_FC], *mproj = &lp->lin[LIN_MLP_PROJ];
        matmul_forward(la.qkv, la.ln1, PB(m, qkv->W), PB(m, qkv->b), NULL, N, C, 3 * C, st);
        attention_forward(la.atty, la.att, la.qkv, &a->attn, B, T, C, m->NH, st);
        matmul_forward(a->branch, la.atty, PB(m, proj->W), PB(m, proj->b), NULL, N, C, C, st);
        residual_layernorm_forward(la.res2, la.ln2, la.ln2_mean, la.ln2_rstd, x, a->branch, PB(m, lp->ln2w),
                                   PB(m, lp->ln2b), N, C, st);
        matmul_forward(la.fch_gelu, la.ln2, PB(m, fc->W), PB(m, fc->b), la.fch, N, C, 4 * C, st);
        matmul_forward(a->branch, la.fch_gelu, PB(m, mproj->W), PB(m, mproj->b), NULL, N, 4 * C, C, st);
        // res3 = res2 + mlp, fused with the next LayerNorm: ln1 of layer l+1, or the final one
        if (l + 1 < L) {
            LayerActs nx = layer_acts(m, l + 1);
            residual_layernorm_forward(la.res3, nx.ln1, nx.ln1_mean, nx.ln1_rstd, la.res2, a->branch,
                                       PB(m, m->layers[l + 1].ln1w), PB(m, m->layers[l + 1].ln1b), N, C, st);
        } else {
            residual_layernorm_forward(la.res3, a->lnf, a->lnf_mean, a->lnf_rstd, la.res2, a->branch,
                                       PB(m, m->lnfw), PB(m, m->lnfb), N, C, st);
        }
    }
    matmul_forward(a->logits, a->lnf, PB(m, m->wte), NULL, NULL, N, C, m->Vp, st);   // tied LM head
    if (!targets) { m->mean_loss = -1.0f; return; }
    fused_classifier(a->logits, a->losses, a->tokens + N, N, m->V, m->Vp, 0.0f, 0, st);
    cudaCheck(cudaMemcpyAsync(m->h_losses, a->losses, (size_t)N * sizeof(float), cudaMemcpyDeviceToHost, st));
    cudaCheck(cudaStreamSynchronize(st));
    double sum = 0.0;
    for (int i = 0; i < N; i++) sum += m->h_losses[i];
    m->mean_loss = (float)(sum / N);
}

static void gpt2_zero_grad(GPT2 *m) {
    cudaCheck(cudaMemsetAsync(m->grads, 0, m->num_params * sizeof(bf16), main_stream));
}

// Accumulates into m->grads the gradient of (loss_scale * mean loss) of the last forward with
// targets. Gradient accumulation over k micro-batches passes loss_scale = 1/k.
static void gpt2_backward(GPT2 *m, float loss_scale) {
    if (!m->have_targets) { fprintf(stderr, "error: backward needs a forward with targets\n"); exit(1); }
    cudaStream_t st = main_stream;
    int B = m->B, T = m->T, C = m->C, N = B * T;
    Activations *a = &m->acts;
    float *cs = a->colsum;
    // the classifier again, now writing dlogits over the logits (one more read of them; it keeps
    // forward free of the loss scale, which only backward knows)
    fused_classifier(a->logits, a->losses, a->tokens + N, N, m->V, m->Vp, loss_scale / N, 1, st);
    matmul_backward(a->dln, GB(m, m->wte), NULL, a->logits, a->lnf, PB(m, m->wte), NULL, cs, N, C, m->Vp, st);
    cudaCheck(cudaMemsetAsync(a->dres, 0, (size_t)N * C * sizeof(bf16), st));
    layernorm_backward(a->dres, GB(m, m->lnfw), GB(m, m->lnfb), cs, a->dln, layer_input(m, m->L), PB(m, m->lnfw),
                       a->lnf_mean, a->lnf_rstd, N, C, st);
    // dres carries d(residual stream); each block adds its branches' input gradients to it
    for (int l = m->L - 1; l >= 0; l--) {
        LayerParams *lp = &m->layers[l];
        LayerActs la = layer_acts(m, l);
        const bf16 *x = layer_input(m, l);
        Linear *qkv = &lp->lin[LIN_ATTN_QKV], *proj = &lp->lin[LIN_ATTN_PROJ];
        Linear *fc = &lp->lin[LIN_MLP_FC], *mproj = &lp->lin[LIN_MLP_PROJ];
        // mlp_proj, with the GELU backward fused: dfch = (dres W) * gelu'(fch)
        matmul_backward(a->dfch, GB(m, mproj->W), GB(m, mproj->b), a->dres, la.fch_gelu, PB(m, mproj->W), la.fch, cs,
                        N, 4 * C, C, st);
        matmul_backward(a->dln, GB(m, fc->W), GB(m, fc->b), a->dfch, la.ln2, PB(m, fc->W), NULL, cs, N, C, 4 * C, st);
        layernorm_backward(a->dres, GB(m, lp->ln2w), GB(m, lp->ln2b), cs, a->dln, la.res2, PB(m, lp->ln2w),
                           la.ln2_mean, la.ln2_rstd, N, C, st);
        matmul_backward(a->datty, GB(m, proj->W), GB(m, proj->b), a->dres, la.atty, PB(m, proj->W), NULL, cs, N, C, C, st);
        attention_backward(a->dqkv, a->datty, la.qkv, la.att, &a->attn, B, T, C, m->NH, st);
        matmul_backward(a->dln, GB(m, qkv->W), GB(m, qkv->b), a->dqkv, la.ln1, PB(m, qkv->W), NULL, cs, N, C, 3 * C, st);
        layernorm_backward(a->dres, GB(m, lp->ln1w), GB(m, lp->ln1b), cs, a->dln, x, PB(m, lp->ln1w),
                           la.ln1_mean, la.ln1_rstd, N, C, st);
    }
    encoder_backward(GB(m, m->wte), GB(m, m->wpe), a->dres, a->tokens + 2 * N, m->buckets_U, B, T, C, st);
}

// The optimizer step for 0-based step `step` on the accumulated gradients (ZeRO-1): average the
// gradients over the ranks into each rank's shard (reduce-scatter), clip by the global norm, AdamW
// on the shard, all-gather the new bf16 parameters. Returns the norm before clipping; *lr_out the lr.
static float gpt2_optimizer_step(GPT2 *m, int step, float *lr_out) {
    cudaStream_t st = main_stream;
    Dist *d = m->dist;
    const Config *c = &m->cfg;
    bf16 *gshard = m->grads + m->shard_begin;
    // in place: rank r's slice of the buffer receives the average of every rank's slice r
    ncclCheck(ncclReduceScatter(m->grads, gshard, m->shard_size, ncclBfloat16, ncclAvg, d->comm, st));
    float *sumsq = m->acts.norm + NORM_BLOCKS;
    grad_sumsq(sumsq, gshard, m->shard_size, m->acts.norm, st);
    ncclCheck(ncclAllReduce(sumsq, sumsq, 1, ncclFloat, ncclSum, d->comm, st));
    float s;
    cudaCheck(cudaMemcpyAsync(&s, sumsq, sizeof s, cudaMemcpyDeviceToHost, st));
    cudaCheck(cudaStreamSynchronize(st));
    float norm = sqrtf(s), clip = c->optim.grad_clip;
    float scale = (clip > 0.0f && norm > clip) ? clip / norm : 1.0f;
    float lr = *lr_out = lr_at_step(c, step);
    float b1 = c->optim.beta1, b2 = c->optim.beta2;
    int t = step + 1;
    float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
    size_t lo = m->shard_begin, hi = m->shard_begin + m->shard_size;
    for (int k = 0; k < m->ntensors; k++) {
        ParamTensor *tn = &m->tensors[k];
        size_t b = tn->offset > lo ? tn->offset : lo, e = tn->offset + tn->size < hi ? tn->offset + tn->size : hi;
        if (b >= e) continue;
        float wd = tn->decay ? c->optim.weight_decay : 0.0f;
        adamw_update(m->params + b, m->master + (b - lo), m->grads + b, m->m + (b - lo), m->v + (b - lo), e - b, lr,
                     b1, b2, bc1, bc2, c->optim.eps, wd, scale, st);
    }
    ncclCheck(ncclAllGather(m->params + lo, m->params, m->shard_size, ncclBfloat16, d->comm, st));
    cudaCheck(cudaStreamSynchronize(st));
    return norm;
}

// Training FLOPs per token, the CPU trainer's count: 6 per MAC of every matmul plus attention
// (q.k and att.v at full context, halved by the causal mask).
static double gpt2_flops_per_token(const GPT2 *m, int T) {
    double macs = (double)m->Vp * m->C;
    for (int l = 0; l < m->L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) macs += (double)m->layers[l].lin[k].d_in * m->layers[l].lin[k].d_out;
    double attn = (double)m->L * T * m->C;
    return 6.0 * (macs + attn);
}

// ----------------------------------------------------------------------------------------------
// Host copies (checkpoints)

// A device fp32 shard array (master, m or v) of every rank -> host full array (num_params).
// Collective: every rank calls it.
static void gpt2_gather_shards(GPT2 *m, const float *shard, float *host) {
    const float *full = shard;
    if (m->dist->world > 1) {
        ncclCheck(ncclAllGather(shard, m->gather, m->shard_size, ncclFloat, m->dist->comm, main_stream));
        full = m->gather;
    }
    cudaCheck(cudaMemcpyAsync(host, full, m->num_params * sizeof(float), cudaMemcpyDeviceToHost, main_stream));
    cudaCheck(cudaStreamSynchronize(main_stream));
}

// ----------------------------------------------------------------------------------------------
// Checkpoints (DESIGN section 5), identical in format to the CPU trainer's: model.safetensors
// (fp32 master weights) and state.safetensors (AdamW m., v.), metadata format/config/step/tokens
// (+ dataloader). Written by rank 0 after gathering the shards.

typedef struct {
    int step;                  // completed optimizer steps
    long long tokens;          // tokens trained on
    char dataloader[512];      // train loader position
} TrainState;

// Writes the tensors of nbases host arrays laid out like params (prefixes[i] + name from bases[i]).
static int write_tensor_file(GPT2 *m, const char *path, const char *const *prefixes, float *const *bases,
                             int nbases, const char *const *keys, const char *const *vals, int nmeta, char *err) {
    int n = m->ntensors * nbases;
    StTensor *ts = (StTensor *)xmalloc((size_t)n * sizeof(StTensor));
    char (*names)[80] = (char (*)[80])xmalloc((size_t)n * sizeof *names);
    for (int k = 0; k < nbases; k++) {
        for (int i = 0; i < m->ntensors; i++) {
            ParamTensor *t = &m->tensors[i];
            StTensor *s = &ts[k * m->ntensors + i];
            snprintf(names[k * m->ntensors + i], sizeof names[0], "%s%s", prefixes[k], t->name);
            s->name = names[k * m->ntensors + i];
            s->dtype = "F32";
            s->data = bases[k] + t->offset;
            s->ndim = t->ndim;
            for (int d = 0; d < 4; d++) s->shape[d] = t->shape[d];
        }
    }
    int rc = safetensors_write(path, ts, n, keys, vals, nmeta, err, ERRLEN);
    free(ts);
    free(names);
    return rc;
}

// RUN/ckpt_%08d/ written atomically by rank 0. Collective (the shards are gathered on every rank).
static int gpt2_save_checkpoint(GPT2 *m, const char *run_dir, const TrainState *st, char *err) {
    float *h = (float *)xmalloc(m->num_params * sizeof(float) * 2);
    float *hm = h, *hv = h + m->num_params;
    int rc = 0, root = m->dist->rank == 0;
    char tmp[1100], path[1200], step_s[32], tokens_s[32];
    char *config = config_to_json(&m->cfg);
    snprintf(step_s, sizeof step_s, "%d", st->step);
    snprintf(tokens_s, sizeof tokens_s, "%lld", st->tokens);
    const char *keys[] = {"format", "config", "step", "tokens", "dataloader"};
    const char *vals[] = {"structured-gpt2/1", config, step_s, tokens_s, st->dataloader};
    const char *model_prefix[] = {""}, *state_prefix[] = {"m.", "v."};
    if (root) rc = checkpoint_begin(run_dir, st->step, tmp, sizeof tmp, err, ERRLEN);
    gpt2_gather_shards(m, m->master, hm);
    if (root && !rc) {
        float *model_base[] = {hm};
        snprintf(path, sizeof path, "%s/model.safetensors", tmp);
        rc = write_tensor_file(m, path, model_prefix, model_base, 1, keys, vals, 4, err);
    }
    gpt2_gather_shards(m, m->m, hm);
    gpt2_gather_shards(m, m->v, hv);
    if (root && !rc) {
        float *state_base[] = {hm, hv};
        snprintf(path, sizeof path, "%s/state.safetensors", tmp);
        rc = write_tensor_file(m, path, state_prefix, state_base, 2, keys, vals, 5, err);
    }
    if (root && !rc) rc = checkpoint_commit(run_dir, st->step, m->cfg.checkpoint.keep, err, ERRLEN);
    free(config);
    free(h);
    // every rank learns whether rank 0 succeeded, so all stop together on a failed write
    if (dist_any(m->dist, rc != 0)) {
        if (!root) snprintf(err, ERRLEN, "rank 0 failed to write the checkpoint of step %d", st->step);
        return -1;
    }
    return 0;
}

// Copies every tensor named prefix+name from a safetensors file into the host array base (padded
// layout), checking dtypes and shapes.
static int load_tensors(GPT2 *m, const SafeTensors *st, const char *path, const char *prefix, float *base, char *err) {
    for (int i = 0; i < m->ntensors; i++) {
        ParamTensor *t = &m->tensors[i];
        char name[80];
        snprintf(name, sizeof name, "%s%s", prefix, t->name);
        const char *dtype;
        int ndim;
        long long shape[4];
        const void *data = safetensors_find(st, name, &dtype, &ndim, shape);
        if (!data) {
            snprintf(err, ERRLEN, "%s: tensor %s is missing (the config's model has it)", path, name);
            return -1;
        }
        int same = strcmp(dtype, "F32") == 0 && ndim == t->ndim;
        for (int d = 0; same && d < ndim; d++) same = shape[d] == t->shape[d];
        if (!same) {
            snprintf(err, ERRLEN, "%s: tensor %s: dtype %s shape (%lld,%lld) but the config's model needs F32 (%lld,%lld)",
                     path, name, dtype, shape[0], ndim > 1 ? shape[1] : 0, t->shape[0], t->ndim > 1 ? t->shape[1] : 0);
            return -1;
        }
        memcpy(base + t->offset, data, t->size * sizeof(float));
    }
    return 0;
}

// llm.c's model file (gpt2_124M.bin): parameters in llm.c order, each kind concatenated over layers.
static int gpt2_load_llmc(GPT2 *m, const char *path, float *host, char *err) {
    int h[8];
    float *src;
    size_t n;
    if (llmc_model_read(path, h, &src, &n, err, ERRLEN)) return -1;
    const char *what[6] = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "padded_vocab_size"};
    int ours[6] = {m->maxT, m->V, m->L, m->NH, m->C, m->Vp};
    for (int i = 0; i < 6; i++) {
        if (h[2 + i] != ours[i]) {
            snprintf(err, ERRLEN, "%s: the file's %s is %d but the config's model.%s is %d (use --set model.%s=%d)",
                     path, what[i], h[2 + i], what[i], ours[i], what[i], h[2 + i]);
            free(src);
            return -1;
        }
    }
    const float *p = src;
    // one llm.c kind (L tensors back to back) into our per-layer tensors
    #define TAKE_ONE(idx) { ParamTensor *t = &m->tensors[idx]; memcpy(host + t->offset, p, t->size * sizeof(float)); p += t->size; }
    #define TAKE_LAYERS(field) for (int l = 0; l < m->L; l++) TAKE_ONE(m->layers[l].field)
    TAKE_ONE(m->wte); TAKE_ONE(m->wpe);
    TAKE_LAYERS(ln1w); TAKE_LAYERS(ln1b);
    TAKE_LAYERS(lin[LIN_ATTN_QKV].W); TAKE_LAYERS(lin[LIN_ATTN_QKV].b);
    TAKE_LAYERS(lin[LIN_ATTN_PROJ].W); TAKE_LAYERS(lin[LIN_ATTN_PROJ].b);
    TAKE_LAYERS(ln2w); TAKE_LAYERS(ln2b);
    TAKE_LAYERS(lin[LIN_MLP_FC].W); TAKE_LAYERS(lin[LIN_MLP_FC].b);
    TAKE_LAYERS(lin[LIN_MLP_PROJ].W); TAKE_LAYERS(lin[LIN_MLP_PROJ].b);
    TAKE_ONE(m->lnfw); TAKE_ONE(m->lnfb);
    #undef TAKE_LAYERS
    #undef TAKE_ONE
    free(src);
    return 0;
}

// --init-from FILE: our model.safetensors (or a checkpoint directory holding one), or an llm.c .bin
static int gpt2_init_from(GPT2 *m, const char *path, char *err) {
    struct stat sb;
    char file[1200];
    if (stat(path, &sb) != 0) { snprintf(err, ERRLEN, "%s: %s", path, strerror(errno)); return -1; }
    snprintf(file, sizeof file, S_ISDIR(sb.st_mode) ? "%s/model.safetensors" : "%s", path);
    FILE *f = fopen(file, "rb");
    if (!f) { snprintf(err, ERRLEN, "%s: %s", file, strerror(errno)); return -1; }
    int magic = 0;
    size_t got = fread(&magic, sizeof magic, 1, f);
    fclose(f);
    float *host = (float *)xcalloc(m->num_params * sizeof(float));
    int rc;
    if (got == 1 && magic == 20240326) {
        rc = gpt2_load_llmc(m, file, host, err);
    } else {
        SafeTensors st;
        rc = safetensors_read(&st, file, err, ERRLEN);
        if (!rc) {
            rc = load_tensors(m, &st, file, "", host, err);
            safetensors_free(&st);
        }
    }
    if (!rc) gpt2_upload_params(m, host);
    free(host);
    return rc;
}

// --resume RUN: the newest complete checkpoint's config (with --set overrides), parameters, AdamW
// state, step, token count and data position. Every rank reads the files itself.
static int gpt2_resume(GPT2 *m, Config *cfg, Dist *dist, const CliArgs *args, TrainState *st, char *err) {
    char dir[1100], path[1200];
    int step;
    if (checkpoint_latest(args->resume_dir, dir, sizeof dir, &step)) {
        snprintf(err, ERRLEN, "%s: no complete checkpoint (ckpt_NNNNNNNN/) to resume from", args->resume_dir);
        return -1;
    }
    SafeTensors ms, ss;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (safetensors_read(&ms, path, err, ERRLEN)) return -1;
    const char *config = safetensors_meta(&ms, "config");
    if (!config || config_from_json_string(cfg, config, path, args->sets, args->nsets, err, ERRLEN)) {
        if (!config) snprintf(err, ERRLEN, "%s: metadata has no \"config\"", path);
        safetensors_free(&ms);
        return -1;
    }
    if (gpt2_check_supported(cfg, dist->world, err)) { safetensors_free(&ms); return -1; }
    gpt2_build(m, cfg, dist, cfg->train.micro_batch, cfg->train.seq_len);
    float *host = (float *)xcalloc(m->num_params * sizeof(float));
    int rc = load_tensors(m, &ms, path, "", host, err);
    safetensors_free(&ms);
    if (!rc) gpt2_upload_params(m, host);
    snprintf(path, sizeof path, "%s/state.safetensors", dir);
    if (!rc) rc = safetensors_read(&ss, path, err, ERRLEN);
    if (!rc) {
        rc = load_tensors(m, &ss, path, "m.", host, err);
        if (!rc) cudaCheck(cudaMemcpy(m->m, host + m->shard_begin, m->shard_size * sizeof(float), cudaMemcpyHostToDevice));
        if (!rc) rc = load_tensors(m, &ss, path, "v.", host, err);
        if (!rc) cudaCheck(cudaMemcpy(m->v, host + m->shard_begin, m->shard_size * sizeof(float), cudaMemcpyHostToDevice));
        const char *s_step = safetensors_meta(&ss, "step"), *s_tok = safetensors_meta(&ss, "tokens");
        const char *s_dl = safetensors_meta(&ss, "dataloader");
        if (!rc && (!s_step || !s_tok || !s_dl)) {
            snprintf(err, ERRLEN, "%s: metadata lacks step, tokens or dataloader", path);
            rc = -1;
        }
        if (!rc) {
            st->step = atoi(s_step);
            st->tokens = atoll(s_tok);
            snprintf(st->dataloader, sizeof st->dataloader, "%s", s_dl);
            if (dist->rank == 0) printf("resuming from %s (step %d, %lld tokens)\n", dir, st->step, st->tokens);
        }
        safetensors_free(&ss);
    }
    free(host);
    return rc ? -1 : 0;
}

// ----------------------------------------------------------------------------------------------
// Evaluation and sampling

// Mean loss over up to max_batches batches of an in-order loader (all of it when max_batches <= 0),
// the same batches as the CPU trainer; rank r evaluates batches r, r + world, ... Collective.
static double gpt2_evaluate(GPT2 *m, DataLoader *dl, int max_batches, long long *tokens, char *err) {
    dataloader_reset(dl);
    size_t nb = dataloader_num_batches(dl);
    if (max_batches > 0 && (size_t)max_batches < nb) nb = (size_t)max_batches;
    double sum = 0.0;
    int failed = 0;
    for (size_t i = 0; i < nb && !failed; i++) {
        if (dataloader_next(dl, err, ERRLEN)) { failed = 1; break; }
        if ((int)(i % m->dist->world) != m->dist->rank) continue;
        gpt2_forward(m, dl->inputs, dl->targets, m->Bmax, m->Tmax);
        sum += m->mean_loss;
    }
    if (dist_any(m->dist, failed)) return -1.0;
    sum = dist_sum_double(m->dist, sum);
    *tokens = (long long)nb * m->Bmax * m->Tmax;
    return nb ? sum / nb : 0.0;
}

// Samples n tokens after <|endoftext|> at temperature 1, from a seed; returns them decoded
// (malloc'd). The CPU trainer's procedure, on the GPU's logits. Not collective (rank 0 only).
static char *gpt2_sample(GPT2 *m, const Tokenizer *tok, int n, uint64_t seed) {
    int T = m->Tmax;
    int *gen = (int *)xmalloc((size_t)(n + 1) * sizeof(int));
    float *probs = (float *)xmalloc((size_t)m->V * sizeof(float));
    bf16 *row = (bf16 *)xmalloc((size_t)m->Vp * sizeof(bf16));
    Rng rng;
    rng_seed(&rng, seed);
    gen[0] = GPT2_EOT;
    for (int i = 1; i <= n; i++) {
        int t = i < T ? i : T;                    // the last t tokens fit the context
        gpt2_forward(m, gen + i - t, NULL, 1, t);
        cudaCheck(cudaMemcpyAsync(row, m->acts.logits + (size_t)(t - 1) * m->Vp, (size_t)m->Vp * sizeof(bf16),
                                  cudaMemcpyDeviceToHost, main_stream));
        cudaCheck(cudaStreamSynchronize(main_stream));
        float maxv = -INFINITY, sum = 0.0f;
        for (int v = 0; v < m->V; v++) { probs[v] = bf16_to_float_host(row[v]); if (probs[v] > maxv) maxv = probs[v]; }
        for (int v = 0; v < m->V; v++) { probs[v] = expf(probs[v] - maxv); sum += probs[v]; }
        for (int v = 0; v < m->V; v++) probs[v] /= sum;
        gen[i] = sample_from_probs(probs, m->V, rng_float(&rng));
    }
    size_t len;
    char *text = tokenizer_decode(tok, gen + 1, n, &len);
    free(gen);
    free(probs);
    free(row);
    return text;
}

// ----------------------------------------------------------------------------------------------
// Training

static volatile sig_atomic_t stop_signal = 0;
static void on_stop_signal(int sig) { stop_signal = sig; }

static void fail(const char *msg) {
    fprintf(stderr, "error: %s\n", msg);
    exit(1);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// Peak dense bf16 FLOP/s of one GPU, for MFU; 0 where we do not know it (mfu logged as null).
static double gpu_peak_flops(void) {
    if (strstr(device_prop.name, "H100") || strstr(device_prop.name, "H200")) return H100_BF16_PEAK;
    return 0.0;
}

static void print_summary(const GPT2 *m) {
    const Config *c = &m->cfg;
    const Dist *d = m->dist;
    printf("GPU: %s (%.1f GiB), %d process%s (%s)\n", device_prop.name, device_prop.totalGlobalMem / 1073741824.0,
           d->world, d->world > 1 ? "es" : "", d->launcher);
    printf("model: %d layers, %d heads, n_embd %d, block_size %d, vocab %d (padded %d)\n",
           m->L, m->NH, m->C, m->maxT, m->V, m->Vp);
    printf("%-10s %-8s %-14s %12s %12s\n", "layer", "type", "shape", "params", "MACs/token");
    size_t lin_params = 0, total = 0;
    for (int k = 0; k < NUM_LINEAR; k++) {
        const Linear *lin = &m->layers[0].lin[k];
        char shape[32];
        snprintf(shape, sizeof shape, "%d -> %d", lin->d_in, lin->d_out);
        size_t p = (size_t)lin->d_in * lin->d_out;
        printf("%-10s %-8s %-14s %12zu %12zu\n", linear_names[k], c->model.linear[k].type, shape, p + lin->d_out, p);
        lin_params += (p + lin->d_out) * m->L;
    }
    for (int i = 0; i < m->ntensors; i++) total += m->tensors[i].size;
    printf("parameters: %zu total, %zu in linear layers; training FLOPs/token %.3g (T=%d)\n",
           total, lin_params, gpt2_flops_per_token(m, m->Tmax), m->Tmax);
}

static void print_gpu_help(void) {
    printf("\nCUDA trainer: bf16 mixed precision, one GPU per process. Data parallel (ZeRO-1 over NCCL):\n"
           "  mpirun -np 8 ./train_gpt2cu CONFIG.json          (Open MPI / MPICH ranks from the environment)\n"
           "  srun --ntasks-per-node=8 --gpus-per-node=8 ./train_gpt2cu CONFIG.json\n"
           "  LLMC_RANK=r LLMC_WORLD_SIZE=n [LLMC_LOCAL_RANK=g] ./train_gpt2cu ...   (any launcher)\n"
           "The processes meet through a file in $LLMC_RENDEZVOUS (default: run.dir), which every node must see;\n"
           "$LLMC_RUN_ID tells concurrent jobs apart when no launcher job id is set.\n");
}

#ifndef TESTING
int main(int argc, char **argv) {
    char err[ERRLEN];
    CliArgs args;
    if (cli_parse(argc, argv, &args, err, sizeof err)) {
        fprintf(stderr, "error: %s\n(see %s --help)\n", err, argv[0]);
        return 2;
    }
    if (args.help) { cli_print_help(stdout, argv[0]); print_gpu_help(); return 0; }

    Config cfg;
    GPT2 model;
    TrainState st;
    memset(&st, 0, sizeof st);
    Dist dist;
    dist_detect(&dist);   // the world size is needed to validate the config; dist_init joins below
    if (args.resume_dir) {
        if (args.config_path) fail("--resume takes the config stored in the checkpoint; change keys with --set");
        if (args.init_from) fail("--resume and --init-from exclude each other");
        char rdv[1100];
        snprintf(rdv, sizeof rdv, "%s", args.resume_dir);
        dist_init(&dist, rdv);
        if (gpt2_resume(&model, &cfg, &dist, &args, &st, err)) fail(err);
    } else {
        const char *path = args.config_path;
        struct stat sb;
        if (!path && stat("configs/default.json", &sb) == 0) path = "configs/default.json";
        if (config_load(&cfg, path, args.sets, args.nsets, dist.world, err, sizeof err)) fail(err);
        if (gpt2_check_supported(&cfg, dist.world, err)) fail(err);
        if (dist.world > 1 && ckpt_mkdirs(cfg.run.dir) != 0) {
            snprintf(err, sizeof err, "%s: cannot create directory: %s", cfg.run.dir, strerror(errno));
            fail(err);
        }
        dist_init(&dist, cfg.run.dir);
        gpt2_build(&model, &cfg, &dist, cfg.train.micro_batch, cfg.train.seq_len);
        if (args.init_from) {
            if (gpt2_init_from(&model, args.init_from, err)) fail(err);
            if (dist.rank == 0) printf("weights from %s\n", args.init_from);
        } else {
            gpt2_init_weights(&model, cfg.train.seed);
        }
    }
    int root = dist.rank == 0;
    if (!root && !freopen("/dev/null", "w", stdout)) fail("cannot silence stdout");  // one copy of the output
    int B = cfg.train.micro_batch, T = cfg.train.seq_len;
    print_summary(&model);

    if (args.eval_shard) {
        if (!args.init_from && !args.resume_dir) fail("--eval needs --init-from FILE or --resume RUN_DIR");
        DataLoader dl;
        if (dataloader_init(&dl, args.eval_shard, cfg.data.format, B, T, cfg.model.vocab_size, 0, 0, 0, 1,
                            err, sizeof err)) fail(err);
        long long tokens;
        double loss = gpt2_evaluate(&model, &dl, 0, &tokens, err);
        if (loss < 0) fail(err);
        printf("eval %s: loss %.6f over %lld tokens\n", args.eval_shard, loss, tokens);
        dataloader_free(&dl);
        gpt2_free(&model);
        dist_free(&dist);
        return 0;
    }

    // data (this rank's share of every batch), tokenizer (for samples), run directory
    int accum = (int)(cfg.train.batch_tokens / ((long)B * T * dist.world));
    DataLoader train, val;
    int have_val = cfg.data.val[0] != '\0';
    if (dataloader_init(&train, cfg.data.train, cfg.data.format, B, T, cfg.model.vocab_size, cfg.train.seed, 1,
                        dist.rank, dist.world, err, sizeof err)) fail(err);
    if (st.dataloader[0] && dataloader_seek(&train, st.dataloader, err, sizeof err)) fail(err);
    if (have_val && dataloader_init(&val, cfg.data.val, cfg.data.format, B, T, cfg.model.vocab_size, 0, 0, 0, 1,
                                    err, sizeof err)) fail(err);
    Tokenizer tok;
    int have_tok = root && (cfg.sample.every > 0 || cfg.sample.tokens > 0);
    if (have_tok && tokenizer_load(&tok, "data/gpt2.tiktoken", err, sizeof err)) {
        fprintf(stderr, "warning: no samples: %s\n", err);
        have_tok = 0;
    }
    const char *run_dir = cfg.run.dir;
    char path[1200], ckpt[1100];
    int last_ckpt;
    Logger log;
    memset(&log, 0, sizeof log);   // a rank that never opens it writes nothing
    // rank 0 sets up the run directory; every rank learns whether it failed, so all exit together
    char setup_err[ERRLEN] = "";
    if (root) {
        if (!args.resume_dir && checkpoint_latest(run_dir, ckpt, sizeof ckpt, &last_ckpt) == 0) {
            snprintf(setup_err, sizeof setup_err, "%s already holds checkpoints (%s): continue it with --resume %s, "
                     "or start a new run with --set run.dir=OTHER", run_dir, ckpt, run_dir);
        } else if (ckpt_mkdirs(run_dir) != 0) {
            snprintf(setup_err, sizeof setup_err, "%s: cannot create directory: %s", run_dir, strerror(errno));
        } else {
            snprintf(path, sizeof path, "%s/config.json", run_dir);
            char *config_json = config_to_json(&cfg);
            FILE *cf = fopen(path, "w");
            if (!cf || fputs(config_json, cf) < 0 || fclose(cf) != 0) snprintf(setup_err, sizeof setup_err, "%s: cannot write", path);
            free(config_json);
            if (!setup_err[0] && args.resume_dir && logger_truncate_after(run_dir, st.step, err, sizeof err))
                snprintf(setup_err, sizeof setup_err, "%s", err);
            if (!setup_err[0] && logger_open(&log, run_dir, args.resume_dir != NULL, err, sizeof err))
                snprintf(setup_err, sizeof setup_err, "%s", err);
        }
    }
    if (dist_any(&dist, setup_err[0] != 0)) fail(root ? setup_err : "rank 0 could not set up the run directory");
    snprintf(path, sizeof path, "%s/samples.txt", run_dir);

    signal(SIGINT, on_stop_signal);
    signal(SIGTERM, on_stop_signal);
    double flops_per_token = gpt2_flops_per_token(&model, T), peak = gpu_peak_flops() * dist.world;
    printf("batch: %d x %d tokens x %d accumulation x %d processes = %ld tokens per step; %d steps; run dir %s\n",
           B, T, accum, dist.world, cfg.train.batch_tokens, cfg.train.max_steps, run_dir);
    char line[2048], mfu_s[32];
    for (int step = st.step; step <= cfg.train.max_steps; step++) {
        int last = step == cfg.train.max_steps;
        if (have_val && ((cfg.eval.every > 0 && step % cfg.eval.every == 0) || last)) {
            long long ntok;
            double vl = gpt2_evaluate(&model, &val, cfg.eval.batches, &ntok, err);
            if (vl < 0) fail(err);
            printf("step %d: val loss %.4f (%lld tokens)\n", step, vl, ntok);
            snprintf(line, sizeof line, "{\"type\": \"val\", \"step\": %d, \"val_loss\": %.6f, \"tokens\": %lld}",
                     step, vl, st.tokens);
            logger_write(&log, line);
        }
        if (have_tok && cfg.sample.tokens > 0 &&
            ((cfg.sample.every > 0 && step > 0 && step % cfg.sample.every == 0) || last)) {
            char *text = gpt2_sample(&model, &tok, cfg.sample.tokens, cfg.train.seed ^ (0x5A3C1ull * (step + 1)));
            printf("--- sample at step %d ---\n%s\n---\n", step, text);
            FILE *sf = fopen(path, "a");
            if (sf) { fprintf(sf, "--- step %d ---\n%s\n", step, text); fclose(sf); }
            free(text);
        }
        if (last) break;

        double t0 = now_ms();
        gpt2_zero_grad(&model);
        double loss = 0.0;
        for (int micro = 0; micro < accum; micro++) {
            if (dataloader_next(&train, err, sizeof err)) fail(err);
            gpt2_forward(&model, train.inputs, train.targets, B, T);
            gpt2_backward(&model, 1.0f / accum);
            loss += model.mean_loss / accum;
        }
        float lr, norm = gpt2_optimizer_step(&model, step, &lr);
        loss = dist_sum_double(&dist, loss) / dist.world;
        double ms = now_ms() - t0;
        st.step = step + 1;
        st.tokens += cfg.train.batch_tokens;
        double tps = cfg.train.batch_tokens / (ms / 1e3);
        if (peak > 0) snprintf(mfu_s, sizeof mfu_s, "%.4f", flops_per_token * tps / peak);
        else snprintf(mfu_s, sizeof mfu_s, "null");
        printf("step %5d/%d | loss %.4f | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | mfu %s\n",
               st.step, cfg.train.max_steps, loss, lr, norm, ms, tps, mfu_s);
        fflush(stdout);
        snprintf(line, sizeof line, "{\"type\": \"train\", \"step\": %d, \"loss\": %.6f, \"aux_loss\": 0, \"lr\": %.6g, "
                 "\"grad_norm\": %.6f, \"tokens\": %lld, \"ms\": %.3f, \"tok_per_s\": %.1f, \"flops_per_token\": %.6g, "
                 "\"mfu\": %s}", st.step, loss, lr, norm, st.tokens, ms, tps, flops_per_token, mfu_s);
        logger_write(&log, line);

        int stop = dist_any(&dist, stop_signal);
        int periodic = cfg.checkpoint.every > 0 && st.step % cfg.checkpoint.every == 0;
        if (periodic || stop || st.step == cfg.train.max_steps) {
            dataloader_position(&train, st.dataloader, sizeof st.dataloader);
            if (gpt2_save_checkpoint(&model, run_dir, &st, err)) fail(err);
            printf("checkpoint: %s/ckpt_%08d\n", run_dir, st.step);
        }
        if (stop) {
            printf("stopped by signal %d after step %d; resume with: %s --resume %s\n",
                   stop_signal ? (int)stop_signal : SIGINT, st.step, argv[0], run_dir);
            break;
        }
    }
    logger_close(&log);
    dataloader_free(&train);
    if (have_val) dataloader_free(&val);
    if (have_tok) tokenizer_free(&tok);
    gpt2_free(&model);
    dist_free(&dist);
    return 0;
}
#endif
