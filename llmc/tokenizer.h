// GPT-2 byte-level BPE tokenizer: encode text to token ids and decode ids to bytes, equal to
// tiktoken's get_encoding("gpt2").encode_ordinary token for token.
//
// Encoding, as tiktoken does it:
//   1. Pre-tokenize with GPT-2's regular expression (PCRE2, UTF-8 + Unicode properties, JIT):
//        '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      \s is spelled out as Unicode White_Space (what tiktoken's Rust regex means by \s): PCRE2's own
//      \s under PCRE2_UCP also matches U+180E, which left White_Space in Unicode 6.3 (and tiktoken
//      then splits "a \u180Eb" differently).
//   2. Each piece that is itself a token is that token. Otherwise start from its single bytes and
//      repeatedly merge the adjacent pair whose concatenation has the lowest rank (the leftmost on
//      a tie) until no adjacent pair is a token. Ranks come from data/gpt2.tiktoken (r50k ranks:
//      "base64-token rank" per line, 50,256 lines); the token id is the rank. 50256 is
//      <|endoftext|>, never produced by encoding ("<|endoftext|>" in text is ordinary text).
//
// Invalid UTF-8 (tiktoken cannot be given it: its strings are Unicode), defined here so that
// encoding never fails and is deterministic: the input is cut into maximal runs of valid UTF-8
// (RFC 3629: no overlong forms, no surrogates U+D800..U+DFFF, nothing above U+10FFFF); each run is
// encoded as above as if it were a text of its own, and every byte that does not belong to a valid
// character becomes its single-byte token. E.g. "ab\xFFcd" encodes as encode("ab") + [byte token of
// 0xFF] + encode("cd"), and a truncated "\xE2\x82" followed by "x" gives two byte tokens, then "x".
// Decoding the ids gives back the input bytes exactly, valid UTF-8 or not.
//
// Thread safety: a loaded Tokenizer is read-only; encode allocates its match state per call.
#ifndef LLMC_TOKENIZER_H
#define LLMC_TOKENIZER_H
#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <limits.h>
#include <pcre2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define GPT2_EOT 50256
#define GPT2_NUM_RANKS 50256   // lines in the ranks file; EOT is one more token after them
#define TOK_EOT_TEXT "<|endoftext|>"

// One slot of the open-addressing table bytes -> rank. The first (up to) 8 bytes of the token live
// in the slot, so the common short token is found without touching the token bytes at all.
typedef struct {
    uint64_t head;   // bytes 0..min(len,8)-1, little-endian, zero padded
    uint32_t len;    // 0: empty slot
    int32_t rank;
} TokSlot;

struct Tokenizer {
    int vocab_size;           // GPT2_NUM_RANKS + 1 (EOT)
    unsigned char *bytes;     // every token's bytes back to back, then 8 bytes of zero padding
    uint32_t *offsets;        // (vocab_size + 1): token i is bytes[offsets[i] .. offsets[i+1])
    TokSlot *table;           // 2^table_bits slots, at most half full; the start of the one
                              // allocation that also holds offsets and bytes (tokenizer_load)
    int table_bits;
    int byte_rank[256];       // single-byte tokens, the starting point of every merge
    pcre2_code *re;
    int jit;                  // 1 if the pattern was JIT-compiled
};
typedef struct Tokenizer Tokenizer;

typedef struct { int *data; size_t len, cap; } TokenBuf;

// ----------------------------------------------------------------------------
// growable id buffer

