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

Every linear layer is one of the structures of DESIGN section 3, resolved by llmc/structure.h exactly
as the CPU trainer resolves it (same tensors, shapes, init, lr multipliers): dense runs on cuBLASLt,
blockdiag / lowrank / monarch / btt on the block-diagonal kernels of llmc/blockdiag.cuh, btt_moe on
llmc/moe.cuh; rms_cap, qk_norm, attn_scale "mup" and the mup lr multipliers as in train_gpt2.c.

Shapes: B batch, T time, C channels, NH heads, hs = C/NH, V vocab, Vp padded vocab, L layers,
N = B*T tokens. Every weight is stored (blocks, out, in) like llm.c's dense (d_out, d_in): y = x W^T + b.
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
#include "llmc/structure.h"
#include "llmc/schedule.h"
#include "llmc/logger.h"
#include "llmc/checkpoint.h"
#include "llmc/dataloader.h"
#include "llmc/tokenizer.h"
#include "llmc/rand.h"
#include "llmc/params.h"

#include "llmc/cuda_common.cuh"
#include "llmc/distributed.cuh"
#include "llmc/encoder.cuh"
#include "llmc/layernorm.cuh"
#include "llmc/matmul.cuh"
#include "llmc/attention.cuh"
#include "llmc/classifier.cuh"
#include "llmc/adamw.cuh"
#include "llmc/blockdiag.cuh"
#include "llmc/moe.cuh"

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
// Parameters: the CPU trainer's table of named tensors over one flat allocation (llmc/params.h, in
// its order, so initialization draws the same numbers), with offsets rounded up to 8 elements so every
// tensor starts 16-byte aligned, as cuBLASLt and vector loads want; the gaps stay zero.

// One linear layer: y (N, d_out) = S(x) + b, S the structure s (llmc/structure.h) with its cores W0
// (named W for one-core types) and W1, under rms_cap each core scaled by its gamma; btt_moe adds the router G.
typedef struct {
    Structure s;
    int d_in, d_out;
    int core[2], gamma[2], G, b; // tensor indices; -1: absent (gamma without rms_cap, core[1] for one core,
                                 // G but for btt_moe)
    size_t saved;                // byte offset of this layer's saved state in acts.lin_saved
    size_t weff[2];              // rms_cap: offsets of the effective cores in m->weff
    int stat[2];                 // rms_cap: each core's RMS in m->rms_stats (kept from forward for backward)
    size_t load;                 // btt_moe: offset of its aux loss and expert loads (1 + E) in m->h_moe
} Linear;

typedef struct {
    int ln1w, ln1b, ln2w, ln2b;
    int qkw, qkb, kkw, kkb;  // qk_norm's q and k LayerNorm weight and bias (-1 without qk_norm)
    Linear lin[NUM_LINEAR];  // attn_qkv, attn_proj, mlp_fc, mlp_proj
} LayerParams;

// Device activations, one allocation; per-layer buffers hold L slices sized for (Bmax, Tmax).
typedef struct {
    bf16 *encoded;                    // (B,T,C)
    bf16 *ln1; float *ln1_mean, *ln1_rstd;  // (L,B,T,C), (L,B,T) x2
    bf16 *qkv;                        // (L,B,T,3C)
    bf16 *qkvn; float *qk_mean, *qk_rstd;   // qk_norm only: (L,B,T,3C) attention's input, (L,B,T,2,NH) x2
    float *lse;                       // (L,B,NH,T) attention's softmax log-sum-exp per query, for backward
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
    bf16 *dqkv, *dqkvn;               // (B,T,3C); dqkvn with qk_norm only
    bf16 *dfch;                       // (B,T,4C)
    float *colsum;                    // bias / LayerNorm gradient partial sums (colsum_chunks(N), 4C)
    float *norm;                      // NORM_BLOCKS partial sums, then the result
    int *tokens;                      // inputs (N), targets (N), encoder buckets (3N + 2)
    char *lin_saved;                  // every structured layer's saved state (Linear.saved)
    char *lin_scratch;                // the structured layers' temporaries (the largest need)
    bf16 *dweff;                      // rms_cap: dL/dW_eff of one layer's cores
    float *rms_partial;               // rms_cap's partial sums (RMS_BLOCKS)
    float *attn_scratch;              // attention backward's D = rowsum(datty * atty) (B,NH,T)
} Activations;

typedef struct {
    Config cfg;
    Dist *dist;
    int L, C, NH, V, Vp, maxT;
    ParamTable pt;                    // every parameter tensor, in checkpoint order (align 8)
    size_t num_params;                // pt.num padded to a multiple of 128 * world
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
    float mean_loss;                  // of the last forward with targets (the cross-entropy), else -1
    bf16 *weff;                       // rms_cap's effective cores, recomputed by every forward
    float *rms_stats;                 // rms_cap: RMS of every capped core in the last forward (device)
    float attn_scale;                 // 1/sqrt(hs), or 8/hs under attn_scale "mup"
    int n_moe;                        // btt_moe layers (over all blocks)
    float *h_moe;                     // pinned: per btt_moe layer its aux loss and expert loads (1 + E) of the last forward
    float aux_loss;                   // mean over btt_moe layers of their aux loss in the last forward (0: none)
    float moe_daux;                   // backward: d(objective)/d(each layer's aux) = loss_scale * aux_weight / n_moe
} GPT2;

static bf16 *PB(GPT2 *m, int t) { return m->params + m->pt.t[t].offset; }
static bf16 *GB(GPT2 *m, int t) { return m->grads + m->pt.t[t].offset; }

