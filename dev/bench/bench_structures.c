// Structured layers (llmc/blockdiag.h's structured_forward + structured_backward) at GPT-2 124M
// layer shapes: one forward + backward (dx, dW0, dW1) of N tokens per call, no bias.
// Structures: dense, blockdiag b=4, lowrank (default r), monarch b=4, btt (default factorization, r=1);
// shapes 768->2304, 768->768, 768->3072, 3072->768 (attn_qkv, attn_proj, mlp_fc, mlp_proj of C=768).
// Every repetition times every (structure, shape) once, interleaved, so noise from the shared machine
// spreads over all of them; each reports the median over reps after WARMUP.
// Usage: build/bench/bench_structures [N] [reps]     (N = 4096, reps = 3)
// Prints one line per (structure, shape): "RESULT struct=btt d_in=768 d_out=2304 ms=... macs=... dense_macs=..."
#include <time.h>
#include "llmc/blockdiag.h"

#define WARMUP 1

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static float *filled(size_t n, uint64_t *s) {
    float *p = malloc(n * sizeof *p);
    if (!p) { fprintf(stderr, "bench_structures: out of memory\n"); exit(1); }
    for (size_t i = 0; i < n; i++) {
        *s = *s * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (float)((double)(*s >> 40) / (double)(1ull << 24) - 0.5) * 0.04f;
    }
    return p;
}

typedef struct {
    Structure s;
    float *x, *dy, *y, *dx, *W0, *W1, *dW0, *dW1, *saved, *scratch;
    double *ms;
} Case;

int main(int argc, char **argv) {
    int N = argc > 1 ? atoi(argv[1]) : 4096, reps = argc > 2 ? atoi(argv[2]) : 3;
    if (N < 1 || reps < 1) { fprintf(stderr, "usage: %s [N] [reps]\n", argv[0]); return 1; }
    static const char *types[] = {"dense", "blockdiag", "lowrank", "monarch", "btt"};
    enum { NT = 5 };
    Case cases[NT * NUM_LINEAR];
    uint64_t seed = 1337;
    for (int t = 0; t < NT; t++) {
        for (int w = 0; w < NUM_LINEAR; w++) {
            Case *c = &cases[t * NUM_LINEAR + w];
            Config cfg;
            config_defaults(&cfg);
            strcpy(cfg.model.linear[w].type, types[t]);
            char err[512];
            if (structure_resolve(&c->s, &cfg, w, err, sizeof err)) { fprintf(stderr, "bench_structures: %s\n", err); return 1; }
            const Structure *s = &c->s;
            size_t n0 = (size_t)s->core[0].nb * s->core[0].p * s->core[0].q;
            size_t n1 = s->ncores == 2 ? (size_t)s->core[1].nb * s->core[1].p * s->core[1].q : 1;
            c->x = filled((size_t)N * s->d_in, &seed);
            c->dy = filled((size_t)N * s->d_out, &seed);
            c->W0 = filled(n0, &seed);
            c->W1 = filled(n1, &seed);
            c->y = calloc((size_t)N * s->d_out, sizeof(float));
            c->dx = calloc((size_t)N * s->d_in, sizeof(float));
            c->dW0 = calloc(n0, sizeof(float));
            c->dW1 = calloc(n1, sizeof(float));
            c->saved = calloc(structured_saved_floats(s, N) + 1, sizeof(float));
            c->scratch = calloc(structured_scratch_floats(s, N) + 1, sizeof(float));
            c->ms = malloc(reps * sizeof(double));
            if (!c->y || !c->dx || !c->dW0 || !c->dW1 || !c->saved || !c->scratch || !c->ms) {
                fprintf(stderr, "bench_structures: out of memory\n");
                return 1;
            }
        }
    }
    for (int r = -WARMUP; r < reps; r++) {
        for (int k = 0; k < NT * NUM_LINEAR; k++) {
            Case *c = &cases[k];
            double t0 = now_ms();
            structured_forward(&c->s, c->y, c->x, c->W0, c->W1, c->saved, c->scratch, N);
            structured_backward(&c->s, c->dx, c->dW0, c->dW1, c->dy, c->x, c->W0, c->W1, c->saved, c->scratch, N);
            double t1 = now_ms();
            if (r >= 0) c->ms[r] = t1 - t0;
        }
    }
    for (int k = 0; k < NT * NUM_LINEAR; k++) {
        Case *c = &cases[k];
        qsort(c->ms, reps, sizeof(double), cmp_double);
        double med = reps % 2 ? c->ms[reps / 2] : 0.5 * (c->ms[reps / 2 - 1] + c->ms[reps / 2]);
        printf("RESULT struct=%s d_in=%d d_out=%d ms=%.4f macs=%.0f dense_macs=%.0f\n", types[k / NUM_LINEAR],
               c->s.d_in, c->s.d_out, med, c->s.macs, c->s.dense_macs);
    }
    return 0;
}
