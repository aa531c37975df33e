// One BTT-MoE layer (llmc/moe.h), E experts, top-k, forward + backward on N tokens, at the four GPT-2 124M
// projection shapes (768 -> 2304, 768 -> 768, 768 -> 3072, 3072 -> 768; default BTT factorization), against:
//   (a) the baseline that computes all E experts on every token and masks them by the gates (the BTT-MoE
//       papers' way: moe_dense_masked_*): target masked / grouped >= 0.6 E/k;
//   (b) a single rank-1 BTT of one expert's shape on all N tokens (blockdiag.h's structured_forward +
//       structured_backward) run k times: the same core FLOPs without routing; target grouped / (k x BTT) <= 1.25.
// The three run interleaved within each repetition, after WARMUP repetitions. Reported: the median time
// of each, and each ratio as the median over repetitions of that repetition's ratio (paired, so that
// load from other processes, which drifts slowly, mostly cancels).
// Steady state: every buffer is allocated once per shape and first touched in the warm-up (first-touch
// page faults, ~15 us each on this VM, are not timed); the minor page faults of the timed repetitions are
// counted and printed per method, to show it.
// Usage: build/bench/bench_moe [REPS [N [E [K [cpu]]]]]   defaults 7, 4096, 8, 2; "cpu": time with the
//   process's CPU clock instead of the wall clock (meaningful with OMP_NUM_THREADS=1: a shared machine's
//   load then costs waiting, not CPU time).
#include <sys/resource.h>
#include <time.h>
#include "llmc/moe.h"

#define WARMUP 1

static clockid_t clock_id = CLOCK_MONOTONIC;
static double now_ms(void) {
    struct timespec t;
    clock_gettime(clock_id, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}
static long minor_faults(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_minflt;
}
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
// Buffers aligned to 64 bytes, as the trainer's (moe.h streams its output rows where they are aligned).
static float *zeros(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, (n ? n : 1) * sizeof(float))) { fprintf(stderr, "bench_moe: out of memory\n"); exit(1); }
    return memset(p, 0, (n ? n : 1) * sizeof(float));
}
static float *filled(size_t n, float scale, uint64_t *s) {  // uniform in +-scale/2
    float *p = zeros(n);
    for (size_t i = 0; i < n; i++) {
        *s = *s * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (float)((double)(*s >> 40) / (double)(1ull << 24) - 0.5) * scale;
    }
    return p;
}

