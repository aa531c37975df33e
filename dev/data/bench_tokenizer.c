// Tokenizer throughput: llmc/tokenizer.h on one thread and on all cores (OpenMP over documents).
// Run by dev/data/bench_tokenizer, which times npm tiktoken on the same documents and prints ratios.
//   build/bench_tokenizer TEXT_FILE [RANKS_FILE]
// Documents are the text split on "\n\n" (empty pieces dropped), the same split bench_tiktoken.js
// makes. Prints one line "name=value ..." for the script to parse: each timing is the best of 3.
#include <omp.h>
#include <time.h>
#include "llmc/tokenizer.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef struct { size_t off, len; } Doc;

// Encodes every document, each thread appending into its own buffer; returns the total token count.
static size_t encode_all(const Tokenizer *tok, const char *text, const Doc *docs, long ndocs, int threads) {
    size_t total = 0;
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(+ : total, failed)
    {
        TokenBuf buf = {0};
        #pragma omp for schedule(dynamic, 64)
        for (long d = 0; d < ndocs; d++) {
            buf.len = 0;
            failed += tokenizer_encode(tok, text + docs[d].off, docs[d].len, &buf) != 0;
            total += buf.len;
        }
        tokenbuf_free(&buf);
    }
    if (failed) { fprintf(stderr, "bench_tokenizer: %d documents failed to encode\n", failed); exit(1); }
    return total;
}

static double best_of_3(const Tokenizer *tok, const char *text, const Doc *docs, long ndocs, int threads,
                        size_t *ntok) {
    double best = 1e30;
    for (int r = 0; r < 3; r++) {
        double t0 = now_s();
        *ntok = encode_all(tok, text, docs, ndocs, threads);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    return best;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s TEXT_FILE [RANKS_FILE]\n", argv[0]); return 2; }
    const char *ranks = argc > 2 ? argv[2] : "data/gpt2.tiktoken";
    char err[512];
    Tokenizer tok;
    if (tokenizer_load(&tok, ranks, err, sizeof(err)) != 0) { fprintf(stderr, "%s\n", err); return 1; }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 1; }
    fseek(f, 0, SEEK_END);
    size_t n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = (char *)malloc(n + 1);
    if (!text || fread(text, 1, n, f) != n) { fprintf(stderr, "%s: read error\n", argv[1]); return 1; }
    fclose(f);
    text[n] = '\0';

    long ndocs = 0, cap = 1024;
    Doc *docs = (Doc *)malloc(cap * sizeof(Doc));
    for (size_t p = 0; p <= n;) {
        char *sep = strstr(text + p, "\n\n");
        size_t end = sep ? (size_t)(sep - text) : n;
        if (end > p) {
            if (ndocs == cap) docs = (Doc *)realloc(docs, (cap *= 2) * sizeof(Doc));
            docs[ndocs++] = (Doc){p, end - p};
        }
        p = end + 2;
    }

    int cores = omp_get_num_procs();
    size_t tok1, tokN;
    encode_all(&tok, text, docs, ndocs, 1);   // warm-up: page in the text and the rank table
    double t1 = best_of_3(&tok, text, docs, ndocs, 1, &tok1);
    double tN = best_of_3(&tok, text, docs, ndocs, cores, &tokN);
    if (tok1 != tokN) {
        fprintf(stderr, "bench_tokenizer: %zu tokens on 1 thread, %zu on %d\n", tok1, tokN, cores);
        return 1;
    }
    printf("bytes=%zu docs=%ld tokens=%zu cores=%d single_s=%.4f all_s=%.4f single_tok_s=%.0f all_tok_s=%.0f\n",
           n, ndocs, tok1, cores, t1, tN, tok1 / t1, tokN / tN);
    free(docs);
    free(text);
    tokenizer_free(&tok);
    return 0;
}
