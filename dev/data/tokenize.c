// tokenize: GPT-2-tokenize a corpus (OpenWebText-sized) into llm.c shards on all cores.
//
//   tokenize -o data/openwebtext [options] INPUT...      (tokenize --help for everything)
//
// Documents come from the inputs in command-line order: a text file is one document; a file named
// *.jsonl or *.json holds one {"text": "..."} document per line; a directory contributes every file
// below it (recursively, paths in strcmp order, names starting with '.' skipped), each by the same
// two rules; "-" is all of stdin as one document. Every document is stored as <|endoftext|> (50256)
// followed by its tokens, and the stream is cut into shards of exactly --shard-tokens tokens (the
// last one shorter): shard 0 is OUTDIR/PREFIX_val_000000.bin, shard k >= 1 is PREFIX_train_%06d.bin.
//
// Determinism: documents are read in batches, a batch is tokenized in parallel (one document per
// task, each into its own buffer) and then appended in document order, so the shards are byte-
// identical for every thread count.
//
// Overwriting and resuming: existing PREFIX shards are refused unless --force (rewrite everything)
// or --resume. Shards are written atomically (PATH.tmp, fsync, rename), so a killed run leaves only
// complete shards. With --resume the whole input is tokenized again (that is the only way to know
// where each shard starts), and a shard whose file is complete (valid llm.c header and a size that
// matches its token count) is compared with the tokens this run produced for it: equal -> kept
// without rewriting; different -> error (the input or options changed; use --force). Missing or
// incomplete shards are written.
//
// Bad input: every input path must exist before anything is written (else exit 1, nothing touched);
// a bad JSONL line stops the run with FILE:LINE and exit 1 before its document, so only the complete
// shards before it exist (never a partial one).
#include <dirent.h>
#include <errno.h>
#include <omp.h>
#include <sys/stat.h>
#include <time.h>
#include "llmc/tokenizer.h"
#include "llmc/dataloader.h"

#define BATCH_BYTES (32u << 20)  // text per parallel batch: large enough to keep every core busy
#define BATCH_DOCS 16384

static void usage(FILE *f) {
    fprintf(f,
"usage: tokenize -o OUTDIR [options] INPUT...\n"
"GPT-2-tokenize documents into llm.c shards (256 int32 header, uint16 tokens), on all cores.\n"
"\n"
"INPUT (any number, in order):\n"
"  FILE          one document (its whole text)\n"
"  FILE.jsonl    one document per line, {\"text\": \"...\"} (also FILE.json); blank lines are\n"
"                skipped, any other line that is not such an object is an error (FILE:LINE)\n"
"  DIR           every file below DIR, recursively, in sorted path order (names starting with\n"
"                '.' skipped), each read by the two rules above\n"
"  -             all of stdin, one document\n"
"Every document becomes <|endoftext|> (50256) followed by its tokens.\n"
"\n"
"options:\n"
"  -o, --out DIR        output directory (created if missing)\n"
"  --prefix NAME        shard names NAME_val_000000.bin, NAME_train_000001.bin, ...\n"
"                       (default: the output directory's name)\n"
"  --shard-tokens N     tokens per shard (default 100000000); shard 0 is validation\n"
"  --threads N          tokenizer threads (default: all cores); output is identical for any N\n"
"  --ranks PATH         GPT-2 ranks file (default data/gpt2.tiktoken)\n"
"  --force              overwrite existing shards of this prefix (and remove stale higher ones)\n"
"  --resume             continue an interrupted run: re-tokenize everything, keep each complete\n"
"                       shard that equals what this run produces, write the missing ones\n"
"  -h, --help           this help\n"
"Shards are written atomically (tmp file, fsync, rename). Without --force or --resume, existing\n"
"shards are refused. Progress (documents/s, tokens/s, ETA from bytes read) goes to stderr.\n"
"Exit status: 0 done, 1 error (bad input, refused overwrite), 2 bad usage.\n");
}

// ----------------------------------------------------------------------------
// inputs

