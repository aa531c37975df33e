/*
GPT-2 training on the CPU, fp32, OpenMP + OpenBLAS: the reference every GPU result is tested against.

Read top to bottom: the layers (forward and backward side by side, shapes in comments), then the
model (one allocation each for parameters, gradients, AdamW moments and activations), then the
training loop (config, data, checkpoints, evaluation, sampling, logging).

Shapes: B batch, T time, C channels (n_embd), NH heads, hs = C/NH, V vocab, Vp padded vocab,
L layers. Each of the four linear layers of a block is one of the structures of DESIGN section 3
(dense, blockdiag, lowrank, monarch, btt, btt_moe): llmc/structure.h describes its cores' shapes,
and every type runs on the one block-diagonal primitive of llmc/blockdiag.h (dense is one block).
Every weight is stored (blocks, out, in), like llm.c's dense (d_out, d_in), and y = x W^T + b.
*/
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <cblas.h>

#include "llmc/config.h"
#include "llmc/structure.h"
#include "llmc/blockdiag.h"
#include "llmc/moe.h"
#include "llmc/schedule.h"
#include "llmc/logger.h"
#include "llmc/checkpoint.h"
#include "llmc/dataloader.h"
#include "llmc/tokenizer.h"
#include "llmc/rand.h"
#include "llmc/params.h"

#define ERRLEN 1024

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "error: out of memory allocating %zu bytes\n", n); exit(1); }
    return p;
}
// Zeroed and aligned to 64 bytes (a cache line, an AVX-512 vector): the kernels' rows then start on a
// line wherever their width is a multiple of 16 floats, which moe.h's streamed stores need.
static void *xcalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 1) != 0) { fprintf(stderr, "error: out of memory allocating %zu bytes\n", n); exit(1); }
    memset(p, 0, n);
    return p;
}

// ----------------------------------------------------------------------------------------------
// Layers

// out (B,T,C) = wte[inp] + wpe[t]
static void encoder_forward(float *out, const int *inp, const float *wte, const float *wpe,
                            int B, int T, int C) {
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *e = wte + (size_t)inp[b * T + t] * C, *p = wpe + (size_t)t * C;
            for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
        }
    }
}
// dwte[inp] += dout, dwpe[t] += dout. Serial over tokens: two tokens may share a row of wte,
// and a fixed order keeps the sum bit-reproducible.
static void encoder_backward(float *dwte, float *dwpe, const float *dout, const int *inp,
                             int B, int T, int C) {
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            const float *d = dout + ((size_t)b * T + t) * C;
            float *de = dwte + (size_t)inp[b * T + t] * C, *dp = dwpe + (size_t)t * C;
            for (int i = 0; i < C; i++) { de[i] += d[i]; dp[i] += d[i]; }
        }
    }
}

// out (N,C) = (inp - mean) * rstd * w + b over the last dim; mean, rstd (N) kept for backward
static void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C) {
    const float eps = 1e-5f;
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float m = 0.0f, v = 0.0f;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        for (int i = 0; i < C; i++) { float d = x[i] - m; v += d * d; }
        v /= C;
        float s = 1.0f / sqrtf(v + eps);
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * w[i] + b[i];
        mean[n] = m;
        rstd[n] = s;
    }
}
// dinp (N,C) += LN'(dout); dw, db (C) += ...   dw/db are reduced over N in a fixed thread-chunk
// order (per-thread partial sums, then a serial sum), so the result does not depend on timing.
static void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                               const float *w, const float *mean, const float *rstd, int N, int C) {
    int nth = omp_get_max_threads();
    float *partial = xcalloc((size_t)nth * 2 * C * sizeof(float));
    #pragma omp parallel num_threads(nth)
    {
        float *pw = partial + (size_t)omp_get_thread_num() * 2 * C, *pb = pw + C;
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
            float m = mean[n], s = rstd[n];
            float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
            for (int i = 0; i < C; i++) {
                float norm = (x[i] - m) * s, dnorm = w[i] * d[i];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= C;
            dnorm_norm_mean /= C;
            float *dx = dinp + (size_t)n * C;
            for (int i = 0; i < C; i++) {
                float norm = (x[i] - m) * s, dnorm = w[i] * d[i];
                pb[i] += d[i];
                pw[i] += norm * d[i];
                dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
            }
        }
    }
    for (int t = 0; t < nth; t++) {
        for (int i = 0; i < C; i++) { dw[i] += partial[(size_t)t * 2 * C + i]; db[i] += partial[(size_t)t * 2 * C + C + i]; }
    }
    free(partial);
}

// out (N,OC) = inp (N,IC) W^T + bias, W (OC,IC), bias (OC) or NULL
static void matmul_forward(float *out, const float *inp, const float *W, const float *bias,
                           int N, int IC, int OC) {
    if (bias) {
        #pragma omp parallel for
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * OC, bias, OC * sizeof(float));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, IC, 1.0f, inp, IC, W, IC,
                bias ? 1.0f : 0.0f, out, OC);
}
// dinp (N,IC) = dout W (overwritten); dW (OC,IC) += dout^T inp; dbias (OC) += column sums of dout
static void matmul_backward(float *dinp, float *dW, float *dbias, const float *dout, const float *inp,
                            const float *W, int N, int IC, int OC) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IC, OC, 1.0f, dout, OC, W, IC, 0.0f, dinp, IC);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dW, IC);
    if (dbias) {
        #pragma omp parallel for
        for (int o = 0; o < OC; o++) {
            float s = 0.0f;
            for (int n = 0; n < N; n++) s += dout[(size_t)n * OC + o];
            dbias[o] += s;
        }
    }
}

