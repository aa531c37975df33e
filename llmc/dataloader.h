// Token shards -> (inputs, targets) batches, with per-epoch shuffling, a resumable position and
// data-parallel sharding.
//
// Shard formats (DESIGN 5):
//   "llmc":    llm.c's shard: 256 int32 header {20240520 magic, 1 version, ntok, 0...} (1024 bytes),
//              then ntok little-endian uint16 tokens.
//   "nanogpt": nanoGPT's train.bin/val.bin: headerless little-endian uint16 tokens.
// Every shard is mmap'd read-only and validated completely at open (header, size, every token <
// vocab_size), so training never meets a bad token hours in.
//
// Samples: a sample is a window of T+1 consecutive tokens (inputs = first T, targets = last T).
// Windows start at multiples of T inside one shard and never cross a shard boundary, so a shard of
// ntok tokens holds (ntok-1)/T windows and consecutive windows overlap by exactly one token.
//
// An epoch is one ordered sequence of every window of every shard:
//   shuffle=0: shards in sorted-name order, windows in file order (evaluation: consecutive windows
//              from the first token of the first shard).
//   shuffle=1: shards in a permuted order, and the windows of each shard in a permuted order, both
//              Fisher-Yates shuffles driven by splitmix64 seeded from (seed, epoch, stream): stream 0
//              orders the shards, stream 1+i orders the windows of shard i (i = sorted index).
//              Every epoch therefore visits every window exactly once; the same seed replays the same
//              batches, another seed gives others.
// Data parallelism: with world R, the epoch's sample sequence is dealt round-robin: rank r takes
// epoch samples r, r+R, r+2R, ... Batch b of rank r holds epoch samples (b*B + i)*R + r, i in [0,B),
// so at every step the ranks together consume the contiguous block [b*B*R, (b+1)*B*R): disjoint,
// and covering the epoch except its last (nwindows mod B*R) samples, which every rank drops alike.
//
// Position: the next batch is fully determined by (epoch, batch index), because everything else is
// a function of the seed. dataloader_position() writes them with the sample/shard they point at and
// the parameters that give them meaning; dataloader_seek() refuses a position whose parameters do not
// match this loader. The position is the same on every rank, so rank 0's checkpoint restores all.
#ifndef LLMC_DATALOADER_H
#define LLMC_DATALOADER_H
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <inttypes.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cjson/cJSON.h>

#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1
#define SHARD_HEADER_INTS 256
#define SHARD_HEADER_BYTES (SHARD_HEADER_INTS * 4)

// ----------------------------------------------------------------------------
// one mapped shard

typedef struct {
    char *path;
    void *map;              // the whole file, PROT_READ
    size_t map_len;
    const uint16_t *tokens; // ntok tokens inside map (after the header for llmc)
    size_t ntok;
} Shard;

static void shard_unmap(Shard *s) {
    if (s->map) munmap(s->map, s->map_len);
    free(s->path);
    memset(s, 0, sizeof(*s));
}