static int tokenbuf_reserve(TokenBuf *b, size_t extra) {
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;   // small first: most documents are short
    while (cap < b->len + extra) cap *= 2;
    int *d = (int *)realloc(b->data, cap * sizeof(int));
    if (!d) return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

// Out of memory here has no caller to report to (void API), and no trainer survives it: abort.
static void tokenbuf_push(TokenBuf *b, int id) {
    if (tokenbuf_reserve(b, 1) != 0) {
        fprintf(stderr, "tokenbuf_push: out of memory at %zu ids\n", b->len);
        abort();
    }
    b->data[b->len++] = id;
}

static void tokenbuf_free(TokenBuf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

// ----------------------------------------------------------------------------
// the rank table

// Every string hashed or looked up is followed by at least 8 readable bytes (the token pool and
// the encoder's piece buffer are padded), so words are loaded whole and masked.
static inline uint64_t tok_load64(const unsigned char *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

static inline uint64_t tok_head(const unsigned char *p, size_t n) {
    uint64_t w = tok_load64(p);
    return n >= 8 ? w : w & ((1ull << (8 * n)) - 1);
}

static inline uint32_t tok_hash(const unsigned char *p, size_t n, uint64_t head, int bits) {
    uint64_t h = (head ^ ((uint64_t)n << 56)) * 0x9E3779B97F4A7C15ull;
    for (size_t i = 8; i < n; i += 8) {
        h ^= h >> 29;
        h = (h ^ tok_head(p + i, n - i)) * 0xBF58476D1CE4E5B9ull;
    }
    return (uint32_t)(h >> (64 - bits));
}

// rank of the token p[0..n), or -1 if those bytes are not a token
static inline int tok_rank(const Tokenizer *t, const unsigned char *p, size_t n) {
    uint64_t head = tok_head(p, n);
    uint32_t mask = (1u << t->table_bits) - 1;
    for (uint32_t i = tok_hash(p, n, head, t->table_bits);; i = (i + 1) & mask) {
        const TokSlot *s = &t->table[i];
        if (s->len == n && s->head == head &&
            (n <= 8 || memcmp(t->bytes + t->offsets[s->rank] + 8, p + 8, n - 8) == 0)) {
            return s->rank;
        }
        if (s->len == 0) return -1;
    }
}

// ----------------------------------------------------------------------------
// loading data/gpt2.tiktoken

static int tok_b64_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

// Strict standard base64 (length a multiple of 4, '=' only as final padding, zero unused bits),
// so that one token has one spelling. Writes the bytes to out; returns their count, or -1.
static long tok_b64_decode(const unsigned char *s, size_t n, unsigned char *out) {
    if (n == 0 || n % 4 != 0) return -1;
    size_t pad = (s[n - 1] == '=') + (s[n - 2] == '=' && s[n - 1] == '=');
    long k = 0;
    for (size_t i = 0; i < n; i += 4) {
        uint32_t v = 0;
        for (size_t j = 0; j < 4; j++) {
            int d = (i + j >= n - pad) ? 0 : tok_b64_value(s[i + j]);
            if (d < 0) return -1;
            v = (v << 6) | (uint32_t)d;
        }
        out[k++] = (unsigned char)(v >> 16);
        if (i + 4 < n || pad < 2) out[k++] = (unsigned char)(v >> 8);
        if (i + 4 < n || pad < 1) out[k++] = (unsigned char)v;
        if (i + 4 == n && ((pad == 1 && (v & 0xFF)) || (pad == 2 && (v & 0xFFFF)))) return -1;
    }
    return k;
}

static void tokenizer_free(Tokenizer *tok) {
    free(tok->table);
    if (tok->re) pcre2_code_free(tok->re);
    memset(tok, 0, sizeof(*tok));
}

// Pre-tokenizer pattern. WS is Unicode White_Space: 0009..000D 0020 0085 00A0 1680 2000..200A
// 2028 2029 202F 205F 3000.
#define TOK_WS "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
static const char tok_pattern[] =
    "'(?:[sdmt]|ll|ve|re)| ?\\p{L}+| ?\\p{N}+| ?[^" TOK_WS "\\p{L}\\p{N}]+|[" TOK_WS "]+(?![^" TOK_WS "])|[" TOK_WS "]+";

// n zeroed bytes, 2 MiB-aligned and marked for transparent huge pages: loading touches ~4 MB, which
// in 4 KiB pages is ~1000 page faults, and on virtual machines where a fault costs tens of
// microseconds that was most of the load time (measured on one: 24 ms of CPU, 4 ms with huge pages).
static void *tok_alloc_huge(size_t n) {
    const size_t huge = (size_t)1 << 21;
    size_t size = (n + huge - 1) & ~(huge - 1);
    void *p = NULL;
    if (posix_memalign(&p, huge, size) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE);
#endif
    memset(p, 0, n);
    return p;
}

// Load the ranks file and compile the pre-tokenizer. 0 ok; -1 with err "path:line: what".
static int tokenizer_load(Tokenizer *tok, const char *ranks_path, char *err, size_t errlen) {
    memset(tok, 0, sizeof(*tok));
    FILE *f = fopen(ranks_path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open: %s", ranks_path, strerror(errno));
        return -1;
    }
    // One allocation: the table, the offsets, the token bytes (base64 decodes to 3/4 of its length,
    // so the file's size bounds them) and, at the end, the file itself while it is parsed.
    struct stat st;
    size_t n = fstat(fileno(f), &st) == 0 && st.st_size > 0 ? (size_t)st.st_size : 0;
    tok->vocab_size = GPT2_NUM_RANKS + 1;
    tok->table_bits = 17;   // 2^17 slots for 50,256 tokens: under 40% full, short probes
    size_t table_size = ((size_t)1 << tok->table_bits) * sizeof(TokSlot);
    size_t offsets_size = (size_t)(tok->vocab_size + 1) * sizeof(uint32_t), bytes_size = n + sizeof(TOK_EOT_TEXT) + 8;
    unsigned char *region = (unsigned char *)tok_alloc_huge(table_size + offsets_size + bytes_size + n);
    unsigned char *file = region ? region + table_size + offsets_size + bytes_size : NULL;
    n = file ? fread(file, 1, n, f) : 0;
    int read_error = ferror(f) || (file && fgetc(f) != EOF);   // more than fstat said: it is changing
    fclose(f);
    if (!region || read_error) {
        snprintf(err, errlen, "%s: cannot read: %s", ranks_path, region ? "read error" : "out of memory");
        free(region);
        return -1;
    }
    tok->table = (TokSlot *)region;
    tok->offsets = (uint32_t *)(region + table_size);
    tok->bytes = region + table_size + offsets_size;
    uint32_t mask = (1u << tok->table_bits) - 1, pos = 0;
    size_t p = 0;
    int line = 0;
    while (p < n) {
        line++;
        size_t eol = p;
        while (eol < n && file[eol] != '\n') eol++;
        size_t end = (eol > p && file[eol - 1] == '\r') ? eol - 1 : eol;
        if (line > GPT2_NUM_RANKS) {
            snprintf(err, errlen, "%s:%d: more than %d lines", ranks_path, line, GPT2_NUM_RANKS);
            goto fail;
        }
        size_t sp = p;
        while (sp < end && file[sp] != ' ') sp++;
        if (sp == end) {
            snprintf(err, errlen, "%s:%d: expected 'base64 rank', got '%.*s'", ranks_path, line,
                     (int)(end - p < 60 ? end - p : 60), (const char *)file + p);
            goto fail;
        }
        unsigned char *dst = tok->bytes + pos;
        long len = tok_b64_decode(file + p, sp - p, dst);
        if (len < 0) {
            snprintf(err, errlen, "%s:%d: bad base64 '%.*s'", ranks_path, line,
                     (int)(sp - p < 60 ? sp - p : 60), (const char *)file + p);
            goto fail;
        }
        long rank = 0;
        size_t r = sp + 1;
        while (r < end && file[r] >= '0' && file[r] <= '9' && rank <= INT_MAX) rank = rank * 10 + (file[r++] - '0');
        if (r == sp + 1 || r != end || rank != line - 1) {
            snprintf(err, errlen, "%s:%d: rank '%.*s' is not the line's index %d", ranks_path, line,
                     (int)(end - sp - 1 < 30 ? end - sp - 1 : 30), (const char *)file + sp + 1, line - 1);
            goto fail;
        }
        uint64_t head = tok_head(dst, (size_t)len);
        uint32_t i = tok_hash(dst, (size_t)len, head, tok->table_bits);
        for (; tok->table[i].len; i = (i + 1) & mask) {
            const TokSlot *s = &tok->table[i];
            if (s->len == (uint32_t)len && s->head == head &&
                memcmp(tok->bytes + tok->offsets[s->rank], dst, (size_t)len) == 0) {
                snprintf(err, errlen, "%s:%d: duplicate token: same bytes as line %d", ranks_path, line,
                         s->rank + 1);
                goto fail;
            }
        }
        tok->table[i] = (TokSlot){head, (uint32_t)len, (int32_t)rank};
        tok->offsets[rank] = pos;
        pos += (uint32_t)len;
        p = eol + 1;
    }
    if (line != GPT2_NUM_RANKS) {
        snprintf(err, errlen, "%s:%d: file ends after %d lines, expected %d", ranks_path, line + 1, line,
                 GPT2_NUM_RANKS);
        goto fail;
    }
    tok->offsets[GPT2_EOT] = pos;
    memcpy(tok->bytes + pos, TOK_EOT_TEXT, sizeof(TOK_EOT_TEXT) - 1);
    pos += sizeof(TOK_EOT_TEXT) - 1;
    tok->offsets[GPT2_EOT + 1] = pos;

    // Byte-level BPE needs every byte as a token: any input byte sequence is then encodable.
    for (int b = 0; b < 256; b++) {
        unsigned char s[9] = {(unsigned char)b};
        tok->byte_rank[b] = tok_rank(tok, s, 1);
        if (tok->byte_rank[b] < 0) {
            snprintf(err, errlen, "%s: no token for the byte 0x%02X", ranks_path, b);
            goto fail;
        }
    }

    int errcode;
    PCRE2_SIZE erroff;
    tok->re = pcre2_compile((PCRE2_SPTR)tok_pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &errcode,
                            &erroff, NULL);
    if (!tok->re) {
        PCRE2_UCHAR msg[120];
        pcre2_get_error_message(errcode, msg, sizeof(msg));
        snprintf(err, errlen, "tokenizer pattern: offset %zu: %s", (size_t)erroff, (const char *)msg);
        goto fail;
    }
    tok->jit = pcre2_jit_compile(tok->re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
fail:
    tokenizer_free(tok);
    return -1;
}

static int tokenizer_vocab_size(const Tokenizer *tok) { return tok->vocab_size; }

// ----------------------------------------------------------------------------
// BPE of one pre-tokenized piece

// Pieces up to this many bytes merge with a linear scan for the lowest-ranked pair (tiktoken's
// loop: O(n^2) lookups, fastest for the short pieces that make up real text); longer ones use a
// heap so that a megabyte-long word costs O(n log n), not O(n^2).
#define TOK_SMALL_PIECE 128

// p[0..n) with 2 <= n <= TOK_SMALL_PIECE, followed by 8 readable bytes; appends its ids to out
// (room for n ids reserved by the caller).
static void tok_merge_small(const Tokenizer *t, const unsigned char *p, int n, TokenBuf *out) {
    // Part i is p[start[i] .. start[i+1]) and is token id[i]; pair[i] is the rank of part i
    // merged with part i+1 (INT_MAX: not a token).
    int start[TOK_SMALL_PIECE + 1], id[TOK_SMALL_PIECE], pair[TOK_SMALL_PIECE];
    for (int i = 0; i < n; i++) {
        start[i] = i;
        id[i] = t->byte_rank[p[i]];
        int r = i + 1 < n ? tok_rank(t, p + i, 2) : -1;
        pair[i] = r < 0 ? INT_MAX : r;
    }
    start[n] = n;
    int m = n;
    for (;;) {
        int best = INT_MAX, bi = -1;
        for (int i = 0; i + 1 < m; i++) {
            if (pair[i] < best) { best = pair[i]; bi = i; }
        }
        if (bi < 0) break;
        id[bi] = best;
        m--;
        for (int i = bi + 1; i < m; i++) {
            start[i] = start[i + 1];
            id[i] = id[i + 1];
            pair[i] = pair[i + 1];
        }
        start[m] = n;
        if (bi + 1 < m) {
            int r = tok_rank(t, p + start[bi], start[bi + 2] - start[bi]);
            pair[bi] = r < 0 ? INT_MAX : r;
        } else {
            pair[bi] = INT_MAX;
        }
        if (bi > 0) {
            int r = tok_rank(t, p + start[bi - 1], start[bi + 1] - start[bi - 1]);
            pair[bi - 1] = r < 0 ? INT_MAX : r;
        }
    }
    for (int i = 0; i < m; i++) out->data[out->len++] = id[i];
}

// A candidate merge of the part starting at byte `start` with its right neighbour, which together
// span [start, end). It is stale once either part has changed; then `end` no longer matches.
typedef struct { int rank, start, end; } TokPair;

static inline int tok_pair_less(TokPair a, TokPair b) {
    return a.rank < b.rank || (a.rank == b.rank && a.start < b.start);  // the leftmost on a tie
}

static void tok_heap_push(TokPair *h, int *hn, TokPair x) {
    int i = (*hn)++;
    while (i > 0 && tok_pair_less(x, h[(i - 1) / 2])) { h[i] = h[(i - 1) / 2]; i = (i - 1) / 2; }
    h[i] = x;
}

static TokPair tok_heap_pop(TokPair *h, int *hn) {
    TokPair top = h[0], x = h[--(*hn)];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= *hn) break;
        if (c + 1 < *hn && tok_pair_less(h[c + 1], h[c])) c++;
        if (!tok_pair_less(h[c], x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
    return top;
}

// The same merges as tok_merge_small, in O(n log n): parts are a linked list over byte positions
// and candidate pairs sit in a heap ordered by (rank, start), the order the linear scan picks
// them in. Returns -1 if out of memory.
static int tok_merge_large(const Tokenizer *t, const unsigned char *p, int n, TokenBuf *out) {
    // next[s]/prev[s]: neighbours of the part starting at s (n / -1 at the ends); id[s] its token;
    // next[s] == -2 marks a position that no longer starts a part. At most n-1 initial pairs plus
    // 2 per merge (n-1 merges) are ever pushed.
    int *next = (int *)malloc((size_t)n * 3 * sizeof(int));
    TokPair *heap = (TokPair *)malloc((size_t)n * 3 * sizeof(TokPair));
    if (!next || !heap) { free(next); free(heap); return -1; }
    int *prev = next + n, *id = next + 2 * n, hn = 0;
    for (int i = 0; i < n; i++) {
        next[i] = i + 1;
        prev[i] = i - 1;
        id[i] = t->byte_rank[p[i]];
        int r = i + 1 < n ? tok_rank(t, p + i, 2) : -1;
        if (r >= 0) tok_heap_push(heap, &hn, (TokPair){r, i, i + 2});
    }
    while (hn > 0) {
        TokPair c = tok_heap_pop(heap, &hn);
        int s = c.start;
        if (next[s] < 0 || next[s] >= n || next[next[s]] != c.end) continue;   // stale
        int right = next[s];
        id[s] = c.rank;
        next[right] = -2;
        next[s] = c.end;
        if (c.end < n) {
            prev[c.end] = s;
            int r = tok_rank(t, p + s, next[c.end] - s);
            if (r >= 0) tok_heap_push(heap, &hn, (TokPair){r, s, next[c.end]});
        }
        if (prev[s] >= 0) {
            int r = tok_rank(t, p + prev[s], c.end - prev[s]);
            if (r >= 0) tok_heap_push(heap, &hn, (TokPair){r, prev[s], c.end});
        }
    }
    for (int s = 0; s < n; s = next[s]) out->data[out->len++] = id[s];
    free(next);
    free(heap);
    return 0;
}

// ----------------------------------------------------------------------------
// encoding

// Length of the longest prefix of s[0..n) that is valid UTF-8 (RFC 3629).
static size_t tok_utf8_valid_prefix(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n && (tok_load64(s + i) & 0x8080808080808080ull) == 0) { i += 8; continue; }
        unsigned char c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t k;
        unsigned char lo = 0x80, hi = 0xBF;    // allowed range of the second byte
        if (c >= 0xC2 && c <= 0xDF) k = 2;
        else if (c >= 0xE0 && c <= 0xEF) { k = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { k = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        else return i;
        if (i + k > n || s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t j = 2; j < k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return i;
        }
        i += k;
    }
    return n;
}

// Per-call scratch: PCRE2 match data, and a padded copy of the current piece (tok_rank reads 8
// bytes past the end of what it looks up, which the caller's text may not have). No JIT stack is
// assigned: each alternative of the pattern is a literal or one repeated character class, which
// PCRE2's JIT backtracks without stack frames, so the default 32 KiB machine stack serves runs of
// any length (20 MiB single-piece runs were checked; test_tokenizer encodes 2 MiB ones, with the JIT
// and with the interpreter).
typedef struct {
    pcre2_match_data *md;
    unsigned char *buf;
    size_t cap;
} TokScratch;

static int tok_encode_piece(const Tokenizer *t, const unsigned char *piece, size_t n, TokScratch *sc,
                            TokenBuf *out) {
    // tok_merge_large indexes with int, 3 ints per byte
    if (n > INT_MAX / 3 || tokenbuf_reserve(out, n) != 0) return -1;
    if (n == 1) { out->data[out->len++] = t->byte_rank[piece[0]]; return 0; }
    if (n + 8 > sc->cap) {
        size_t cap = (n + 8) * 2;
        unsigned char *b = (unsigned char *)realloc(sc->buf, cap);
        if (!b) return -1;
        sc->buf = b;
        sc->cap = cap;
    }
    memcpy(sc->buf, piece, n);
    memset(sc->buf + n, 0, 8);
    int whole = tok_rank(t, sc->buf, n);
    if (whole >= 0) { out->data[out->len++] = whole; return 0; }
    if (n <= TOK_SMALL_PIECE) { tok_merge_small(t, sc->buf, (int)n, out); return 0; }
    return tok_merge_large(t, sc->buf, (int)n, out);
}

// One run of valid UTF-8, pre-tokenized on its own.
static int tok_encode_run(const Tokenizer *t, const unsigned char *s, size_t n, TokScratch *sc, TokenBuf *out) {
    PCRE2_SIZE off = 0;
    while (off < n) {
        int rc = t->jit ? pcre2_jit_match(t->re, s, n, off, PCRE2_NO_UTF_CHECK, sc->md, NULL)
                        : pcre2_match(t->re, s, n, off, PCRE2_NO_UTF_CHECK, sc->md, NULL);
        if (rc < 0) return -1;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(sc->md);
        // Every character matches some alternative, so each match starts where the last ended.
        if (ov[0] != off || ov[1] <= off) return -1;
        if (tok_encode_piece(t, s + off, ov[1] - off, sc, out) != 0) return -1;
        off = ov[1];
    }
    return 0;
}

// Encode len bytes of text (no special tokens), appending ids to out. Thread-safe.
// Returns 0, or -1 (out of memory, or a PCRE2 match error such as its JIT stack limit).
static int tokenizer_encode(const Tokenizer *tok, const char *text, size_t len, TokenBuf *out) {
    TokScratch sc = {pcre2_match_data_create(1, NULL), NULL, 0};
    if (!sc.md) return -1;
    const unsigned char *s = (const unsigned char *)text;
    int rc = 0;
    size_t i = 0;
    while (i < len && rc == 0) {
        size_t run = tok_utf8_valid_prefix(s + i, len - i);
        if (run == 0) {
            rc = tokenbuf_reserve(out, 1);
            if (rc == 0) out->data[out->len++] = tok->byte_rank[s[i]];
            i++;
        } else {
            rc = tok_encode_run(tok, s + i, run, &sc, out);
            i += run;
        }
    }
    pcre2_match_data_free(sc.md);
    free(sc.buf);
    return rc;
}

// ----------------------------------------------------------------------------
// decoding

static const unsigned char *tokenizer_token_bytes(const Tokenizer *tok, int id, size_t *len) {
    if (id < 0 || id >= tok->vocab_size) { *len = 0; return NULL; }
    *len = tok->offsets[id + 1] - tok->offsets[id];
    return tok->bytes + tok->offsets[id];
}

// Concatenated bytes of ids (out-of-range ids give nothing), NUL-terminated for convenience;
// NULL only if out of memory.
static char *tokenizer_decode(const Tokenizer *tok, const int *ids, size_t n, size_t *out_len) {
    size_t total = 0, len;
    for (size_t i = 0; i < n; i++) {
        if (tokenizer_token_bytes(tok, ids[i], &len)) total += len;
    }
    char *s = (char *)malloc(total + 1);
    if (!s) { *out_len = 0; return NULL; }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const unsigned char *b = tokenizer_token_bytes(tok, ids[i], &len);
        if (b) { memcpy(s + k, b, len); k += len; }
    }
    s[k] = '\0';
    *out_len = k;
    return s;
}

#endif