// Causal self-attention. qkv (B,T,3C) holds q,k,v each (NH,hs) per token; att (B,NH,T,T) keeps the
// softmax rows (only t2 <= t written) for backward; out (B,T,C).
// scale: 1/sqrt(hs), or 8/hs under attn_scale "mup" (DESIGN section 2).
static void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH, float scale) {
    int hs = C / NH, C3 = 3 * C;
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float *a = att + (((size_t)b * NH + h) * T + t) * T;
                float maxv = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = qkv + ((size_t)b * T + t2) * C3 + C + h * hs;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) s += q[i] * k[i];
                    s *= scale;
                    a[t2] = s;
                    if (s > maxv) maxv = s;
                }
                float sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) { a[t2] = expf(a[t2] - maxv); sum += a[t2]; }
                float inv = 1.0f / sum;
                for (int t2 = 0; t2 <= t; t2++) a[t2] *= inv;
                float *o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) o[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v = qkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs;
                    for (int i = 0; i < hs; i++) o[i] += a[t2] * v[i];
                }
            }
        }
    }
}
// dqkv (B,T,3C) = attention'(dout). One (b, h) pair per task: it writes only its own head's slice
// of dqkv, so tasks never race and the accumulation order over t is fixed.
static void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                               int B, int T, int C, int NH, float scale) {
    int hs = C / NH, C3 = 3 * C;
    #pragma omp parallel
    {
        float *dpre = xmalloc((size_t)T * sizeof(float));
        #pragma omp for collapse(2)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                for (int t = 0; t < T; t++) {
                    float *dq = dqkv + ((size_t)b * T + t) * C3 + h * hs;
                    for (int i = 0; i < hs; i++) dq[i] = 0.0f;
                    for (int i = 0; i < hs; i++) dq[C + i] = dq[2 * C + i] = 0.0f;
                }
                for (int t = 0; t < T; t++) {
                    const float *a = att + (((size_t)b * NH + h) * T + t) * T;
                    const float *d = dout + ((size_t)b * T + t) * C + h * hs;
                    const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                    float *dq = dqkv + ((size_t)b * T + t) * C3 + h * hs;
                    // datt[t2] = d . v[t2];  dv[t2] += a[t2] d
                    float dot = 0.0f;
                    for (int t2 = 0; t2 <= t; t2++) {
                        const float *v = qkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs;
                        float *dv = dqkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs;
                        float s = 0.0f;
                        for (int i = 0; i < hs; i++) { s += d[i] * v[i]; dv[i] += a[t2] * d[i]; }
                        dpre[t2] = s;
                        dot += a[t2] * s;
                    }
                    // softmax backward: dpre = a * (datt - sum a*datt), then through the scaled dot product
                    for (int t2 = 0; t2 <= t; t2++) {
                        float g = a[t2] * (dpre[t2] - dot) * scale;
                        const float *k = qkv + ((size_t)b * T + t2) * C3 + C + h * hs;
                        float *dk = dqkv + ((size_t)b * T + t2) * C3 + C + h * hs;
                        for (int i = 0; i < hs; i++) { dq[i] += g * k[i]; dk[i] += g * q[i]; }
                    }
                }
            }
        }
        free(dpre);
    }
}

// qk_norm (DESIGN section 2): a LayerNorm over each head's hs channels of q and of k, its weight and
// bias (hs) shared by all heads. qkv (N,3C) -> out (N,3C): q and k normalized, v copied;
// mean, rstd (N, 2, NH) kept for backward (index (n, part, h), part 0 q, 1 k).
static void qknorm_forward(float *out, float *mean, float *rstd, const float *qkv, const float *wq,
                           const float *bq, const float *wk, const float *bk, int N, int C, int NH) {
    const float eps = 1e-5f;
    int hs = C / NH;
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        for (int part = 0; part < 2; part++) {
            const float *w = part ? wk : wq, *b = part ? bk : bq;
            for (int h = 0; h < NH; h++) {
                size_t off = (size_t)n * 3 * C + part * C + h * hs;
                const float *x = qkv + off;
                float m = 0.0f, v = 0.0f;
                for (int i = 0; i < hs; i++) m += x[i];
                m /= hs;
                for (int i = 0; i < hs; i++) { float d = x[i] - m; v += d * d; }
                float r = 1.0f / sqrtf(v / hs + eps);
                for (int i = 0; i < hs; i++) out[off + i] = (x[i] - m) * r * w[i] + b[i];
                mean[((size_t)n * 2 + part) * NH + h] = m;
                rstd[((size_t)n * 2 + part) * NH + h] = r;
            }
        }
        memcpy(out + (size_t)n * 3 * C + 2 * C, qkv + (size_t)n * 3 * C + 2 * C, C * sizeof(float));
    }
}
// dqkv (N,3C) = qk_norm'(dout) (overwritten; v passes through); dwq, dbq, dwk, dbk (hs) += ...
// reduced over tokens and heads in a fixed per-thread-chunk order, as layernorm_backward.
static void qknorm_backward(float *dqkv, float *dwq, float *dbq, float *dwk, float *dbk, const float *dout,
                            const float *qkv, const float *wq, const float *wk, const float *mean,
                            const float *rstd, int N, int C, int NH) {
    int hs = C / NH, nth = omp_get_max_threads();
    float *partial = xcalloc((size_t)nth * 4 * hs * sizeof(float));   // per thread: dwq, dbq, dwk, dbk
    #pragma omp parallel num_threads(nth)
    {
        float *pt = partial + (size_t)omp_get_thread_num() * 4 * hs;
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            for (int part = 0; part < 2; part++) {
                const float *w = part ? wk : wq;
                float *pw = pt + part * 2 * hs, *pb = pw + hs;
                for (int h = 0; h < NH; h++) {
                    size_t off = (size_t)n * 3 * C + part * C + h * hs;
                    const float *x = qkv + off, *d = dout + off;
                    float m = mean[((size_t)n * 2 + part) * NH + h], r = rstd[((size_t)n * 2 + part) * NH + h];
                    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
                    for (int i = 0; i < hs; i++) {
                        float norm = (x[i] - m) * r, dnorm = w[i] * d[i];
                        dnorm_mean += dnorm;
                        dnorm_norm_mean += dnorm * norm;
                    }
                    dnorm_mean /= hs;
                    dnorm_norm_mean /= hs;
                    for (int i = 0; i < hs; i++) {
                        float norm = (x[i] - m) * r, dnorm = w[i] * d[i];
                        pb[i] += d[i];
                        pw[i] += norm * d[i];
                        dqkv[off + i] = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
                    }
                }
            }
            memcpy(dqkv + (size_t)n * 3 * C + 2 * C, dout + (size_t)n * 3 * C + 2 * C, C * sizeof(float));
        }
    }
    for (int t = 0; t < nth; t++) {
        const float *pt = partial + (size_t)t * 4 * hs;
        for (int i = 0; i < hs; i++) {
            dwq[i] += pt[i]; dbq[i] += pt[hs + i]; dwk[i] += pt[2 * hs + i]; dbk[i] += pt[3 * hs + i];
        }
    }
    free(partial);
}

// weight_norm "rms_cap" (DESIGN 3.7) on one core W (n entries): the forward uses
// W_eff = gamma * W / c, c = max(1, RMS(W) / sigma), RMS(W) = sqrt(mean(W^2) + 1e-8).
// Sums in double, serially: the result must not depend on the thread count's timing.
static double rms_of(const float *W, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)W[i] * W[i];
    return sqrt(s / n + 1e-8);
}
static void rms_cap_forward(float *weff, const float *W, size_t n, float gamma, double sigma) {
    double rms = rms_of(W, n), c = rms / sigma > 1.0 ? rms / sigma : 1.0;
    float k = (float)(gamma / c);
    for (size_t i = 0; i < n; i++) weff[i] = k * W[i];
}
// From dweff = dL/dW_eff: dW += dL/dW and *dgamma += dL/dgamma. With u = sum(dweff * W):
//   c == 1:  dW += gamma dweff,                                        dgamma += u
//   c > 1:   dW += gamma sigma / rms (dweff - u W / (n rms^2)),       dgamma += u sigma / rms
// (the second row is the chain rule through RMS: d rms / dW_i = W_i / (n rms)).
static void rms_cap_backward(float *dW, float *dgamma, const float *dweff, const float *W, size_t n,
                             float gamma, double sigma) {
    double rms = rms_of(W, n), u = 0.0;
    for (size_t i = 0; i < n; i++) u += (double)dweff[i] * W[i];
    if (rms <= sigma) {
        for (size_t i = 0; i < n; i++) dW[i] += gamma * dweff[i];
        *dgamma += (float)u;
    } else {
        float k = (float)(gamma * sigma / rms), kw = (float)(u / (n * rms * rms));
        for (size_t i = 0; i < n; i++) dW[i] += k * (dweff[i] - kw * W[i]);
        *dgamma += (float)(u * sigma / rms);
    }
}

// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
#define GELU_SCALE 0.7978845608028654f
static void gelu_forward(float *out, const float *inp, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
    }
}
// dinp = GELU'(inp) * dout (overwritten)
static void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;
        float g = 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = g * dout[i];
    }
}

// out = a + b
static void residual_forward(float *out, const float *a, const float *b, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) out[i] = a[i] + b[i];
}

// Cross-entropy over the first V of Vp logits, row by row. With targets, logits (N,Vp) are
// replaced in place by probabilities and losses (N) are written; the padded columns are ignored.
static void softmax_crossentropy_forward(float *logits, float *losses, const int *targets,
                                         int N, int V, int Vp) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *z = logits + (size_t)n * Vp;
        float maxv = -INFINITY;
        for (int i = 0; i < V; i++) if (z[i] > maxv) maxv = z[i];
        float sum = 0.0f;
        for (int i = 0; i < V; i++) { z[i] = expf(z[i] - maxv); sum += z[i]; }
        float inv = 1.0f / sum;
        for (int i = 0; i < V; i++) z[i] *= inv;
        for (int i = V; i < Vp; i++) z[i] = 0.0f;
        losses[n] = -logf(z[targets[n]]);
    }
}
// dlogits (N,Vp) = (probs - onehot(target)) * dloss, in place over the probabilities
static void softmax_crossentropy_backward(float *probs, const int *targets, int N, int Vp, float dloss) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *p = probs + (size_t)n * Vp;
        for (int i = 0; i < Vp; i++) p[i] *= dloss;
        p[targets[n]] -= dloss;
    }
}

// ----------------------------------------------------------------------------------------------
// Parameters: the table of named tensors over one allocation (llmc/params.h), shared with the CUDA
// trainer, so saving, loading, weight decay, mup's learning rates and the llm.c import all read it.

// One linear layer: y (N, d_out) = S(x) + b, S the structure s (llmc/structure.h) with its cores
// W0 (named W for one-core types) and W1, under rms_cap each core scaled by its gamma. btt_moe adds
// the router G and runs on llmc/moe.h instead of blockdiag.h's driver.
typedef struct {
    Structure s;
    int d_in, d_out;
    int core[2], gamma[2], G, b; // tensor indices; -1: absent (gamma without rms_cap, core[1] for one
                                 // core, G but for btt_moe)
    size_t saved;            // offset (floats) of this layer's saved intermediate in acts.lin_saved
    size_t weff[2];          // rms_cap: offsets of the effective cores in m->weff
    size_t load;             // btt_moe: offset of its expert load (E) in m->moe_load
    float aux;               // btt_moe: its auxiliary loss in the last forward
} Linear;

typedef struct {
    int ln1w, ln1b, ln2w, ln2b;
    int qkw, qkb, kkw, kkb;  // qk_norm's q and k LayerNorm weight and bias (-1 without qk_norm)
    Linear lin[NUM_LINEAR];  // attn_qkv, attn_proj, mlp_fc, mlp_proj
} LayerParams;

// Activations kept for backward, one allocation; per layer: sizes for (B, T) = (Bmax, Tmax)
typedef struct {
    float *encoded;                   // (B,T,C)
    float *ln1, *ln1_mean, *ln1_rstd; // (L,B,T,C), (L,B,T) x2
    float *qkv;                       // (L,B,T,3C)
    float *qkvn, *qk_mean, *qk_rstd;  // qk_norm only: (L,B,T,3C) attention's input, (L,B,T,2,NH) x2
    float *att;                       // (L,B,NH,T,T)
    float *atty;                      // (L,B,T,C)
    float *res2;                      // (L,B,T,C)
    float *ln2, *ln2_mean, *ln2_rstd; // (L,B,T,C), (L,B,T) x2
    float *fch, *fch_gelu;            // (L,B,T,4C) x2
    float *res3;                      // (L,B,T,C)
    float *lnf, *lnf_mean, *lnf_rstd; // (B,T,C), (B,T) x2
    float *logits;                    // (B,T,Vp): logits, then probabilities, then dlogits
    float *losses;                    // (B,T)
    float *lin_saved;                 // every structured layer's saved intermediate (Linear.saved)
    // backward scratch, reused by every layer
    float *dres, *dln, *datty;        // (B,T,C)
    float *dqkv, *dqkvn;              // (B,T,3C); dqkvn with qk_norm only
    float *dfch_gelu, *dfch;          // (B,T,4C)
    float *lin_scratch;               // the structured layers' temporaries (the largest need)
    float *dweff;                     // rms_cap: dL/dW_eff of one layer's cores
} Activations;

typedef struct {
    Config cfg;
    int L, C, NH, V, Vp, maxT;
    ParamTable pt;                    // every parameter tensor, in checkpoint order
    size_t num_params;                // pt.num
    float *params, *grads, *m, *v;    // one allocation each, num_params floats
    int wte, wpe, lnfw, lnfb;         // tensor indices
    LayerParams *layers;              // (L)
    Activations acts;
    float *act_memory;
    float *weff;                      // rms_cap's effective cores, recomputed by every forward
    float attn_scale;                 // 1/sqrt(hs), or 8/hs under attn_scale "mup"
    int n_moe;                        // btt_moe layers (over all blocks)
    float *moe_load;                  // their expert loads in the last forward: fraction of routed slots (E each)
    float aux_loss;                   // mean over btt_moe layers of their aux loss in the last forward (0: none)
    float moe_daux;                   // backward: d(objective)/d(each layer's aux) = loss_scale * aux_weight / n_moe
    int Bmax, Tmax;
    int B, T;                         // shape of the last forward
    const int *inputs, *targets;      // of the last forward (caller-owned)
    float mean_loss;                  // of the last forward with targets, else -1
} GPT2;

static float *P(GPT2 *m, int t) { return m->params + m->pt.t[t].offset; }
static float *G(GPT2 *m, int t) { return m->grads + m->pt.t[t].offset; }