enum { SRC_TEXT, SRC_JSONL, SRC_STDIN };
typedef struct { char *path; int kind; size_t size; } Source;
typedef struct { Source *v; size_t n, cap; } Sources;

static void sources_add(Sources *s, const char *path, int kind, size_t size) {
    if (s->n == s->cap) { s->cap = s->cap ? 2 * s->cap : 64; s->v = realloc(s->v, sizeof(Source) * s->cap); }
    s->v[s->n++] = (Source){strdup(path), kind, size};
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int cmp_source(const void *a, const void *b) { return strcmp(((const Source *)a)->path, ((const Source *)b)->path); }

// path -> sources: a file by its name, a directory by every file below it (recursively, unsorted
// here); -1 with a message
static int collect(Sources *out, const char *path, char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) != 0) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    if (S_ISREG(st.st_mode)) {
        sources_add(out, path, ends_with(path, ".jsonl") || ends_with(path, ".json") ? SRC_JSONL : SRC_TEXT,
                    (size_t)st.st_size);
        return 0;
    }
    if (!S_ISDIR(st.st_mode)) { snprintf(err, errlen, "%s: not a regular file or directory", path); return -1; }
    DIR *d = opendir(path);
    if (!d) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        char *child = malloc(len);
        snprintf(child, len, "%s%s%s", path, ends_with(path, "/") ? "" : "/", e->d_name);
        rc = collect(out, child, err, errlen);
        free(child);
    }
    closedir(d);
    return rc;
}

// one command-line input -> sources; the files of a directory in strcmp order of their full paths
static int expand(Sources *out, const char *path, char *err, size_t errlen) {
    size_t first = out->n;
    if (collect(out, path, err, errlen) != 0) return -1;
    qsort(out->v + first, out->n - first, sizeof(Source), cmp_source);
    return 0;
}

static char *read_all(FILE *f, size_t *len) {
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap);
    size_t r;
    while ((r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) { cap *= 2; buf = realloc(buf, cap); }
    }
    *len = n;
    return buf;
}

// ----------------------------------------------------------------------------
// documents, read in batches

typedef struct {
    char *text;       // raw file text, or one JSONL line (NUL-terminated, newline stripped)
    size_t len;
    size_t bytes;     // input bytes it accounts for (progress)
    int src;          // index into sources
    long line;        // JSONL line number (1-based), 0 otherwise
    TokenBuf tokens;  // EOT + the document's tokens, filled in parallel
    char err[512];    // set in parallel when the item is bad
} Item;

typedef struct {
    Sources *srcs;
    size_t next_src;
    FILE *jsonl;      // the JSONL source being read, if any
    long line;
    char *stdin_text; // stdin, read at startup so its size counts in the total
    size_t stdin_len;
    char err[8192];
} Reader;

