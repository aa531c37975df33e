// Tokenizer tests: llmc/tokenizer.h against npm tiktoken's GPT-2 encoding.
// Fixtures (test/fixtures/tokenizer/*.u16, little-endian uint16 ids) come from
// dev/data/make_tokenizer_fixtures; see it for how the invalid-UTF-8 reference is built.
#include <omp.h>
#include <unistd.h>
#include "llmc/rand.h"
#include "llmc/tokenizer.h"
#include "test/test.h"

#define RANKS "data/gpt2.tiktoken"

// whole file, malloc'd (NUL-terminated) and *n set; NULL if unreadable
static char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = (char *)malloc(*n + 1);
    if (fread(s, 1, *n, f) != *n) { free(s); s = NULL; }
    else s[*n] = '\0';
    fclose(f);
    return s;
}

// index of the first difference between got and want (n ids each compared up to the shorter);
// the shorter length when one is a prefix of the other, -1 when equal
static long first_diff(const int *got, size_t ngot, const int *want, size_t nwant) {
    size_t n = ngot < nwant ? ngot : nwant;
    for (size_t i = 0; i < n; i++) if (got[i] != want[i]) return (long)i;
    return ngot == nwant ? -1 : (long)n;
}

// One fixture: the encoding equals tiktoken's, and decoding gives the input bytes back.
static void check_fixture(const Tokenizer *tok, const char *name, const char *input) {
    char fixture[256], cname[300];
    const char *engine = tok->jit ? "jit" : "interpreter";
    snprintf(fixture, sizeof(fixture), "test/fixtures/tokenizer/%s.u16", name);
    size_t ntext = 0, nbytes = 0;
    char *text = read_file(input, &ntext);
    unsigned char *raw = (unsigned char *)read_file(fixture, &nbytes);
    snprintf(cname, sizeof(cname), "%s [%s]: input and fixture readable", name, engine);
    check(text && raw && nbytes % 2 == 0, cname, "%s or %s missing (regenerate: dev/data/make_tokenizer_fixtures)",
          input, fixture);
    if (!text || !raw) { free(text); free(raw); return; }
    size_t nwant = nbytes / 2;
    int *want = (int *)malloc(nwant * sizeof(int) + 1);
    for (size_t i = 0; i < nwant; i++) want[i] = raw[2 * i] | raw[2 * i + 1] << 8;

    TokenBuf got = {0};
    int rc = tokenizer_encode(tok, text, ntext, &got);
    long d = first_diff(got.data, got.len, want, nwant);
    snprintf(cname, sizeof(cname), "%s [%s]: encode equals tiktoken (%zu tokens)", name, engine, nwant);
    check(rc == 0 && d < 0, cname, "rc %d, %zu vs %zu tokens, first difference at %ld: ours %d, tiktoken %d", rc,
          got.len, nwant, d, d >= 0 && (size_t)d < got.len ? got.data[d] : -1,
          d >= 0 && (size_t)d < nwant ? want[d] : -1);

    size_t nback;
    char *back = tokenizer_decode(tok, got.data, got.len, &nback);
    snprintf(cname, sizeof(cname), "%s [%s]: decode(encode(text)) == text", name, engine);
    check(back && nback == ntext && memcmp(back, text, ntext) == 0, cname, "%zu bytes back, %zu in", nback, ntext);
    free(back);
    tokenbuf_free(&got);
    free(want);
    free(raw);
    free(text);
}

// Writes a ranks file: the real one with line `line` (1-based) replaced by `repl` (NULL: keep),
// cut to `keep` lines, then `extra` appended (NULL: nothing).
static void write_ranks(const char *path, const char *real, size_t nreal, int line, const char *repl, int keep,
                        const char *extra) {
    FILE *f = fopen(path, "wb");
    const char *p = real, *end = real + nreal;
    for (int l = 1; l <= keep && p < end; l++) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        size_t len = eol ? (size_t)(eol - p) : (size_t)(end - p);
        if (l == line) fprintf(f, "%s\n", repl);
        else fprintf(f, "%.*s\n", (int)len, p);
        p += len + 1;
    }
    if (extra) fputs(extra, f);
    fclose(f);
}

