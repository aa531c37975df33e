// Tokenize tinyshakespeare into the trainer's default data (`make data`):
//   build/prepare_tinyshakespeare data/tinyshakespeare.txt data/tinyshakespeare [RANKS]
// writes OUTDIR/tiny_shakespeare_val.bin and OUTDIR/tiny_shakespeare_train.bin (llm.c shards).
//
// Documents: the text is split at every "\n\n", exactly like Python's text.split("\n\n") (left to
// right, non-overlapping), so a document is a paragraph without the blank line that separates it from
// the next: its last line has no trailing "\n", the final document keeps the file's final "\n", and a
// run of three newlines leaves a "\n" at the start of the next document. Each document is stored as
// <|endoftext|> (50256) followed by its tokens. The first ceil(ndocs/10) documents are validation,
// the rest training.
#include <errno.h>
#include <sys/stat.h>
#include "llmc/tokenizer.h"
#include "llmc/dataloader.h"

// read a whole file; NULL with a message
static char *read_file(const char *path, size_t *len, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return NULL; }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (n < 0 || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        snprintf(err, errlen, "%s: read failed", path);
        free(buf); fclose(f); return NULL;
    }
    fclose(f);
    buf[n] = '\0';
    *len = (size_t)n;
    return buf;
}

// the tokens of documents [from, to) into a uint16 buffer: EOT, then each document's tokens
static int encode_docs(const Tokenizer *tok, const char *const *doc, const size_t *doclen, size_t from, size_t to,
                       uint16_t **out, size_t *n, char *err, size_t errlen) {
    TokenBuf buf = {0};
    for (size_t d = from; d < to; d++) {
        tokenbuf_push(&buf, GPT2_EOT);
        if (tokenizer_encode(tok, doc[d], doclen[d], &buf) != 0) {
            snprintf(err, errlen, "document %zu: encoding failed", d);
            tokenbuf_free(&buf); return -1;
        }
    }
    *out = malloc(sizeof(uint16_t) * (buf.len ? buf.len : 1));
    for (size_t i = 0; i < buf.len; i++) (*out)[i] = (uint16_t)buf.data[i];
    *n = buf.len;
    tokenbuf_free(&buf);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s TINYSHAKESPEARE.txt OUTDIR [RANKS=data/gpt2.tiktoken]\n", argv[0]);
        return 2;
    }
    const char *in = argv[1], *outdir = argv[2], *ranks = argc > 3 ? argv[3] : "data/gpt2.tiktoken";
    char err[8192];
    static Tokenizer tok;
    if (tokenizer_load(&tok, ranks, err, sizeof(err)) != 0) { fprintf(stderr, "error: %s\n", err); return 1; }
    size_t len;
    char *text = read_file(in, &len, err, sizeof(err));
    if (!text) { fprintf(stderr, "error: %s\n", err); return 1; }

    // split at "\n\n": documents point into text
    size_t cap = 1024, ndocs = 0;
    const char **doc = malloc(sizeof(char *) * cap);
    size_t *doclen = malloc(sizeof(size_t) * cap);
    size_t start = 0;
    for (size_t i = 0;; ) {
        int at_sep = i + 1 < len && text[i] == '\n' && text[i + 1] == '\n';
        if (at_sep || i >= len) {
            if (ndocs == cap) {
                cap *= 2;
                doc = realloc(doc, sizeof(char *) * cap);
                doclen = realloc(doclen, sizeof(size_t) * cap);
            }
            doc[ndocs] = text + start;
            doclen[ndocs++] = (i >= len ? len : i) - start;
            if (!at_sep) break;
            i += 2;
            start = i;
        } else {
            i++;
        }
    }
    size_t nval = (ndocs + 9) / 10;

    if (mkdir(outdir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "error: %s: %s\n", outdir, strerror(errno)); return 1;
    }
    const char *names[2] = {"tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin"};
    size_t ranges[2][2] = {{0, nval}, {nval, ndocs}};
    for (int s = 0; s < 2; s++) {
        uint16_t *tokens;
        size_t n;
        if (encode_docs(&tok, doc, doclen, ranges[s][0], ranges[s][1], &tokens, &n, err, sizeof(err)) != 0) {
            fprintf(stderr, "error: %s: %s\n", in, err); return 1;
        }
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", outdir, names[s]);
        if (shard_write(path, tokens, n, err, sizeof(err)) != 0) { fprintf(stderr, "error: %s\n", err); return 1; }
        printf("%s: %zu documents, %zu tokens\n", path, ranges[s][1] - ranges[s][0], n);
        free(tokens);
    }
    free(doc); free(doclen); free(text);
    tokenizer_free(&tok);
    return 0;
}