// Map path and check its layout (not the token values). llmc: header magic, version, and a token count
// that matches the file size exactly. nanogpt: an even, non-zero size. 0 ok, -1 with a message that
// names the file and the byte offset of the offending field.
static int shard_map(Shard *s, const char *path, const char *format, char *err, size_t errlen) {
    memset(s, 0, sizeof(*s));
    int llmc = strcmp(format, "llmc") == 0;
    if (!llmc && strcmp(format, "nanogpt") != 0) {
        snprintf(err, errlen, "%s: unknown shard format \"%s\" (expected \"llmc\" or \"nanogpt\")", path, format);
        return -1;
    }
    int fd = open(path, O_RDONLY);
    if (fd < 0) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    struct stat st;
    if (fstat(fd, &st) != 0) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); close(fd); return -1; }
    size_t size = (size_t)st.st_size;
    if (llmc && size < SHARD_HEADER_BYTES) {
        snprintf(err, errlen, "%s: offset %zu: truncated: file ends inside the %d-byte llm.c shard header",
                 path, size, SHARD_HEADER_BYTES);
        close(fd); return -1;
    }
    if (!llmc && (size == 0 || size % 2 != 0)) {
        snprintf(err, errlen, "%s: offset %zu: file size %zu is not a positive whole number of uint16 tokens (nanogpt)",
                 path, size, size);
        close(fd); return -1;
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);  // the mapping keeps the file alive
    if (map == MAP_FAILED) { snprintf(err, errlen, "%s: mmap: %s", path, strerror(errno)); return -1; }
    s->map = map; s->map_len = size;
    s->path = strdup(path);
    if (llmc) {
        int32_t h[3];
        memcpy(h, map, sizeof(h));
        if (h[0] != SHARD_MAGIC) {
            snprintf(err, errlen, "%s: offset 0: magic %d, expected %d (llm.c shard)", path, h[0], SHARD_MAGIC);
            shard_unmap(s); return -1;
        }
        if (h[1] != SHARD_VERSION) {
            snprintf(err, errlen, "%s: offset 4: version %d, expected %d (llm.c shard)", path, h[1], SHARD_VERSION);
            shard_unmap(s); return -1;
        }
        size_t want = SHARD_HEADER_BYTES + 2 * (size_t)(h[2] < 0 ? 0 : h[2]);
        if (h[2] < 0 || want != size) {
            snprintf(err, errlen, "%s: offset 8: token count %d disagrees with the file size %zu "
                     "(%s: a count of %d needs %zu bytes)", path, h[2], size,
                     want > size ? "truncated" : "extra bytes", h[2], want);
            shard_unmap(s); return -1;
        }
        s->tokens = (const uint16_t *)((const char *)map + SHARD_HEADER_BYTES);
        s->ntok = (size_t)h[2];
    } else {
        s->tokens = (const uint16_t *)map;
        s->ntok = size / 2;
    }
    return 0;
}

// Every token < vocab_size. The max is a bandwidth-bound vectorized reduction over all threads; only a
// failing shard pays for the scan that finds the first offender's offset.
static int shard_check_tokens(const Shard *s, const char *format, int vocab_size, char *err, size_t errlen) {
    const uint16_t *t = s->tokens;
    long n = (long)s->ntok;
    int mx = 0;
    #pragma omp parallel for reduction(max:mx) schedule(static)
    for (long i = 0; i < n; i++) mx = t[i] > mx ? t[i] : mx;
    if (mx < vocab_size) return 0;
    size_t base = strcmp(format, "llmc") == 0 ? SHARD_HEADER_BYTES : 0;
    for (size_t i = 0; i < s->ntok; i++) {
        if (t[i] >= vocab_size) {
            snprintf(err, errlen, "%s: offset %zu: token %d >= vocab_size %d", s->path, base + 2 * i, t[i], vocab_size);
            return -1;
        }
    }
    return 0;  // unreachable: mx came from some t[i]
}

// Write an llm.c shard atomically: path.tmp, fsync, rename, fsync the directory. A crash leaves either
// the old file or the complete new one, never a partial shard under the real name.
static int shard_write(const char *path, const uint16_t *tokens, size_t n, char *err, size_t errlen) {
    if (n > INT32_MAX) {
        snprintf(err, errlen, "%s: %zu tokens do not fit the int32 count of an llm.c shard", path, n);
        return -1;
    }
    size_t plen = strlen(path);
    char *tmp = (char *)malloc(plen + 5);
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    int32_t header[SHARD_HEADER_INTS] = {SHARD_MAGIC, SHARD_VERSION, (int32_t)n};
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { snprintf(err, errlen, "%s: %s", tmp, strerror(errno)); free(tmp); return -1; }
    const char *parts[2] = {(const char *)header, (const char *)tokens};
    size_t lens[2] = {sizeof(header), n * sizeof(uint16_t)};
    for (int p = 0; p < 2; p++) {
        size_t off = 0;
        while (off < lens[p]) {
            ssize_t w = write(fd, parts[p] + off, lens[p] - off);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                snprintf(err, errlen, "%s: write: %s", tmp, w < 0 ? strerror(errno) : "no progress");
                close(fd); unlink(tmp); free(tmp); return -1;
            }
            off += (size_t)w;
        }
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        snprintf(err, errlen, "%s: fsync/close: %s", tmp, strerror(errno));
        unlink(tmp); free(tmp); return -1;
    }
    if (rename(tmp, path) != 0) {
        snprintf(err, errlen, "%s: rename to %s: %s", tmp, path, strerror(errno));
        unlink(tmp); free(tmp); return -1;
    }
    free(tmp);
    // make the rename itself durable
    char *dir = strdup(path);
    char *slash = strrchr(dir, '/');
    if (slash) { *slash = '\0'; if (slash == dir) strcpy(dir, "/"); } else strcpy(dir, ".");
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) { fsync(dfd); close(dfd); }
    free(dir);
    return 0;
}