static void check_refused(const char *name, const char *path, const char *want1, const char *want2) {
    Tokenizer t;
    char err[512] = "", cname[300];
    int rc = tokenizer_load(&t, path, err, sizeof(err));
    snprintf(cname, sizeof(cname), "ranks file refused: %s", name);
    check(rc == -1 && strstr(err, want1) && strstr(err, want2), cname, "rc %d, message '%s', expected '%s' and '%s'",
          rc, err, want1, want2);
    if (rc == 0) tokenizer_free(&t);
}

// One broken ranks file (see write_ranks) must be refused with "path:line_no:" and `what` in the message.
static void refused_case(const char *name, const char *path, const char *real, size_t nreal, int line,
                         const char *repl, int keep, const char *extra, int line_no, const char *what) {
    char want[400];
    write_ranks(path, real, nreal, line, repl, keep, extra);
    snprintf(want, sizeof(want), "%s:%d:", path, line_no);
    check_refused(name, path, want, what);
}

static void test_bad_ranks_files(void) {
    size_t nreal;
    char *real = read_file(RANKS, &nreal);
    char dir[] = "/tmp/test_tokenizer_XXXXXX", path[300], want[400];
    if (!real || !mkdtemp(dir)) {
        check(0, "ranks file refused: setup", "cannot read %s or make a temp dir", RANKS);
        free(real);
        return;
    }
    snprintf(path, sizeof(path), "%s/ranks.tiktoken", dir);
    const int N = GPT2_NUM_RANKS;
    refused_case("bad base64", path, real, nreal, 17, "ab$c 16", N, NULL, 17, "bad base64 'ab$c'");
    refused_case("base64 length not a multiple of 4", path, real, nreal, 18, "YWJ 17", N, NULL, 18, "bad base64");
    refused_case("base64 padding with stray bits", path, real, nreal, 19, "IR== 18", N, NULL, 19, "bad base64");
    refused_case("empty token", path, real, nreal, 20, " 19", N, NULL, 20, "bad base64");
    refused_case("line without a rank", path, real, nreal, 42, "IQ==", N, NULL, 42, "expected 'base64 rank'");
    refused_case("wrong rank", path, real, nreal, 100, "ICAgIGJhcg== 12345", N, NULL, 100, "rank '12345'");
    refused_case("rank not a number", path, real, nreal, 101, "ICAgIGJhcg== 1OO", N, NULL, 101, "rank '1OO'");
    refused_case("duplicate token", path, real, nreal, 300, "IQ== 299", N, NULL, 300,
                 "duplicate token: same bytes as line 1");
    refused_case("too few lines", path, real, nreal, 0, NULL, 50000, NULL, 50001, "file ends after 50000 lines");
    refused_case("too many lines", path, real, nreal, 0, NULL, N, "ICAgIGJhcg== 50256\n", 50257,
                 "more than 50256 lines");
    // A single byte without a token would make some input unencodable: replace '!' (line 1).
    write_ranks(path, real, nreal, 1, "enp6enp6enp6cXE= 0", N, NULL);
    snprintf(want, sizeof(want), "%s:", path);
    check_refused("a byte without a token", path, want, "no token for the byte 0x21");
    unlink(path);
    snprintf(path, sizeof(path), "%s/missing.tiktoken", dir);
    check_refused("missing file", path, path, "cannot open");
    rmdir(dir);
    free(real);
}

static const char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void base64(const unsigned char *s, size_t n, char *out) {
    size_t k = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? s[i + 1] << 8 : 0) | (i + 2 < n ? s[i + 2] : 0);
        out[k++] = b64_alphabet[v >> 18];
        out[k++] = b64_alphabet[(v >> 12) & 63];
        out[k++] = i + 1 < n ? b64_alphabet[(v >> 6) & 63] : '=';
        out[k++] = i + 2 < n ? b64_alphabet[v & 63] : '=';
    }
    out[k] = '\0';
}

