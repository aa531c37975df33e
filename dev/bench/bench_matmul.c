// Our matmul (train_gpt2.c's matmul_forward + matmul_backward) against raw OpenBLAS cblas_sgemm doing the
// same three GEMMs, on the model's largest matmul: the tied LM head, (B*T, C) x (C, Vp), no bias.
//   forward  out  (N,Vp) = inp (N,C) W^T         W (Vp,C)
//   backward dinp (N,C)  = dout (N,Vp) W
//            dW   (Vp,C) += dout^T inp
// FLOPs per forward+backward: 3 * 2 * N * C * Vp. Median over REPS after WARMUP, ours and raw interleaved.
// Usage: build/bench/bench_matmul [CONFIG.json] [reps]   (shapes from the config's model and train.micro_batch x seq_len)
// Prints one line of key=value pairs (read by dev/bench/bench_cpu).
#include "train_gpt2.c"

#define WARMUP 2

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void raw_sgemms(float *out, float *dinp, float *dW, const float *dout, const float *inp, const float *W,
                       int N, int IC, int OC) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, IC, 1.0f, inp, IC, W, IC, 0.0f, out, OC);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IC, OC, 1.0f, dout, OC, W, IC, 0.0f, dinp, IC);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dW, IC);
}

static float *filled(size_t n, uint64_t *s) {
    float *p = malloc(n * sizeof *p);
    if (!p) { fprintf(stderr, "bench_matmul: out of memory\n"); exit(1); }
    for (size_t i = 0; i < n; i++) {
        *s = *s * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (float)((double)(*s >> 40) / (double)(1ull << 24) - 0.5) * 0.04f;
    }
    return p;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "configs/default.json";
    int reps = argc > 2 ? atoi(argv[2]) : 10;
    if (reps < 1) reps = 1;
    char err[ERRLEN];
    Config cfg;
    if (config_load(&cfg, path, NULL, 0, 1, err, sizeof err)) { fprintf(stderr, "bench_matmul: %s\n", err); return 1; }
    int N = cfg.train.micro_batch * cfg.train.seq_len, IC = cfg.model.n_embd, OC = cfg.model.padded_vocab_size;

    uint64_t s = 1337;
    float *inp = filled((size_t)N * IC, &s), *W = filled((size_t)OC * IC, &s), *dout = filled((size_t)N * OC, &s);
    float *out = calloc((size_t)N * OC, sizeof(float)), *dinp = calloc((size_t)N * IC, sizeof(float));
    float *dW = calloc((size_t)OC * IC, sizeof(float));
    if (!out || !dinp || !dW) { fprintf(stderr, "bench_matmul: out of memory\n"); return 1; }

    double *t_ours = malloc(reps * sizeof(double)), *t_raw = malloc(reps * sizeof(double));
    for (int r = -WARMUP; r < reps; r++) {
        double t0 = now_ms();
        matmul_forward(out, inp, W, NULL, N, IC, OC);
        matmul_backward(dinp, dW, NULL, dout, inp, W, N, IC, OC);
        double t1 = now_ms();
        raw_sgemms(out, dinp, dW, dout, inp, W, N, IC, OC);
        double t2 = now_ms();
        if (r >= 0) { t_ours[r] = t1 - t0; t_raw[r] = t2 - t1; }
    }
    double flops = 3.0 * 2.0 * N * IC * OC;
    double ms_ours = median(t_ours, reps), ms_raw = median(t_raw, reps);
    printf("N=%d C=%d Vp=%d threads=%d reps=%d ours_ms=%.3f raw_ms=%.3f ours_gflops=%.2f raw_gflops=%.2f "
           "ratio=%.3f checksum=%.6g\n", N, IC, OC, omp_get_max_threads(), reps, ms_ours, ms_raw,
           flops / (ms_ours * 1e6), flops / (ms_raw * 1e6), ms_raw / ms_ours, (double)dinp[0] + dW[0] + out[0]);
    free(inp); free(W); free(dout); free(out); free(dinp); free(dW); free(t_ours); free(t_raw);
    return 0;
}