// Lays out every parameter and allocates parameters, gradients, AdamW moments and activations
// for micro-batches up to (Bmax, Tmax). Weights are left zero: initialize or load them next.
static void gpt2_build(GPT2 *m, const Config *cfg, int Bmax, int Tmax) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    int L = m->L = cfg->model.n_layer, C = m->C = cfg->model.n_embd;
    m->NH = cfg->model.n_head;
    m->V = cfg->model.vocab_size;
    int Vp = m->Vp = cfg->model.padded_vocab_size;
    m->maxT = cfg->model.block_size;
    int NH = m->NH, hs = C / NH, qk = cfg->model.qk_norm;
    m->attn_scale = strcmp(cfg->model.attn_scale, "mup") == 0 ? 8.0f / hs : 1.0f / sqrtf((float)hs);
    Structure st[NUM_LINEAR];
    char err[ERRLEN];
    for (int k = 0; k < NUM_LINEAR; k++) {
        if (structure_resolve(&st[k], cfg, k, err, sizeof err)) { fprintf(stderr, "error: %s\n", err); exit(1); }
    }
    m->wte = param_add(&m->pt, "wte", 2, Vp, C, 0, 1, 0.02f);
    m->wpe = param_add(&m->pt, "wpe", 2, m->maxT, C, 0, 1, 0.02f);
    m->layers = xcalloc((size_t)L * sizeof(LayerParams));
    size_t BT = (size_t)Bmax * Tmax, saved = 0, scratch = 0, weff = 0, dweff = 0, load = 0;
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
            *lin = (Linear){.s = st[k], .d_in = st[k].d_in, .d_out = st[k].d_out};
            param_add_linear(&m->pt, &st[k], l, lin->core, lin->gamma, &lin->G, &lin->b);
            int moe = st[k].type == STRUCT_BTT_MOE;
            lin->saved = saved;
            saved += moe ? moe_saved_floats(&st[k], (int)BT) : structured_saved_floats(&st[k], (int)BT);
            size_t need = moe ? moe_scratch_floats(&st[k], (int)BT) : structured_scratch_floats(&st[k], (int)BT), cores = 0;
            if (moe) { lin->load = load; load += st[k].experts; m->n_moe++; }
            if (need > scratch) scratch = need;
            for (int c = 0; c < st[k].ncores; c++) {
                size_t n = m->pt.t[lin->core[c]].size;
                lin->weff[c] = weff;
                if (st[k].rms_cap) { weff += n; cores += n; }
            }
            if (cores > dweff) dweff = cores;
        }
    }
    param_add_norm(&m->pt, -1, "lnf", C, &m->lnfw, &m->lnfb);
    m->num_params = m->pt.num;
    size_t bytes = m->num_params * sizeof(float);
    m->params = xcalloc(bytes);
    m->grads = xcalloc(bytes);
    m->m = xcalloc(bytes);
    m->v = xcalloc(bytes);
    m->weff = xcalloc(weff * sizeof(float));
    m->moe_load = xcalloc(load * sizeof(float));

    // activations: the table order is the layout order of the one allocation
    m->Bmax = Bmax;
    m->Tmax = Tmax;
    Activations *a = &m->acts;
    size_t qkn = qk ? 1 : 0;
    struct { float **p; size_t n; } table[] = {
        {&a->encoded, BT * C},
        {&a->ln1, L * BT * C}, {&a->ln1_mean, L * BT}, {&a->ln1_rstd, L * BT},
        {&a->qkv, L * BT * 3 * C},
        {&a->qkvn, qkn * L * BT * 3 * C}, {&a->qk_mean, qkn * L * BT * 2 * NH}, {&a->qk_rstd, qkn * L * BT * 2 * NH},
        {&a->att, L * Bmax * NH * Tmax * Tmax}, {&a->atty, L * BT * C},
        {&a->res2, L * BT * C},
        {&a->ln2, L * BT * C}, {&a->ln2_mean, L * BT}, {&a->ln2_rstd, L * BT},
        {&a->fch, L * BT * 4 * C}, {&a->fch_gelu, L * BT * 4 * C}, {&a->res3, L * BT * C},
        {&a->lnf, BT * C}, {&a->lnf_mean, BT}, {&a->lnf_rstd, BT},
        {&a->logits, BT * Vp}, {&a->losses, BT}, {&a->lin_saved, saved},
        {&a->dres, BT * C}, {&a->dln, BT * C}, {&a->datty, BT * C}, {&a->dqkv, BT * 3 * C},
        {&a->dqkvn, qkn * BT * 3 * C}, {&a->dfch_gelu, BT * 4 * C}, {&a->dfch, BT * 4 * C},
        {&a->lin_scratch, scratch}, {&a->dweff, dweff},
    };
    size_t total = 0;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) total += table[i].n;
    m->act_memory = xcalloc(total * sizeof(float));
    float *p = m->act_memory;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) { *table[i].p = p; p += table[i].n; }
    m->mean_loss = -1.0f;
}

static void gpt2_free(GPT2 *m) {
    free(m->params); free(m->grads); free(m->m); free(m->v); free(m->weff); free(m->moe_load);
    free(m->act_memory); free(m->layers);
}

// Init from each tensor's init_std (set by gpt2_build): embeddings N(0, 0.02); dense matrices as
// GPT-2 and structured cores as llmc/structure.h says (DESIGN 3.7); biases 0; LayerNorm weights and
// gamma 1. Tensors drawn in table order from one generator; zero and one tensors draw nothing.
static void gpt2_init_weights(GPT2 *m, uint64_t seed) {
    memset(m->params, 0, m->num_params * sizeof(float));
    param_init(&m->pt, m->params, seed);
}

// ----------------------------------------------------------------------------------------------
// Forward and backward of the whole model

// The weights a linear layer's forward multiplies by: its cores, or under rms_cap the effective
// cores gamma W / max(1, RMS(W)/sigma) (recomputed here, as the weights change every step).
static const float *linear_core(GPT2 *m, const Linear *lin, int c, int recompute) {
    if (c >= lin->s.ncores) return NULL;
    if (lin->gamma[c] < 0) return P(m, lin->core[c]);
    float *weff = m->weff + lin->weff[c];
    if (recompute) rms_cap_forward(weff, P(m, lin->core[c]), m->pt.t[lin->core[c]].size, *P(m, lin->gamma[c]),
                                   lin->s.mup_sigma[c]);
    return weff;
}