// Every token's bytes, re-encoded to base64, equal its line of the ranks file; EOT and the ends.
static void test_token_bytes(const Tokenizer *tok) {
    size_t nreal;
    char *real = read_file(RANKS, &nreal);
    int bad = -1;
    char line[1024], b64[1024];
    const char *p = real;
    for (int id = 0; real && id < GPT2_NUM_RANKS && bad < 0; id++) {
        const char *eol = strchr(p, '\n');
        snprintf(line, sizeof(line), "%.*s", (int)(eol - p), p);
        size_t len;
        const unsigned char *b = tokenizer_token_bytes(tok, id, &len);
        base64(b, len, b64);
        size_t k = strlen(b64);
        if (strncmp(line, b64, k) != 0 || line[k] != ' ' || atoi(line + k + 1) != id) bad = id;
        p = eol + 1;
    }
    check(real && bad < 0, "token_bytes of every rank equal the ranks file", "id %d: file '%s', ours '%s'", bad,
          line, b64);
    free(real);

    size_t len;
    const unsigned char *eot = tokenizer_token_bytes(tok, GPT2_EOT, &len);
    check(GPT2_EOT == 50256 && eot && len == 13 && memcmp(eot, "<|endoftext|>", 13) == 0,
          "EOT is 50256 = <|endoftext|>", "got %zu bytes", len);
    check(tokenizer_vocab_size(tok) == 50257, "vocab_size is 50257", "got %d", tokenizer_vocab_size(tok));
    check(!tokenizer_token_bytes(tok, -1, &len) && !tokenizer_token_bytes(tok, 50257, &len) &&
          !tokenizer_token_bytes(tok, INT_MAX, &len), "token_bytes out of range is NULL", "got non-NULL");

    // tiktoken encode_ordinary("<|endoftext|>"): "<", "|", "end", "of", "text", "|", ">"
    static const int want[] = {27, 91, 437, 1659, 5239, 91, 29};
    TokenBuf b = {0};
    tokenizer_encode(tok, "<|endoftext|>", 13, &b);
    check(b.len == 7 && memcmp(b.data, want, sizeof(want)) == 0, "encode treats <|endoftext|> as ordinary text",
          "%zu ids, first %d", b.len, b.len ? b.data[0] : -1);
    tokenbuf_free(&b);
}

// Random id sequences, many out of range, decode to the concatenated bytes of the in-range ones.
static void test_decode_safety(const Tokenizer *tok) {
    Rng rng;
    rng_seed(&rng, 1234);
    int ok = 1, ids[512];
    for (int trial = 0; trial < 2000 && ok; trial++) {
        size_t n = rng_u64(&rng) % 512;
        for (size_t i = 0; i < n; i++) {
            uint64_t r = rng_u64(&rng);
            switch (r % 5) {
                case 0: ids[i] = (int)(r >> 32); break;                     // anything, mostly out of range
                case 1: ids[i] = -(int)((r >> 8) % 1000) - 1; break;        // negative
                case 2: ids[i] = 50257 + (int)((r >> 8) % 100); break;      // just past the end
                case 3: ids[i] = tok->byte_rank[0x80 + (r >> 8) % 128]; break; // bytes of split characters
                default: ids[i] = (int)((r >> 8) % 50257); break;           // any token, EOT included
            }
        }
        size_t nout, want = 0, len;
        char *out = tokenizer_decode(tok, ids, n, &nout);
        for (size_t i = 0; i < n && ok; i++) {
            const unsigned char *b = tokenizer_token_bytes(tok, ids[i], &len);
            if (!b) continue;
            ok = want + len <= nout && memcmp(out + want, b, len) == 0;
            want += len;
        }
        ok = ok && out && nout == want && out[nout] == '\0';
        free(out);
    }
    check(ok, "decode of random ids (out of range, split characters) is the concatenated token bytes", "mismatch");

    // Every prefix of the ids of multi-byte text decodes to the matching prefix of its bytes,
    // including prefixes that end inside a character.
    const char *text = "\xf0\x9f\x98\x80\xe4\xbd\xa0\xe5\xa5\xbd "                 // emoji, 2 CJK
                       "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9 caf\xc3\xa9";    // ZWJ pair, accent
    TokenBuf b = {0};
    tokenizer_encode(tok, text, strlen(text), &b);
    size_t off = 0, nout;
    ok = 1;
    for (size_t k = 0; k <= b.len && ok; k++) {
        char *out = tokenizer_decode(tok, b.data, k, &nout);
        ok = out && nout == off && memcmp(out, text, nout) == 0;
        size_t len;
        if (k < b.len) { tokenizer_token_bytes(tok, b.data[k], &len); off += len; }
        free(out);
    }
    check(ok && off == strlen(text), "decode of every id prefix of multi-byte text is a byte prefix", "at %zu bytes",
          off);
    tokenbuf_free(&b);

    char *out = tokenizer_decode(tok, NULL, 0, &nout);
    check(out && nout == 0, "decode of no ids is the empty string", "got %p, %zu", (void *)out, nout);
    free(out);

    TokenBuf grow = {0};
    for (int i = 0; i < 5000; i++) tokenbuf_push(&grow, i * 7);
    ok = grow.len == 5000 && grow.cap >= 5000;
    for (int i = 0; i < 5000 && ok; i++) ok = grow.data[i] == i * 7;
    tokenbuf_free(&grow);
    check(ok && !grow.data && grow.len == 0, "tokenbuf_push grows and keeps ids; tokenbuf_free empties", "mismatch");
}