// ----------------------------------------------------------------------------
// the loader

typedef struct DataLoader {
    int B, T, vocab_size, shuffle, rank, world;
    uint64_t seed;
    Shard *shards;          // (nshards,) in sorted path order
    int nshards;
    size_t *nwin;           // (nshards,) windows per shard: (ntok-1)/T
    size_t total_windows;   // windows in one epoch
    size_t batches;         // batches per epoch for each rank: total_windows / (B*world)
    // position: the next batch is batch `batch` of epoch `epoch`
    int epoch;
    size_t batch;
    // the current epoch's order
    int *shard_order;       // (nshards,) sorted indices, in epoch order
    size_t *win_perm;       // (max nwin,) window order of the shard perm_shard (shuffle mode)
    int perm_shard;         // which shard win_perm belongs to, -1 for none
    // cursor into the epoch's sequence: samples before shard_order[cur] number cur_base
    int cur;
    size_t cur_base;
    int *inputs;            // (B, T)
    int *targets;           // (B, T)
} DataLoader;

// splitmix64 (Steele, Lea, Flood 2014): one 64-bit add and a finalizer per draw; plenty for shuffling
// and trivially reseeded, which is what makes every (epoch, shard) order reproducible on its own.
static uint64_t dl_splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// the state of stream `stream` in epoch `epoch`: each input is mixed in through a full splitmix64 step
static uint64_t dl_stream_state(uint64_t seed, uint64_t epoch, uint64_t stream) {
    uint64_t s = seed;
    s = dl_splitmix64(&s) ^ epoch;
    s = dl_splitmix64(&s) ^ stream;
    return dl_splitmix64(&s);
}

// uniform in [0, n) without modulo bias (rejection of the short top range)
static uint64_t dl_below(uint64_t *state, uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do x = dl_splitmix64(state); while (x >= limit);
    return x % n;
}

// the shard order of an epoch: sorted indices, permuted by stream 0 in shuffle mode. order: (nshards,)
static void dl_shard_order(const DataLoader *dl, int epoch, int *order) {
    for (int i = 0; i < dl->nshards; i++) order[i] = i;
    if (!dl->shuffle) return;
    uint64_t st = dl_stream_state(dl->seed, (uint64_t)epoch, 0);
    for (int i = dl->nshards - 1; i > 0; i--) {
        int j = (int)dl_below(&st, (uint64_t)i + 1);
        int t = order[i]; order[i] = order[j]; order[j] = t;
    }
}

// the sorted index of the shard that holds epoch sample `sample` of epoch `epoch`
static int dl_shard_at(const DataLoader *dl, int epoch, size_t sample) {
    int *order = (int *)malloc(sizeof(int) * (size_t)dl->nshards);
    dl_shard_order(dl, epoch, order);
    size_t base = 0;
    int k = 0;
    while (sample >= base + dl->nwin[order[k]]) base += dl->nwin[order[k++]];
    int s = order[k];
    free(order);
    return s;
}

// start the current epoch: its shard order, no window permutation yet, cursor at its first sample
static void dl_begin_epoch(DataLoader *dl) {
    dl_shard_order(dl, dl->epoch, dl->shard_order);
    dl->perm_shard = -1;
    dl->cur = 0;
    dl->cur_base = 0;
}