static int resolve(Structure *s, int which, const char *type, int E, int k) {
    Config c;
    config_defaults(&c);
    LinearSpec *sp = &c.model.linear[which];
    memset(sp, 0, sizeof *sp);
    snprintf(sp->type, sizeof sp->type, "%s", type);
    sp->experts = E;
    sp->top_k = k;
    char err[512];
    if (structure_resolve(s, &c, which, err, sizeof err)) { fprintf(stderr, "bench_moe: %s\n", err); return -1; }
    return 0;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 7, N = argc > 2 ? atoi(argv[2]) : 4096;
    int E = argc > 3 ? atoi(argv[3]) : 8, K = argc > 4 ? atoi(argv[4]) : 2;
    if (argc > 5 && !strcmp(argv[5], "cpu")) clock_id = CLOCK_PROCESS_CPUTIME_ID;
    if (reps < 1 || N < 1 || E < 1 || K < 1 || K > E) {
        fprintf(stderr, "usage: bench_moe [REPS [N [E [K [cpu]]]]]\n");
        return 1;
    }
    printf("BTT-MoE layer, E=%d k=%d, N=%d tokens, forward+backward, fp32, %d threads, %s time, median of %d (after %d "
           "warm-up)\n", E, K, N, omp_get_max_threads(), clock_id == CLOCK_MONOTONIC ? "wall" : "CPU", reps, WARMUP);
    printf("%-10s %-10s %11s %11s %11s %9s %9s %6s\n", "proj", "shape", "grouped ms", "masked ms", "k*BTT ms",
           "masked/", "grouped/", "max");
    printf("%-10s %-10s %11s %11s %11s %9s %9s %6s\n", "", "", "", "", "", "grouped", "k*BTT", "load");
    double *sum_t[3], *ra = malloc(reps * sizeof(double)), *rb = malloc(reps * sizeof(double));  // sums over the 4
    for (int i = 0; i < 3; i++) sum_t[i] = calloc(reps, sizeof(double));
    long faults[3] = {0, 0, 0};  // minor page faults in the timed repetitions, per method
    uint64_t seed = 1337;
    for (int which = 0; which < NUM_LINEAR; which++) {
        Structure s, b;
        if (resolve(&s, which, "btt_moe", E, K) || resolve(&b, which, "btt", 0, 0)) return 1;
        int d_in = s.d_in, d_out = s.d_out;
        size_t n0w = (size_t)s.core[0].nb * s.core[0].p * s.core[0].q, n1w = (size_t)s.core[1].nb * s.core[1].p * s.core[1].q;
        // x, dy of unit scale; router weights uniform of std ~1.7/sqrt(d_in): logits of std ~1 (balanced routing)
        float *x = filled((size_t)N * d_in, 2.0f, &seed), *dy = filled((size_t)N * d_out, 2.0f, &seed);
        float *W0 = filled(n0w, 0.1f, &seed), *W1 = filled(n1w, 0.1f, &seed);
        float *G = filled((size_t)E * d_in, 6.0f / sqrtf((float)d_in), &seed);
        float *y = zeros((size_t)N * d_out), *dx = zeros((size_t)N * d_in), *load = zeros(E);
        float *dW0 = zeros(n0w), *dW1 = zeros(n1w), *dG = zeros((size_t)E * d_in);
        size_t sv = moe_saved_floats(&s, N), sc = moe_scratch_floats(&s, N);
        size_t msv = moe_dense_masked_saved_floats(&s, N), msc = moe_dense_masked_scratch_floats(&s, N);
        size_t bsv = structured_saved_floats(&b, N), bsc = structured_scratch_floats(&b, N);
        size_t big_sv = sv > msv ? sv : msv, big_sc = sc > msc ? sc : msc;
        if (bsv > big_sv) big_sv = bsv;
        if (bsc > big_sc) big_sc = bsc;
        float *saved = zeros(big_sv), *scratch = zeros(big_sc);
        double *t[3];
        for (int i = 0; i < 3; i++) t[i] = malloc(reps * sizeof(double));
        for (int r = -WARMUP; r < reps; r++) {
            long f0 = minor_faults();
            double t0 = now_ms();
            moe_forward(&s, y, x, W0, W1, G, 0.1f, saved, scratch, N, load);
            moe_backward(&s, dx, dW0, dW1, dG, dy, 0.01f, 0.1f, x, W0, W1, G, saved, scratch, N);
            double t1 = now_ms();
            long f1 = minor_faults();
            moe_dense_masked_forward(&s, y, x, W0, W1, G, 0.1f, saved, scratch, N, NULL);
            moe_dense_masked_backward(&s, dx, dW0, dW1, dG, dy, 0.01f, 0.1f, x, W0, W1, G, saved, scratch, N);
            double t2 = now_ms();
            long f2 = minor_faults();
            for (int j = 0; j < K; j++) {  // the rank-1 BTT's cores: the first floats of W0, W1
                structured_forward(&b, y, x, W0, W1, saved, scratch, N);
                structured_backward(&b, dx, dW0, dW1, dy, x, W0, W1, saved, scratch, N);
            }
            double t3 = now_ms();
            long f3 = minor_faults();
            if (r < 0) continue;
            faults[0] += f1 - f0; faults[1] += f2 - f1; faults[2] += f3 - f2;
            t[0][r] = t1 - t0; t[1][r] = t2 - t1; t[2][r] = t3 - t2;
            for (int i = 0; i < 3; i++) sum_t[i][r] += t[i][r];
            ra[r] = t[1][r] / t[0][r];
            rb[r] = t[0][r] / t[2][r];
        }
        double ms[3];
        for (int i = 0; i < 3; i++) { ms[i] = median(t[i], reps); free(t[i]); }
        double mra = median(ra, reps), mrb = median(rb, reps);
        moe_forward(&s, y, x, W0, W1, G, 0.1f, saved, scratch, N, load);
        float maxload = 0;
        for (int e = 0; e < E; e++) if (load[e] > maxload) maxload = load[e];
        char shape[32];
        snprintf(shape, sizeof shape, "%d->%d", d_in, d_out);
        printf("%-10s %-10s %11.2f %11.2f %11.2f %9.2f %9.3f %6.3f\n", linear_names[which], shape, ms[0], ms[1], ms[2],
               mra, mrb, maxload);
        free(x); free(dy); free(W0); free(W1); free(G); free(y); free(dx); free(load); free(dW0); free(dW1); free(dG);
        free(saved); free(scratch);
    }
    for (int r = 0; r < reps; r++) { ra[r] = sum_t[1][r] / sum_t[0][r]; rb[r] = sum_t[0][r] / sum_t[2][r]; }
    double mra = median(ra, reps), mrb = median(rb, reps), ms[3];
    for (int i = 0; i < 3; i++) ms[i] = median(sum_t[i], reps);
    printf("%-10s %-10s %11.2f %11.2f %11.2f %9.2f %9.3f\n", "all four", "", ms[0], ms[1], ms[2], mra, mrb);
    printf("(a) masked / grouped = %.2f (target >= 0.6 E/k = %.2f): %s\n", mra, 0.6 * E / K, mra >= 0.6 * E / K ? "met" : "NOT met");
    printf("(b) grouped / (k x rank-1 BTT) = %.3f, routing overhead %.0f%% (target <= 25%%): %s\n", mrb, 100 * (mrb - 1),
           mrb <= 1.25 ? "met" : "NOT met");
    printf("minor page faults per timed repetition (all four shapes): grouped %.1f, masked %.1f, k x BTT %.1f\n",
           (double)faults[0] / reps, (double)faults[1] / reps, (double)faults[2] / reps);
    for (int i = 0; i < 3; i++) free(sum_t[i]);
    free(ra); free(rb);
    return 0;
}