// The linear-scan merge (short pieces) and the heap merge (long pieces) make the same merges:
// random pieces built from frequent fragments, merged both ways.
static void test_merge_paths_agree(const Tokenizer *tok) {
    static const char *frag[] = {"a", "e", "th", "in", "er", " ", "the", "ing", "s", "t", "o", "n", "an",
                                 "\xc3", "\xa9", "1", "0"};
    const int nfrag = (int)(sizeof(frag) / sizeof(frag[0]));
    Rng rng;
    rng_seed(&rng, 99);
    unsigned char piece[TOK_SMALL_PIECE + 16];
    int ok = 1;
    for (int trial = 0; trial < 5000 && ok; trial++) {
        int n = 0, target = 2 + (int)(rng_u64(&rng) % (TOK_SMALL_PIECE - 1));
        while (n < target) {
            const char *f = frag[rng_u64(&rng) % nfrag];
            for (const char *c = f; *c && n < target; c++) piece[n++] = (unsigned char)*c;
        }
        memset(piece + n, 0, 8);
        TokenBuf a = {0}, b = {0};
        tokenbuf_reserve(&a, (size_t)n);
        tokenbuf_reserve(&b, (size_t)n);
        tok_merge_small(tok, piece, n, &a);
        tok_merge_large(tok, piece, n, &b);
        ok = first_diff(a.data, a.len, b.data, b.len) < 0;
        tokenbuf_free(&a);
        tokenbuf_free(&b);
    }
    check(ok, "linear and heap merges agree on 5000 random pieces", "they differ");
}

// Very long runs of one class (one regex match, one piece each) encode without a PCRE2 stack
// limit and decode back; the letters take the heap merge.
static void test_long_runs(const Tokenizer *tok) {
    const size_t n = 2u << 20;
    char *s = (char *)malloc(n);
    const char *fills[] = {" ", "a", "7", "!", "\n "};
    const char *names[] = {"spaces", "letters", "digits", "punctuation", "newline-space"};
    for (int k = 0; k < 5; k++) {
        size_t m = strlen(fills[k]);
        for (size_t i = 0; i < n; i++) s[i] = fills[k][i % m];
        TokenBuf b = {0};
        int rc = tokenizer_encode(tok, s, n, &b);
        size_t nback;
        char *back = tokenizer_decode(tok, b.data, b.len, &nback);
        char cname[128];
        snprintf(cname, sizeof(cname), "2 MiB run of %s encodes and decodes back [%s]", names[k],
                 tok->jit ? "jit" : "interpreter");
        check(rc == 0 && back && nback == n && memcmp(back, s, n) == 0, cname, "rc %d, %zu bytes back", rc, nback);
        free(back);
        tokenbuf_free(&b);
    }
    free(s);
}