// the window order of shard s in the current epoch, into win_perm
static void dl_permute_windows(DataLoader *dl, int s) {
    size_t n = dl->nwin[s];
    for (size_t i = 0; i < n; i++) dl->win_perm[i] = i;
    uint64_t st = dl_stream_state(dl->seed, (uint64_t)dl->epoch, 1 + (uint64_t)s);
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)dl_below(&st, (uint64_t)i + 1);
        size_t t = dl->win_perm[i]; dl->win_perm[i] = dl->win_perm[j]; dl->win_perm[j] = t;
    }
    dl->perm_shard = s;
}

// epoch sample g -> (shard, first token). g never decreases within an epoch, so the cursor only moves
// forward; returns the shard's sorted index and sets *window.
static int dl_locate(DataLoader *dl, size_t g, size_t *window) {
    while (g >= dl->cur_base + dl->nwin[dl->shard_order[dl->cur]]) {
        dl->cur_base += dl->nwin[dl->shard_order[dl->cur]];
        dl->cur++;
    }
    int s = dl->shard_order[dl->cur];
    size_t w = g - dl->cur_base;
    if (dl->shuffle) {
        if (dl->perm_shard != s) dl_permute_windows(dl, s);
        w = dl->win_perm[w];
    }
    *window = w;
    return s;
}

static int dl_cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void dataloader_free(DataLoader *dl) {
    for (int i = 0; i < dl->nshards; i++) shard_unmap(&dl->shards[i]);
    free(dl->shards); free(dl->nwin); free(dl->shard_order); free(dl->win_perm);
    free(dl->inputs); free(dl->targets);
    memset(dl, 0, sizeof(*dl));
}

static int dataloader_init(DataLoader *dl, const char *pattern, const char *format, int B, int T,
                           int vocab_size, uint64_t seed, int shuffle, int rank, int world,
                           char *err, size_t errlen) {
    memset(dl, 0, sizeof(*dl));
    if (B < 1 || T < 1 || world < 1 || rank < 0 || rank >= world || vocab_size < 1 || vocab_size > 65536) {
        snprintf(err, errlen, "%s: bad loader arguments B=%d T=%d vocab_size=%d rank=%d world=%d",
                 pattern, B, T, vocab_size, rank, world);
        return -1;
    }
    if (strcmp(format, "llmc") != 0 && strcmp(format, "nanogpt") != 0) {
        snprintf(err, errlen, "%s: unknown shard format \"%s\" (expected \"llmc\" or \"nanogpt\")", pattern, format);
        return -1;
    }
    glob_t g;
    int gr = glob(pattern, GLOB_NOSORT, NULL, &g);
    if (gr != 0 || g.gl_pathc == 0) {
        if (strpbrk(pattern, "*?[")) snprintf(err, errlen, "%s: no files match this pattern", pattern);
        else snprintf(err, errlen, "%s: no such file", pattern);
        if (gr == 0) globfree(&g);
        return -1;
    }
    // strcmp order, independent of the locale's collation
    qsort(g.gl_pathv, g.gl_pathc, sizeof(char *), dl_cmp_str);
    dl->B = B; dl->T = T; dl->vocab_size = vocab_size; dl->seed = seed;
    dl->shuffle = shuffle ? 1 : 0; dl->rank = rank; dl->world = world;
    dl->nshards = (int)g.gl_pathc;
    dl->shards = (Shard *)calloc(g.gl_pathc, sizeof(Shard));
    dl->nwin = (size_t *)calloc(g.gl_pathc, sizeof(size_t));
    size_t max_win = 0;
    for (int i = 0; i < dl->nshards; i++) {
        Shard *s = &dl->shards[i];
        if (shard_map(s, g.gl_pathv[i], format, err, errlen) != 0 ||
            shard_check_tokens(s, format, vocab_size, err, errlen) != 0) {
            globfree(&g); dataloader_free(dl); return -1;
        }
        if (s->ntok < (size_t)T + 1) {
            snprintf(err, errlen, "%s: %zu tokens, fewer than one window of T+1 = %d tokens",
                     s->path, s->ntok, T + 1);
            globfree(&g); dataloader_free(dl); return -1;
        }
        dl->nwin[i] = (s->ntok - 1) / (size_t)T;
        dl->total_windows += dl->nwin[i];
        if (dl->nwin[i] > max_win) max_win = dl->nwin[i];
        if (dl->shuffle) madvise(s->map, s->map_len, MADV_RANDOM);
    }
    globfree(&g);
    dl->batches = dl->total_windows / ((size_t)B * (size_t)world);
    if (dl->batches == 0) {
        snprintf(err, errlen, "%s: %zu windows of %d tokens, fewer than one batch of B*world = %d*%d",
                 pattern, dl->total_windows, T + 1, B, world);
        dataloader_free(dl); return -1;
    }
    dl->shard_order = (int *)malloc(sizeof(int) * (size_t)dl->nshards);
    if (dl->shuffle) dl->win_perm = (size_t *)malloc(sizeof(size_t) * max_win);
    dl->inputs = (int *)malloc(sizeof(int) * (size_t)B * (size_t)T);
    dl->targets = (int *)malloc(sizeof(int) * (size_t)B * (size_t)T);
    dl->epoch = 0;
    dl->batch = 0;
    dl_begin_epoch(dl);
    return 0;
}