// out (N, d_out) = S(inp (N, d_in)) + b; btt_moe also sets lin->aux and its expert load.
static void linear_forward(GPT2 *m, Linear *lin, float *out, const float *inp, int N) {
    const float *W0 = linear_core(m, lin, 0, 1), *W1 = linear_core(m, lin, 1, 1);
    float *saved = m->acts.lin_saved + lin->saved;
    if (lin->G >= 0) {
        lin->aux = moe_forward(&lin->s, out, inp, W0, W1, P(m, lin->G), m->cfg.model.moe_z_weight, saved,
                               m->acts.lin_scratch, N, m->moe_load + lin->load);
    } else {
        structured_forward(&lin->s, out, inp, W0, W1, saved, m->acts.lin_scratch, N);
    }
    const float *b = P(m, lin->b);
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *y = out + (size_t)n * lin->d_out;
        for (int o = 0; o < lin->d_out; o++) y[o] += b[o];
    }
}
// dinp (N, d_in) = S'(dout) (overwritten); the cores' (gammas', router's) and the bias's gradients += ...
// btt_moe's router also receives the aux loss's gradient, scaled by m->moe_daux.
// Under rms_cap the driver's weight gradient goes to dweff, then through the cap to W and gamma.
static void linear_backward(GPT2 *m, const Linear *lin, float *dinp, const float *dout, const float *inp, int N) {
    const Structure *s = &lin->s;
    float *dW[2] = {NULL, NULL}, *dweff = m->acts.dweff;
    for (int c = 0; c < s->ncores; c++) {
        size_t n = m->pt.t[lin->core[c]].size;
        if (lin->gamma[c] < 0) { dW[c] = G(m, lin->core[c]); continue; }
        dW[c] = dweff;
        memset(dweff, 0, n * sizeof(float));
        dweff += n;
    }
    const float *W0 = linear_core(m, lin, 0, 0), *W1 = linear_core(m, lin, 1, 0), *saved = m->acts.lin_saved + lin->saved;
    if (lin->G >= 0) {
        moe_backward(s, dinp, dW[0], dW[1], G(m, lin->G), dout, m->moe_daux, m->cfg.model.moe_z_weight, inp, W0, W1,
                     P(m, lin->G), saved, m->acts.lin_scratch, N);
    } else {
        structured_backward(s, dinp, dW[0], dW[1], dout, inp, W0, W1, saved, m->acts.lin_scratch, N);
    }
    for (int c = 0; c < s->ncores; c++) {
        if (lin->gamma[c] < 0) continue;
        int k = lin->core[c];
        rms_cap_backward(G(m, k), G(m, lin->gamma[c]), dW[c], P(m, k), m->pt.t[k].size, *P(m, lin->gamma[c]),
                         s->mup_sigma[c]);
    }
    float *db = G(m, lin->b);
    #pragma omp parallel for
    for (int o = 0; o < lin->d_out; o++) {
        float sum = 0.0f;
        for (int n = 0; n < N; n++) sum += dout[(size_t)n * lin->d_out + o];
        db[o] += sum;
    }
}

// Per-layer activation pointers for the current (B, T): layer l's slice of each (L, ...) buffer.
typedef struct { float *ln1, *ln1_mean, *ln1_rstd, *qkv, *qkvn, *qk_mean, *qk_rstd, *att, *atty, *res2,
                 *ln2, *ln2_mean, *ln2_rstd, *fch, *fch_gelu, *res3; } LayerActs;
static LayerActs layer_acts(GPT2 *m, int l) {
    Activations *a = &m->acts;
    size_t BT = (size_t)m->B * m->T, C = m->C, qk = m->cfg.model.qk_norm ? 1 : 0;
    LayerActs la = {
        a->ln1 + l * BT * C, a->ln1_mean + l * BT, a->ln1_rstd + l * BT, a->qkv + l * BT * 3 * C,
        a->qkvn + qk * l * BT * 3 * C, a->qk_mean + qk * l * BT * 2 * m->NH, a->qk_rstd + qk * l * BT * 2 * m->NH,
        a->att + l * (size_t)m->B * m->NH * m->T * m->T, a->atty + l * BT * C, a->res2 + l * BT * C,
        a->ln2 + l * BT * C, a->ln2_mean + l * BT, a->ln2_rstd + l * BT,
        a->fch + l * BT * 4 * C, a->fch_gelu + l * BT * 4 * C, a->res3 + l * BT * C};
    return la;
}
static const float *layer_input(GPT2 *m, int l) {
    return l == 0 ? m->acts.encoded : layer_acts(m, l - 1).res3;
}

// inputs, targets (B,T); targets may be NULL (then acts.logits holds the logits (B,T,Vp)).
// With targets: acts.losses (B,T), m->mean_loss (the cross-entropy), and acts.logits holds the
// probabilities. m->aux_loss: the mean aux loss of the btt_moe layers (DESIGN 3.6).
static void gpt2_forward(GPT2 *m, const int *inputs, const int *targets, int B, int T) {
    if (B > m->Bmax || T > m->Tmax || T > m->maxT) {
        fprintf(stderr, "error: forward (B=%d, T=%d) exceeds the allocation (%d, %d)\n", B, T, m->Bmax, m->Tmax);
        exit(1);
    }
    m->B = B; m->T = T; m->inputs = inputs; m->targets = targets;
    int C = m->C, N = B * T;
    Activations *a = &m->acts;
    encoder_forward(a->encoded, inputs, P(m, m->wte), P(m, m->wpe), B, T, C);
    for (int l = 0; l < m->L; l++) {
        LayerParams *lp = &m->layers[l];
        LayerActs la = layer_acts(m, l);
        const float *x = layer_input(m, l);
        layernorm_forward(la.ln1, la.ln1_mean, la.ln1_rstd, x, P(m, lp->ln1w), P(m, lp->ln1b), N, C);
        linear_forward(m, &lp->lin[LIN_ATTN_QKV], la.qkv, la.ln1, N);
        const float *qkv = la.qkv;
        if (lp->qkw >= 0) {
            qknorm_forward(la.qkvn, la.qk_mean, la.qk_rstd, la.qkv, P(m, lp->qkw), P(m, lp->qkb), P(m, lp->kkw),
                           P(m, lp->kkb), N, C, m->NH);
            qkv = la.qkvn;
        }
        attention_forward(la.atty, la.att, qkv, B, T, C, m->NH, m->attn_scale);
        linear_forward(m, &lp->lin[LIN_ATTN_PROJ], la.res2, la.atty, N);   // attn_proj into res2 ...
        residual_forward(la.res2, x, la.res2, (size_t)N * C);               // ... then res2 = x + it
        layernorm_forward(la.ln2, la.ln2_mean, la.ln2_rstd, la.res2, P(m, lp->ln2w), P(m, lp->ln2b), N, C);
        linear_forward(m, &lp->lin[LIN_MLP_FC], la.fch, la.ln2, N);
        gelu_forward(la.fch_gelu, la.fch, (size_t)N * 4 * C);
        linear_forward(m, &lp->lin[LIN_MLP_PROJ], la.res3, la.fch_gelu, N);
        residual_forward(la.res3, la.res2, la.res3, (size_t)N * C);
    }
    double aux = 0.0;
    for (int l = 0; l < m->L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) if (m->layers[l].lin[k].G >= 0) aux += m->layers[l].lin[k].aux;
    m->aux_loss = m->n_moe ? (float)(aux / m->n_moe) : 0.0f;
    layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, layer_input(m, m->L), P(m, m->lnfw), P(m, m->lnfb), N, C);
    matmul_forward(a->logits, a->lnf, P(m, m->wte), NULL, N, C, m->Vp);   // tied LM head
    if (!targets) { m->mean_loss = -1.0f; return; }
    softmax_crossentropy_forward(a->logits, a->losses, targets, N, m->V, m->Vp);
    double sum = 0.0;
    for (int i = 0; i < N; i++) sum += a->losses[i];
    m->mean_loss = (float)(sum / N);
}

static void gpt2_zero_grad(GPT2 *m) { memset(m->grads, 0, m->num_params * sizeof(float)); }

