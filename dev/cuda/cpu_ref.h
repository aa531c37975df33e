// The CPU references of the structured-layer kernels (llmc/blockdiag.h, llmc/moe.h), compiled as C by
// gcc with the CPU trainer's flags (dev/cuda/cpu_ref.c; those headers are C, not C++) and linked into
// the dev/cuda programs and the emulation check. fp32 throughout; see the headers for the semantics.
#ifndef DEV_CUDA_CPU_REF_H
#define DEV_CUDA_CPU_REF_H
#include <math.h>
#include <stddef.h>
#include "llmc/structure.h"
#ifdef __cplusplus
extern "C" {
#endif
void ref_blockdiag_forward(float *y, int ldy, const float *x, int ldx, const float *W, int N, int nb, int p, int q, float beta);
void ref_blockdiag_backward_input(float *dx, int ldx, const float *dy, int ldy, const float *W, int N, int nb, int p, int q, float beta);
void ref_blockdiag_backward_weight(float *dW, const float *dy, int ldy, const float *x, int ldx, int N, int nb, int p, int q);
void ref_token_transpose(float *out, const float *in, int N, int a, int b, int r);
size_t ref_structured_saved_floats(const Structure *s, int N);
size_t ref_structured_scratch_floats(const Structure *s, int N);
void ref_structured_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1, float *saved,
                            float *scratch, int N);
void ref_structured_backward(const Structure *s, float *dx, float *dW0, float *dW1, const float *dy, const float *x,
                             const float *W0, const float *W1, const float *saved, float *scratch, int N);
size_t ref_moe_saved_floats(const Structure *s, int N);
size_t ref_moe_scratch_floats(const Structure *s, int N);
float ref_moe_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1, const float *G,
                      float z_weight, float *saved, float *scratch, int N, float *load);
void ref_moe_backward(const Structure *s, float *dx, float *dW0, float *dW1, float *dG, const float *dy, float daux,
                      float z_weight, const float *x, const float *W0, const float *W1, const float *G,
                      const float *saved, float *scratch, int N);
size_t ref_moe_dense_masked_saved_floats(const Structure *s, int N);
size_t ref_moe_dense_masked_scratch_floats(const Structure *s, int N);
float ref_moe_dense_masked_forward(const Structure *s, float *y, const float *x, const float *W0, const float *W1,
                                   const float *G, float z_weight, float *saved, float *scratch, int N, float *load);
#ifdef __cplusplus
}
#endif

// The structure of projection `which` (LIN_*) of a 2-layer model of width C with the given spec (0: the
// structure's default), resolved by llmc/structure.h as the trainers do; exits on an invalid spec.
static Structure dev_structure(int C, int which, const char *type, int blocks, int rank, int in_blocks, int out_blocks,
                               int experts, int top_k) {
    Config c;
    config_defaults(&c);
    c.model.n_embd = C;
    c.model.n_layer = 2;
    LinearSpec *sp = &c.model.linear[which];
    memset(sp, 0, sizeof *sp);
    snprintf(sp->type, sizeof sp->type, "%s", type);
    sp->blocks = blocks;
    sp->rank = rank;
    sp->in_blocks = in_blocks;
    sp->out_blocks = out_blocks;
    sp->experts = experts;
    sp->top_k = top_k;
    Structure s;
    char err[256];
    if (structure_resolve(&s, &c, which, err, sizeof err)) { fprintf(stderr, "structure: %s\n", err); exit(1); }
    return s;
}

// max |a - ref| / max |ref|: the error measure of every GPU and emulation check (NaN counts as worst)
static double ref_rel_err(const float *a, const float *ref, size_t n) {
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs((double)ref[i]));
    if (scale == 0.0) scale = 1.0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - ref[i]) / scale;
        if (!(e <= worst)) worst = e;
    }
    return worst;
}
#endif
