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
// Pipeline: the inputs are cut into chunks of ~CHUNK_BYTES (whole JSONL lines, whole files) held in
// a ring of slots. Each of the --threads workers reads the next chunk (one at a time), parses and
// tokenizes it, each document into the chunk's own token buffer, and then appends every chunk that
// is next in order to the shard file being written (one worker at a time). Every buffer belongs to
// a slot or a worker and is reused, so there is no allocation per document, and the only serial
// work is reading and copying; the order of the stream is the order of the chunks, so the shards
// are byte-identical for every thread count. A JSONL line is read by a small validating JSON parser that decodes only the
// top-level "text" into the worker's buffer (cJSON would build a tree per line).
//
// Interruption and reruns: OUTDIR/PREFIX.tokenize.json (the manifest, replaced atomically) records
// the run's settings, a fingerprint of its inputs (paths, sizes, modification times; stdin's bytes)
// and, after each shard is durably written (PATH.tmp, fsync, rename), how many shards are complete
// and where in the inputs the next one starts (file, byte offset of its first document, the count
// of that document's tokens already in the complete shards). Rerunning the same command after an
// interruption therefore skips the complete shards without re-reading their input and continues
// with the next one; the result is byte-identical to an uninterrupted run. A finished output, other
// shards of the prefix without a manifest, or an unfinished run of other inputs or settings are
// refused (exit 1) unless --force, which starts over (and removes higher shards left by an earlier,
// larger run when it finishes). --resume is accepted: it is the plain rerun, except that a finished
// output of the same inputs and settings is not an error (nothing to do).
//
// Bad input: every input path must exist before anything is written (else exit 1, nothing touched);
// a bad JSONL line stops the run with FILE:LINE and exit 1 before its document, so only the complete
// shards before it exist (never a partial one).
#define _GNU_SOURCE   // sync_file_range, memrchr
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <omp.h>
#include <pthread.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "llmc/tokenizer.h"
#include "llmc/dataloader.h"

#define CHUNK_BYTES (64u << 10)     // input per work item: ~1.5 ms of one core; small, because every
                                    // buffer page touched the first time costs a page fault
#define SLOTS_PER_THREAD 2          // chunks per worker in the ring: room for uneven chunk times
#define SYNC_BYTES (4u << 20)       // start writeback of a shard every 4 MiB, so that its fsync is short
#define JSON_MAX_DEPTH 1000         // nesting limit of the JSONL parser (cJSON's)
#define MANIFEST_VERSION 1          // bump when the same inputs and settings could give other shards

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
"  --threads N          threads (default: all cores); the output is identical for any N\n"
"  --ranks PATH         GPT-2 ranks file (default data/gpt2.tiktoken)\n"
"  --force              start over: overwrite this prefix's shards (and remove stale higher ones)\n"
"  --resume             the plain rerun, except that a finished output is not an error\n"
"  --max-shards N       stop once N shards are complete, leaving the run unfinished (a rerun\n"
"                       continues it)\n"
"  -h, --help           this help\n"
"Shards are written atomically (tmp file, fsync, rename) and recorded in OUTDIR/NAME.tokenize.json.\n"
"After an interruption, rerun the same command: it keeps the complete shards and continues. A\n"
"finished output, or shards of other inputs or settings, are refused without --force.\n"
"Progress (documents/s, tokens/s, ETA from bytes read) goes to stderr.\n"
"Exit status: 0 done, 1 error (bad input, refused overwrite), 2 bad usage.\n");
}

// ----------------------------------------------------------------------------
// inputs

enum { SRC_TEXT, SRC_JSONL, SRC_STDIN };
typedef struct { char *path; int kind, input; size_t size; long long mtime_ns; } Source;
typedef struct { Source *v; size_t n, cap; } Sources;

static void sources_add(Sources *s, const char *path, int kind, int input, const struct stat *st) {
    if (s->n == s->cap) { s->cap = s->cap ? 2 * s->cap : 64; s->v = realloc(s->v, sizeof(Source) * s->cap); }
    s->v[s->n++] = (Source){strdup(path), kind, input, (size_t)st->st_size,
                            st->st_mtim.tv_sec * 1000000000ll + st->st_mtim.tv_nsec};
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int cmp_source(const void *a, const void *b) { return strcmp(((const Source *)a)->path, ((const Source *)b)->path); }

// path -> sources: a file by its name, a directory by every file below it (recursively, unsorted
// here); -1 with a message
static int collect(Sources *out, const char *path, int input, char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) != 0) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    if (S_ISREG(st.st_mode)) {
        sources_add(out, path, ends_with(path, ".jsonl") || ends_with(path, ".json") ? SRC_JSONL : SRC_TEXT, input, &st);
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
        rc = collect(out, child, input, err, errlen);
        free(child);
    }
    closedir(d);
    return rc;
}

// one command-line input -> sources; the files of a directory in strcmp order of their full paths
static int expand(Sources *out, const char *path, int input, char *err, size_t errlen) {
    size_t first = out->n;
    if (collect(out, path, input, err, errlen) != 0) return -1;
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

// 64-bit FNV-1a: the inputs' fingerprint (a rerun check, not a defence against collisions)
static uint64_t fnv(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}
#define FNV_SEED 0xCBF29CE484222325ull

// stdin's bytes, 8 at a time (FNV byte by byte would take seconds on a large stdin)
static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = FNV_SEED ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 31;
    }
    return fnv(h, s + i, n - i);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) { fprintf(stderr, "tokenize: out of memory (%zu bytes)\n", n); exit(1); }
    return q;
}

// grow *buf (elements of size el, capacity *cap) to hold need elements
static void reserve(void *buf, size_t *cap, size_t need, size_t el) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    *(void **)buf = xrealloc(*(void **)buf, c * el);
    *cap = c;
}

// ----------------------------------------------------------------------------
// JSONL: the "text" string of one line, with a small validating JSON parser (no allocation per line)

typedef struct { char *data; size_t len, cap; } Bytes;

typedef struct {
    const char *line, *p, *end;
    Bytes *out;        // where the string being read is decoded to, NULL: validate only
} Json;