// Accumulates into m->grads the gradient of loss_scale * (mean loss + aux_weight * aux_loss) of the
// last forward with targets. Gradient accumulation over k micro-batches passes loss_scale = 1/k.
static void gpt2_backward(GPT2 *m, float loss_scale) {
    if (m->mean_loss < 0.0f) { fprintf(stderr, "error: backward needs a forward with targets\n"); exit(1); }
    int B = m->B, T = m->T, C = m->C, N = B * T;
    Activations *a = &m->acts;
    m->moe_daux = m->n_moe ? loss_scale * m->cfg.model.moe_aux_weight / m->n_moe : 0.0f;
    softmax_crossentropy_backward(a->logits, m->targets, N, m->Vp, loss_scale / N);
    matmul_backward(a->dln, G(m, m->wte), NULL, a->logits, a->lnf, P(m, m->wte), N, C, m->Vp);
    memset(a->dres, 0, (size_t)N * C * sizeof(float));
    layernorm_backward(a->dres, G(m, m->lnfw), G(m, m->lnfb), a->dln, layer_input(m, m->L),
                       P(m, m->lnfw), a->lnf_mean, a->lnf_rstd, N, C);
    // dres carries d(residual stream); each block adds its branches' input gradients to it
    for (int l = m->L - 1; l >= 0; l--) {
        LayerParams *lp = &m->layers[l];
        LayerActs la = layer_acts(m, l);
        const float *x = layer_input(m, l);
        linear_backward(m, &lp->lin[LIN_MLP_PROJ], a->dfch_gelu, a->dres, la.fch_gelu, N);
        gelu_backward(a->dfch, la.fch, a->dfch_gelu, (size_t)N * 4 * C);
        linear_backward(m, &lp->lin[LIN_MLP_FC], a->dln, a->dfch, la.ln2, N);
        layernorm_backward(a->dres, G(m, lp->ln2w), G(m, lp->ln2b), a->dln, la.res2, P(m, lp->ln2w),
                           la.ln2_mean, la.ln2_rstd, N, C);
        linear_backward(m, &lp->lin[LIN_ATTN_PROJ], a->datty, a->dres, la.atty, N);
        if (lp->qkw >= 0) {
            attention_backward(a->dqkvn, a->datty, la.qkvn, la.att, B, T, C, m->NH, m->attn_scale);
            qknorm_backward(a->dqkv, G(m, lp->qkw), G(m, lp->qkb), G(m, lp->kkw), G(m, lp->kkb), a->dqkvn, la.qkv,
                            P(m, lp->qkw), P(m, lp->kkw), la.qk_mean, la.qk_rstd, N, C, m->NH);
        } else {
            attention_backward(a->dqkv, a->datty, la.qkv, la.att, B, T, C, m->NH, m->attn_scale);
        }
        linear_backward(m, &lp->lin[LIN_ATTN_QKV], a->dln, a->dqkv, la.ln1, N);
        layernorm_backward(a->dres, G(m, lp->ln1w), G(m, lp->ln1b), a->dln, x, P(m, lp->ln1w),
                           la.ln1_mean, la.ln1_rstd, N, C);
    }
    encoder_backward(G(m, m->wte), G(m, m->wpe), a->dres, m->inputs, B, T, C);
}

// Global L2 norm of the gradients, summed in double in a fixed order (reproducible).
static float gpt2_grad_norm(GPT2 *m) {
    double s = 0.0;
    #pragma omp parallel for reduction(+:s) schedule(static)
    for (size_t i = 0; i < m->num_params; i++) s += (double)m->grads[i] * m->grads[i];
    return (float)sqrt(s);
}

// AdamW with decoupled weight decay (matrices and cores only), step t >= 1, gradients scaled by
// grad_scale (the clipping factor), each tensor at its own lr (mup): p -= lr_t (mhat / (sqrt(vhat) + eps) + wd p)
static void gpt2_update(GPT2 *m, float lr, float grad_scale, int t) {
    const Config *c = &m->cfg;
    float b1 = c->optim.beta1, b2 = c->optim.beta2, eps = c->optim.eps;
    float bc1 = 1.0f - powf(b1, (float)t), bc2 = 1.0f - powf(b2, (float)t);
    for (int k = 0; k < m->pt.n; k++) {
        ParamTensor *tn = &m->pt.t[k];
        float wd = tn->decay ? c->optim.weight_decay : 0.0f, tlr = lr * tn->lr_mult;
        float *p = m->params + tn->offset, *g = m->grads + tn->offset;
        float *mm = m->m + tn->offset, *vv = m->v + tn->offset;
        #pragma omp parallel for
        for (size_t i = 0; i < tn->size; i++) {
            float gi = g[i] * grad_scale;
            mm[i] = b1 * mm[i] + (1.0f - b1) * gi;
            vv[i] = b2 * vv[i] + (1.0f - b2) * gi * gi;
            float mhat = mm[i] / bc1, vhat = vv[i] / bc2;
            p[i] -= tlr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
        }
    }
}

// The optimizer step for 0-based step `step` on the accumulated gradients: clip by the global
// norm, take the scheduled lr, AdamW. Returns the norm before clipping; *lr_out gets the lr.
static float gpt2_optimizer_step(GPT2 *m, int step, float *lr_out) {
    float norm = gpt2_grad_norm(m), clip = m->cfg.optim.grad_clip;
    float scale = (clip > 0.0f && norm > clip) ? clip / norm : 1.0f;
    *lr_out = lr_at_step(&m->cfg, step);
    gpt2_update(m, *lr_out, scale, step + 1);
    return norm;
}

// Training FLOPs per token at context T (llmc/params.h: the linear layers' real MACs, attention, LM head)
static double gpt2_flops_per_token(const GPT2 *m, int T) {
    Structure st[NUM_LINEAR];
    for (int k = 0; k < NUM_LINEAR; k++) st[k] = m->layers[0].lin[k].s;
    return model_flops_per_token(&m->cfg, st, T);
}

// ----------------------------------------------------------------------------------------------
// Checkpoints (DESIGN section 5): model.safetensors (params) and state.safetensors (AdamW m, v)

typedef struct {
    int step;                  // completed optimizer steps
    long long tokens;          // tokens trained on
    char dataloader[512];      // train loader position
} TrainState;

// RUN/ckpt_%08d/ written atomically: model.safetensors (parameters), state.safetensors (m., v.)
static int gpt2_save_checkpoint(GPT2 *m, const char *run_dir, const TrainState *st, char *err) {
    char tmp[1100], path[1200], step_s[32], tokens_s[32];
    if (checkpoint_begin(run_dir, st->step, tmp, sizeof tmp, err, ERRLEN)) return -1;
    char *config = config_to_json(&m->cfg);
    snprintf(step_s, sizeof step_s, "%d", st->step);
    snprintf(tokens_s, sizeof tokens_s, "%lld", st->tokens);
    const char *keys[] = {"format", "config", "step", "tokens", "dataloader"};
    const char *vals[] = {"structured-gpt2/1", config, step_s, tokens_s, st->dataloader};
    const char *model_prefix[] = {""}, *state_prefix[] = {"m.", "v."};
    float *model_base[] = {m->params}, *state_base[] = {m->m, m->v};
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    int rc = param_write_file(&m->pt, path, model_prefix, model_base, 1, keys, vals, 4, err, ERRLEN);
    if (!rc) {
        snprintf(path, sizeof path, "%s/state.safetensors", tmp);
        rc = param_write_file(&m->pt, path, state_prefix, state_base, 2, keys, vals, 5, err, ERRLEN);
    }
    free(config);
    if (rc) return -1;
    return checkpoint_commit(run_dir, st->step, m->cfg.checkpoint.keep, err, ERRLEN);
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
    if (got == 1 && magic == 20240326) return param_load_llmc(&m->pt, &m->cfg, file, m->params, err, ERRLEN);
    SafeTensors st;
    if (safetensors_read(&st, file, err, ERRLEN)) return -1;
    int rc = param_load(&m->pt, &st, file, "", m->params, err, ERRLEN);
    safetensors_free(&st);
    return rc;
}