static size_t dataloader_num_batches(const DataLoader *dl) { return dl->batches; }

static void dataloader_reset(DataLoader *dl) {
    dl->epoch = 0;
    dl->batch = 0;
    dl_begin_epoch(dl);
}

// Fill inputs/targets (B, T) with the next batch; after the last full batch of an epoch the next call
// starts the following epoch (dl->epoch is the epoch of the batch just returned).
static int dataloader_next(DataLoader *dl, char *err, size_t errlen) {
    if (dl->batch == dl->batches) {
        if (dl->epoch == INT_MAX) { snprintf(err, errlen, "dataloader: epoch counter overflow"); return -1; }
        dl->epoch++;
        dl->batch = 0;
        dl_begin_epoch(dl);
    }
    int B = dl->B, T = dl->T;
    for (int i = 0; i < B; i++) {
        size_t g = (dl->batch * (size_t)B + (size_t)i) * (size_t)dl->world + (size_t)dl->rank;
        size_t w;
        int s = dl_locate(dl, g, &w);
        const uint16_t *src = dl->shards[s].tokens + w * (size_t)T;
        int *in = dl->inputs + (size_t)i * T, *tg = dl->targets + (size_t)i * T;
        for (int t = 0; t < T; t++) { in[t] = src[t]; tg[t] = src[t + 1]; }
    }
    dl->batch++;
    return 0;
}

// The position of the next batch as one JSON line. "epoch" and "batch" are the position; "sample" is
// the epoch sample that batch starts at and "shard" the sorted index of the shard holding it, for
// people and for a consistency check; the rest must equal the loader's own parameters on seek.
// The seed is a string because JSON numbers lose integers above 2^53. 256 bytes of buf always suffice.
static void dataloader_position(const DataLoader *dl, char *buf, size_t buflen) {
    int epoch = dl->epoch;
    size_t batch = dl->batch;
    if (batch == dl->batches) { epoch++; batch = 0; }  // the same point, said the way seek lands on it
    size_t sample = batch * (size_t)dl->B * (size_t)dl->world;
    int shard = dl_shard_at(dl, epoch, sample);
    snprintf(buf, buflen,
             "{\"epoch\":%d,\"batch\":%zu,\"sample\":%zu,\"shard\":%d,\"seed\":\"%" PRIu64 "\","
             "\"shuffle\":%d,\"B\":%d,\"T\":%d,\"world\":%d,\"windows\":%zu,\"shards\":%d}",
             epoch, batch, sample, shard, dl->seed, dl->shuffle, dl->B, dl->T, dl->world,
             dl->total_windows, dl->nshards);
}