static void json_ws(Json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static void json_put(Json *j, const char *s, size_t n) {
    if (!j->out) return;
    reserve(&j->out->data, &j->out->cap, j->out->len + n, 1);
    memcpy(j->out->data + j->out->len, s, n);
    j->out->len += n;
}

static void json_put_utf8(Json *j, uint32_t cp) {
    char b[4];
    int n;
    if (cp < 0x80) { b[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { b[0] = (char)(0xC0 | cp >> 6); b[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | cp >> 12); b[1] = (char)(0x80 | (cp >> 6 & 0x3F)); b[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        b[0] = (char)(0xF0 | cp >> 18); b[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        b[2] = (char)(0x80 | (cp >> 6 & 0x3F)); b[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    json_put(j, b, (size_t)n);
}

// "\uXXXX" at p (6 bytes) -> its code unit, or -1
static long json_u_escape(const char *p, const char *end) {
    if (end - p < 6 || p[0] != '\\' || p[1] != 'u') return -1;
    long v = 0;
    for (int i = 2; i < 6; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

// A string at p ('"'), decoded into j->out if set. Other bytes than '"' and '\\' are taken as they
// are (like cJSON: raw control characters and invalid UTF-8 pass through). \uXXXX escapes become
// UTF-8; a surrogate that is not half of a pair becomes U+FFFD, which is what tiktoken encodes for
// it (Python strings can hold lone surrogates, tiktoken replaces them).
static int json_string(Json *j) {
    j->p++;
    for (;;) {
        const char *run = j->p;
        while (j->p < j->end && *j->p != '"' && *j->p != '\\') j->p++;
        json_put(j, run, (size_t)(j->p - run));
        if (j->p == j->end) return -1;
        if (*j->p == '"') { j->p++; return 0; }
        if (j->end - j->p < 2) return -1;
        char c = j->p[1], plain = c == 'b' ? '\b' : c == 'f' ? '\f' : c == 'n' ? '\n' : c == 'r' ? '\r' :
                                  c == 't' ? '\t' : c == '"' || c == '\\' || c == '/' ? c : 0;
        if (plain) { json_put(j, &plain, 1); j->p += 2; continue; }
        long u = json_u_escape(j->p, j->end);
        if (u < 0) return -1;
        j->p += 6;
        if (u >= 0xD800 && u <= 0xDBFF) {
            long lo = json_u_escape(j->p, j->end);
            if (lo >= 0xDC00 && lo <= 0xDFFF) {
                j->p += 6;
                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
            } else {
                u = 0xFFFD;   // a following "\uXXXX" that is not a low surrogate is read on its own
            }
        } else if (u >= 0xDC00 && u <= 0xDFFF) {
            u = 0xFFFD;
        }
        json_put_utf8(j, (uint32_t)u);
    }
}

static int json_digits(Json *j) {
    const char *s = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    return j->p > s ? 0 : -1;
}

// RFC 8259 number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
static int json_number(Json *j) {
    if (j->p < j->end && *j->p == '-') j->p++;
    if (j->p < j->end && *j->p == '0') j->p++;
    else if (json_digits(j)) return -1;
    if (j->p < j->end && *j->p == '.') { j->p++; if (json_digits(j)) return -1; }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (json_digits(j)) return -1;
    }
    return 0;
}

static int json_literal(Json *j, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0) return -1;
    j->p += n;
    return 0;
}

// Skip one value (validated, not decoded) at p, after whitespace.
static int json_value(Json *j, int depth) {
    if (j->p == j->end) return -1;
    char c = *j->p;
    if (c == '"') { Bytes *out = j->out; j->out = NULL; int rc = json_string(j); j->out = out; return rc; }
    if (c == 't') return json_literal(j, "true");
    if (c == 'f') return json_literal(j, "false");
    if (c == 'n') return json_literal(j, "null");
    if (c == '-' || (c >= '0' && c <= '9')) return json_number(j);
    if (c != '{' && c != '[') return -1;
    if (depth >= JSON_MAX_DEPTH) return -1;
    char close = c == '{' ? '}' : ']';
    j->p++;
    json_ws(j);
    if (j->p < j->end && *j->p == close) { j->p++; return 0; }
    for (;;) {
        if (close == '}') {
            if (j->p == j->end || *j->p != '"' || json_value(j, depth + 1)) return -1;
            json_ws(j);
            if (j->p == j->end || *j->p != ':') return -1;
            j->p++;
            json_ws(j);
        }
        if (json_value(j, depth + 1)) return -1;
        json_ws(j);
        if (j->p < j->end && *j->p == ',') { j->p++; json_ws(j); continue; }
        if (j->p < j->end && *j->p == close) { j->p++; return 0; }
        return -1;
    }
}

enum { JSONL_OK, JSONL_INVALID, JSONL_NO_TEXT };

// One JSONL line [s, end) -> its top-level "text" string decoded into text (the first "text" key,
// as cJSON_GetObjectItem takes it). JSONL_INVALID sets *col (1-based byte column of the error).
static int jsonl_text(const char *s, const char *end, Bytes *text, Bytes *key, long *col) {
    Json j = {s, s, end, NULL};
    int found = 0, is_string = 0;
    json_ws(&j);
    if (j.p < j.end && *j.p != '{') {   // any other valid JSON value is a line without a "text"
        if (json_value(&j, 0)) goto invalid;
        goto tail;
    }
    if (j.p == j.end) goto invalid;
    j.p++;
    json_ws(&j);
    if (j.p < j.end && *j.p == '}') { j.p++; goto tail; }
    for (;;) {
        if (j.p == j.end || *j.p != '"') goto invalid;
        key->len = 0;
        j.out = key;
        if (json_string(&j)) goto invalid;
        json_ws(&j);
        if (j.p == j.end || *j.p != ':') goto invalid;
        j.p++;
        json_ws(&j);
        if (!found && key->len == 4 && memcmp(key->data, "text", 4) == 0) {
            found = 1;
            is_string = j.p < j.end && *j.p == '"';
            if (is_string) {
                text->len = 0;
                j.out = text;
                if (json_string(&j)) goto invalid;
            } else if (json_value(&j, 1)) goto invalid;
        } else if (json_value(&j, 1)) goto invalid;
        json_ws(&j);
        if (j.p < j.end && *j.p == ',') { j.p++; json_ws(&j); continue; }
        if (j.p < j.end && *j.p == '}') { j.p++; break; }
        goto invalid;
    }
tail:
    json_ws(&j);
    if (j.p != j.end) goto invalid;
    return is_string ? JSONL_OK : JSONL_NO_TEXT;
invalid:
    *col = (long)(j.p - s) + 1;
    return JSONL_INVALID;
}

// ----------------------------------------------------------------------------
// chunks: the unit of work of the pipeline

// Consecutive bytes of one source inside a chunk: one whole text file, or whole lines of a JSONL file.
typedef struct {
    int src, kind;
    size_t off, len;    // chunk->buf[off, off + len)
    size_t src_off;     // where those bytes start in the source
    long nlines;        // JSONL: lines in it (counted by the worker)
} Piece;

// One document of a chunk: where it starts (for the manifest) and where its tokens end.
typedef struct {
    int piece;
    long line;          // JSONL: 0-based line index inside the piece
    size_t src_off;     // byte offset of its line (its file: 0) in the source
    size_t tok_end;     // chunk tokens up to and including this document's
} DocMark;

enum { SLOT_FREE, SLOT_BUSY, SLOT_DONE };   // BUSY: being read and tokenized by a worker

typedef struct {
    int state;
    char *buf;                 // input bytes
    size_t len, buf_cap;
    Piece *pieces;
    int npieces;
    size_t piece_cap;
    uint16_t *tok;             // (ntok,) EOT + tokens of each document, in order
    size_t ntok, tok_cap;
    DocMark *docs;
    size_t ndocs, doc_cap;
    size_t bytes;              // input bytes it accounts for (progress)
    // a bad document stops the chunk before document ndocs: in piece err_piece at 0-based line
    // err_line (JSONL; -1 for a text file), msg says what
    int err, err_piece;
    long err_line;
    char msg[600];
    int read_err;              // the reader failed after the chunk's pieces (read_msg)
    char read_msg[600];
} Chunk;

// Shrink a slot's buffers after a huge document so that the ring does not keep its size forever.
static void chunk_trim(Chunk *c) {
    if (c->buf_cap > 8 * CHUNK_BYTES) { free(c->buf); c->buf = NULL; c->buf_cap = 0; }
    if (c->tok_cap > 8 * CHUNK_BYTES) { free(c->tok); c->tok = NULL; c->tok_cap = 0; }
}

static Piece *chunk_piece(Chunk *c, int src, int kind, size_t src_off) {
    reserve(&c->pieces, &c->piece_cap, (size_t)c->npieces + 1, sizeof(Piece));
    Piece *p = &c->pieces[c->npieces++];
    *p = (Piece){src, kind, c->len, 0, src_off, 0};
    return p;
}

// ----------------------------------------------------------------------------
// the reader: sources -> chunks

typedef struct {
    const Sources *srcs;
    size_t src;          // the source being read, or the next one
    int fd;              // its file (JSONL or text), -1 between sources
    size_t pos;          // JSONL: source offset of the first byte not yet in a chunk (the carry's)
    char *carry;         // JSONL: the partial last line of the previous read
    size_t ncarry, carry_cap;
    const char *stdin_text;
    size_t stdin_len;
} Reader;

// read(2) until n bytes or the end of the file; bytes read, -1 on error
static ssize_t read_full(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

static int reader_open(Reader *rd, char *msg, size_t msglen, size_t offset) {
    const Source *s = &rd->srcs->v[rd->src];
    rd->fd = open(s->path, O_RDONLY);
    if (rd->fd < 0 || (offset && lseek(rd->fd, (off_t)offset, SEEK_SET) < 0)) {
        snprintf(msg, msglen, "%s: %s", s->path, strerror(errno));
        return -1;
    }
    rd->pos = offset;
    return 0;
}

// A read error: the chunk ends before the piece being read.
static int reader_fail(Reader *rd, Chunk *c) {
    snprintf(c->read_msg, sizeof(c->read_msg), "%s: %s", rd->srcs->v[rd->src].path, strerror(errno));
    c->npieces--;
    c->len = c->pieces[c->npieces].off;
    return -1;
}

// Fill c with about CHUNK_BYTES of input: whole text files, and whole lines of JSONL files (the
// partial line at the end of a read is carried to the next chunk). 1: more to come, 0: input done,
// -1: read error (c->read_msg).
static int reader_fill(Reader *rd, Chunk *c) {
    const Sources *srcs = rd->srcs;
    while (c->len < CHUNK_BYTES) {
        if (rd->src == srcs->n) return 0;
        const Source *s = &srcs->v[rd->src];
        if (s->kind == SRC_STDIN) {
            Piece *p = chunk_piece(c, (int)rd->src, SRC_TEXT, 0);
            reserve(&c->buf, &c->buf_cap, c->len + rd->stdin_len, 1);
            memcpy(c->buf + c->len, rd->stdin_text, rd->stdin_len);
            c->len += p->len = rd->stdin_len;
            c->bytes += rd->stdin_len;
            rd->src++;
            continue;
        }
        if (rd->fd < 0 && reader_open(rd, c->read_msg, sizeof(c->read_msg), 0) != 0) return -1;
        if (s->kind == SRC_TEXT) {
            Piece *p = chunk_piece(c, (int)rd->src, SRC_TEXT, 0);
            for (;;) {   // the file's size may have changed since it was listed: read to its end
                reserve(&c->buf, &c->buf_cap, c->len + s->size + 65536, 1);
                ssize_t r = read_full(rd->fd, c->buf + c->len, c->buf_cap - c->len);
                if (r < 0) return reader_fail(rd, c);
                c->len += (size_t)r;
                if (c->len < c->buf_cap) break;
            }
            p->len = c->len - p->off;
            c->bytes += p->len;
            close(rd->fd); rd->fd = -1; rd->src++;
            continue;
        }
        // JSONL: the carried partial line, then as much as fits; cut after the last newline
        Piece *p = chunk_piece(c, (int)rd->src, SRC_JSONL, rd->pos);
        reserve(&c->buf, &c->buf_cap, c->len + rd->ncarry, 1);
        memcpy(c->buf + c->len, rd->carry, rd->ncarry);
        c->len += rd->ncarry;
        rd->ncarry = 0;
        size_t unscanned = c->len;   // the carry holds no newline
        int eof = 0;
        for (;;) {
            // fill the chunk; a line longer than that grows it by doubling
            size_t want = c->len < CHUNK_BYTES ? CHUNK_BYTES - c->len : c->len - p->off;
            if (want < 65536) want = 65536;
            reserve(&c->buf, &c->buf_cap, c->len + want, 1);
            ssize_t r = read_full(rd->fd, c->buf + c->len, want);
            if (r < 0) return reader_fail(rd, c);
            c->len += (size_t)r;
            if ((size_t)r < want) { eof = 1; break; }
            if (c->len < CHUNK_BYTES) continue;
            char *nl = memrchr(c->buf + unscanned, '\n', c->len - unscanned);
            unscanned = c->len;
            if (!nl) continue;
            size_t keep = (size_t)(nl + 1 - c->buf);
            rd->ncarry = c->len - keep;
            reserve(&rd->carry, &rd->carry_cap, rd->ncarry, 1);
            memcpy(rd->carry, c->buf + keep, rd->ncarry);
            c->len = keep;
            break;
        }
        p->len = c->len - p->off;
        c->bytes += p->len;
        rd->pos += p->len;
        if (eof) { close(rd->fd); rd->fd = -1; rd->src++; }
    }
    return 1;
}

// ----------------------------------------------------------------------------
// workers: chunk -> tokens

typedef struct {
    TokenBuf ids;     // one document's ids
    Bytes text, key;  // a JSONL line's decoded text, and the key being compared with "text"
} WorkerBufs;

// EOT + the tokens of text[0..len) appended to the chunk; 0, or -1 if the encoder failed
static int encode_doc(const Tokenizer *tok, Chunk *c, WorkerBufs *w, int piece, long line, size_t src_off,
                      const char *text, size_t len) {
    w->ids.len = 0;
    tokenbuf_push(&w->ids, GPT2_EOT);
    if (tokenizer_encode(tok, text, len, &w->ids) != 0) return -1;
    reserve(&c->tok, &c->tok_cap, c->ntok + w->ids.len, sizeof(uint16_t));
    for (size_t i = 0; i < w->ids.len; i++) c->tok[c->ntok + i] = (uint16_t)w->ids.data[i];
    c->ntok += w->ids.len;
    reserve(&c->docs, &c->doc_cap, c->ndocs + 1, sizeof(DocMark));
    c->docs[c->ndocs++] = (DocMark){piece, line, src_off, c->ntok};
    if (w->ids.cap > 4 * CHUNK_BYTES) tokenbuf_free(&w->ids);   // after a huge document
    return 0;
}

static int is_blank(const char *s, const char *end) {
    while (s < end && (*s == ' ' || *s == '\t' || *s == '\r')) s++;
    return s == end;
}

// Tokenize every document of the chunk, stopping at the first bad one.
static void encode_chunk(const Tokenizer *tok, Chunk *c, WorkerBufs *w) {
    for (int k = 0; k < c->npieces && !c->err; k++) {
        Piece *pc = &c->pieces[k];
        const char *s = c->buf + pc->off, *end = s + pc->len;
        if (pc->kind == SRC_TEXT) {
            if (encode_doc(tok, c, w, k, 0, 0, s, pc->len) != 0) {
                c->err = 1; c->err_piece = k; c->err_line = -1;
                snprintf(c->msg, sizeof(c->msg), "tokenizer failed");
            }
            continue;
        }
        long line = 0;
        for (const char *p = s; p < end; line++) {
            const char *nl = memchr(p, '\n', (size_t)(end - p)), *e = nl ? nl : end;
            if (!is_blank(p, e)) {
                long col = 0;
                int rc = jsonl_text(p, e, &w->text, &w->key, &col);
                if (rc == JSONL_INVALID) snprintf(c->msg, sizeof(c->msg), "invalid JSON at column %ld", col);
                else if (rc == JSONL_NO_TEXT) snprintf(c->msg, sizeof(c->msg), "expected an object with a string \"text\"");
                else if (encode_doc(tok, c, w, k, line, pc->src_off + (size_t)(p - s), w->text.data, w->text.len) != 0)
                    snprintf(c->msg, sizeof(c->msg), "tokenizer failed");
                else rc = -1;
                if (rc != -1) { c->err = 1; c->err_piece = k; c->err_line = line; break; }
            }
            p = nl ? nl + 1 : end;
        }
        pc->nlines = line;
    }
}

// ----------------------------------------------------------------------------
// the manifest: OUTDIR/PREFIX.tokenize.json

// Where shard k starts: the document holding its first token, and how many of that document's
// tokens (EOT included) are in shard k-1 and before.
typedef struct {
    long long src, offset, line, skip;
} ResumePoint;

typedef struct {
    char *inputs;             // the command-line inputs, canonical, as a JSON array
    long long shard_tokens, files, bytes;
    char fingerprint[17];     // hex of the inputs' and the ranks file's hash
    int force;                // started with --force: remove stale higher shards when finished
    int finished;
    long long shards, docs, tokens;   // complete so far
    ResumePoint next;         // unfinished: where shard `shards` starts
} Manifest;

static int write_file_atomic(const char *path, const char *data, size_t n, char *err, size_t errlen) {
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { snprintf(err, errlen, "%s: %s", tmp, strerror(errno)); return -1; }
    int ok = write(fd, data, n) == (ssize_t)n;
    ok = fsync(fd) == 0 && ok;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno)); unlink(tmp); return -1;
    }
    return 0;
}

static void fsync_dir(const char *dir) {
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) { fsync(dfd); close(dfd); }
}

static int manifest_write(const Manifest *m, const char *path, const char *outdir, char *err, size_t errlen) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "tool", "tokenize");
    cJSON_AddNumberToObject(o, "version", MANIFEST_VERSION);
    cJSON_AddItemToObject(o, "inputs", cJSON_Parse(m->inputs));
    cJSON_AddNumberToObject(o, "files", (double)m->files);
    cJSON_AddNumberToObject(o, "bytes", (double)m->bytes);
    cJSON_AddStringToObject(o, "fingerprint", m->fingerprint);
    cJSON_AddNumberToObject(o, "shard_tokens", (double)m->shard_tokens);
    cJSON_AddBoolToObject(o, "force", m->force);
    cJSON_AddBoolToObject(o, "finished", m->finished);
    cJSON_AddNumberToObject(o, "shards", (double)m->shards);
    cJSON_AddNumberToObject(o, "documents", (double)m->docs);
    cJSON_AddNumberToObject(o, "tokens", (double)m->tokens);
    if (!m->finished) {
        cJSON *n = cJSON_AddObjectToObject(o, "next");
        cJSON_AddNumberToObject(n, "file", (double)m->next.src);
        cJSON_AddNumberToObject(n, "offset", (double)m->next.offset);
        cJSON_AddNumberToObject(n, "line", (double)m->next.line);
        cJSON_AddNumberToObject(n, "skip_tokens", (double)m->next.skip);
    }
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    size_t n = strlen(text);
    text[n] = '\n';   // cJSON_Print's buffer has room for its NUL, which becomes the final newline
    int rc = write_file_atomic(path, text, n + 1, err, errlen);
    free(text);
    if (rc == 0) fsync_dir(outdir);
    return rc;
}

static int json_ll(const cJSON *o, const char *key, long long *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9e15) return -1;
    *out = (long long)v->valuedouble;
    return 0;
}

// 0 read, -1 unreadable or not a manifest of this version (err)
static int manifest_read(Manifest *m, const char *path, char *err, size_t errlen) {
    memset(m, 0, sizeof(*m));
    FILE *f = fopen(path, "rb");
    if (!f) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    size_t n;
    char *text = read_all(f, &n);
    fclose(f);
    text = xrealloc(text, n + 1);
    text[n] = '\0';
    cJSON *o = cJSON_Parse(text);
    free(text);
    const cJSON *fp = cJSON_GetObjectItemCaseSensitive(o, "fingerprint"), *in = cJSON_GetObjectItemCaseSensitive(o, "inputs");
    const cJSON *fin = cJSON_GetObjectItemCaseSensitive(o, "finished"), *nx = cJSON_GetObjectItemCaseSensitive(o, "next");
    const cJSON *force = cJSON_GetObjectItemCaseSensitive(o, "force");
    long long version = 0;
    int ok = o && json_ll(o, "version", &version) == 0 && version == MANIFEST_VERSION && cJSON_IsString(fp) &&
             strlen(fp->valuestring) == 16 && cJSON_IsArray(in) && cJSON_IsBool(fin) && cJSON_IsBool(force) &&
             json_ll(o, "files", &m->files) == 0 && json_ll(o, "bytes", &m->bytes) == 0 &&
             json_ll(o, "shard_tokens", &m->shard_tokens) == 0 && json_ll(o, "shards", &m->shards) == 0 &&
             json_ll(o, "documents", &m->docs) == 0 && json_ll(o, "tokens", &m->tokens) == 0;
    if (ok) {
        m->finished = cJSON_IsTrue(fin);
        m->force = cJSON_IsTrue(force);
        strcpy(m->fingerprint, fp->valuestring);
        m->inputs = cJSON_PrintUnformatted(in);
        ok = m->finished || (json_ll(nx, "file", &m->next.src) == 0 && json_ll(nx, "offset", &m->next.offset) == 0 &&
                             json_ll(nx, "line", &m->next.line) == 0 && json_ll(nx, "skip_tokens", &m->next.skip) == 0);
    }
    cJSON_Delete(o);
    if (!ok) {
        snprintf(err, errlen, "%s: not a manifest of this version of tokenize (version %d)", path, MANIFEST_VERSION);
        return -1;
    }
    return 0;
}

// ----------------------------------------------------------------------------
// shards

typedef struct {
    const char *outdir, *prefix, *manifest_path;
    Manifest *m;                 // updated after each shard
    int recorded;                // the manifest exists (a new run writes it before its first shard)
    size_t cap;                  // tokens per shard
    int max_shards;              // 0: no limit
    int fd;                      // the open shard's tmp file, -1 if none
    size_t fill, unsynced;       // tokens in it; bytes not yet handed to writeback
    long long stream;            // stream index of the next chunk's first token
    long long docs;              // documents of the stream before the next chunk
    size_t written, kept;
    int paused;                  // stopped by --max-shards
} Shards;

static void shard_path(const Shards *sh, long long k, char *path, size_t len, const char *suffix) {
    snprintf(path, len, "%s/%s_%s_%06lld.bin%s", sh->outdir, sh->prefix, k == 0 ? "val" : "train", k, suffix);
}

static int write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w; n -= (size_t)w;
    }
    return 0;
}