// What the GPU trainer cannot run (beyond what config.h refuses for both trainers), refused before any
// work, naming the key.
static int gpt2_check_supported(const Config *c, int world, char *err) {
    for (int p = 0; p < NUM_LINEAR; p++) {
        Structure s;
        if (structure_resolve(&s, c, p, err, ERRLEN)) return -1;
        if (s.type == STRUCT_BTT_MOE && s.experts > MOE_MAX_EXPERTS) {
            snprintf(err, ERRLEN, "model.linear.%s.experts: %d: the CUDA trainer supports at most %d", linear_names[p],
                     s.experts, MOE_MAX_EXPERTS);
            return -1;
        }
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

// Lays out every parameter (the CPU trainer's table, in its order) and allocates parameters, gradients,
// this rank's optimizer shard and the activations for micro-batches up to (Bmax, Tmax). Weights are
// left zero: load them next.
static void gpt2_build(GPT2 *m, const Config *cfg, Dist *dist, int Bmax, int Tmax) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->dist = dist;
    m->pt.align = 8;
    int L = m->L = cfg->model.n_layer, C = m->C = cfg->model.n_embd;
    m->NH = cfg->model.n_head;
    m->V = cfg->model.vocab_size;
    int Vp = m->Vp = cfg->model.padded_vocab_size;
    m->maxT = cfg->model.block_size;
    int NH = m->NH, hs = C / NH, qk = cfg->model.qk_norm;
    attention_check_head_size(hs);
    m->attn_scale = strcmp(cfg->model.attn_scale, "mup") == 0 ? 8.0f / hs : 1.0f / sqrtf((float)hs);
    Structure st[NUM_LINEAR];
    char err[ERRLEN];
    for (int k = 0; k < NUM_LINEAR; k++) {
        if (structure_resolve(&st[k], cfg, k, err, sizeof err)) { fprintf(stderr, "error: %s\n", err); exit(1); }
    }
    m->wte = param_add(&m->pt, "wte", 2, Vp, C, 0, 1, 0.02f);
    m->wpe = param_add(&m->pt, "wpe", 2, m->maxT, C, 0, 1, 0.02f);
    m->layers = (LayerParams *)xcalloc((size_t)L * sizeof(LayerParams));
    size_t BT = (size_t)Bmax * Tmax, saved = 0, scratch = 0, weff = 0, dweff = 0, moe_floats = 0;
    int nstats = 0;
    for (int l = 0; l < L; l++) {
        LayerParams *lp = &m->layers[l];
        param_add_norm(&m->pt, l, "ln1", C, &lp->ln1w, &lp->ln1b);
        lp->qkw = lp->qkb = lp->kkw = lp->kkb = -1;
        if (qk) {
            param_add_norm(&m->pt, l, "qk_norm.q", hs, &lp->qkw, &lp->qkb);
            param_add_norm(&m->pt, l, "qk_norm.k", hs, &lp->kkw, &lp->kkb);
        }
        for (int k = 0; k < NUM_LINEAR; k++) {
            if (k == LIN_MLP_FC)   // checkpoint order: the attention half, ln2, the MLP half
                param_add_norm(&m->pt, l, "ln2", C, &lp->ln2w, &lp->ln2b);
            Linear *lin = &lp->lin[k];
            memset(lin, 0, sizeof *lin);
            lin->s = st[k];
            lin->d_in = st[k].d_in;
            lin->d_out = st[k].d_out;
            param_add_linear(&m->pt, &st[k], l, lin->core, lin->gamma, &lin->G, &lin->b);
            int moe = st[k].type == STRUCT_BTT_MOE;
            lin->saved = saved;
            saved += moe_align(moe ? moe_gpu_saved_bytes(&st[k], (int)BT) : structured_gpu_saved(&st[k], (int)BT) * sizeof(bf16));
            size_t need = moe ? moe_gpu_scratch_bytes(&st[k], (int)BT)
                              : st[k].type == STRUCT_DENSE ? 0 : structured_gpu_scratch_bytes(&st[k], (int)BT);
            if (need > scratch) scratch = need;
            if (moe) { lin->load = moe_floats; moe_floats += 1 + st[k].experts; m->n_moe++; }
            size_t cores = 0;
            for (int c = 0; st[k].rms_cap && c < st[k].ncores; c++) {
                size_t n = m->pt.t[lin->core[c]].size;
                lin->weff[c] = weff;
                lin->stat[c] = nstats++;
                weff += (n + 7) / 8 * 8;
                cores += (n + 7) / 8 * 8;
            }
            if (cores > dweff) dweff = cores;
        }
    }
    param_add_norm(&m->pt, -1, "lnf", C, &m->lnfw, &m->lnfb);
    m->num_params = m->pt.num;
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
    m->weff = (bf16 *)cuda_malloc_or_die(weff * sizeof(bf16), "rms_cap effective weights");
    m->rms_stats = (float *)cuda_malloc_or_die(nstats * sizeof(float), "rms_cap statistics");
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
    size_t qkn = qk ? 1 : 0;
    Activations *a = &m->acts;
    struct { void **p; size_t bytes; } table[] = {
        {(void **)&a->encoded, BT * C * 2},
        {(void **)&a->ln1, L * BT * C * 2}, {(void **)&a->ln1_mean, L * BT * 4}, {(void **)&a->ln1_rstd, L * BT * 4},
        {(void **)&a->qkv, L * BT * 3 * C * 2},
        {(void **)&a->qkvn, qkn * L * BT * 3 * C * 2}, {(void **)&a->qk_mean, qkn * L * BT * 2 * NH * 4},
        {(void **)&a->qk_rstd, qkn * L * BT * 2 * NH * 4},
        {(void **)&a->lse, L * BT * NH * 4}, {(void **)&a->atty, L * BT * C * 2},
        {(void **)&a->res2, L * BT * C * 2},
        {(void **)&a->ln2, L * BT * C * 2}, {(void **)&a->ln2_mean, L * BT * 4}, {(void **)&a->ln2_rstd, L * BT * 4},
        {(void **)&a->fch, L * BT * 4 * C * 2}, {(void **)&a->fch_gelu, L * BT * 4 * C * 2},
        {(void **)&a->res3, L * BT * C * 2},
        {(void **)&a->lnf, BT * C * 2}, {(void **)&a->lnf_mean, BT * 4}, {(void **)&a->lnf_rstd, BT * 4},
        {(void **)&a->logits, BT * Vp * 2}, {(void **)&a->losses, BT * 4},
        {(void **)&a->branch, BT * C * 2},
        {(void **)&a->dres, BT * C * 2}, {(void **)&a->dln, BT * C * 2}, {(void **)&a->datty, BT * C * 2},
        {(void **)&a->dqkv, BT * 3 * C * 2}, {(void **)&a->dqkvn, qkn * BT * 3 * C * 2}, {(void **)&a->dfch, BT * 4 * C * 2},
        {(void **)&a->colsum, (size_t)colsum_chunks((int)BT) * 4 * C * 4},
        {(void **)&a->norm, (NORM_BLOCKS + 1) * 4},
        {(void **)&a->tokens, (5 * BT + 2) * 4},
        {(void **)&a->lin_saved, saved}, {(void **)&a->lin_scratch, scratch}, {(void **)&a->dweff, dweff * 2},
        {(void **)&a->rms_partial, RMS_BLOCKS * 4},
        {(void **)&a->attn_scratch, attention_scratch_floats(Bmax, Tmax, NH) * 4},
    };
    size_t total = 0, n = sizeof table / sizeof table[0];
    for (size_t i = 0; i < n; i++) total += (table[i].bytes + 255) / 256 * 256;
    m->act_memory = cuda_malloc_or_die(total, "activations");
    cudaCheck(cudaMemset(m->act_memory, 0, total));
    char *p = (char *)m->act_memory;
    for (size_t i = 0; i < n; i++) { *table[i].p = p; p += (table[i].bytes + 255) / 256 * 256; }
    cudaCheck(cudaMallocHost((void **)&m->h_tokens, (5 * BT + 2) * sizeof(int)));
    cudaCheck(cudaMallocHost((void **)&m->h_losses, BT * sizeof(float)));
    cudaCheck(cudaMallocHost((void **)&m->h_moe, (moe_floats + 1) * sizeof(float)));
    m->h_counts = (int *)xmalloc((size_t)Vp * sizeof(int));
    m->mean_loss = -1.0f;
}

static void gpt2_free(GPT2 *m) {
    cudaCheck(cudaStreamSynchronize(main_stream));
    cudaFree(m->params); cudaFree(m->grads); cudaFree(m->master); cudaFree(m->m); cudaFree(m->v);
    cudaFree(m->gather); cudaFree(m->act_memory); cudaFree(m->weff); cudaFree(m->rms_stats);
    cudaFreeHost(m->h_tokens); cudaFreeHost(m->h_losses); cudaFreeHost(m->h_moe);
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

// Init on the host, exactly as the CPU trainer: from each tensor's init_std (set by gpt2_build):
// embeddings N(0, 0.02); dense matrices as GPT-2 and structured cores as llmc/structure.h says (DESIGN 3.7);
// biases and routers 0; LayerNorm weights and gamma 1. Tensors drawn in table order from one generator;
// zero and one tensors draw nothing.
static void gpt2_init_weights(GPT2 *m, uint64_t seed) {
    float *h = (float *)xcalloc(m->num_params * sizeof(float));
    param_init(&m->pt, h, seed);
    gpt2_upload_params(m, h);
    free(h);
}

// ----------------------------------------------------------------------------------------------
// Forward and backward

// qk_norm (DESIGN section 2): a LayerNorm over each head's hs channels of q and of k, its weight and
// bias (hs) shared by all heads; the CPU trainer's qknorm_forward / qknorm_backward. One warp per
// (token, part, head), part 0 q, 1 k, 2 v (copied). qkv (N,3C) -> out (N,3C); mean, rstd (N, 2, NH).
__global__ void qknorm_forward_kernel(bf16 *out, float *mean, float *rstd, const bf16 *qkv, const bf16 *wq,
                                      const bf16 *bq, const bf16 *wk, const bf16 *bk, int N, int C, int NH) {
    int idx = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32, hs = C / NH;
    if (idx >= N * 3 * NH) return;
    int n = idx / (3 * NH), part = (idx / NH) % 3, h = idx % NH;
    size_t off = (size_t)n * 3 * C + (size_t)part * C + (size_t)h * hs;
    if (part == 2) {
        for (int i = lane; i < hs; i += 32) out[off + i] = qkv[off + i];
        return;
    }
    const bf16 *w = part ? wk : wq, *b = part ? bk : bq;
    float sum = 0.0f, var = 0.0f;
    for (int i = lane; i < hs; i += 32) sum += __bfloat162float(qkv[off + i]);
    float m = warp_sum(sum) / hs;
    for (int i = lane; i < hs; i += 32) { float d = __bfloat162float(qkv[off + i]) - m; var += d * d; }
    float r = 1.0f / sqrtf(warp_sum(var) / hs + 1e-5f);
    for (int i = lane; i < hs; i += 32)
        out[off + i] = __float2bfloat16((__bfloat162float(qkv[off + i]) - m) * r * __bfloat162float(w[i]) + __bfloat162float(b[i]));
    if (lane == 0) { mean[((size_t)n * 2 + part) * NH + h] = m; rstd[((size_t)n * 2 + part) * NH + h] = r; }
}
// dqkv (N,3C) = qk_norm'(dout), overwritten (v passes through).
__global__ void qknorm_backward_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const bf16 *wq, const bf16 *wk,
                                       const float *mean, const float *rstd, int N, int C, int NH) {
    int idx = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32, hs = C / NH;
    if (idx >= N * 3 * NH) return;
    int n = idx / (3 * NH), part = (idx / NH) % 3, h = idx % NH;
    size_t off = (size_t)n * 3 * C + (size_t)part * C + (size_t)h * hs;
    if (part == 2) {
        for (int i = lane; i < hs; i += 32) dqkv[off + i] = dout[off + i];
        return;
    }
    const bf16 *w = part ? wk : wq;
    float m = mean[((size_t)n * 2 + part) * NH + h], r = rstd[((size_t)n * 2 + part) * NH + h];
    float dm = 0.0f, dnm = 0.0f;
    for (int i = lane; i < hs; i += 32) {
        float norm = (__bfloat162float(qkv[off + i]) - m) * r, dnorm = __bfloat162float(w[i]) * __bfloat162float(dout[off + i]);
        dm += dnorm;
        dnm += dnorm * norm;
    }
    dm = warp_sum(dm) / hs;
    dnm = warp_sum(dnm) / hs;
    for (int i = lane; i < hs; i += 32) {
        float norm = (__bfloat162float(qkv[off + i]) - m) * r, dnorm = __bfloat162float(w[i]) * __bfloat162float(dout[off + i]);
        dqkv[off + i] = __float2bfloat16((dnorm - dm - norm * dnm) * r);
    }
}
// Partial sums of the qk_norm parameter gradients over each chunk of COLSUM_CHUNK tokens (all heads):
// partial (S, 4 hs) = [dwq, dbq, dwk, dbk]; thread (x, y) of a (32, 8) block takes column x, tokens y, y+8, ...
__global__ void qknorm_params_kernel(float *partial, const bf16 *dout, const bf16 *qkv, const float *mean,
                                     const float *rstd, int N, int C, int NH) {
    __shared__ float acc[8][33];
    int hs = C / NH, c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    int r0 = chunk * COLSUM_CHUNK, r1 = min(r0 + COLSUM_CHUNK, N);
    for (int q = 0; q < 4; q++) {   // dwq, dbq, dwk, dbk
        int part = q / 2, bias = q % 2;
        float s = 0.0f;
        if (c < hs)
            for (int n = r0 + threadIdx.y; n < r1; n += 8)
                for (int h = 0; h < NH; h++) {
                    size_t off = (size_t)n * 3 * C + (size_t)part * C + (size_t)h * hs + c;
                    float d = __bfloat162float(dout[off]);
                    size_t st = ((size_t)n * 2 + part) * NH + h;
                    s += bias ? d : d * (__bfloat162float(qkv[off]) - mean[st]) * rstd[st];
                }
        __syncthreads();
        acc[threadIdx.y][threadIdx.x] = s;
        __syncthreads();
        if (threadIdx.y == 0 && c < hs) {
            float t = 0.0f;
            for (int y = 0; y < 8; y++) t += acc[y][threadIdx.x];
            partial[(size_t)chunk * 4 * hs + (size_t)q * hs + c] = t;
        }
    }
}
static void qknorm_forward(bf16 *out, float *mean, float *rstd, const bf16 *qkv, const bf16 *wq, const bf16 *bq,
                           const bf16 *wk, const bf16 *bk, int N, int C, int NH, cudaStream_t st) {
    qknorm_forward_kernel<<<ceil_div((long)N * 3 * NH, 8), 256, 0, st>>>(out, mean, rstd, qkv, wq, bq, wk, bk, N, C, NH);
    cudaCheck(cudaGetLastError());
}
// dqkv overwritten; dwq, dbq, dwk, dbk (hs) += ... scratch: colsum_chunks(N) * 4 hs floats.
static void qknorm_backward(bf16 *dqkv, bf16 *dwq, bf16 *dbq, bf16 *dwk, bf16 *dbk, float *scratch, const bf16 *dout,
                            const bf16 *qkv, const bf16 *wq, const bf16 *wk, const float *mean, const float *rstd,
                            int N, int C, int NH, cudaStream_t st) {
    int hs = C / NH, S = colsum_chunks(N);
    qknorm_backward_kernel<<<ceil_div((long)N * 3 * NH, 8), 256, 0, st>>>(dqkv, dout, qkv, wq, wk, mean, rstd, N, C, NH);
    cudaCheck(cudaGetLastError());
    qknorm_params_kernel<<<dim3(ceil_div(hs, 32), S), dim3(32, 8), 0, st>>>(scratch, dout, qkv, mean, rstd, N, C, NH);
    cudaCheck(cudaGetLastError());
    bf16 *outs[4] = {dwq, dbq, dwk, dbk};
    for (int q = 0; q < 4; q++) colsum_finalize(outs[q], scratch + (size_t)q * hs, S, hs, 4 * hs, st);
}

// The weights a linear layer's forward multiplies by: its cores, or under rms_cap the effective cores
// gamma W / max(1, RMS(W)/sigma) (recomputed by every forward, as the weights change every step; the
// RMS is kept for backward).
static const bf16 *linear_core(GPT2 *m, const Linear *lin, int c, int recompute) {
    if (c >= lin->s.ncores) return NULL;
    if (lin->gamma[c] < 0) return PB(m, lin->core[c]);
    bf16 *weff = m->weff + lin->weff[c];
    if (recompute)
        rmscap_forward(weff, m->rms_stats + lin->stat[c], PB(m, lin->core[c]), PB(m, lin->gamma[c]),
                       m->pt.t[lin->core[c]].size, lin->s.mup_sigma[c], m->acts.rms_partial, main_stream);
    return weff;
}

// out (N, d_out) = S(inp (N, d_in)) + b; with gelu_pre (mlp_fc): out = gelu(that), gelu_pre = that.
// btt_moe also leaves its aux loss and expert loads in its saved state.
static void linear_forward(GPT2 *m, const Linear *lin, bf16 *out, const bf16 *inp, bf16 *gelu_pre, int N) {
    cudaStream_t st = main_stream;
    const bf16 *W0 = linear_core(m, lin, 0, 1), *W1 = linear_core(m, lin, 1, 1), *b = PB(m, lin->b);
    char *saved = m->acts.lin_saved + lin->saved;
    if (lin->s.type == STRUCT_DENSE)
        matmul_forward(out, inp, W0, b, gelu_pre, N, lin->d_in, lin->d_out, st);
    else if (lin->G >= 0)
        moe_forward_gpu(&lin->s, out, inp, W0, W1, PB(m, lin->G), b, gelu_pre, m->cfg.model.moe_z_weight, saved,
                        m->acts.lin_scratch, N, st);
    else
        structured_forward_gpu(&lin->s, out, inp, W0, W1, b, gelu_pre, (bf16 *)saved, N, st);
}

// dinp (N, d_in) = S'(dout) (overwritten; times gelu'(dgelu_pre) when given: the GELU before this layer);
// the cores' (gammas', router's) and the bias's gradients += ... Under rms_cap the weight gradient goes
// to dweff (overwritten), then through the cap to W and gamma. btt_moe's router also receives the aux
// loss's gradient, scaled by m->moe_daux.
static void linear_backward(GPT2 *m, const Linear *lin, bf16 *dinp, const bf16 *dout, const bf16 *inp,
                            const bf16 *dgelu_pre, int N) {
    cudaStream_t st = main_stream;
    const Structure *s = &lin->s;
    bf16 *dW[2] = {NULL, NULL}, *dweff = m->acts.dweff;
    int capped = lin->gamma[0] >= 0;
    for (int c = 0; c < s->ncores; c++) {
        if (!capped) { dW[c] = GB(m, lin->core[c]); continue; }
        dW[c] = dweff;
        dweff += (m->pt.t[lin->core[c]].size + 7) / 8 * 8;
    }
    const bf16 *W0 = linear_core(m, lin, 0, 0), *W1 = linear_core(m, lin, 1, 0);
    char *saved = m->acts.lin_saved + lin->saved;
    float *cs = m->acts.colsum;
    if (s->type == STRUCT_DENSE) {
        if (capped) cudaCheck(cudaMemsetAsync(dW[0], 0, m->pt.t[lin->core[0]].size * sizeof(bf16), st));
        matmul_backward(dinp, dW[0], GB(m, lin->b), dout, inp, W0, dgelu_pre, cs, N, lin->d_in, lin->d_out, st);
    } else {
        if (lin->G >= 0)
            moe_backward_gpu(s, dinp, dW[0], dW[1], GB(m, lin->G), !capped, dout, m->moe_daux, m->cfg.model.moe_z_weight,
                             inp, W0, W1, PB(m, lin->G), saved, dgelu_pre, m->acts.lin_scratch, N, st);
        else
            structured_backward_gpu(s, dinp, dW[0], dW[1], !capped, dout, inp, W0, W1, (const bf16 *)saved, dgelu_pre,
                                    m->acts.lin_scratch, N, st);
        bias_backward(GB(m, lin->b), dout, cs, N, lin->d_out, st);
    }
    for (int c = 0; capped && c < s->ncores; c++) {
        int k = lin->core[c];
        rmscap_backward(GB(m, k), GB(m, lin->gamma[c]), dW[c], PB(m, k), PB(m, lin->gamma[c]), m->rms_stats + lin->stat[c],
                        m->pt.t[k].size, s->mup_sigma[c], m->acts.rms_partial, st);
    }
}

// Per-layer activation pointers for the current (B, T): layer l's slice of each (L, ...) buffer.
typedef struct { bf16 *ln1; float *ln1_mean, *ln1_rstd; bf16 *qkv, *qkvn; float *qk_mean, *qk_rstd;
                 float *lse; bf16 *atty, *res2, *ln2; float *ln2_mean, *ln2_rstd; bf16 *fch, *fch_gelu, *res3; } LayerActs;
static LayerActs layer_acts(GPT2 *m, int l) {
    Activations *a = &m->acts;
    size_t BT = (size_t)m->B * m->T, C = m->C, qk = m->cfg.model.qk_norm ? 1 : 0;
    LayerActs la = {
        a->ln1 + l * BT * C, a->ln1_mean + l * BT, a->ln1_rstd + l * BT, a->qkv + l * BT * 3 * C,
        a->qkvn + qk * l * BT * 3 * C, a->qk_mean + qk * l * BT * 2 * m->NH, a->qk_rstd + qk * l * BT * 2 * m->NH,
        a->lse + l * BT * m->NH, a->atty + l * BT * C, a->res2 + l * BT * C,
        a->ln2 + l * BT * C, a->ln2_mean + l * BT, a->ln2_rstd + l * BT,
        a->fch + l * BT * 4 * C, a->fch_gelu + l * BT * 4 * C, a->res3 + l * BT * C};
    return la;
}
static const bf16 *layer_input(GPT2 *m, int l) {
    return l == 0 ? m->acts.encoded : layer_acts(m, l - 1).res3;
}

// inputs, targets (B,T) host arrays; targets may be NULL (then acts.logits holds the logits
// (B,T,Vp)). With targets: acts.losses (B,T) and m->mean_loss (the cross-entropy). m->aux_loss: the
// mean aux loss of the btt_moe layers, m->h_moe their aux losses and expert loads. The stream is
// synchronized at the end.
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
        linear_forward(m, &lp->lin[LIN_ATTN_QKV], la.qkv, la.ln1, NULL, N);
        const bf16 *qkv = la.qkv;
        if (lp->qkw >= 0) {
            qknorm_forward(la.qkvn, la.qk_mean, la.qk_rstd, la.qkv, PB(m, lp->qkw), PB(m, lp->qkb), PB(m, lp->kkw),
                           PB(m, lp->kkb), N, C, m->NH, st);
            qkv = la.qkvn;
        }
        attention_forward(la.atty, la.lse, qkv, B, T, C, m->NH, m->attn_scale, st);
        linear_forward(m, &lp->lin[LIN_ATTN_PROJ], a->branch, la.atty, NULL, N);
        residual_layernorm_forward(la.res2, la.ln2, la.ln2_mean, la.ln2_rstd, x, a->branch, PB(m, lp->ln2w),
                                   PB(m, lp->ln2b), N, C, st);
        linear_forward(m, &lp->lin[LIN_MLP_FC], la.fch_gelu, la.ln2, la.fch, N);
        linear_forward(m, &lp->lin[LIN_MLP_PROJ], a->branch, la.fch_gelu, NULL, N);
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
    // every btt_moe layer's aux loss and loads to the host (read after the synchronization below)
    for (int l = 0; l < L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) {
            const Linear *lin = &m->layers[l].lin[k];
            if (lin->G < 0) continue;
            cudaCheck(cudaMemcpyAsync(m->h_moe + lin->load, moe_gpu_aux(&lin->s, m->acts.lin_saved + lin->saved, N),
                                      (1 + lin->s.experts) * sizeof(float), cudaMemcpyDeviceToHost, st));
        }
    matmul_forward(a->logits, a->lnf, PB(m, m->wte), NULL, NULL, N, C, m->Vp, st);   // tied LM head
    if (targets) {
        fused_classifier(a->logits, a->losses, a->tokens + N, N, m->V, m->Vp, 0.0f, 0, st);
        cudaCheck(cudaMemcpyAsync(m->h_losses, a->losses, (size_t)N * sizeof(float), cudaMemcpyDeviceToHost, st));
    }
    cudaCheck(cudaStreamSynchronize(st));
    double aux = 0.0;
    for (int l = 0; l < L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) if (m->layers[l].lin[k].G >= 0) aux += m->h_moe[m->layers[l].lin[k].load];
    m->aux_loss = m->n_moe ? (float)(aux / m->n_moe) : 0.0f;
    if (!targets) { m->mean_loss = -1.0f; return; }
    double sum = 0.0;
    for (int i = 0; i < N; i++) sum += m->h_losses[i];
    m->mean_loss = (float)(sum / N);
}