// --resume RUN: the newest complete checkpoint's config (with --set overrides), parameters, AdamW
// state, step, token count and data position.
static int gpt2_resume(GPT2 *m, Config *cfg, const CliArgs *args, TrainState *st, char *err) {
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
    gpt2_build(m, cfg, cfg->train.micro_batch, cfg->train.seq_len);
    int rc = param_load(&m->pt, &ms, path, "", m->params, err, ERRLEN);
    safetensors_free(&ms);
    if (rc) return -1;
    snprintf(path, sizeof path, "%s/state.safetensors", dir);
    if (safetensors_read(&ss, path, err, ERRLEN)) return -1;
    rc = param_load(&m->pt, &ss, path, "m.", m->m, err, ERRLEN) || param_load(&m->pt, &ss, path, "v.", m->v, err, ERRLEN);
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
        printf("resuming from %s (step %d, %lld tokens)\n", dir, st->step, st->tokens);
    }
    safetensors_free(&ss);
    return rc ? -1 : 0;
}

// ----------------------------------------------------------------------------------------------
// Evaluation and sampling

// Mean cross-entropy over up to max_batches batches of an in-order loader (all of it when
// max_batches <= 0); *aux gets the mean aux loss of the btt_moe layers (0 without them).
static double gpt2_evaluate(GPT2 *m, DataLoader *dl, int max_batches, long long *tokens, double *aux, char *err) {
    dataloader_reset(dl);
    size_t nb = dataloader_num_batches(dl);
    if (max_batches > 0 && (size_t)max_batches < nb) nb = (size_t)max_batches;
    double sum = 0.0, aux_sum = 0.0;
    for (size_t i = 0; i < nb; i++) {
        if (dataloader_next(dl, err, ERRLEN)) return -1.0;
        gpt2_forward(m, dl->inputs, dl->targets, m->Bmax, m->Tmax);
        sum += m->mean_loss;
        aux_sum += m->aux_loss;
    }
    *tokens = (long long)nb * m->Bmax * m->Tmax;
    *aux = nb ? aux_sum / nb : 0.0;
    return nb ? sum / nb : 0.0;
}