static int shard_open(Shards *sh, char *err, size_t errlen) {
    if (!sh->recorded && manifest_write(sh->m, sh->manifest_path, sh->outdir, err, errlen) != 0) return -1;
    sh->recorded = 1;
    char tmp[4200];
    shard_path(sh, sh->m->shards, tmp, sizeof(tmp), ".tmp");
    static const int32_t zero[SHARD_HEADER_INTS];   // the count is written when the shard is complete
    sh->fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (sh->fd < 0 || write_all(sh->fd, zero, sizeof(zero)) != 0) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno)); return -1;
    }
    sh->fill = sh->unsynced = 0;
    return 0;
}

// Complete the open shard: header, fsync, rename; then record it in the manifest (the caller has
// set where the next one starts, or that the run is finished).
static int shard_close(Shards *sh, char *err, size_t errlen) {
    char tmp[4200], path[4200];
    shard_path(sh, sh->m->shards, tmp, sizeof(tmp), ".tmp");
    shard_path(sh, sh->m->shards, path, sizeof(path), "");
    int32_t header[3] = {SHARD_MAGIC, SHARD_VERSION, (int32_t)sh->fill};
    int ok = pwrite(sh->fd, header, sizeof(header), 0) == sizeof(header);
    ok = fsync(sh->fd) == 0 && ok;
    ok = close(sh->fd) == 0 && ok;
    sh->fd = -1;
    if (!ok || rename(tmp, path) != 0) { snprintf(err, errlen, "%s: %s", tmp, strerror(errno)); return -1; }
    fsync_dir(sh->outdir);
    sh->m->shards++;
    sh->m->tokens += (long long)sh->fill;
    sh->fill = 0;
    sh->written++;
    return manifest_write(sh->m, sh->manifest_path, sh->outdir, err, errlen);
}