// Fill items with the next batch; returns the count (0 at the end), -1 on a read error.
static long read_batch(Reader *rd, Item *items) {
    long n = 0;
    size_t bytes = 0;
    while (n < BATCH_DOCS && bytes < BATCH_BYTES) {
        if (rd->jsonl) {
            char *line = NULL;
            size_t cap = 0;
            ssize_t len = getline(&line, &cap, rd->jsonl);
            if (len < 0) {
                int bad = ferror(rd->jsonl);
                fclose(rd->jsonl); rd->jsonl = NULL; free(line);
                if (bad) { snprintf(rd->err, sizeof(rd->err), "%s: read error", rd->srcs->v[rd->next_src - 1].path); return -1; }
                continue;
            }
            rd->line++;
            size_t raw = (size_t)len;
            while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
            size_t k = 0;
            while (k < (size_t)len && (line[k] == ' ' || line[k] == '\t')) k++;
            if (k == (size_t)len) { free(line); bytes += raw; continue; }  // blank line: no document
            items[n] = (Item){.text = line, .len = (size_t)len, .bytes = raw, .src = (int)rd->next_src - 1, .line = rd->line};
            bytes += raw;
            n++;
            continue;
        }
        if (rd->next_src == rd->srcs->n) break;
        Source *s = &rd->srcs->v[rd->next_src++];
        if (s->kind == SRC_JSONL) {
            rd->jsonl = fopen(s->path, "rb");
            rd->line = 0;
            if (!rd->jsonl) { snprintf(rd->err, sizeof(rd->err), "%s: %s", s->path, strerror(errno)); return -1; }
            continue;
        }
        Item *it = &items[n];
        *it = (Item){.src = (int)rd->next_src - 1};
        if (s->kind == SRC_STDIN) {
            it->text = rd->stdin_text; it->len = rd->stdin_len;
            rd->stdin_text = NULL;
        } else {
            FILE *f = fopen(s->path, "rb");
            if (!f) { snprintf(rd->err, sizeof(rd->err), "%s: %s", s->path, strerror(errno)); return -1; }
            it->text = read_all(f, &it->len);
            int bad = ferror(f);
            fclose(f);
            if (bad) { free(it->text); snprintf(rd->err, sizeof(rd->err), "%s: read error", s->path); return -1; }
        }
        it->bytes = s->size;
        bytes += it->bytes;
        n++;
    }
    return n;
}

// Tokenize one item (runs in parallel). JSONL: the line must be an object with a string "text".
// cJSON keeps a global error pointer that a failing parse writes; the column comes from
// return_parse_end instead, which is per call.
static void encode_item(const Tokenizer *tok, Item *it, const char *path) {
    const char *text = it->text;
    size_t len = it->len;
    cJSON *json = NULL;
    if (it->line) {
        const char *end = NULL;
        json = cJSON_ParseWithOpts(it->text, &end, 1);
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(json, "text");
        if (!json) {
            snprintf(it->err, sizeof(it->err), "%s:%ld: invalid JSON at column %ld", path, it->line,
                     end ? (long)(end - it->text) + 1 : 1L);
            return;
        }
        if (!cJSON_IsObject(json) || !cJSON_IsString(t)) {
            snprintf(it->err, sizeof(it->err), "%s:%ld: expected an object with a string \"text\"", path, it->line);
            cJSON_Delete(json);
            return;
        }
        text = t->valuestring;
        len = strlen(text);
    }
    tokenbuf_push(&it->tokens, GPT2_EOT);
    if (tokenizer_encode(tok, text, len, &it->tokens) != 0) {
        if (it->line) snprintf(it->err, sizeof(it->err), "%s:%ld: tokenizer failed", path, it->line);
        else snprintf(it->err, sizeof(it->err), "%s: tokenizer failed", path);
    }
    cJSON_Delete(json);
}

// ----------------------------------------------------------------------------
// shards

typedef struct {
    const char *outdir, *prefix;
    int resume;
    uint16_t *buf;     // (shard_tokens,) the shard being filled
    size_t fill, cap;
    int index;         // the shard being filled
    size_t written, kept;
} Shards;

static void shard_path(const Shards *sh, int k, char *path, size_t len) {
    snprintf(path, len, "%s/%s_%s_%06d.bin", sh->outdir, sh->prefix, k == 0 ? "val" : "train", k);
}

// Write shard sh->index from sh->buf[0..fill), or under --resume keep an identical complete one.
static int shard_flush(Shards *sh, char *err, size_t errlen) {
    char path[4096];
    shard_path(sh, sh->index, path, sizeof(path));
    if (sh->resume) {
        Shard old;
        char ignored[8192];
        if (shard_map(&old, path, "llmc", ignored, sizeof(ignored)) == 0) {
            size_t n = old.ntok < sh->fill ? old.ntok : sh->fill, i = 0;
            while (i < n && old.tokens[i] == sh->buf[i]) i++;
            int same = old.ntok == sh->fill && i == n;
            shard_unmap(&old);
            if (!same) {
                snprintf(err, errlen, "%s: complete shard differs from this run's tokens (at token %zu of %zu); "
                         "the input or options changed: use --force to rewrite", path, i, sh->fill);
                return -1;
            }
            sh->kept++;
            sh->index++; sh->fill = 0;
            return 0;
        }
    }
    if (shard_write(path, sh->buf, sh->fill, err, errlen) != 0) return -1;
    sh->written++;
    sh->index++; sh->fill = 0;
    return 0;
}