static void gpt2_zero_grad(GPT2 *m) {
    cudaCheck(cudaMemsetAsync(m->grads, 0, m->num_params * sizeof(bf16), main_stream));
}

// Accumulates into m->grads the gradient of loss_scale * (mean loss + aux_weight * aux_loss) of the last
// forward with targets. Gradient accumulation over k micro-batches passes loss_scale = 1/k.
static void gpt2_backward(GPT2 *m, float loss_scale) {
    if (!m->have_targets) { fprintf(stderr, "error: backward needs a forward with targets\n"); exit(1); }
    cudaStream_t st = main_stream;
    int B = m->B, T = m->T, C = m->C, N = B * T;
    Activations *a = &m->acts;
    float *cs = a->colsum;
    m->moe_daux = m->n_moe ? loss_scale * m->cfg.model.moe_aux_weight / m->n_moe : 0.0f;
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
        // mlp_proj, with the GELU backward fused: dfch = S'(dres) * gelu'(fch)
        linear_backward(m, &lp->lin[LIN_MLP_PROJ], a->dfch, a->dres, la.fch_gelu, la.fch, N);
        linear_backward(m, &lp->lin[LIN_MLP_FC], a->dln, a->dfch, la.ln2, NULL, N);
        layernorm_backward(a->dres, GB(m, lp->ln2w), GB(m, lp->ln2b), cs, a->dln, la.res2, PB(m, lp->ln2w),
                           la.ln2_mean, la.ln2_rstd, N, C, st);
        linear_backward(m, &lp->lin[LIN_ATTN_PROJ], a->datty, a->dres, la.atty, NULL, N);
        if (lp->qkw >= 0) {
            attention_backward(a->dqkvn, a->datty, la.qkvn, la.atty, la.lse, a->attn_scratch, B, T, C, m->NH,
                               m->attn_scale, st);
            qknorm_backward(a->dqkv, GB(m, lp->qkw), GB(m, lp->qkb), GB(m, lp->kkw), GB(m, lp->kkb), cs, a->dqkvn, la.qkv,
                            PB(m, lp->qkw), PB(m, lp->kkw), la.qk_mean, la.qk_rstd, N, C, m->NH, st);
        } else {
            attention_backward(a->dqkv, a->datty, la.qkv, la.atty, la.lse, a->attn_scratch, B, T, C, m->NH, m->attn_scale,
                               st);
        }
        linear_backward(m, &lp->lin[LIN_ATTN_QKV], a->dln, a->dqkv, la.ln1, NULL, N);
        layernorm_backward(a->dres, GB(m, lp->ln1w), GB(m, lp->ln1b), cs, a->dln, x, PB(m, lp->ln1w),
                           la.ln1_mean, la.ln1_rstd, N, C, st);
    }
    encoder_backward(GB(m, m->wte), GB(m, m->wpe), a->dres, a->tokens + 2 * N, m->buckets_U, B, T, C, st);
}