// Samples n tokens after <|endoftext|> at temperature 1, from a seed; returns them decoded (malloc'd).
static char *gpt2_sample(GPT2 *m, const Tokenizer *tok, int n, uint64_t seed) {
    int T = m->Tmax;
    int *gen = xmalloc((size_t)(n + 1) * sizeof(int));
    float *probs = xmalloc((size_t)m->V * sizeof(float));
    Rng rng;
    rng_seed(&rng, seed);
    gen[0] = GPT2_EOT;
    for (int i = 1; i <= n; i++) {
        int t = i < T ? i : T;                    // the last t tokens fit the context
        gpt2_forward(m, gen + i - t, NULL, 1, t);
        const float *z = m->acts.logits + (size_t)(t - 1) * m->Vp;
        float maxv = -INFINITY, sum = 0.0f;
        for (int v = 0; v < m->V; v++) if (z[v] > maxv) maxv = z[v];
        for (int v = 0; v < m->V; v++) { probs[v] = expf(z[v] - maxv); sum += probs[v]; }
        for (int v = 0; v < m->V; v++) probs[v] /= sum;
        gen[i] = sample_from_probs(probs, m->V, rng_float(&rng));
    }
    size_t len;
    char *text = tokenizer_decode(tok, gen + 1, n, &len);
    free(gen);
    free(probs);
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

// The start-up summary (llmc/params.h), printed; returns its JSON record for log.jsonl (malloc'd).
static char *print_summary(const GPT2 *m, int step) {
    Structure st[NUM_LINEAR];
    for (int k = 0; k < NUM_LINEAR; k++) st[k] = m->layers[0].lin[k].s;
    return model_summary(&m->pt, &m->cfg, st, m->Tmax, step);
}

// aux[j] += w * (the j-th btt_moe layer's aux loss in the last forward), layers in model order
static void moe_layer_aux(const GPT2 *m, float *aux, float w) {
    int j = 0;
    for (int l = 0; l < m->L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) if (m->layers[l].lin[k].G >= 0) aux[j++] += w * m->layers[l].lin[k].aux;
}

// Appends to a train log record ", \"moe\": [...]": per btt_moe layer its aux loss and expert load
// (the fraction of routed slots per expert; both averaged over the step's micro-batches; loads as
// laid out in m->moe_load, aux in layer order) and max/mean of the load (1 is perfectly balanced, E
// is everything on one expert). Returns the largest max/mean, for the console.
static float moe_load_record(const GPT2 *m, const float *loads, const float *aux, char *buf, size_t cap) {
    size_t len = 0;
    int j = 0;
    float worst = 0.0f;
    len += snprintf(buf + len, cap - len, ", \"moe\": [");
    int first = 1;
    for (int l = 0; l < m->L; l++) {
        for (int k = 0; k < NUM_LINEAR; k++) {
            const Linear *lin = &m->layers[l].lin[k];
            if (lin->G < 0 || len >= cap) continue;
            int E = lin->s.experts;
            const float *load = loads + lin->load;
            float mx = 0.0f;
            for (int e = 0; e < E; e++) if (load[e] > mx) mx = load[e];
            float ratio = mx * E;   // max / mean, the mean being 1/E
            if (ratio > worst) worst = ratio;
            len += snprintf(buf + len, cap - len, "%s{\"layer\": \"h.%d.%s\", \"aux_loss\": %.6f, \"load\": [",
                            first ? "" : ", ", l, linear_names[k], aux[j++]);
            for (int e = 0; e < E && len < cap; e++) len += snprintf(buf + len, cap - len, "%s%.4f", e ? ", " : "", load[e]);
            if (len < cap) len += snprintf(buf + len, cap - len, "], \"max_over_mean\": %.4f}", ratio);
            first = 0;
        }
    }
    if (len < cap) snprintf(buf + len, cap - len, "]");
    return worst;
}

#ifndef TESTING
int main(int argc, char **argv) {
    char err[ERRLEN];
    CliArgs args;
    if (cli_parse(argc, argv, &args, err, sizeof err)) {
        fprintf(stderr, "error: %s\n(see %s --help)\n", err, argv[0]);
        return 2;
    }
    if (args.help) { cli_print_help(stdout, argv[0]); return 0; }

    Config cfg;
    GPT2 model;
    TrainState st = {0};
    if (args.resume_dir) {
        if (args.config_path) fail("--resume takes the config stored in the checkpoint; change keys with --set");
        if (args.init_from) fail("--resume and --init-from exclude each other");
        if (gpt2_resume(&model, &cfg, &args, &st, err)) fail(err);
    } else {
        const char *path = args.config_path;
        struct stat sb;
        if (!path && stat("configs/default.json", &sb) == 0) path = "configs/default.json";
        if (config_load(&cfg, path, args.sets, args.nsets, 1, err, sizeof err)) fail(err);
        gpt2_build(&model, &cfg, cfg.train.micro_batch, cfg.train.seq_len);
        if (args.init_from) {
            if (gpt2_init_from(&model, args.init_from, err)) fail(err);
            printf("weights from %s\n", args.init_from);
        } else {
            gpt2_init_weights(&model, cfg.train.seed);
        }
    }
    int B = cfg.train.micro_batch, T = cfg.train.seq_len;
    printf("threads: %d (OMP_NUM_THREADS)\n", omp_get_max_threads());
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
        dataloader_free(&dl);
        gpt2_free(&model);
        free(summary);
        return 0;
    }

    // data, tokenizer (for samples), run directory
    int accum = (int)(cfg.train.batch_tokens / ((long)B * T));
    DataLoader train, val;
    int have_val = cfg.data.val[0] != '\0';
    if (dataloader_init(&train, cfg.data.train, cfg.data.format, B, T, cfg.model.vocab_size, cfg.train.seed, 1, 0, 1,
                        err, sizeof err)) fail(err);
    if (st.dataloader[0] && dataloader_seek(&train, st.dataloader, err, sizeof err)) fail(err);
    if (have_val && dataloader_init(&val, cfg.data.val, cfg.data.format, B, T, cfg.model.vocab_size, 0, 0, 0, 1,
                                    err, sizeof err)) fail(err);
    Tokenizer tok;
    int have_tok = cfg.sample.every > 0 || cfg.sample.tokens > 0;
    if (have_tok && tokenizer_load(&tok, "data/gpt2.tiktoken", err, sizeof err)) {
        fprintf(stderr, "warning: no samples: %s\n", err);
        have_tok = 0;
    }
    const char *run_dir = cfg.run.dir;
    char path[1200], ckpt[1100];
    int last_ckpt;
    if (!args.resume_dir && checkpoint_latest(run_dir, ckpt, sizeof ckpt, &last_ckpt) == 0) {
        snprintf(err, sizeof err, "%s already holds checkpoints (%s): continue it with --resume %s, "
                 "or start a new run with --set run.dir=OTHER", run_dir, ckpt, run_dir);
        fail(err);
    }
    if (ckpt_mkdirs(run_dir) != 0) {
        snprintf(err, sizeof err, "%s: cannot create directory: %s", run_dir, strerror(errno));
        fail(err);
    }
    snprintf(path, sizeof path, "%s/config.json", run_dir);
    char *config_json = config_to_json(&cfg);
    FILE *cf = fopen(path, "w");
    if (!cf || fputs(config_json, cf) < 0 || fclose(cf) != 0) { snprintf(err, sizeof err, "%s: cannot write", path); fail(err); }
    free(config_json);
    Logger log;
    if (args.resume_dir && logger_truncate_after(run_dir, st.step, err, sizeof err)) fail(err);
    if (logger_open(&log, run_dir, args.resume_dir != NULL, err, sizeof err)) fail(err);
    logger_write(&log, summary);
    free(summary);
    snprintf(path, sizeof path, "%s/samples.txt", run_dir);

    signal(SIGINT, on_stop_signal);
    signal(SIGTERM, on_stop_signal);
    double flops_per_token = gpt2_flops_per_token(&model, T);
    printf("batch: %d x %d tokens x %d accumulation = %ld tokens per step; %d steps; run dir %s\n",
           B, T, accum, cfg.train.batch_tokens, cfg.train.max_steps, run_dir);
    static char line[65536];
    size_t n_load = 0;
    for (int l = 0; l < model.L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) if (model.layers[l].lin[k].G >= 0) n_load += model.layers[l].lin[k].s.experts;
    float *step_load = xcalloc(n_load * sizeof(float));   // the step's expert loads, averaged over micro-batches
    float *step_aux = xcalloc(model.n_moe * sizeof(float)); // and each btt_moe layer's aux loss
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
            for (size_t i = 0; i < n_load; i++) step_load[i] += model.moe_load[i] / accum;
            moe_layer_aux(&model, step_aux, 1.0f / accum);
        }
        float lr, norm = gpt2_optimizer_step(&model, step, &lr);
        double ms = now_ms() - t0;
        st.step = step + 1;
        st.tokens += cfg.train.batch_tokens;
        double tps = cfg.train.batch_tokens / (ms / 1e3);
        char moe[64] = "";
        int len = snprintf(line, sizeof line, "{\"type\": \"train\", \"step\": %d, \"loss\": %.6f, \"aux_loss\": %.6f, "
                           "\"lr\": %.6g, \"grad_norm\": %.6f, \"tokens\": %lld, \"ms\": %.3f, \"tok_per_s\": %.1f, "
                           "\"flops_per_token\": %.6g, \"mfu\": null", st.step, loss, aux, lr, norm, st.tokens, ms, tps,
                           flops_per_token);
        if (model.n_moe) {
            float worst = moe_load_record(&model, step_load, step_aux, line + len, sizeof line - len);
            snprintf(moe, sizeof moe, " | aux %.4f | load max/mean %.2f", aux, worst);
            memset(step_load, 0, n_load * sizeof(float));
            memset(step_aux, 0, model.n_moe * sizeof(float));
        }
        strncat(line, "}", sizeof line - strlen(line) - 1);
        printf("step %5d/%d | loss %.4f%s | lr %.2e | norm %.3f | %.1f ms | %.0f tok/s\n",
               st.step, cfg.train.max_steps, loss, moe, lr, norm, ms, tps);
        fflush(stdout);
        logger_write(&log, line);

        int periodic = cfg.checkpoint.every > 0 && st.step % cfg.checkpoint.every == 0;
        if (periodic || stop_signal || st.step == cfg.train.max_steps) {
            dataloader_position(&train, st.dataloader, sizeof st.dataloader);
            if (gpt2_save_checkpoint(&model, run_dir, &st, err)) fail(err);
            printf("checkpoint: %s/ckpt_%08d\n", run_dir, st.step);
        }
        if (stop_signal) {
            printf("stopped by signal %d after step %d; resume with: %s --resume %s\n",
                   (int)stop_signal, st.step, argv[0], run_dir);
            break;
        }
    }
    logger_close(&log);
    free(step_load);
    free(step_aux);
    dataloader_free(&train);
    if (have_val) dataloader_free(&val);
    if (have_tok) tokenizer_free(&tok);
    gpt2_free(&model);
    return 0;
}
#endif
