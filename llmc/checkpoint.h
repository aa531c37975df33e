// Checkpoints: safetensors files, atomic checkpoint directories, and llm.c model files.
//
// safetensors layout (the standard one, so PyTorch's safetensors.torch.load_file reads our files):
//   [8 bytes] N, little-endian uint64
//   [N bytes] JSON header: {"__metadata__": {string: string}, "name": {"dtype": "F32", "shape": [..],
//             "data_offsets": [begin, end]}, ...}, padded with spaces so the data starts 8-byte aligned
//   [rest]    the data area; tensor bytes at [begin, end) of it, contiguous, covering it exactly.
// Our writer adds two metadata entries (metadata values must be strings):
//   "crc32":        a JSON object {tensor name: "8 lowercase hex digits"}, the CRC-32 (IEEE, zlib's) of
//                   each tensor's bytes, serialized as a string;
//   "header_crc32": 8 hex digits, the CRC-32 of a canonical form of the rest of the header, so that a
//                   flipped byte in a name, shape, offset or metadata value is caught too. The canonical
//                   form is, for each tensor sorted by name (byte order):
//                       name \0 dtype \0 dims joined by "," \0 begin "," end \0
//                   then for each metadata key except "header_crc32", sorted by key:
//                       key \0 value \0
// A file with neither entry (e.g. written by Python) is read unchecked unless its "format" metadata
// claims to be ours ("structured-gpt2/..."), in which case missing CRCs mean corruption.
#ifndef LLMC_CHECKPOINT_H
#define LLMC_CHECKPOINT_H
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>
#include <cjson/cJSON.h>

// Tensor bytes are written and read as they lie in memory; safetensors is little-endian.
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "checkpoint.h assumes a little-endian host"
#endif

#define CKPT_FORMAT_PREFIX "structured-gpt2/"
#define ST_MAX_DIMS 4

// ----------------------------------------------------------------------------
// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), identical to zlib.crc32.
// Slicing-by-8: eight 256-entry tables let the loop consume 8 bytes per step, ~4x the speed of the
// byte-wise loop, which matters because every checkpoint (~1.5 GB for GPT-2 124M with AdamW state)
// is checksummed on write and on load.

static uint32_t crc32_tab[8][256];
static pthread_once_t crc32_once = PTHREAD_ONCE_INIT;

static void crc32_init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc32_tab[0][i] = c;
    }
    // tab[t][i] = the CRC register after byte i followed by t zero bytes
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            crc32_tab[t][i] = (crc32_tab[t - 1][i] >> 8) ^ crc32_tab[0][crc32_tab[t - 1][i] & 0xff];
}