// a non-negative integer field of a position object; -1 with a message when absent or not one
static int dl_pos_field(const cJSON *o, const char *key, double max, double *out, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v)) {
        snprintf(err, errlen, "dataloader position: \"%s\": missing or not a number", key);
        return -1;
    }
    double d = v->valuedouble;
    if (d < 0 || d > max || d != (double)(uint64_t)d) {
        snprintf(err, errlen, "dataloader position: \"%s\": %.17g is not an integer in [0, %.17g]", key, d, max);
        return -1;
    }
    *out = d;
    return 0;
}

static int dataloader_seek(DataLoader *dl, const char *position, char *err, size_t errlen) {
    cJSON *o = cJSON_Parse(position);
    if (!cJSON_IsObject(o)) {
        snprintf(err, errlen, "dataloader position: not a JSON object: \"%.80s\"", position);
        cJSON_Delete(o);
        return -1;
    }
    double epoch, batch, sample, shard, shuffle, B, T, world, windows, shards;
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(o, "seed");
    int rc = -1;
    if (dl_pos_field(o, "epoch", INT_MAX, &epoch, err, errlen) ||
        dl_pos_field(o, "batch", 9e15, &batch, err, errlen) ||
        dl_pos_field(o, "sample", 9e15, &sample, err, errlen) ||
        dl_pos_field(o, "shard", INT_MAX, &shard, err, errlen) ||
        dl_pos_field(o, "shuffle", 1, &shuffle, err, errlen) ||
        dl_pos_field(o, "B", INT_MAX, &B, err, errlen) ||
        dl_pos_field(o, "T", INT_MAX, &T, err, errlen) ||
        dl_pos_field(o, "world", INT_MAX, &world, err, errlen) ||
        dl_pos_field(o, "windows", 9e15, &windows, err, errlen) ||
        dl_pos_field(o, "shards", INT_MAX, &shards, err, errlen)) goto done;
    char seedstr[32];
    snprintf(seedstr, sizeof(seedstr), "%" PRIu64, dl->seed);
    if (!cJSON_IsString(seed) || strcmp(seed->valuestring, seedstr) != 0) {
        snprintf(err, errlen, "dataloader position: \"seed\": %s, this loader's seed is %s",
                 cJSON_IsString(seed) ? seed->valuestring : "missing or not a string", seedstr);
        goto done;
    }
    {   // parameters that change what a batch index means (a block: goto done must not enter its scope)
        struct { const char *key; double got, want; } same[] = {
            {"shuffle", shuffle, (double)dl->shuffle}, {"B", B, (double)dl->B}, {"T", T, (double)dl->T},
            {"world", world, (double)dl->world}, {"windows", windows, (double)dl->total_windows},
            {"shards", shards, (double)dl->nshards}};
        for (size_t i = 0; i < sizeof(same) / sizeof(same[0]); i++) {
            if (same[i].got != same[i].want) {
                snprintf(err, errlen, "dataloader position: \"%s\": %.17g, this loader has %.17g "
                         "(the position belongs to other data or settings)", same[i].key, same[i].got, same[i].want);
                goto done;
            }
        }
    }
    if (batch >= (double)dl->batches) {
        snprintf(err, errlen, "dataloader position: \"batch\": %.17g, an epoch has %zu batches", batch, dl->batches);
        goto done;
    }
    size_t want_sample;
    int want_shard;
    want_sample = (size_t)batch * (size_t)dl->B * (size_t)dl->world;
    want_shard = dl_shard_at(dl, (int)epoch, want_sample);
    if (sample != (double)want_sample || shard != (double)want_shard) {
        snprintf(err, errlen, "dataloader position: \"sample\" %.17g / \"shard\" %.17g disagree with epoch %.17g "
                 "batch %.17g, which start at sample %zu in shard %d", sample, shard, epoch, batch,
                 want_sample, want_shard);
        goto done;
    }
    dl->epoch = (int)epoch;
    dl->batch = (size_t)batch;
    dl_begin_epoch(dl);
    rc = 0;
done:
    cJSON_Delete(o);
    return rc;
}

#endif