// Append the first ntok tokens of chunk c (documents [0, ndocs)) to the shards. Tokens before
// m->tokens + fill (resuming: in complete shards already) are dropped.
static int shards_append(Shards *sh, const Chunk *c, size_t ntok, size_t ndocs, const long *line_base,
                         char *err, size_t errlen) {
    long long g0 = sh->stream;
    size_t i = 0;
    while (i < ntok) {
        long long have = sh->m->tokens + (long long)sh->fill;   // stream index of the next token to write
        if (g0 + (long long)ntok <= have) break;
        if (g0 + (long long)i < have) i = (size_t)(have - g0);
        if (sh->fd < 0) {
            if (sh->max_shards && sh->m->shards >= sh->max_shards) { sh->paused = 1; return 0; }
            if (shard_open(sh, err, errlen) != 0) return -1;
        }
        size_t n = ntok - i < sh->cap - sh->fill ? ntok - i : sh->cap - sh->fill;
        if (write_all(sh->fd, c->tok + i, n * sizeof(uint16_t)) != 0) {
            snprintf(err, errlen, "%s/%s shard %lld: write: %s", sh->outdir, sh->prefix, sh->m->shards, strerror(errno));
            return -1;
        }
        sh->fill += n;
        sh->unsynced += n * sizeof(uint16_t);
        i += n;
        if (sh->unsynced >= SYNC_BYTES) {   // hand the written part to the disk now, not all at the fsync
            sync_file_range(sh->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
            sh->unsynced = 0;
        }
        if (sh->fill == sh->cap) {
            // the document holding the shard's last token: the next shard starts in it
            size_t last = i - 1, d = 0;
            while (c->docs[d].tok_end <= last) d++;
            size_t start = d ? c->docs[d - 1].tok_end : 0;
            const Piece *pc = &c->pieces[c->docs[d].piece];
            sh->m->docs = sh->docs + (long long)d + 1;
            sh->m->next = (ResumePoint){pc->src, (long long)c->docs[d].src_off,
                                        pc->kind == SRC_JSONL ? line_base[c->docs[d].piece] + c->docs[d].line : 0,
                                        (long long)(i - start)};
            if (shard_close(sh, err, errlen) != 0) return -1;
        }
    }
    sh->stream += (long long)ntok;
    sh->docs += (long long)ndocs;
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
// every 10 s so logs stay readable. Rates count this run's work; the ETA assumes the remaining
// bytes go as fast as the ones read.
static void progress(double t0, size_t docs, size_t toks, size_t bytes, size_t done_before, size_t total, int final) {
    static double last = -1e9;
    int tty = isatty(2);
    double t = now_s(), dt = t - t0;
    if (!final && t - last < (tty ? 0.2 : 10.0)) return;
    last = t;
    double frac = total ? (double)(done_before + bytes) / (double)total : 1.0;
    char bar[31], a[16], b[16], c[16], d[16];
    int fill = (int)(frac * 30 + 0.5);
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    double eta = bytes > 0 && dt > 0 ? dt * (double)(total - done_before - bytes) / (double)bytes : 0;
    fprintf(stderr, "%s[%s] %5.1f%% %s docs (%s/s) %s tok (%s/s) ETA %dm%02ds%s", tty ? "\r\033[K" : "",
            bar, 100 * frac, human((double)docs, a), human(docs / (dt > 0 ? dt : 1), b), human((double)toks, c),
            human(toks / (dt > 0 ? dt : 1), d), (int)eta / 60, (int)eta % 60, tty && !final ? "" : "\n");
}

// ----------------------------------------------------------------------------
// the pipeline: a ring of chunk slots and n workers. A worker takes the next chunk of input (reading
// it under read_mu), tokenizes it, and then, if no other worker holds the writer role (write_mu),
// appends every chunk that is next in order and tokenized to the shards. Reading and writing are
// cheap next to tokenizing, so no thread of their own competes with the workers for the cores, and
// --threads N means N threads.

// The writer role's state: chunks in order -> shards.
typedef struct {
    Shards sh;
    const Sources *srcs;
    long *line_base;               // (npieces,) of the chunk: lines of its source before each piece
    size_t line_cap;
    long long line_src, line;      // the JSONL source being read, and its lines before the next piece
    size_t docs, toks, bytes;      // this run's (progress)
    size_t done_before, total;     // input bytes before the resume point, and in all
    double t0;
    int status;                    // 1: an error stopped the run (printed)
} Writer;

// Append chunk c to the shards. 0, or -1 when the run stops here: an error (printed, status set)
// or --max-shards (sh.paused).
static int writer_take(Writer *w, const Chunk *c) {
    char err[8192];
    reserve(&w->line_base, &w->line_cap, (size_t)c->npieces + 1, sizeof(long));
    for (int k = 0; k < c->npieces; k++) {
        if (c->pieces[k].src != w->line_src) { w->line_src = c->pieces[k].src; w->line = 0; }
        w->line_base[k] = (long)w->line;
        w->line += c->pieces[k].nlines;
    }
    size_t ndocs = c->ndocs, ntok = ndocs ? c->docs[ndocs - 1].tok_end : 0;
    const char *path = c->err ? w->srcs->v[c->pieces[c->err_piece].src].path : NULL;
    if (shards_append(&w->sh, c, ntok, ndocs, w->line_base, err, sizeof(err)) != 0) {
        fprintf(stderr, "\ntokenize: %s\n", err); w->status = 1;
    } else if (w->sh.paused) {
        // --max-shards: the run stops before the rest of this chunk, bad or not
    } else if (c->err && c->err_line < 0) {
        fprintf(stderr, "\ntokenize: %s: %s\n", path, c->msg); w->status = 1;
    } else if (c->err) {
        fprintf(stderr, "\ntokenize: %s:%ld: %s\n", path, w->line_base[c->err_piece] + c->err_line + 1, c->msg);
        w->status = 1;
    } else if (c->read_err) {
        fprintf(stderr, "\ntokenize: %s\n", c->read_msg); w->status = 1;
    }
    w->docs += ndocs; w->toks += ntok; w->bytes += c->bytes;
    if (w->status || w->sh.paused) return -1;
    progress(w->t0, w->docs, w->toks, w->bytes, w->done_before, w->total, 0);
    return 0;
}

typedef struct {
    Chunk *slots;
    int nslots;
    pthread_mutex_t read_mu;     // the reader, next_read, read_done
    pthread_mutex_t write_mu;    // the writer role: writer, next_write's chunk
    pthread_mutex_t mu;          // slot states, next_write, stop
    pthread_cond_t freed;        // a slot became free, or stop
    long next_read, next_write;  // chunk sequence numbers
    int read_done, stop;
    Reader rd;
    Writer *writer;
    const Tokenizer *tok;
} Pipeline;

static Chunk *slot_of(Pipeline *pl, long seq) { return &pl->slots[seq % pl->nslots]; }

static int next_is_done(Pipeline *pl) {
    pthread_mutex_lock(&pl->mu);
    int ready = !pl->stop && slot_of(pl, pl->next_write)->state == SLOT_DONE;
    pthread_mutex_unlock(&pl->mu);
    return ready;
}

// Take the writer role if it is free and write what is ready. A chunk that becomes ready while
// another worker holds the role is found by that worker when it looks again after letting go.
static void write_ready(Pipeline *pl) {
    while (next_is_done(pl) && pthread_mutex_trylock(&pl->write_mu) == 0) {
        while (next_is_done(pl)) {
            Chunk *c = slot_of(pl, pl->next_write);
            int stop = writer_take(pl->writer, c) != 0;
            chunk_trim(c);
            pthread_mutex_lock(&pl->mu);
            c->state = SLOT_FREE;
            pl->next_write++;
            pl->stop |= stop;
            pthread_cond_broadcast(&pl->freed);
            pthread_mutex_unlock(&pl->mu);
        }
        pthread_mutex_unlock(&pl->write_mu);
    }
}

// the next chunk of input read into its slot (waiting for the slot to be free); NULL at the end
static Chunk *read_next(Pipeline *pl) {
    pthread_mutex_lock(&pl->read_mu);
    Chunk *c = pl->read_done ? NULL : slot_of(pl, pl->next_read);
    if (c) {
        pthread_mutex_lock(&pl->mu);
        while (!pl->stop && c->state != SLOT_FREE) pthread_cond_wait(&pl->freed, &pl->mu);
        if (pl->stop) c = NULL;
        else c->state = SLOT_BUSY;
        pthread_mutex_unlock(&pl->mu);
    }
    if (c) {
        c->len = 0; c->npieces = 0; c->ntok = 0; c->ndocs = 0; c->bytes = 0; c->err = 0;
        int more = reader_fill(&pl->rd, c);
        c->read_err = more < 0;
        pl->next_read++;
        pl->read_done = more <= 0;
    }
    pthread_mutex_unlock(&pl->read_mu);
    return c;
}

static void *worker_main(void *arg) {
    Pipeline *pl = arg;
    WorkerBufs w = {0};
    Chunk *c;
    while ((c = read_next(pl))) {
        encode_chunk(pl->tok, c, &w);
        pthread_mutex_lock(&pl->mu);
        c->state = SLOT_DONE;
        pthread_mutex_unlock(&pl->mu);
        write_ready(pl);
    }
    tokenbuf_free(&w.ids);
    free(w.text.data);
    free(w.key.data);
    return NULL;
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
    long shard_tokens = 100000000, threads = omp_get_num_procs(), max_shards = 0;
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
        } else if (!strcmp(a, "--max-shards") && has_value) {
            if (parse_long(argv[++i], 1, 999999, &max_shards)) {
                fprintf(stderr, "tokenize: --max-shards %s: expected an integer in [1, 999999]\n", argv[i]); return 2;
            }
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "tokenize: %s: unknown option or missing value (see --help)\n", a); return 2;
        } else inputs[ninputs++] = a;
    }
    if (!outdir || ninputs == 0) { fprintf(stderr, "tokenize: need -o OUTDIR and at least one INPUT (see --help)\n"); return 2; }
    if (force && resume) { fprintf(stderr, "tokenize: --force and --resume exclude each other\n"); return 2; }

    // every input must exist before anything is written; the fingerprint covers what each one is
    char err[8192];
    Sources srcs = {0};
    char *stdin_text = NULL;
    size_t stdin_len = 0, total_bytes = 0;
    uint64_t fp = FNV_SEED;
    cJSON *canon_inputs = cJSON_CreateArray();
    struct stat rst;
    char *ranks_real = realpath(ranks, NULL);
    if (!ranks_real || stat(ranks_real, &rst) != 0) { fprintf(stderr, "tokenize: %s: %s\n", ranks, strerror(errno)); return 1; }
    fp = fnv(fp, ranks_real, strlen(ranks_real) + 1);
    fp = fnv(fp, &rst.st_size, sizeof(rst.st_size));
    fp = fnv(fp, &rst.st_mtim, sizeof(rst.st_mtim));
    for (int i = 0; i < ninputs; i++) {
        if (!strcmp(inputs[i], "-")) {
            if (stdin_text) { fprintf(stderr, "tokenize: stdin (-) given twice\n"); return 2; }
            stdin_text = read_all(stdin, &stdin_len);
            struct stat st = {.st_size = (off_t)stdin_len};
            sources_add(&srcs, "<stdin>", SRC_STDIN, i, &st);
            uint64_t h = hash_bytes(stdin_text, stdin_len);
            fp = fnv(fp, "-", 2);
            fp = fnv(fp, &h, sizeof(h));
            cJSON_AddItemToArray(canon_inputs, cJSON_CreateString("-"));
            continue;
        }
        size_t first = srcs.n;
        if (expand(&srcs, inputs[i], i, err, sizeof(err)) != 0) { fprintf(stderr, "tokenize: %s\n", err); return 1; }
        char *real = realpath(inputs[i], NULL);
        cJSON_AddItemToArray(canon_inputs, cJSON_CreateString(real));
        fp = fnv(fp, real, strlen(real) + 1);
        free(real);
        for (size_t k = first; k < srcs.n; k++) {   // each file by its path below the input, size, mtime
            const Source *s = &srcs.v[k];
            const char *below = s->path + strlen(inputs[i]);
            fp = fnv(fp, below, strlen(below) + 1);
            fp = fnv(fp, &s->size, sizeof(s->size));
            fp = fnv(fp, &s->mtime_ns, sizeof(s->mtime_ns));
        }
    }
    if (srcs.n == 0) { fprintf(stderr, "tokenize: the inputs hold no files\n"); return 1; }
    for (size_t i = 0; i < srcs.n; i++) total_bytes += srcs.v[i].size;
    fp = fnv(fp, &shard_tokens, sizeof(shard_tokens));

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

    // This run: new, or the continuation of an unfinished one of the same inputs and settings.
    Manifest m = {.inputs = cJSON_PrintUnformatted(canon_inputs), .shard_tokens = shard_tokens,
                  .files = (long long)srcs.n, .bytes = (long long)total_bytes, .force = force};
    cJSON_Delete(canon_inputs);
    snprintf(m.fingerprint, sizeof(m.fingerprint), "%016llx", (unsigned long long)fp);
    char manifest_path[4200];
    snprintf(manifest_path, sizeof(manifest_path), "%s/%s.tokenize.json", outdir, prefix);
    size_t nexisting;
    char **existing = existing_shards(outdir, prefix, &nexisting);
    int continuing = 0;
    struct stat mst;
    if (!force && stat(manifest_path, &mst) == 0) {
        Manifest old;
        if (manifest_read(&old, manifest_path, err, sizeof(err)) != 0) {
            fprintf(stderr, "tokenize: %s; pass --force to overwrite\n", err); return 1;
        }
        const char *why = NULL;
        char what[8192];
        if (old.shard_tokens != shard_tokens) {
            snprintf(what, sizeof(what), "--shard-tokens %ld, the existing run's is %lld", shard_tokens, old.shard_tokens);
            why = what;
        } else if (strcmp(old.inputs, m.inputs) != 0) {
            snprintf(what, sizeof(what), "inputs %s, the existing run's are %s", m.inputs, old.inputs);
            why = what;
        } else if (strcmp(old.fingerprint, m.fingerprint) != 0) {
            snprintf(what, sizeof(what), "the input files or the ranks file changed since (%lld files, %lld bytes then; "
                     "%zu, %zu now, or their modification times differ)", old.files, old.bytes, srcs.n, total_bytes);
            why = what;
        }
        if (old.finished && !why && resume) {
            printf("%s/%s_*.bin: already complete (%lld shards, %lld documents, %lld tokens); nothing to do\n",
                   outdir, prefix, old.shards, old.docs, old.tokens);
            return 0;
        }
        if (old.finished || why) {
            fprintf(stderr, "tokenize: %s: holds the %s run of prefix \"%s\" (%lld complete shards)%s%s; "
                    "pass --force to start over\n", outdir, old.finished ? "finished" : "unfinished", prefix,
                    old.shards, why ? ": this run has " : "", why ? why : "");
            return 1;
        }
        // the complete shards must still be there, whole
        for (long long k = 0; k < old.shards; k++) {
            char path[4200];
            Shards tmp = {.outdir = outdir, .prefix = prefix};
            shard_path(&tmp, k, path, sizeof(path), "");
            Shard s;
            if (shard_map(&s, path, "llmc", err, sizeof(err)) != 0 || s.ntok != (size_t)shard_tokens) {
                if (s.map) snprintf(err, sizeof(err), "%s: %zu tokens, expected %ld", path, s.ntok, shard_tokens);
                fprintf(stderr, "tokenize: %s, but %s records it complete; pass --force to start over\n", err, manifest_path);
                return 1;
            }
            shard_unmap(&s);
        }
        if (old.next.src >= (long long)srcs.n || old.next.offset > (long long)srcs.v[old.next.src].size) {
            fprintf(stderr, "tokenize: %s: resume point outside the inputs; pass --force to start over\n", manifest_path);
            return 1;
        }
        free(m.inputs);
        m = old;
        continuing = 1;
    } else if (nexisting && !force) {
        fprintf(stderr, "tokenize: %s/%s: exists (%zu shard%s of prefix \"%s\", not from an unfinished run of "
                "tokenize: no %s); pass --force to overwrite\n", outdir, existing[0], nexisting,
                nexisting > 1 ? "s" : "", prefix, manifest_path);
        return 1;
    }

    static Tokenizer tok;
    if (tokenizer_load(&tok, ranks, err, sizeof(err)) != 0) { fprintf(stderr, "tokenize: %s\n", err); return 1; }
    fprintf(stderr, "tokenize: %zu input file%s (%.1f MB), %ld thread%s, shards of %ld tokens -> %s/%s_*.bin%s\n",
            srcs.n, srcs.n > 1 ? "s" : "", total_bytes / 1e6, threads, threads > 1 ? "s" : "", shard_tokens,
            outdir, prefix, continuing ? " (continuing)" : "");
    if (continuing)
        fprintf(stderr, "tokenize: continuing the unfinished run: %lld complete shard%s kept, from %s byte %lld\n",
                m.shards, m.shards == 1 ? "" : "s", srcs.v[m.next.src].path, m.next.offset);
    Writer wr = {.sh = {.outdir = outdir, .prefix = prefix, .manifest_path = manifest_path, .m = &m,
                        .cap = (size_t)shard_tokens, .max_shards = (int)max_shards, .fd = -1, .kept = (size_t)m.shards,
                        .recorded = continuing},
                 .srcs = &srcs, .line_src = m.next.src, .line = m.next.line, .total = total_bytes, .t0 = now_s()};
    Shards *sh = &wr.sh;
    if (continuing) {   // the stream restarts at the first token of the document holding the cut
        sh->stream = m.tokens - m.next.skip;
        sh->docs = m.docs - (m.next.skip > 0);
    }
    for (long long k = 0; k < m.next.src; k++) wr.done_before += srcs.v[k].size;
    wr.done_before += (size_t)m.next.offset;
    Pipeline pl = {.nslots = SLOTS_PER_THREAD * (int)threads + 2, .writer = &wr, .tok = &tok};
    pl.slots = calloc((size_t)pl.nslots, sizeof(Chunk));
    pthread_mutex_init(&pl.read_mu, NULL);
    pthread_mutex_init(&pl.write_mu, NULL);
    pthread_mutex_init(&pl.mu, NULL);
    pthread_cond_init(&pl.freed, NULL);
    pl.rd = (Reader){.srcs = &srcs, .src = (size_t)m.next.src, .fd = -1, .stdin_text = stdin_text, .stdin_len = stdin_len};
    int status = 0;
    if (m.next.offset && reader_open(&pl.rd, err, sizeof(err), (size_t)m.next.offset) != 0) {
        fprintf(stderr, "tokenize: %s\n", err); status = 1;
    }
    pthread_t *workers = malloc(sizeof(pthread_t) * (size_t)threads);
    long nworkers = status == 0 ? threads : 0;
    for (long t = 0; t < nworkers; t++) pthread_create(&workers[t], NULL, worker_main, &pl);
    for (long t = 0; t < nworkers; t++) pthread_join(workers[t], NULL);
    status |= wr.status;

    if (status == 0 && !sh->paused) {   // finished: the last shard, or (the input ended with a full one) the manifest
        m.docs = sh->docs;
        m.finished = 1;
        if (sh->fd >= 0 ? shard_close(sh, err, sizeof(err)) : manifest_write(&m, manifest_path, outdir, err, sizeof(err))) {
            fprintf(stderr, "tokenize: %s\n", err); status = 1;
        }
    }
    if (status != 0 && sh->fd >= 0) {   // the partial shard is not kept
        char tmp[4200];
        shard_path(sh, m.shards, tmp, sizeof(tmp), ".tmp");
        close(sh->fd);
        unlink(tmp);
    }
    if (status != 0 && m.shards == 0 && sh->recorded) unlink(manifest_path);   // nothing of this run is left
    if (status == 0 && sh->paused) {
        printf("stopped after %lld shards (--max-shards) in %s/%s_*.bin; rerun to continue\n", m.shards, outdir, prefix);
    } else if (status == 0) {
        progress(wr.t0, wr.docs, wr.toks, wr.bytes, wr.done_before, wr.total, 1);
        // shards beyond this run's last one belong to an earlier, larger run
        for (size_t i = 0; i < nexisting; i++) {
            if (shard_index_of(existing[i], prefix) < m.shards) continue;
            char path[4096];
            snprintf(path, sizeof(path), "%s/%s", outdir, existing[i]);
            if (m.force && unlink(path) == 0) fprintf(stderr, "tokenize: removed stale %s\n", path);
            else fprintf(stderr, "tokenize: warning: %s is not part of this run's output\n", path);
        }
        double dt = now_s() - wr.t0;
        printf("%lld documents, %lld tokens, %lld shards (%zu written, %zu kept) in %s/%s_*.bin; %.1f s, %.0f tokens/s\n",
               m.docs, m.tokens, m.shards, sh->written, sh->kept, outdir, prefix, dt, wr.toks / (dt > 0 ? dt : 1));
        if (m.shards == 1) fprintf(stderr, "tokenize: warning: one shard only: no training shard (lower --shard-tokens)\n");
    }

    for (int i = 0; i < pl.nslots; i++) {
        Chunk *s = &pl.slots[i];
        free(s->buf); free(s->pieces); free(s->tok); free(s->docs);
    }
    if (pl.rd.fd >= 0) close(pl.rd.fd);
    free(pl.rd.carry); free(pl.slots); free(workers); free(wr.line_base);
    for (size_t i = 0; i < nexisting; i++) free(existing[i]);
    free(existing);
    for (size_t i = 0; i < srcs.n; i++) free(srcs.v[i].path);
    free(srcs.v); free(default_prefix); free(inputs); free(stdin_text); free(ranks_real); free(m.inputs);
    tokenizer_free(&tok);
    return status;
}