// The optimizer step for 0-based step `step` on the accumulated gradients (ZeRO-1): average the
// gradients over the ranks into each rank's shard (reduce-scatter), clip by the global norm, AdamW
// on the shard (each tensor at its own lr: mup's multipliers), all-gather the new bf16 parameters.
// Returns the norm before clipping; *lr_out the scheduled lr.
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
    for (int k = 0; k < m->pt.n; k++) {
        ParamTensor *tn = &m->pt.t[k];
        size_t b = tn->offset > lo ? tn->offset : lo, e = tn->offset + tn->size < hi ? tn->offset + tn->size : hi;
        if (b >= e) continue;
        float wd = tn->decay ? c->optim.weight_decay : 0.0f;
        adamw_update(m->params + b, m->master + (b - lo), m->grads + b, m->m + (b - lo), m->v + (b - lo), e - b,
                     lr * tn->lr_mult, b1, b2, bc1, bc2, c->optim.eps, wd, scale, st);
    }
    ncclCheck(ncclAllGather(m->params + lo, m->params, m->shard_size, ncclBfloat16, d->comm, st));
    cudaCheck(cudaStreamSynchronize(st));
    return norm;
}

// Training FLOPs per token at context T (llmc/params.h: the linear layers' real MACs, attention, LM head)
static double gpt2_flops_per_token(const GPT2 *m, int T) {
    Structure st[NUM_LINEAR];
    for (int k = 0; k < NUM_LINEAR; k++) st[k] = m->layers[0].lin[k].s;
    return model_flops_per_token(&m->cfg, st, T);
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
        rc = param_write_file(&m->pt, path, model_prefix, model_base, 1, keys, vals, 4, err, ERRLEN);
    }
    gpt2_gather_shards(m, m->m, hm);
    gpt2_gather_shards(m, m->v, hv);
    if (root && !rc) {
        float *state_base[] = {hm, hv};
        snprintf(path, sizeof path, "%s/state.safetensors", tmp);
        rc = param_write_file(&m->pt, path, state_prefix, state_base, 2, keys, vals, 5, err, ERRLEN);
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
        rc = param_load_llmc(&m->pt, &m->cfg, file, host, err, ERRLEN);
    } else {
        SafeTensors st;
        rc = safetensors_read(&st, file, err, ERRLEN);
        if (!rc) {
            rc = param_load(&m->pt, &st, file, "", host, err, ERRLEN);
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
    int rc = param_load(&m->pt, &ms, path, "", host, err, ERRLEN);
    safetensors_free(&ms);
    if (!rc) gpt2_upload_params(m, host);
    snprintf(path, sizeof path, "%s/state.safetensors", dir);
    if (!rc) rc = safetensors_read(&ss, path, err, ERRLEN);
    if (!rc) {
        rc = param_load(&m->pt, &ss, path, "m.", host, err, ERRLEN);
        if (!rc) cudaCheck(cudaMemcpy(m->m, host + m->shard_begin, m->shard_size * sizeof(float), cudaMemcpyHostToDevice));
        if (!rc) rc = param_load(&m->pt, &ss, path, "v.", host, err, ERRLEN);
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
// the same batches as the CPU trainer; rank r evaluates batches r, r + world, ... *aux gets the mean aux
// loss of the btt_moe layers (0 without them). Collective.
static double gpt2_evaluate(GPT2 *m, DataLoader *dl, int max_batches, long long *tokens, double *aux, char *err) {
    dataloader_reset(dl);
    size_t nb = dataloader_num_batches(dl);
    if (max_batches > 0 && (size_t)max_batches < nb) nb = (size_t)max_batches;
    double sum = 0.0, aux_sum = 0.0;
    int failed = 0;
    for (size_t i = 0; i < nb && !failed; i++) {
        if (dataloader_next(dl, err, ERRLEN)) { failed = 1; break; }
        if ((int)(i % m->dist->world) != m->dist->rank) continue;
        gpt2_forward(m, dl->inputs, dl->targets, m->Bmax, m->Tmax);
        sum += m->mean_loss;
        aux_sum += m->aux_loss;
    }
    if (dist_any(m->dist, failed)) return -1.0;
    sum = dist_sum_double(m->dist, sum);
    aux_sum = dist_sum_double(m->dist, aux_sum);
    *tokens = (long long)nb * m->Bmax * m->Tmax;
    *aux = nb ? aux_sum / nb : 0.0;
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

// The start-up summary (llmc/params.h), printed; returns its JSON record for log.jsonl (malloc'd).
static char *print_summary(const GPT2 *m, int step) {
    const Dist *d = m->dist;
    printf("GPU: %s (%.1f GiB), %d process%s (%s)\n", device_prop.name, device_prop.totalGlobalMem / 1073741824.0,
           d->world, d->world > 1 ? "es" : "", d->launcher);
    Structure st[NUM_LINEAR];
    for (int k = 0; k < NUM_LINEAR; k++) st[k] = m->layers[0].lin[k].s;
    return model_summary(&m->pt, &m->cfg, st, m->Tmax, step);
}

// Appends to a train log record ", \"moe\": [...]", as the CPU trainer: per btt_moe layer its aux loss
// and expert load (the fraction of routed slots per expert; both averaged over the step's micro-batches:
// moe holds m->h_moe's layout) and max/mean of the load (1 is perfectly balanced, E is everything on one
// expert). Returns the largest max/mean, for the console.
static float moe_load_record(const GPT2 *m, const float *moe, char *buf, size_t cap) {
    size_t len = 0;
    float worst = 0.0f;
    int first = 1;
    len += snprintf(buf + len, cap - len, ", \"moe\": [");
    for (int l = 0; l < m->L; l++) {
        for (int k = 0; k < NUM_LINEAR; k++) {
            const Linear *lin = &m->layers[l].lin[k];
            if (lin->G < 0 || len >= cap) continue;
            int E = lin->s.experts;
            const float *load = moe + lin->load + 1;
            float mx = 0.0f;
            for (int e = 0; e < E; e++) if (load[e] > mx) mx = load[e];
            float ratio = mx * E;   // max / mean, the mean being 1/E
            if (ratio > worst) worst = ratio;
            len += snprintf(buf + len, cap - len, "%s{\"layer\": \"h.%d.%s\", \"aux_loss\": %.6f, \"load\": [",
                            first ? "" : ", ", l, linear_names[k], moe[lin->load]);
            for (int e = 0; e < E && len < cap; e++) len += snprintf(buf + len, cap - len, "%s%.4f", e ? ", " : "", load[e]);
            if (len < cap) len += snprintf(buf + len, cap - len, "], \"max_over_mean\": %.4f}", ratio);
            first = 0;
        }
    }
    if (len < cap) snprintf(buf + len, cap - len, "]");
    return worst;
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
    char *summary = print_summary(&model, st.step);

    if (args.eval_shard) {
        if (!args.init_from && !args.resume_dir) fail("--eval needs --init-from FILE or --resume RUN_DIR");
        DataLoader dl;
        if (dataloader_init(&dl, args.eval_shard, cfg.data.format, B, T, cfg.model.vocab_size, 0, 0, 0, 1,
                            err, sizeof err)) fail(err);
        long long tokens;
        double aux, loss = gpt2_evaluate(&model, &dl, 0, &tokens, &aux, err);
        if (loss < 0) fail(err);
        printf("eval %s: loss %.6f over %lld tokens\n", args.eval_shard, loss, tokens);
        if (model.n_moe) printf("eval %s: mean aux loss of the %d btt_moe layers %.6f\n", args.eval_shard, model.n_moe, aux);
        free(summary);
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
    logger_write(&log, summary);
    free(summary);
    snprintf(path, sizeof path, "%s/samples.txt", run_dir);

    signal(SIGINT, on_stop_signal);
    signal(SIGTERM, on_stop_signal);
    double flops_per_token = gpt2_flops_per_token(&model, T), peak = gpu_peak_flops() * dist.world;
    printf("batch: %d x %d tokens x %d accumulation x %d processes = %ld tokens per step; %d steps; run dir %s\n",
           B, T, accum, dist.world, cfg.train.batch_tokens, cfg.train.max_steps, run_dir);
    static char line[65536];
    char mfu_s[32];
    size_t moe_floats = 0;   // m->h_moe's length: per btt_moe layer its aux loss and E loads
    for (int l = 0; l < model.L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) if (model.layers[l].lin[k].G >= 0) moe_floats += 1 + model.layers[l].lin[k].s.experts;
    float *step_moe = (float *)xcalloc((moe_floats + 1) * sizeof(float));   // averaged over the step's micro-batches
    for (int step = st.step; step <= cfg.train.max_steps; step++) {
        int last = step == cfg.train.max_steps;
        if (have_val && ((cfg.eval.every > 0 && step % cfg.eval.every == 0) || last)) {
            long long ntok;
            double vaux, vl = gpt2_evaluate(&model, &val, cfg.eval.batches, &ntok, &vaux, err);
            if (vl < 0) fail(err);
            if (model.n_moe) printf("step %d: val loss %.4f, aux loss %.4f (%lld tokens)\n", step, vl, vaux, ntok);
            else printf("step %d: val loss %.4f (%lld tokens)\n", step, vl, ntok);
            snprintf(line, sizeof line, "{\"type\": \"val\", \"step\": %d, \"val_loss\": %.6f, \"val_aux_loss\": %.6f, "
                     "\"tokens\": %lld}", step, vl, vaux, st.tokens);
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
        double loss = 0.0, aux = 0.0;
        for (int micro = 0; micro < accum; micro++) {
            if (dataloader_next(&train, err, sizeof err)) fail(err);
            gpt2_forward(&model, train.inputs, train.targets, B, T);
            gpt2_backward(&model, 1.0f / accum);
            loss += model.mean_loss / accum;
            aux += model.aux_loss / accum;
            for (size_t i = 0; i < moe_floats; i++) step_moe[i] += model.h_moe[i] / accum;
        }
        float lr, norm = gpt2_optimizer_step(&model, step, &lr);
        loss = dist_sum_double(&dist, loss) / dist.world;
        aux = dist_sum_double(&dist, aux) / dist.world;   // the loads in the log are rank 0's
        double ms = now_ms() - t0;
        st.step = step + 1;
        st.tokens += cfg.train.batch_tokens;
        double tps = cfg.train.batch_tokens / (ms / 1e3);
        if (peak > 0) snprintf(mfu_s, sizeof mfu_s, "%.4f", flops_per_token * tps / peak);
        else snprintf(mfu_s, sizeof mfu_s, "null");
        char moe[64] = "";
        int len = snprintf(line, sizeof line, "{\"type\": \"train\", \"step\": %d, \"loss\": %.6f, \"aux_loss\": %.6f, "
                           "\"lr\": %.6g, \"grad_norm\": %.6f, \"tokens\": %lld, \"ms\": %.3f, \"tok_per_s\": %.1f, "
                           "\"flops_per_token\": %.6g, \"mfu\": %s", st.step, loss, aux, lr, norm, st.tokens, ms, tps,
                           flops_per_token, mfu_s);
        if (model.n_moe) {
            float worst = moe_load_record(&model, step_moe, line + len, sizeof line - len);
            snprintf(moe, sizeof moe, " | aux %.4f | load max/mean %.2f", aux, worst);
            memset(step_moe, 0, moe_floats * sizeof(float));
        }
        strncat(line, "}", sizeof line - strlen(line) - 1);
        printf("step %5d/%d | loss %.4f%s | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s | mfu %s\n",
               st.step, cfg.train.max_steps, loss, moe, lr, norm, ms, tps, mfu_s);
        fflush(stdout);
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
    free(step_moe);
    dataloader_free(&train);
    if (have_val) dataloader_free(&val);
    if (have_tok) tokenizer_free(&tok);
    gpt2_free(&model);
    dist_free(&dist);
    return 0;
}
#endif