// Thread safety: pieces of tinyshakespeare encoded on several OpenMP threads at once.
static void test_threads(const Tokenizer *tok) {
    size_t n, nfix;
    char *text = read_file("data/tinyshakespeare.txt", &n);
    unsigned char *raw = (unsigned char *)read_file("test/fixtures/tokenizer/tinyshakespeare.u16", &nfix);
    if (!text || !raw) { check(0, "threads: inputs readable", "missing"); free(text); free(raw); return; }
    // (1) chunks cut just before a "\n\n": nothing in the pattern looks back past a newline, so
    // the chunks' ids concatenated are the whole text's ids, i.e. the tiktoken fixture.
    enum { NCHUNK = 256 };
    size_t cut[NCHUNK + 1];
    cut[0] = 0;
    for (int c = 1; c < NCHUNK; c++) {
        char *sep = strstr(text + n / NCHUNK * c, "\n\n");
        cut[c] = sep ? (size_t)(sep - text) : n;
        if (cut[c] < cut[c - 1]) cut[c] = cut[c - 1];
    }
    cut[NCHUNK] = n;
    TokenBuf out[NCHUNK] = {{0}};
    int fails = 0;
    #pragma omp parallel for num_threads(8) schedule(dynamic, 1) reduction(+ : fails)
    for (int c = 0; c < NCHUNK; c++) fails += tokenizer_encode(tok, text + cut[c], cut[c + 1] - cut[c], &out[c]) != 0;
    size_t k = 0;
    int same = fails == 0;
    for (int c = 0; c < NCHUNK; c++) {
        for (size_t i = 0; i < out[c].len && same; i++, k++) {
            same = 2 * k + 1 < nfix && out[c].data[i] == (raw[2 * k] | raw[2 * k + 1] << 8);
        }
        tokenbuf_free(&out[c]);
    }
    check(same && 2 * k == nfix, "8 threads over 256 chunks of tinyshakespeare equal the tiktoken fixture",
          "differ at token %zu", k);

    // (2) chunks cut at arbitrary bytes (mid-character too), 4 rounds on 8 threads, each chunk
    // equal to its single-threaded encoding.
    Rng rng;
    rng_seed(&rng, 7);
    for (int c = 1; c < NCHUNK; c++) cut[c] = rng_u64(&rng) % n;
    for (int c = 1; c < NCHUNK; c++) {   // insertion sort of the cut points
        for (int j = c; j > 1 && cut[j] < cut[j - 1]; j--) { size_t t = cut[j]; cut[j] = cut[j - 1]; cut[j - 1] = t; }
    }
    TokenBuf ref[NCHUNK] = {{0}};
    for (int c = 0; c < NCHUNK; c++) tokenizer_encode(tok, text + cut[c], cut[c + 1] - cut[c], &ref[c]);
    same = 1;
    for (int round = 0; round < 4; round++) {
        #pragma omp parallel for num_threads(8) schedule(dynamic, 1) reduction(+ : fails)
        for (int c = 0; c < NCHUNK; c++) {
            fails += tokenizer_encode(tok, text + cut[c], cut[c + 1] - cut[c], &out[c]) != 0;
        }
        for (int c = 0; c < NCHUNK; c++) {
            same = same && first_diff(out[c].data, out[c].len, ref[c].data, ref[c].len) < 0;
            tokenbuf_free(&out[c]);
        }
    }
    for (int c = 0; c < NCHUNK; c++) tokenbuf_free(&ref[c]);
    check(same && fails == 0, "8 threads over random byte chunks equal the single-thread encoding (4 rounds)",
          "%d failures, same %d", fails, same);
    free(text);
    free(raw);
}

int main(void) {
    Tokenizer tok;
    char err[512];
    int rc = tokenizer_load(&tok, RANKS, err, sizeof(err));
    check(rc == 0, "load data/gpt2.tiktoken", "%s", err);
    if (rc != 0) return test_exit();
    printf("# PCRE2 JIT: %s\n", tok.jit ? "on" : "off (interpreter)");
    check_fixture(&tok, "tinyshakespeare", "data/tinyshakespeare.txt");
    check_fixture(&tok, "stress", "dev/data/tokenizer_stress.txt");
    check_fixture(&tok, "stress_invalid", "dev/data/tokenizer_stress_invalid.bin");
    // The PCRE2 interpreter, used where the JIT is not available, must give the same ids.
    Tokenizer interp = tok;
    interp.jit = 0;
    check_fixture(&interp, "stress", "dev/data/tokenizer_stress.txt");
    check_fixture(&interp, "stress_invalid", "dev/data/tokenizer_stress_invalid.bin");
    test_long_runs(&interp);
    test_token_bytes(&tok);
    test_decode_safety(&tok);
    test_merge_paths_agree(&tok);
    test_long_runs(&tok);
    test_threads(&tok);
    test_bad_ranks_files();
    tokenizer_free(&tok);
    return test_exit();
}