// append one document's tokens, flushing every shard that fills up
static int shards_append(Shards *sh, const TokenBuf *t, char *err, size_t errlen) {
    for (size_t i = 0; i < t->len; i++) {
        sh->buf[sh->fill++] = (uint16_t)t->data[i];
        if (sh->fill == sh->cap && shard_flush(sh, err, errlen) != 0) return -1;
    }
    return 0;
}

// the index of a file name PREFIX_{val,train}_NNNNNN.bin, or -1
static int shard_index_of(const char *name, const char *prefix) {
    size_t p = strlen(prefix);
    if (strncmp(name, prefix, p) != 0 || name[p] != '_') return -1;
    const char *rest = name + p + 1;
    if (strncmp(rest, "val_", 4) == 0) rest += 4;
    else if (strncmp(rest, "train_", 6) == 0) rest += 6;
    else return -1;
    for (int i = 0; i < 6; i++) if (rest[i] < '0' || rest[i] > '9') return -1;
    if (strcmp(rest + 6, ".bin") != 0) return -1;
    return atoi(rest);
}

// shard names by index: they all end in NNNNNN.bin, so compare those ten characters
static int cmp_shard_name(const void *a, const void *b) {
    const char *x = *(char *const *)a, *y = *(char *const *)b;
    return strcmp(x + strlen(x) - 10, y + strlen(y) - 10);
}

// the existing shards of this prefix, by index (malloc'd names, *n set)
static char **existing_shards(const char *outdir, const char *prefix, size_t *n) {
    DIR *d = opendir(outdir);
    char **names = NULL;
    size_t cap = 0;
    *n = 0;
    if (!d) return NULL;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (shard_index_of(e->d_name, prefix) < 0) continue;
        if (*n == cap) { cap = cap ? 2 * cap : 16; names = realloc(names, sizeof(char *) * cap); }
        names[(*n)++] = strdup(e->d_name);
    }
    closedir(d);
    if (*n) qsort(names, *n, sizeof(char *), cmp_shard_name);
    return names;
}

static int mkdir_p(const char *path, char *err, size_t errlen) {
    char *p = strdup(path);
    for (char *s = p + 1;; s++) {
        if (*s == '/' || *s == '\0') {
            char c = *s;
            *s = '\0';
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                snprintf(err, errlen, "%s: %s", p, strerror(errno)); free(p); return -1;
            }
            *s = c;
            if (c == '\0') break;
        }
    }
    free(p);
    return 0;
}

// ----------------------------------------------------------------------------
// progress

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static const char *human(double x, char *buf) {
    const char *unit = "";
    if (x >= 1e9) { x /= 1e9; unit = "G"; } else if (x >= 1e6) { x /= 1e6; unit = "M"; } else if (x >= 1e3) { x /= 1e3; unit = "k"; }
    sprintf(buf, "%.*f%s", *unit ? 2 : 0, x, unit);
    return buf;
}

// One status line on stderr: in place on a terminal (at most 5 times a second), else a new line
// every 10 s so logs stay readable. ETA assumes the remaining bytes go as fast as the ones read.
static void progress(double t0, size_t docs, size_t toks, size_t bytes, size_t total, int final) {
    static double last = -1e9;
    int tty = isatty(2);
    double t = now_s(), dt = t - t0;
    if (!final && t - last < (tty ? 0.2 : 10.0)) return;
    last = t;
    double frac = total ? (double)bytes / (double)total : 1.0;
    char bar[31], a[16], b[16], c[16], d[16];
    int fill = (int)(frac * 30 + 0.5);
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    double eta = frac > 0 && dt > 0 ? dt * (1 - frac) / frac : 0;
    fprintf(stderr, "%s[%s] %5.1f%% %s docs (%s/s) %s tok (%s/s) ETA %dm%02ds%s", tty ? "\r\033[K" : "",
            bar, 100 * frac, human((double)docs, a), human(docs / (dt > 0 ? dt : 1), b), human((double)toks, c),
            human(toks / (dt > 0 ? dt : 1), d), (int)eta / 60, (int)eta % 60, tty && !final ? "" : "\n");
}