// Continue a CRC: crc32_ieee_update(crc32_ieee(a), b) == crc32_ieee(a ++ b); start from 0 (as zlib).
static uint32_t crc32_ieee_update(uint32_t crc, const void *data, size_t n) {
    pthread_once(&crc32_once, crc32_init_tables);
    const unsigned char *p = (const unsigned char *)data;
    uint32_t c = ~crc;
    while (n >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        a ^= c;
        c = crc32_tab[7][a & 0xff] ^ crc32_tab[6][(a >> 8) & 0xff] ^ crc32_tab[5][(a >> 16) & 0xff] ^
            crc32_tab[4][a >> 24] ^ crc32_tab[3][b & 0xff] ^ crc32_tab[2][(b >> 8) & 0xff] ^
            crc32_tab[1][(b >> 16) & 0xff] ^ crc32_tab[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = crc32_tab[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

static uint32_t crc32_ieee(const void *data, size_t n) { return crc32_ieee_update(0, data, n); }

// ----------------------------------------------------------------------------
// small helpers: error messages, whole reads/writes, a growable string

static void ckpt_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

// write(2) may write less than asked and is limited to ~2 GiB per call; loop in 1 GiB pieces.
static int ckpt_write_all(int fd, const void *buf, size_t n) {
    const char *p = (const char *)buf;
    while (n > 0) {
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

// Returns the bytes read: fewer than n only at end of file (or -1 on an I/O error).
static ssize_t ckpt_read_all(int fd, void *buf, size_t n) {
    char *p = (char *)buf;
    size_t got = 0;
    while (got < n) {
        size_t chunk = n - got < ((size_t)1 << 30) ? n - got : ((size_t)1 << 30);
        ssize_t r = read(fd, p + got, chunk);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

typedef struct { char *s; size_t len, cap; int oom; } StStr;

static void ststr_put(StStr *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap) cap *= 2;
        char *ns = (char *)realloc(b->s, cap);
        if (!ns) { b->oom = 1; return; }
        b->s = ns;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void ststr_printf(StStr *b, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    ststr_put(b, tmp, (size_t)n);  // only used for numbers and hex, which always fit in 64 bytes
}

// A JSON string literal; bytes >= 0x80 pass through (UTF-8 stays UTF-8).
static void ststr_json(StStr *b, const char *s) {
    ststr_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
            case '"': ststr_put(b, "\\\"", 2); break;
            case '\\': ststr_put(b, "\\\\", 2); break;
            case '\n': ststr_put(b, "\\n", 2); break;
            case '\r': ststr_put(b, "\\r", 2); break;
            case '\t': ststr_put(b, "\\t", 2); break;
            default:
                if (*p < 0x20) ststr_printf(b, "\\u%04x", *p);
                else ststr_put(b, (const char *)p, 1);
        }
    }
    ststr_put(b, "\"", 1);
}

// ----------------------------------------------------------------------------
// safetensors

typedef struct { const char *name; const char *dtype; /* "F32" or "I32" */ const void *data;
                 int ndim; long long shape[4]; } StTensor;

// The dtypes of the safetensors spec; find() reports them by these names, data as stored.
static const struct { const char *name; int size; } st_dtypes[] = {
    {"F32", 4}, {"I32", 4}, {"BF16", 2}, {"F16", 2}, {"F64", 8}, {"I64", 8}, {"I16", 2}, {"I8", 1},
    {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
};

// the table's entry for a dtype name, or -1
static int st_dtype_index(const char *name) {
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (strcmp(st_dtypes[i].name, name) == 0) return (int)i;
    return -1;
}

typedef struct {
    const char *name;               // owned (malloc'd) when read from a file
    const char *dtype;              // points into st_dtypes
    int ndim;
    long long shape[ST_MAX_DIMS];
    size_t begin, end;              // byte range in the data area
    const void *data;               // the tensor's bytes
    void *copy;                     // an aligned copy, when begin is not a multiple of the element size
} StEntry;

struct SafeTensors {
    unsigned char *data;            // the data area, 64-byte aligned
    size_t data_size;
    StEntry *t;                     // in file (offset) order
    int n;
    char **meta_keys, **meta_vals;  // in header order
    int nmeta;
};
typedef struct SafeTensors SafeTensors;

// Bytes of dtype*shape into *bytes; -1 if it overflows 2^62.
static int st_nbytes(int elem, int ndim, const long long *shape, unsigned long long *bytes) {
    unsigned long long b = (unsigned long long)elem;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return -1;
        if (shape[d] != 0 && b > (1ull << 62) / (unsigned long long)shape[d]) return -1;
        b *= (unsigned long long)shape[d];
    }
    *bytes = b;
    return 0;
}

static int st_cmp_entry_name(const void *a, const void *b) {
    return strcmp((*(const StEntry *const *)a)->name, (*(const StEntry *const *)b)->name);
}

typedef struct { const char *key, *val; } StMeta;
static int st_cmp_meta_key(const void *a, const void *b) {
    return strcmp(((const StMeta *)a)->key, ((const StMeta *)b)->key);
}

// The header CRC over the canonical form described at the top of this file; -1 if out of memory.
static long long st_header_crc(const StEntry *t, int n, const char *const *keys,
                               const char *const *vals, int nmeta) {
    const StEntry **byname = (const StEntry **)malloc(sizeof(*byname) * (size_t)(n ? n : 1));
    StMeta *meta = (StMeta *)malloc(sizeof(*meta) * (size_t)(nmeta ? nmeta : 1));
    if (!byname || !meta) { free(byname); free(meta); return -1; }
    for (int i = 0; i < n; i++) byname[i] = &t[i];
    qsort(byname, (size_t)n, sizeof(*byname), st_cmp_entry_name);
    int m = 0;
    for (int i = 0; i < nmeta; i++)
        if (strcmp(keys[i], "header_crc32") != 0) {
            meta[m].key = keys[i];
            meta[m++].val = vals[i];
        }
    qsort(meta, (size_t)m, sizeof(*meta), st_cmp_meta_key);
    uint32_t crc = 0;
    char num[64];
    for (int i = 0; i < n; i++) {
        const StEntry *e = byname[i];
        crc = crc32_ieee_update(crc, e->name, strlen(e->name) + 1);
        crc = crc32_ieee_update(crc, e->dtype, strlen(e->dtype) + 1);
        for (int d = 0; d < e->ndim; d++) {
            int k = snprintf(num, sizeof num, d ? ",%lld" : "%lld", e->shape[d]);
            crc = crc32_ieee_update(crc, num, (size_t)k);
        }
        int k = snprintf(num, sizeof num, "%c%zu,%zu", '\0', e->begin, e->end);
        crc = crc32_ieee_update(crc, num, (size_t)k + 1);  // + the terminating \0
    }
    for (int i = 0; i < m; i++) {
        crc = crc32_ieee_update(crc, meta[i].key, strlen(meta[i].key) + 1);
        crc = crc32_ieee_update(crc, meta[i].val, strlen(meta[i].val) + 1);
    }
    free(byname);
    free(meta);
    return (long long)crc;
}

// Write n tensors (data in the caller's memory, little-endian) and nmeta string pairs to path,
// then fsync. Returns 0, or -1 with err set ("path: what went wrong").
static int safetensors_write(const char *path, const StTensor *ts, int n,
                             const char *const *meta_keys, const char *const *meta_vals, int nmeta,
                             char *err, size_t errlen) {
    // validate the request first: a bad call must not leave a half-written file behind
    for (int i = 0; i < n; i++) {
        const StTensor *x = &ts[i];
        if (!x->name || strcmp(x->name, "__metadata__") == 0) {
            ckpt_err(err, errlen, "%s: tensor %d: missing or reserved name", path, i);
            return -1;
        }
        if (!x->dtype || st_dtype_index(x->dtype) < 0) {
            ckpt_err(err, errlen, "%s: tensor %s: unknown dtype %s", path, x->name, x->dtype ? x->dtype : "(null)");
            return -1;
        }
        unsigned long long bytes;
        if (x->ndim < 0 || x->ndim > ST_MAX_DIMS ||
            st_nbytes(st_dtypes[st_dtype_index(x->dtype)].size, x->ndim, x->shape, &bytes) != 0) {
            ckpt_err(err, errlen, "%s: tensor %s: invalid shape (ndim %d)", path, x->name, x->ndim);
            return -1;
        }
        if (bytes > 0 && !x->data) {
            ckpt_err(err, errlen, "%s: tensor %s: no data", path, x->name);
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (strcmp(ts[j].name, x->name) == 0) {
                ckpt_err(err, errlen, "%s: tensor %s: name used twice", path, x->name);
                return -1;
            }
    }
    for (int i = 0; i < nmeta; i++) {
        if (!meta_keys[i] || !meta_vals[i] || strcmp(meta_keys[i], "crc32") == 0 ||
            strcmp(meta_keys[i], "header_crc32") == 0) {
            ckpt_err(err, errlen, "%s: metadata %d (%s): missing, or a key the writer reserves", path, i,
                     meta_keys[i] ? meta_keys[i] : "(null)");
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (strcmp(meta_keys[j], meta_keys[i]) == 0) {
                ckpt_err(err, errlen, "%s: metadata key %s used twice", path, meta_keys[i]);
                return -1;
            }
    }

    // offsets in the caller's order, and each tensor's CRC (the pass over the data before writing)
    StEntry *e = (StEntry *)calloc((size_t)(n ? n : 1), sizeof(StEntry));
    const char **keys = (const char **)malloc(sizeof(char *) * (size_t)(nmeta + 2));
    const char **vals = (const char **)malloc(sizeof(char *) * (size_t)(nmeta + 2));
    StStr crcs, hdr;
    memset(&crcs, 0, sizeof crcs);
    memset(&hdr, 0, sizeof hdr);
    int fd = -1, ret = -1;
    size_t off = 0;
    long long hcrc;
    char hcrc_hex[16];
    uint64_t hlen;
    if (!e || !keys || !vals) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
    ststr_put(&crcs, "{", 1);
    for (int i = 0; i < n; i++) {
        const StTensor *x = &ts[i];
        unsigned long long bytes = 0;
        st_nbytes(st_dtypes[st_dtype_index(x->dtype)].size, x->ndim, x->shape, &bytes);
        e[i].name = x->name;
        e[i].dtype = st_dtypes[st_dtype_index(x->dtype)].name;
        e[i].ndim = x->ndim;
        e[i].begin = off;
        e[i].end = off + (size_t)bytes;
        e[i].data = x->data;
        memcpy(e[i].shape, x->shape, sizeof(long long) * (size_t)x->ndim);
        off += (size_t)bytes;
        if (i) ststr_put(&crcs, ",", 1);
        ststr_json(&crcs, x->name);
        ststr_printf(&crcs, ":\"%08x\"", crc32_ieee(x->data, (size_t)bytes));
    }
    ststr_put(&crcs, "}", 1);
    if (crcs.oom) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
    for (int i = 0; i < nmeta; i++) { keys[i] = meta_keys[i]; vals[i] = meta_vals[i]; }
    keys[nmeta] = "crc32";
    vals[nmeta] = crcs.s;
    hcrc = st_header_crc(e, n, keys, vals, nmeta + 1);
    if (hcrc < 0) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
    snprintf(hcrc_hex, sizeof hcrc_hex, "%08x", (unsigned)hcrc);
    keys[nmeta + 1] = "header_crc32";
    vals[nmeta + 1] = hcrc_hex;

    // the header: 8 bytes of length, then JSON padded with spaces to a multiple of 8
    ststr_put(&hdr, "01234567{\"__metadata__\":{", 25);
    for (int i = 0; i < nmeta + 2; i++) {
        if (i) ststr_put(&hdr, ",", 1);
        ststr_json(&hdr, keys[i]);
        ststr_put(&hdr, ":", 1);
        ststr_json(&hdr, vals[i]);
    }
    ststr_put(&hdr, "}", 1);
    for (int i = 0; i < n; i++) {
        ststr_put(&hdr, ",", 1);
        ststr_json(&hdr, e[i].name);
        ststr_printf(&hdr, ":{\"dtype\":\"%s\",\"shape\":[", e[i].dtype);
        for (int d = 0; d < e[i].ndim; d++) ststr_printf(&hdr, d ? ",%lld" : "%lld", e[i].shape[d]);
        ststr_printf(&hdr, "],\"data_offsets\":[%zu,%zu]}", e[i].begin, e[i].end);
    }
    ststr_put(&hdr, "}", 1);
    while (hdr.len % 8) ststr_put(&hdr, " ", 1);
    if (hdr.oom) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
    hlen = hdr.len - 8;
    memcpy(hdr.s, &hlen, 8);

    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { ckpt_err(err, errlen, "%s: cannot create: %s", path, strerror(errno)); goto done; }
    if (ckpt_write_all(fd, hdr.s, hdr.len) != 0) {
        ckpt_err(err, errlen, "%s: write failed: %s", path, strerror(errno));
        goto done;
    }
    for (int i = 0; i < n; i++)
        if (ckpt_write_all(fd, e[i].data, e[i].end - e[i].begin) != 0) {
            ckpt_err(err, errlen, "%s: write failed in tensor %s: %s", path, e[i].name, strerror(errno));
            goto done;
        }
    if (fsync(fd) != 0 && errno != EINVAL) {  // EINVAL: a special file (e.g. a pipe) cannot be synced
        ckpt_err(err, errlen, "%s: fsync failed: %s", path, strerror(errno));
        goto done;
    }
    ret = 0;
done:
    if (fd >= 0) {
        struct stat sb;
        int is_file = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode);
        if (close(fd) != 0 && ret == 0) {
            ckpt_err(err, errlen, "%s: close failed: %s", path, strerror(errno));
            ret = -1;
        }
        if (ret != 0 && is_file) unlink(path);  // no half-written file left to be mistaken for a good one
    }
    free(e);
    free(keys);
    free(vals);
    free(crcs.s);
    free(hdr.s);
    return ret;
}

static void safetensors_free(SafeTensors *st);

// A JSON number that is a non-negative integer below 2^53 (exact in a double).
static int st_json_uint(const cJSON *v, unsigned long long *out) {
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!(d >= 0 && d < 9007199254740992.0) || d != (double)(unsigned long long)d) return -1;
    *out = (unsigned long long)d;
    return 0;
}

static int st_cmp_entry_begin(const void *a, const void *b) {
    const StEntry *x = *(const StEntry *const *)a, *y = *(const StEntry *const *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : (x->end > y->end) - (x->end < y->end);
}

// Parse one tensor's header entry into e (name already set). Returns 0 or -1 with err set.
static int st_parse_entry(const char *path, const cJSON *item, StEntry *e, char *err, size_t errlen) {
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(item, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
    if (!cJSON_IsObject(item) || !cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(of)) {
        ckpt_err(err, errlen, "%s: tensor %s: header entry lacks dtype, shape or data_offsets", path, e->name);
        return -1;
    }
    int di = st_dtype_index(dt->valuestring);
    if (di < 0) {
        ckpt_err(err, errlen, "%s: tensor %s: unknown dtype %s", path, e->name, dt->valuestring);
        return -1;
    }
    e->dtype = st_dtypes[di].name;
    e->ndim = cJSON_GetArraySize(sh);
    if (e->ndim > ST_MAX_DIMS) {
        ckpt_err(err, errlen, "%s: tensor %s: %d dimensions, at most %d supported", path, e->name, e->ndim, ST_MAX_DIMS);
        return -1;
    }
    int d = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, sh) {
        unsigned long long x;
        if (st_json_uint(v, &x) != 0) {
            ckpt_err(err, errlen, "%s: tensor %s: shape[%d] is not a non-negative integer", path, e->name, d);
            return -1;
        }
        e->shape[d++] = (long long)x;
    }
    unsigned long long b, en, need = 0;
    if (cJSON_GetArraySize(of) != 2 || st_json_uint(of->child, &b) != 0 || st_json_uint(of->child->next, &en) != 0 || en < b) {
        ckpt_err(err, errlen, "%s: tensor %s: data_offsets is not [begin, end] with begin <= end", path, e->name);
        return -1;
    }
    e->begin = (size_t)b;
    e->end = (size_t)en;
    if (st_nbytes(st_dtypes[di].size, e->ndim, e->shape, &need) != 0 || need != en - b) {
        ckpt_err(err, errlen, "%s: tensor %s: data_offsets [%llu, %llu) hold %llu bytes but dtype %s and "
                 "the shape need %llu", path, e->name, b, en, en - b, e->dtype, need);
        return -1;
    }
    return 0;
}

// Check the crc32 and header_crc32 metadata (see the top of this file). Returns 0 or -1 with err set.
static int st_verify_crcs(const char *path, SafeTensors *st, char *err, size_t errlen) {
    const char *crcs = NULL, *hcrc = NULL, *format = NULL;
    for (int i = 0; i < st->nmeta; i++) {
        if (strcmp(st->meta_keys[i], "crc32") == 0) crcs = st->meta_vals[i];
        if (strcmp(st->meta_keys[i], "header_crc32") == 0) hcrc = st->meta_vals[i];
        if (strcmp(st->meta_keys[i], "format") == 0) format = st->meta_vals[i];
    }
    if (!crcs && !hcrc) {
        if (format && strncmp(format, CKPT_FORMAT_PREFIX, strlen(CKPT_FORMAT_PREFIX)) == 0) {
            ckpt_err(err, errlen, "%s: format %s but no crc32 metadata: the header is corrupt", path, format);
            return -1;
        }
        return 0;  // a foreign file (e.g. written by Python's safetensors): nothing to check against
    }
    int ours = format && strncmp(format, CKPT_FORMAT_PREFIX, strlen(CKPT_FORMAT_PREFIX)) == 0;
    // The Python reference (dev/reference/safetensors_io.py) writes crc32 alone; our trainers write both.
    if (!crcs || (!hcrc && ours)) {
        ckpt_err(err, errlen, "%s: %s metadata missing: the header is corrupt", path, crcs ? "header_crc32" : "crc32");
        return -1;
    }
    if (hcrc) {
        long long computed = st_header_crc(st->t, st->n, (const char *const *)st->meta_keys,
                                           (const char *const *)st->meta_vals, st->nmeta);
        if (computed < 0) { ckpt_err(err, errlen, "%s: out of memory", path); return -1; }
        char hex[16];
        snprintf(hex, sizeof hex, "%08x", (unsigned)computed);
        if (strcmp(hex, hcrc) != 0) {
            ckpt_err(err, errlen, "%s: header CRC-32 mismatch (stored %s, computed %s): the header (names, shapes, "
                     "offsets or metadata) is corrupt", path, hcrc, hex);
            return -1;
        }
    }
    // The header CRC covered the crc32 string, so it parses as we wrote it; still, never trust blindly.
    cJSON *map = cJSON_Parse(crcs);
    int ret = -1;
    char *seen = (char *)calloc((size_t)(st->n ? st->n : 1), 1);
    if (!seen) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
    if (!cJSON_IsObject(map)) { ckpt_err(err, errlen, "%s: crc32 metadata is not a JSON object", path); goto done; }
    const cJSON *c;
    cJSON_ArrayForEach(c, map) {
        int i = 0;
        while (i < st->n && strcmp(st->t[i].name, c->string) != 0) i++;
        if (i == st->n || seen[i]) {
            ckpt_err(err, errlen, "%s: crc32 metadata names tensor %s %s", path, c->string,
                     i == st->n ? "which the file does not hold" : "twice");
            goto done;
        }
        seen[i] = 1;
        StEntry *e = &st->t[i];
        char hex[16];
        snprintf(hex, sizeof hex, "%08x", crc32_ieee(e->data, e->end - e->begin));
        if (!cJSON_IsString(c) || strcmp(c->valuestring, hex) != 0) {
            ckpt_err(err, errlen, "%s: tensor %s: CRC-32 mismatch (stored %s, computed %s): file is corrupt", path,
                     e->name, cJSON_IsString(c) ? c->valuestring : "(not a string)", hex);
            goto done;
        }
    }
    for (int i = 0; i < st->n; i++)
        if (!seen[i]) {
            ckpt_err(err, errlen, "%s: tensor %s: no CRC-32 in the crc32 metadata", path, st->t[i].name);
            goto done;
        }
    ret = 0;
done:
    free(seen);
    cJSON_Delete(map);
    return ret;
}

// Read and validate a whole safetensors file. On error st is left empty (safetensors_free is harmless).
static int safetensors_read(SafeTensors *st, const char *path, char *err, size_t errlen) {
    memset(st, 0, sizeof(*st));
    int fd = open(path, O_RDONLY);
    if (fd < 0) { ckpt_err(err, errlen, "%s: cannot open: %s", path, strerror(errno)); return -1; }
    char *hdr = NULL;
    cJSON *root = NULL;
    int ret = -1, nitems, nmetaobj = 0;
    struct stat sb;
    size_t size = 0, expect_end, pos = 0;
    uint64_t hlen = 0;
    const char *end = NULL;
    const cJSON *item;
    StEntry **order = NULL, *sorted;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        ckpt_err(err, errlen, "%s: not a regular file", path);
        goto done;
    }
    size = (size_t)sb.st_size;
    if (size < 8 || ckpt_read_all(fd, &hlen, 8) != 8) {
        ckpt_err(err, errlen, "%s: file is %zu bytes, too short for a safetensors header (truncated)", path, size);
        goto done;
    }
    if (hlen > size - 8) {
        ckpt_err(err, errlen, "%s: header length %llu exceeds the %zu bytes after it (truncated, or not a "
                 "safetensors file)", path, (unsigned long long)hlen, size - 8);
        goto done;
    }
    hdr = (char *)malloc((size_t)hlen + 1);
    st->data_size = size - 8 - (size_t)hlen;
    if (!hdr || posix_memalign((void **)&st->data, 64, st->data_size ? st->data_size : 64) != 0) {
        st->data = NULL;
        ckpt_err(err, errlen, "%s: out of memory for %zu bytes", path, size);
        goto done;
    }
    if (ckpt_read_all(fd, hdr, (size_t)hlen) != (ssize_t)hlen ||
        ckpt_read_all(fd, st->data, st->data_size) != (ssize_t)st->data_size) {
        ckpt_err(err, errlen, "%s: read failed (file changed while reading?): %s", path, strerror(errno));
        goto done;
    }
    hdr[hlen] = '\0';

    // the header: one JSON object, then only the padding spaces
    root = cJSON_ParseWithLengthOpts(hdr, (size_t)hlen, &end, 0);
    if (!root) {
        ckpt_err(err, errlen, "%s: header is not valid JSON (at file byte %zu)", path,
                 8 + (size_t)(end ? end - hdr : 0));
        goto done;
    }
    for (const char *p = end; p < hdr + hlen; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            ckpt_err(err, errlen, "%s: header has bytes after its JSON (at file byte %zu)", path, 8 + (size_t)(p - hdr));
            goto done;
        }
    if (!cJSON_IsObject(root)) { ckpt_err(err, errlen, "%s: header is not a JSON object", path); goto done; }

    nitems = cJSON_GetArraySize(root);
    st->t = (StEntry *)calloc((size_t)(nitems ? nitems : 1), sizeof(StEntry));
    if (!st->t) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
    cJSON_ArrayForEach(item, root) {
        if (strcmp(item->string, "__metadata__") == 0) {
            if (nmetaobj++ || !cJSON_IsObject(item)) {
                ckpt_err(err, errlen, "%s: __metadata__ is not a single JSON object", path);
                goto done;
            }
            int m = cJSON_GetArraySize(item);
            st->meta_keys = (char **)calloc((size_t)(m ? m : 1), sizeof(char *));
            st->meta_vals = (char **)calloc((size_t)(m ? m : 1), sizeof(char *));
            if (!st->meta_keys || !st->meta_vals) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
            const cJSON *kv;
            cJSON_ArrayForEach(kv, item) {
                if (!cJSON_IsString(kv)) {
                    ckpt_err(err, errlen, "%s: metadata %s: value is not a string", path, kv->string);
                    goto done;
                }
                for (int j = 0; j < st->nmeta; j++)
                    if (strcmp(st->meta_keys[j], kv->string) == 0) {
                        ckpt_err(err, errlen, "%s: metadata key %s appears twice", path, kv->string);
                        goto done;
                    }
                st->meta_keys[st->nmeta] = strdup(kv->string);
                st->meta_vals[st->nmeta] = strdup(kv->valuestring);
                st->nmeta++;
                if (!st->meta_keys[st->nmeta - 1] || !st->meta_vals[st->nmeta - 1]) {
                    ckpt_err(err, errlen, "%s: out of memory", path);
                    goto done;
                }
            }
            continue;
        }
        StEntry *e = &st->t[st->n++];
        if (!(e->name = strdup(item->string))) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
        if (st_parse_entry(path, item, e, err, errlen) != 0) goto done;
    }

    // names unique; data_offsets contiguous from 0 and covering the data area exactly
    order = (StEntry **)malloc(sizeof(StEntry *) * (size_t)(st->n ? st->n : 1));
    if (!order) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
    for (int i = 0; i < st->n; i++) order[i] = &st->t[i];
    qsort(order, (size_t)st->n, sizeof(*order), st_cmp_entry_name);
    for (int i = 1; i < st->n; i++)
        if (strcmp(order[i - 1]->name, order[i]->name) == 0) {
            ckpt_err(err, errlen, "%s: tensor %s appears twice in the header", path, order[i]->name);
            goto done;
        }
    qsort(order, (size_t)st->n, sizeof(*order), st_cmp_entry_begin);
    expect_end = st->n ? order[st->n - 1]->end : 0;
    for (int i = 0; i < st->n; i++) {
        StEntry *e = order[i];
        if (e->end > st->data_size) {
            ckpt_err(err, errlen, "%s: truncated: tensor %s needs data bytes up to %zu but the file holds %zu "
                     "(file is %zu bytes, expected %zu)", path, e->name, e->end, st->data_size, size,
                     8 + (size_t)hlen + expect_end);
            goto done;
        }
        if (e->begin != pos) {
            ckpt_err(err, errlen, "%s: tensor %s: data_offsets [%zu, %zu) %s the previous tensor ending at %zu",
                     path, e->name, e->begin, e->end, e->begin < pos ? "overlap" : "leave a gap after", pos);
            goto done;
        }
        pos = e->end;
    }
    if (pos != st->data_size) {
        ckpt_err(err, errlen, "%s: %zu bytes after the last tensor (file is %zu bytes, expected %zu): not a "
                 "complete safetensors file", path, st->data_size - pos, size, 8 + (size_t)hlen + pos);
        goto done;
    }
    // file order, which for our files is the writer's order
    sorted = (StEntry *)malloc(sizeof(StEntry) * (size_t)(st->n ? st->n : 1));
    if (!sorted) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
    for (int i = 0; i < st->n; i++) sorted[i] = *order[i];
    free(st->t);
    st->t = sorted;

    // data pointers; a tensor at an offset that is not a multiple of its element size (possible after an
    // odd-length BF16/U8 tensor in a foreign file) gets an aligned copy so callers may read it as float*
    for (int i = 0; i < st->n; i++) {
        StEntry *e = &st->t[i];
        size_t elem = (size_t)st_dtypes[st_dtype_index(e->dtype)].size;
        e->data = st->data + e->begin;
        if (e->begin % elem != 0) {
            if (posix_memalign(&e->copy, 64, e->end - e->begin + 1) != 0) {
                e->copy = NULL;
                ckpt_err(err, errlen, "%s: out of memory", path);
                goto done;
            }
            memcpy(e->copy, e->data, e->end - e->begin);
            e->data = e->copy;
        }
    }
    if (st_verify_crcs(path, st, err, errlen) != 0) goto done;
    ret = 0;
done:
    close(fd);
    free(hdr);
    free(order);
    cJSON_Delete(root);
    if (ret != 0) safetensors_free(st);
    return ret;
}

// Tensor by name: its bytes as stored (dtype says which), or NULL if absent. dtype/ndim/shape may be NULL.
static const void *safetensors_find(const SafeTensors *st, const char *name, const char **dtype, int *ndim,
                                    long long shape[4]) {
    for (int i = 0; i < st->n; i++) {
        const StEntry *e = &st->t[i];
        if (strcmp(e->name, name) != 0) continue;
        if (dtype) *dtype = e->dtype;
        if (ndim) *ndim = e->ndim;
        if (shape) {
            for (int d = 0; d < ST_MAX_DIMS; d++) shape[d] = d < e->ndim ? e->shape[d] : 0;
        }
        return e->data;
    }
    return NULL;
}

static const char *safetensors_meta(const SafeTensors *st, const char *key) {
    for (int i = 0; i < st->nmeta; i++)
        if (strcmp(st->meta_keys[i], key) == 0) return st->meta_vals[i];
    return NULL;
}

static int safetensors_count(const SafeTensors *st) { return st->n; }
static const char *safetensors_name(const SafeTensors *st, int i) {
    return i >= 0 && i < st->n ? st->t[i].name : NULL;
}

static void safetensors_free(SafeTensors *st) {
    for (int i = 0; i < st->n; i++) {
        free((void *)st->t[i].name);
        free(st->t[i].copy);
    }
    for (int i = 0; i < st->nmeta; i++) {
        free(st->meta_keys[i]);
        free(st->meta_vals[i]);
    }
    free(st->t);
    free(st->meta_keys);
    free(st->meta_vals);
    free(st->data);
    memset(st, 0, sizeof(*st));
}

// ----------------------------------------------------------------------------
// Checkpoint directories. A checkpoint is RUN/ckpt_%08d/ holding model.safetensors (and
// state.safetensors); it is built in RUN/ckpt_%08d.tmp/ and renamed into place only after every file
// and the directory are on disk, so a directory named ckpt_%08d is always complete and a crash at any
// moment leaves the previous checkpoints intact.

// Set by the tests to take the path used where the filesystem cannot swap two directories.
static int ckpt_no_exchange = 0;

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)  // from <linux/fs.h>: swap two paths atomically
#endif

// An entry of the run directory: "ckpt_<digits>" -> 0, "ckpt_<digits>.tmp"/".old" (unfinished or
// set-aside) -> 1, anything else -> -1.
static int ckpt_parse_name(const char *name, int *step) {
    if (strncmp(name, "ckpt_", 5) != 0) return -1;
    const char *p = name + 5, *q = p;
    while (*q >= '0' && *q <= '9') q++;
    if (q == p || q - p > 10) return -1;
    long long s = strtoll(p, NULL, 10);
    if (s > 2147483647LL) return -1;
    *step = (int)s;
    if (*q == '\0') return 0;
    return strcmp(q, ".tmp") == 0 || strcmp(q, ".old") == 0 ? 1 : -1;
}

// RUN/ckpt_%08d<suffix> into buf; -1 if it does not fit.
static int ckpt_path(char *buf, size_t len, const char *run_dir, int step, const char *suffix) {
    int k = snprintf(buf, len, "%s/ckpt_%08d%s", run_dir, step, suffix);
    return k < 0 || (size_t)k >= len ? -1 : 0;
}

// a directory that holds a model.safetensors file
static int ckpt_is_complete(const char *dir) {
    char p[4300];
    struct stat sb;
    int k = snprintf(p, sizeof p, "%s/model.safetensors", dir);
    return k > 0 && (size_t)k < sizeof p && stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

// A rename or create inside a directory is durable only once the directory itself is fsynced.
static int ckpt_fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return -1;
    int r = fsync(fd);
    int e = errno;
    close(fd);
    errno = e;
    return r;
}

// rm -r path (files, links and nested directories); 0 or -1 with errno set.
static int ckpt_rmtree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(sb.st_mode)) return unlink(path);
    DIR *d = opendir(path);
    if (!d) return -1;
    struct dirent *de;
    int r = 0;
    while (r == 0 && (de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        size_t n = strlen(path) + strlen(de->d_name) + 2;
        char *child = (char *)malloc(n);
        if (!child) { errno = ENOMEM; r = -1; break; }
        snprintf(child, n, "%s/%s", path, de->d_name);
        r = ckpt_rmtree(child);
        free(child);
    }
    int e = errno;
    closedir(d);
    errno = e;
    return r == 0 ? rmdir(path) : -1;
}

// mkdir -p
static int ckpt_mkdirs(const char *path) {
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) { errno = ENAMETOOLONG; return -1; }
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(buf, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

// Make an empty RUN/ckpt_%08d.tmp/ (creating RUN, removing a stale one left by a killed write) and
// put its path in tmp_dir; the caller writes model.safetensors and state.safetensors into it.
static int checkpoint_begin(const char *run_dir, int step, char *tmp_dir, size_t len, char *err, size_t errlen) {
    char tmp[4096];
    if (step < 0) { ckpt_err(err, errlen, "%s: checkpoint step %d is negative", run_dir, step); return -1; }
    if (ckpt_path(tmp, sizeof tmp, run_dir, step, ".tmp") != 0 || strlen(tmp) >= len) {
        ckpt_err(err, errlen, "%s: checkpoint path too long", run_dir);
        return -1;
    }
    if (ckpt_mkdirs(run_dir) != 0) {
        ckpt_err(err, errlen, "%s: cannot create the run directory: %s", run_dir, strerror(errno));
        return -1;
    }
    if (ckpt_rmtree(tmp) != 0) {
        ckpt_err(err, errlen, "%s: cannot remove the stale unfinished checkpoint: %s", tmp, strerror(errno));
        return -1;
    }
    if (mkdir(tmp, 0755) != 0) {
        ckpt_err(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
        return -1;
    }
    memcpy(tmp_dir, tmp, strlen(tmp) + 1);
    return 0;
}

// Put `dir` aside as RUN/ckpt_%08d.tmp (so it stops counting as complete at once) and delete it.
static int ckpt_discard(const char *run_dir, int step, const char *dir, char *err, size_t errlen) {
    char aside[4096];
    if (ckpt_path(aside, sizeof aside, run_dir, step, ".tmp") != 0 || ckpt_rmtree(aside) != 0 ||
        rename(dir, aside) != 0 || ckpt_rmtree(aside) != 0) {
        ckpt_err(err, errlen, "%s: cannot remove the old checkpoint: %s", dir, strerror(errno));
        return -1;
    }
    return 0;
}

static int ckpt_cmp_int_desc(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x < y) - (x > y);
}

// Publish RUN/ckpt_%08d.tmp/ as RUN/ckpt_%08d/, then keep only the `keep` newest complete checkpoints
// (keep <= 0: all), the new one always among them, and delete unfinished ones of older steps.
// A -1 after the rename means the new checkpoint is in place but cleaning up failed.
static int checkpoint_commit(const char *run_dir, int step, int keep, char *err, size_t errlen) {
    char tmp[4096], fin[4096], old[4096];
    if (step < 0 || ckpt_path(tmp, sizeof tmp, run_dir, step, ".tmp") != 0 ||
        ckpt_path(fin, sizeof fin, run_dir, step, "") != 0 || ckpt_path(old, sizeof old, run_dir, step, ".old") != 0) {
        ckpt_err(err, errlen, "%s: bad checkpoint step %d or path too long", run_dir, step);
        return -1;
    }
    if (!ckpt_is_complete(tmp)) {
        ckpt_err(err, errlen, "%s: no model.safetensors in it: nothing to commit", tmp);
        return -1;
    }
    if (ckpt_fsync_dir(tmp) != 0) {
        ckpt_err(err, errlen, "%s: fsync failed: %s", tmp, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (lstat(fin, &sb) != 0) {
        if (rename(tmp, fin) != 0) {
            ckpt_err(err, errlen, "%s: cannot rename to %s: %s", tmp, fin, strerror(errno));
            return -1;
        }
    } else {
        // A checkpoint of this step exists already (a run redone from an earlier step). Swap the two
        // atomically so there is never a moment without a complete one; where the filesystem cannot,
        // set the old one aside as .old first (ignored by checkpoint_latest, deleted below).
        long r = -1;
        errno = ENOSYS;
#ifdef SYS_renameat2
        if (!ckpt_no_exchange) r = syscall(SYS_renameat2, AT_FDCWD, tmp, AT_FDCWD, fin, RENAME_EXCHANGE);
#endif
        if (r == 0) {
            if (ckpt_fsync_dir(run_dir) != 0 || ckpt_rmtree(tmp) != 0) {
                ckpt_err(err, errlen, "%s: cannot remove the replaced checkpoint: %s", tmp, strerror(errno));
                return -1;
            }
        } else if (errno == EINVAL || errno == ENOSYS) {
            if (ckpt_rmtree(old) != 0 || rename(fin, old) != 0 || rename(tmp, fin) != 0) {
                ckpt_err(err, errlen, "%s: cannot replace %s: %s", tmp, fin, strerror(errno));
                return -1;
            }
            if (ckpt_fsync_dir(run_dir) != 0 || ckpt_rmtree(old) != 0) {
                ckpt_err(err, errlen, "%s: cannot remove the replaced checkpoint: %s", old, strerror(errno));
                return -1;
            }
        } else {
            ckpt_err(err, errlen, "%s: cannot replace %s: %s", tmp, fin, strerror(errno));
            return -1;
        }
    }
    if (ckpt_fsync_dir(run_dir) != 0) {
        ckpt_err(err, errlen, "%s: fsync failed: %s", run_dir, strerror(errno));
        return -1;
    }

    // prune: only now that the new checkpoint is durable
    DIR *d = opendir(run_dir);
    if (!d) { ckpt_err(err, errlen, "%s: cannot list: %s", run_dir, strerror(errno)); return -1; }
    int *steps = NULL, nsteps = 0, cap = 0, ret = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        int s, kind = ckpt_parse_name(de->d_name, &s);
        char p[4200];
        snprintf(p, sizeof p, "%s/%s", run_dir, de->d_name);
        if (kind == 1 && s < step) {
            if (ckpt_rmtree(p) != 0) {
                ckpt_err(err, errlen, "%s: cannot remove the stale unfinished checkpoint: %s", p, strerror(errno));
                ret = -1;
            }
        } else if (kind == 0 && s != step && ckpt_is_complete(p)) {
            if (nsteps == cap) {
                cap = cap ? 2 * cap : 16;
                int *ns = (int *)realloc(steps, sizeof(int) * (size_t)cap);
                if (!ns) { ckpt_err(err, errlen, "%s: out of memory", run_dir); ret = -1; break; }
                steps = ns;
            }
            steps[nsteps++] = s;
        }
    }
    closedir(d);
    if (ret == 0) {
        if (nsteps > 1) qsort(steps, (size_t)nsteps, sizeof(int), ckpt_cmp_int_desc);
        for (int i = 0; i < nsteps; i++) {
            if (keep <= 0 || i + 1 < keep) continue;  // the new one plus the keep-1 newest others stay
            char p[4096];
            if (ckpt_path(p, sizeof p, run_dir, steps[i], "") != 0) {
                ckpt_err(err, errlen, "%s: checkpoint path too long", run_dir);
                ret = -1;
                break;
            }
            if (ckpt_discard(run_dir, steps[i], p, err, errlen) != 0) { ret = -1; break; }
        }
    }
    free(steps);
    if (ret == 0 && ckpt_fsync_dir(run_dir) != 0) {
        ckpt_err(err, errlen, "%s: fsync failed: %s", run_dir, strerror(errno));
        ret = -1;
    }
    return ret;
}

// The newest complete checkpoint RUN/ckpt_%08d/ (ignoring unfinished .tmp ones and directories without
// model.safetensors): its path in ckpt_dir and its step. -1 if there is none (or RUN does not exist).
static int checkpoint_latest(const char *run_dir, char *ckpt_dir, size_t len, int *step) {
    DIR *d = opendir(run_dir);
    if (!d) return -1;
    int best = -1;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        int s;
        char p[4200];
        if (ckpt_parse_name(de->d_name, &s) != 0 || s <= best) continue;
        snprintf(p, sizeof p, "%s/%s", run_dir, de->d_name);
        if (ckpt_is_complete(p)) best = s;
    }
    closedir(d);
    if (best < 0 || ckpt_path(ckpt_dir, len, run_dir, best, "") != 0) return -1;
    *step = best;
    return 0;
}

// ----------------------------------------------------------------------------
// llm.c model files (gpt2_124M.bin, gpt2_124M_bf16.bin from llm.c's train_gpt2.py):
// 256 int32 header {20240326, version 3 (fp32) or 5 (bf16), maxT, V, L, NH, C, Vp}, then the parameters
// back to back in llm.c order: wte (Vp,C), wpe (maxT,C), ln1w (L,C), ln1b (L,C), qkvw (L,3C,C),
// qkvb (L,3C), attprojw (L,C,C), attprojb (L,C), ln2w (L,C), ln2b (L,C), fcw (L,4C,C), fcb (L,4C),
// fcprojw (L,C,4C), fcprojb (L,C), lnfw (C), lnfb (C).
// Reads them all as one fp32 array (*params malloc'd, *nparams values); header[0..7] as stored.
static int llmc_model_read(const char *path, int header[8], float **params, size_t *nparams, char *err,
                           size_t errlen) {
    *params = NULL;
    *nparams = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) { ckpt_err(err, errlen, "%s: cannot open: %s", path, strerror(errno)); return -1; }
    int32_t h[256];
    struct stat sb;
    float *p = NULL;
    uint16_t *buf = NULL;
    int ret = -1, maxT, V, L, NH, C, Vp;
    size_t c, n, elem;
    double approx;
    unsigned long long expect;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) { ckpt_err(err, errlen, "%s: not a regular file", path); goto done; }
    if (ckpt_read_all(fd, h, sizeof h) != (ssize_t)sizeof h) {
        ckpt_err(err, errlen, "%s: file is %lld bytes, shorter than the 1024-byte llm.c header", path,
                 (long long)sb.st_size);
        goto done;
    }
    if (h[0] != 20240326) {
        ckpt_err(err, errlen, "%s: bad magic %d (expected 20240326): not an llm.c model file", path, h[0]);
        goto done;
    }
    if (h[1] != 3 && h[1] != 5) {
        ckpt_err(err, errlen, "%s: version %d not supported (3 = fp32, 5 = bf16)", path, h[1]);
        goto done;
    }
    maxT = h[2], V = h[3], L = h[4], NH = h[5], C = h[6], Vp = h[7];
    // in double first: implausible values must not overflow the exact count below
    approx = ((double)Vp + maxT + 2 + 13.0 * L) * C + 12.0 * L * C * (double)C;
    if (maxT <= 0 || V <= 0 || L <= 0 || NH <= 0 || C <= 0 || Vp < V || C % NH != 0 || approx > 1e12) {
        ckpt_err(err, errlen, "%s: implausible header: maxT %d V %d L %d NH %d C %d Vp %d", path, maxT, V, L, NH, C, Vp);
        goto done;
    }
    c = (size_t)C;
    n = (size_t)Vp * c + (size_t)maxT * c + (size_t)L * (12 * c * c + 13 * c) + 2 * c;
    elem = h[1] == 3 ? 4 : 2;
    expect = 1024ull + (unsigned long long)n * elem;
    if ((unsigned long long)sb.st_size != expect) {
        ckpt_err(err, errlen, "%s: file is %lld bytes but its header (maxT %d V %d L %d C %d Vp %d, %s) implies "
                 "%llu: %s", path, (long long)sb.st_size, maxT, V, L, C, Vp, elem == 4 ? "fp32" : "bf16", expect,
                 (unsigned long long)sb.st_size < expect ? "truncated" : "oversized");
        goto done;
    }
    p = (float *)malloc(n * sizeof(float));
    if (!p) { ckpt_err(err, errlen, "%s: out of memory for %zu parameters", path, n); goto done; }
    if (elem == 4) {
        if (ckpt_read_all(fd, p, n * 4) != (ssize_t)(n * 4)) {
            ckpt_err(err, errlen, "%s: read failed: %s", path, strerror(errno));
            goto done;
        }
    } else {
        // bf16 is the top half of an fp32: widening is a 16-bit shift, exact
        const size_t chunk = (size_t)1 << 20;
        buf = (uint16_t *)malloc(chunk * sizeof(uint16_t));
        if (!buf) { ckpt_err(err, errlen, "%s: out of memory", path); goto done; }
        for (size_t i = 0; i < n; i += chunk) {
            size_t m = n - i < chunk ? n - i : chunk;
            if (ckpt_read_all(fd, buf, m * 2) != (ssize_t)(m * 2)) {
                ckpt_err(err, errlen, "%s: read failed: %s", path, strerror(errno));
                goto done;
            }
            for (size_t j = 0; j < m; j++) {
                uint32_t bits = (uint32_t)buf[j] << 16;
                memcpy(&p[i + j], &bits, 4);
            }
        }
    }
    memcpy(header, h, 8 * sizeof(int));
    *params = p;
    *nparams = n;
    p = NULL;
    ret = 0;
done:
    close(fd);
    free(p);
    free(buf);
    return ret;
}

#endif