// ----------------------------------------------------------------------------

static int parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    const char *outdir = NULL, *prefix = NULL, *ranks = "data/gpt2.tiktoken";
    long shard_tokens = 100000000, threads = omp_get_num_procs();
    int force = 0, resume = 0;
    const char **inputs = malloc(sizeof(char *) * (size_t)argc);
    int ninputs = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--force")) force = 1;
        else if (!strcmp(a, "--resume")) resume = 1;
        else if ((!strcmp(a, "-o") || !strcmp(a, "--out")) && has_value) outdir = argv[++i];
        else if (!strcmp(a, "--prefix") && has_value) prefix = argv[++i];
        else if (!strcmp(a, "--ranks") && has_value) ranks = argv[++i];
        else if (!strcmp(a, "--shard-tokens") && has_value) {
            if (parse_long(argv[++i], 1, INT32_MAX, &shard_tokens)) {
                fprintf(stderr, "tokenize: --shard-tokens %s: expected an integer in [1, %d]\n", argv[i], INT32_MAX); return 2;
            }
        } else if (!strcmp(a, "--threads") && has_value) {
            if (parse_long(argv[++i], 1, 4096, &threads)) {
                fprintf(stderr, "tokenize: --threads %s: expected an integer in [1, 4096]\n", argv[i]); return 2;
            }
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "tokenize: %s: unknown option or missing value (see --help)\n", a); return 2;
        } else inputs[ninputs++] = a;
    }
    if (!outdir || ninputs == 0) { fprintf(stderr, "tokenize: need -o OUTDIR and at least one INPUT (see --help)\n"); return 2; }
    if (force && resume) { fprintf(stderr, "tokenize: --force and --resume exclude each other\n"); return 2; }

    // every input must exist before anything is written
    char err[8192];
    Sources srcs = {0};
    Reader rd = {.srcs = &srcs};
    size_t total_bytes = 0;
    for (int i = 0; i < ninputs; i++) {
        if (!strcmp(inputs[i], "-")) {
            if (rd.stdin_text) { fprintf(stderr, "tokenize: stdin (-) given twice\n"); return 2; }
            rd.stdin_text = read_all(stdin, &rd.stdin_len);
            sources_add(&srcs, "<stdin>", SRC_STDIN, rd.stdin_len);
        } else if (expand(&srcs, inputs[i], err, sizeof(err)) != 0) {
            fprintf(stderr, "tokenize: %s\n", err); return 1;
        }
    }
    if (srcs.n == 0) { fprintf(stderr, "tokenize: the inputs hold no files\n"); return 1; }
    for (size_t i = 0; i < srcs.n; i++) total_bytes += srcs.v[i].size;

    if (mkdir_p(outdir, err, sizeof(err)) != 0) { fprintf(stderr, "tokenize: %s\n", err); return 1; }
    char *default_prefix = NULL;
    if (!prefix) {
        char *real = realpath(outdir, NULL);
        const char *base = real ? strrchr(real, '/') + 1 : "";
        if (!*base) { fprintf(stderr, "tokenize: %s: no name to derive a prefix from; pass --prefix\n", outdir); return 2; }
        default_prefix = strdup(base);
        prefix = default_prefix;
        free(real);
    }
    size_t nexisting;
    char **existing = existing_shards(outdir, prefix, &nexisting);
    if (nexisting && !force && !resume) {
        fprintf(stderr, "tokenize: %s/%s: exists (%zu shard%s of prefix \"%s\"); pass --force to overwrite "
                "or --resume to continue an interrupted run\n", outdir, existing[0], nexisting,
                nexisting > 1 ? "s" : "", prefix);
        return 1;
    }

    static Tokenizer tok;
    if (tokenizer_load(&tok, ranks, err, sizeof(err)) != 0) { fprintf(stderr, "tokenize: %s\n", err); return 1; }
    omp_set_num_threads((int)threads);
    fprintf(stderr, "tokenize: %zu input file%s (%.1f MB), %ld thread%s, shards of %ld tokens -> %s/%s_*.bin%s\n",
            srcs.n, srcs.n > 1 ? "s" : "", total_bytes / 1e6, threads, threads > 1 ? "s" : "", shard_tokens,
            outdir, prefix, resume ? " (resuming)" : "");

    Shards sh = {.outdir = outdir, .prefix = prefix, .resume = resume,
                 .buf = malloc(sizeof(uint16_t) * (size_t)shard_tokens), .cap = (size_t)shard_tokens};
    Item *items = malloc(sizeof(Item) * BATCH_DOCS);
    size_t docs = 0, toks = 0, bytes = 0;
    double t0 = now_s();
    int status = 0;
    for (;;) {
        long n = read_batch(&rd, items);
        if (n < 0) { fprintf(stderr, "\ntokenize: %s\n", rd.err); status = 1; break; }
        if (n == 0) break;
        #pragma omp parallel for schedule(dynamic, 1)
        for (long i = 0; i < n; i++) encode_item(&tok, &items[i], srcs.v[items[i].src].path);
        // append in document order; stop at the first bad document
        for (long i = 0; i < n; i++) {
            if (status == 0 && items[i].err[0]) {
                fprintf(stderr, "\ntokenize: %s\n", items[i].err); status = 1;
            }
            if (status == 0 && shards_append(&sh, &items[i].tokens, err, sizeof(err)) != 0) {
                fprintf(stderr, "\ntokenize: %s\n", err); status = 1;
            }
            if (status == 0) { docs++; toks += items[i].tokens.len; bytes += items[i].bytes; }
            tokenbuf_free(&items[i].tokens);
            free(items[i].text);
        }
        if (status) break;
        progress(t0, docs, toks, bytes, total_bytes, 0);
    }
    if (status == 0 && sh.fill > 0 && shard_flush(&sh, err, sizeof(err)) != 0) {
        fprintf(stderr, "tokenize: %s\n", err); status = 1;
    }
    if (status == 0) {
        progress(t0, docs, toks, bytes, total_bytes, 1);
        // shards beyond this run's last one belong to an earlier, larger run
        for (size_t i = 0; i < nexisting; i++) {
            if (shard_index_of(existing[i], prefix) < sh.index) continue;
            char path[4096];
            snprintf(path, sizeof(path), "%s/%s", outdir, existing[i]);
            if (force && unlink(path) == 0) fprintf(stderr, "tokenize: removed stale %s\n", path);
            else fprintf(stderr, "tokenize: warning: %s is not part of this run's output\n", path);
        }
        double dt = now_s() - t0;
        printf("%zu documents, %zu tokens, %d shards (%zu written, %zu kept) in %s/%s_*.bin; %.1f s, %.0f tokens/s\n",
               docs, toks, sh.index, sh.written, sh.kept, outdir, prefix, dt, toks / (dt > 0 ? dt : 1));
        if (sh.index == 1) fprintf(stderr, "tokenize: warning: one shard only: no training shard (lower --shard-tokens)\n");
    }
    for (size_t i = 0; i < nexisting; i++) free(existing[i]);
    free(existing);
    for (size_t i = 0; i < srcs.n; i++) free(srcs.v[i].path);
    free(srcs.v); free(items); free(sh.buf); free(default_prefix); free(inputs); free(rd.stdin_text);
    if (rd.jsonl) fclose(rd.jsonl);
    tokenizer_free(&tok);
    return status;
}
