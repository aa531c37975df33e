// Tests for llmc/checkpoint.h: CRC-32, safetensors write/read and its refusals, checkpoint
// directories (atomic commit, keep, killed writes), and llm.c model files.
// At the end it writes build/test/st_sample.safetensors, which test/test_safetensors_torch.py reads
// with an independent Python reader (the formulas for its values are in write_sample below).
#include "llmc/checkpoint.h"
#include "test/test.h"

#define TMP "build/test/checkpoint_tmp"

static char err[1024];

static int contains(const char *s, const char *sub) { return strstr(s, sub) != NULL; }

static int write_bytes(const char *path, const void *buf, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(buf, 1, n, f);
    return fclose(f) == 0 && w == n ? 0 : -1;
}

static unsigned char *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(*n + 1);
    if (fread(buf, 1, *n, f) != *n) { free(buf); buf = NULL; }
    fclose(f);
    return buf;
}

// A safetensors file from a literal header and data (for foreign and malformed files).
static void write_raw_st(const char *path, const char *header, const void *data, size_t n) {
    uint64_t hl = strlen(header);
    unsigned char *buf = malloc(8 + hl + n + 1);
    memcpy(buf, &hl, 8);
    memcpy(buf + 8, header, hl);
    if (n) memcpy(buf + 8 + hl, data, n);
    write_bytes(path, buf, 8 + hl + n);
    free(buf);
}

// Read expected to fail: 1 if it failed and the message names every one of the given strings.
static int refused(const char *path, const char *a, const char *b) {
    SafeTensors st;
    err[0] = '\0';
    if (safetensors_read(&st, path, err, sizeof err) == 0) {
        safetensors_free(&st);
        snprintf(err, sizeof err, "(accepted)");
        return 0;
    }
    return contains(err, path) && (!a || contains(err, a)) && (!b || contains(err, b));
}

static int count_entries(const char *dir, const char *suffix) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d)) != NULL) {
        size_t l = strlen(de->d_name), s = strlen(suffix);
        if (strncmp(de->d_name, "ckpt_", 5) == 0 && l >= s && strcmp(de->d_name + l - s, suffix) == 0) n++;
    }
    if (d) closedir(d);
    return n;
}

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

// bit-at-a-time CRC-32, the definition, to check the table-driven one against
static uint32_t crc32_slow(const unsigned char *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
    }
    return ~c;
}

static void test_crc32(void) {
    check(crc32_ieee("123456789", 9) == 0xcbf43926u, "crc32 check value of \"123456789\" is cbf43926",
          "got %08x", crc32_ieee("123456789", 9));
    check(crc32_ieee("", 0) == 0, "crc32 of nothing is 0", "got %08x", crc32_ieee("", 0));
    unsigned char buf[1000];
    for (int i = 0; i < 1000; i++) buf[i] = (unsigned char)(i * 131 + (i >> 3) * 7);
    int bad = 0;
    for (size_t n = 0; n <= 1000; n += 37) {
        if (crc32_ieee(buf + 3, n > 997 ? 997 : n) != crc32_slow(buf + 3, n > 997 ? 997 : n)) bad++;
        size_t cut = n / 3;
        if (crc32_ieee_update(crc32_ieee(buf, cut), buf + cut, n - cut) != crc32_ieee(buf, n)) bad++;
    }
    check(bad == 0, "crc32 slicing-by-8 equals bitwise CRC at every length/alignment and composes", "%d mismatches", bad);
}

// ----------------------------------------------------------------------------
// safetensors round trip

#define RT_PATH TMP "/rt.safetensors"
static float rt_a[15], rt_c[24], rt_loss[1], rt_scalar[1];
static int32_t rt_ids[8];
static uint16_t rt_bf[3];
static const char *rt_keys[] = {"format", "config", "step", "empty"};
static const char *rt_vals[] = {"structured-gpt2/1", "{\n  \"model\": {\"n_layer\": 2, \"name\": \"caf\xc3\xa9 \\\"q\\\"\"}\n}\t\x01",
                                "123", ""};

static StTensor rt_tensors[7];

static void make_rt(void) {
    for (int i = 0; i < 15; i++) rt_a[i] = sinf((float)i) * 1e3f;
    uint32_t special[4] = {0x7fc00001u /* NaN payload */, 0x7f800000u /* inf */, 0x80000000u /* -0 */, 0x00000001u};
    for (int i = 0; i < 24; i++) rt_c[i] = (float)i / 7.0f;
    memcpy(rt_c, special, sizeof special);  // bit patterns must survive exactly
    for (int i = 0; i < 8; i++) rt_ids[i] = i * 1000003 - 2000000000;
    rt_loss[0] = 10.8125f;
    rt_scalar[0] = -2.5f;
    rt_bf[0] = 0x3f80; rt_bf[1] = 0xc000; rt_bf[2] = 0x7f7f;
    StTensor t[7] = {
        {"wte", "F32", rt_a, 2, {5, 3}},
        {"h.0.mlp_fc.W", "F32", rt_c, 3, {4, 2, 3}},
        {"inputs", "I32", rt_ids, 2, {2, 4}},
        {"loss", "F32", rt_loss, 1, {1}},
        {"scalar", "F32", rt_scalar, 0, {0}},
        {"empty", "F32", NULL, 2, {0, 3}},
        {"bf", "BF16", rt_bf, 1, {3}},
    };
    memcpy(rt_tensors, t, sizeof t);
}

static void test_roundtrip(void) {
    make_rt();
    int w = safetensors_write(RT_PATH, rt_tensors, 7, rt_keys, rt_vals, 4, err, sizeof err);
    check(w == 0, "safetensors_write of 7 tensors and 4 metadata strings", "%s", err);
    SafeTensors st;
    int r = safetensors_read(&st, RT_PATH, err, sizeof err);
    check(r == 0, "safetensors_read of the file just written", "%s", err);
    if (r != 0) return;
    check(safetensors_count(&st) == 7, "round trip: tensor count", "got %d", safetensors_count(&st));
    int names_ok = 1, meta_ok = 1, dtypes_ok = 1, shapes_ok = 1, values_ok = 1;
    for (int i = 0; i < 7; i++) {
        const StTensor *x = &rt_tensors[i];
        if (!safetensors_name(&st, i) || strcmp(safetensors_name(&st, i), x->name) != 0) names_ok = 0;
        const char *dt;
        int nd;
        long long sh[4];
        const void *p = safetensors_find(&st, x->name, &dt, &nd, sh);
        if (!p) { values_ok = 0; continue; }
        if (strcmp(dt, x->dtype) != 0) dtypes_ok = 0;
        size_t bytes = strcmp(x->dtype, "BF16") == 0 ? 2 : 4;
        if (nd != x->ndim) shapes_ok = 0;
        for (int d = 0; d < nd && d < 4; d++) {
            if (sh[d] != x->shape[d]) shapes_ok = 0;
            bytes *= (size_t)x->shape[d];
        }
        if (bytes && memcmp(p, x->data, bytes) != 0) values_ok = 0;
    }
    for (int i = 0; i < 4; i++) {
        const char *v = safetensors_meta(&st, rt_keys[i]);
        if (!v || strcmp(v, rt_vals[i]) != 0) meta_ok = 0;
    }
    check(names_ok, "round trip: names in the writer's order", "order differs");
    check(dtypes_ok, "round trip: dtypes F32/I32/BF16", "dtype differs");
    check(shapes_ok, "round trip: shapes including scalar () and empty (0,3)", "shape differs");
    check(values_ok, "round trip: values bit-exact (NaN payload, inf, -0, denormal, ints)", "values differ");
    check(meta_ok, "round trip: metadata strings byte-exact (quotes, newline, tab, \\x01, UTF-8, empty)", "metadata differs");
    check(safetensors_find(&st, "nope", NULL, NULL, NULL) == NULL, "find of an absent name is NULL", "not NULL");
    check(safetensors_meta(&st, "nope") == NULL, "meta of an absent key is NULL", "not NULL");
    const char *crcs = safetensors_meta(&st, "crc32");
    char want[32];
    snprintf(want, sizeof want, "\"wte\":\"%08x\"", crc32_ieee(rt_a, sizeof rt_a));
    check(crcs && contains(crcs, want), "crc32 metadata holds each tensor's CRC as 8 lowercase hex digits",
          "crc32 = %s, wanted %s", crcs ? crcs : "(none)", want);
    safetensors_free(&st);

    // the raw layout: length, JSON header, 8-byte aligned data start, string-only metadata
    size_t n;
    unsigned char *buf = read_bytes(RT_PATH, &n);
    uint64_t hl;
    memcpy(&hl, buf, 8);
    check((8 + hl) % 8 == 0 && 8 + hl <= n, "header length puts the data start on an 8-byte boundary",
          "8+N = %llu", (unsigned long long)(8 + hl));
    cJSON *root = cJSON_ParseWithLength((const char *)buf + 8, hl);
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(root, "__metadata__");
    int strings = cJSON_IsObject(meta), nkeys = 0;
    const cJSON *kv;
    cJSON_ArrayForEach(kv, meta) { strings &= cJSON_IsString(kv); nkeys++; }
    check(root && buf[8] == '{', "header is a JSON object", "cJSON could not parse it");
    check(strings && nkeys == 6, "__metadata__ values are all strings (4 given + crc32 + header_crc32)",
          "%d keys, all strings: %d", nkeys, strings);
    const cJSON *wte = cJSON_GetObjectItemCaseSensitive(root, "wte");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(wte, "data_offsets");
    check(off && off->child && off->child->valuedouble == 0 && off->child->next->valuedouble == 60,
          "first tensor's data_offsets are [0, 60]", "wrong offsets");
    cJSON_Delete(root);
    free(buf);
}

// ----------------------------------------------------------------------------
// refusals

static void test_truncation(void) {
    size_t n;
    unsigned char *buf = read_bytes(RT_PATH, &n);
    uint64_t hl;
    memcpy(&hl, buf, 8);
    size_t d0 = 8 + hl;  // data start; wte is [0,60), h.0.mlp_fc.W [60,156), inputs [156,188)
    const char *p = TMP "/cut.safetensors";
    struct { size_t cut; const char *what, *tensor; } cuts[] = {
        {0, "too short", NULL},
        {5, "too short", NULL},
        {8, "exceeds", NULL},
        {8 + hl / 2, "exceeds", NULL},
        {d0, "truncated", "wte"},
        {d0 + 3, "truncated", "wte"},
        {d0 + 60, "truncated", "h.0.mlp_fc.W"},
        {d0 + 100, "truncated", "h.0.mlp_fc.W"},
        {n - 1, "truncated", "bf"},
    };
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        write_bytes(p, buf, cuts[i].cut);
        char name[128];
        snprintf(name, sizeof name, "file cut at %zu of %zu bytes refused (%s%s%s)", cuts[i].cut, n, cuts[i].what,
                 cuts[i].tensor ? ", names tensor " : "", cuts[i].tensor ? cuts[i].tensor : "");
        check(refused(p, cuts[i].what, cuts[i].tensor), name, "%s", err);
    }
    // one byte too many is no more a valid file than one too few
    unsigned char *big = malloc(n + 1);
    memcpy(big, buf, n);
    big[n] = 0;
    write_bytes(p, big, n + 1);
    check(refused(p, "1 bytes after the last tensor", NULL), "file with a trailing extra byte refused", "%s", err);
    free(big);
    free(buf);
}

static void test_flips(void) {
    size_t n;
    unsigned char *buf = read_bytes(RT_PATH, &n);
    uint64_t hl;
    memcpy(&hl, buf, 8);
    const char *p = TMP "/flip.safetensors";
    // a flipped bit in each non-empty tensor's data names that tensor
    struct { const char *name; size_t at; } data_flips[] = {
        {"wte", 0}, {"h.0.mlp_fc.W", 60 + 95}, {"inputs", 170}, {"loss", 188}, {"scalar", 192}, {"bf", 196}};
    for (size_t i = 0; i < sizeof data_flips / sizeof data_flips[0]; i++) {
        buf[8 + hl + data_flips[i].at] ^= 0x10;
        write_bytes(p, buf, n);
        buf[8 + hl + data_flips[i].at] ^= 0x10;
        char want[128], name[128];
        snprintf(want, sizeof want, "tensor %s: CRC-32 mismatch (stored ", data_flips[i].name);
        snprintf(name, sizeof name, "flipped bit in tensor %s's data refused naming it", data_flips[i].name);
        check(refused(p, want, "file is corrupt"), name, "%s", err);
    }
    // a flipped digit inside a metadata value (JSON stays valid) is caught by header_crc32
    unsigned char *s = (unsigned char *)strstr((char *)buf + 8, "\"123\"");
    s[2] ^= 0x01;
    write_bytes(p, buf, n);
    s[2] ^= 0x01;
    check(refused(p, "header CRC-32 mismatch", NULL), "flipped digit in a metadata value refused (header CRC)", "%s", err);
    // a flipped byte of the JSON syntax
    buf[8] ^= 0x01;
    write_bytes(p, buf, n);
    buf[8] ^= 0x01;
    check(refused(p, "not valid JSON", NULL), "flipped '{' of the header refused as not JSON", "%s", err);
    // every single flipped byte anywhere in the length or header, with three different patterns
    int accepted = 0;
    size_t first = 0;
    const unsigned char pats[3] = {0x01, 0x20, 0x80};
    for (size_t i = 0; i < 8 + hl; i++)
        for (int k = 0; k < 3; k++) {
            buf[i] ^= pats[k];
            write_bytes(p, buf, n);
            buf[i] ^= pats[k];
            if (!refused(p, NULL, NULL)) {
                if (!accepted++) first = i;
            }
        }
    check(accepted == 0, "every one of 3x(8+N) single-byte flips in length+header is refused",
          "%d accepted, first at byte %zu", accepted, first);
    free(buf);
}

static void test_malformed(void) {
    const char *p = TMP "/bad.safetensors";
    float f[4] = {1, 2, 3, 4};
    write_raw_st(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}} x", f, 8);
    check(refused(p, "bytes after its JSON", NULL), "garbage after the header JSON refused", "%s", err);
    write_raw_st(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", f, 8);
    check(refused(p, "tensor a: data_offsets [0, 8) hold 8 bytes but dtype F32 and the shape need 12", NULL),
          "data_offsets disagreeing with dtype*shape refused", "%s", err);
    write_raw_st(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", f, 12);
    check(refused(p, "tensor b", "overlap"), "overlapping data_offsets refused naming the tensor", "%s", err);
    write_raw_st(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", f, 8);
    check(refused(p, "tensor a appears twice", NULL), "duplicate tensor name refused", "%s", err);
    write_raw_st(p, "{\"a\":{\"dtype\":\"Q7\",\"shape\":[1],\"data_offsets\":[0,4]}}", f, 4);
    check(refused(p, "unknown dtype Q7", NULL), "unknown dtype refused", "%s", err);
    write_raw_st(p, "{\"__metadata__\":{\"step\":5},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", f, 4);
    check(refused(p, "metadata step: value is not a string", NULL), "non-string metadata value refused", "%s", err);
    write_raw_st(p, "{\"__metadata__\":{\"format\":\"structured-gpt2/1\"},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", f, 4);
    check(refused(p, "no crc32", NULL), "our format without crc32 metadata refused", "%s", err);
    write_raw_st(p, "[1,2]", NULL, 0);
    check(refused(p, "not a JSON object", NULL), "a header that is not an object refused", "%s", err);
    check(refused(TMP "/does_not_exist.safetensors", "cannot open", NULL), "missing file refused naming it", "%s", err);
}

// A file as Python's safetensors writes it: no crc metadata, header length not a multiple of 8, tensors
// listed out of offset order, and an odd-length BF16 tensor that leaves the next F32 misaligned.
static void test_foreign(void) {
    const char *p = TMP "/foreign.safetensors";
    unsigned char data[6 + 8];
    uint16_t bf[3] = {0x3f80, 0x4000, 0xbf00};  // 1, 2, -0.5
    float f[2] = {3.25f, -7.0f};
    memcpy(data, bf, 6);
    memcpy(data + 6, f, 8);
    write_raw_st(p, "{\"z\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[6,14]},"
                    "\"__metadata__\":{\"config\":\"x\"},\"y\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]}}",
                 data, sizeof data);
    SafeTensors st;
    int r = safetensors_read(&st, p, err, sizeof err);
    check(r == 0, "foreign file without crc32, unaligned header length, unsorted entries accepted", "%s", err);
    if (r != 0) return;
    const float *z = safetensors_find(&st, "z", NULL, NULL, NULL);
    const uint16_t *y = safetensors_find(&st, "y", NULL, NULL, NULL);
    check(z && ((uintptr_t)z % 4) == 0 && z[0] == 3.25f && z[1] == -7.0f,
          "F32 tensor at a misaligned offset is returned aligned with its values", "z = %p", (const void *)z);
    check(y && y[0] == 0x3f80 && y[2] == 0xbf00, "BF16 tensor returned raw", "wrong BF16 bits");
    check(strcmp(safetensors_name(&st, 0), "y") == 0 && strcmp(safetensors_meta(&st, "config"), "x") == 0,
          "foreign file: tensors in offset order, metadata read", "name 0 = %s", safetensors_name(&st, 0));
    safetensors_free(&st);
}

static void test_write_errors(void) {
    float x[256] = {0};
    StTensor t = {"x", "F32", x, 1, {256}};
    int r = safetensors_write("/dev/full", &t, 1, NULL, NULL, 0, err, sizeof err);
    check(r != 0 && contains(err, "/dev/full") && contains(err, strerror(ENOSPC)),
          "disk full: write error names the file and the cause", "r=%d %s", r, err);
    r = safetensors_write(TMP "/no/such/dir/x.safetensors", &t, 1, NULL, NULL, 0, err, sizeof err);
    check(r != 0 && contains(err, TMP "/no/such/dir/x.safetensors") && contains(err, "cannot create"),
          "write into a missing directory refused naming the file", "%s", err);
    StTensor two[2] = {t, t};
    r = safetensors_write(TMP "/w.safetensors", two, 2, NULL, NULL, 0, err, sizeof err);
    check(r != 0 && contains(err, "tensor x: name used twice") && !exists(TMP "/w.safetensors"),
          "duplicate tensor name refused before anything is written", "%s", err);
    StTensor bad = {"x", "F31", x, 1, {256}};
    r = safetensors_write(TMP "/w.safetensors", &bad, 1, NULL, NULL, 0, err, sizeof err);
    check(r != 0 && contains(err, "unknown dtype F31"), "unknown dtype refused by the writer", "%s", err);
    const char *k[1] = {"crc32"}, *v[1] = {"x"};
    r = safetensors_write(TMP "/w.safetensors", &t, 1, k, v, 1, err, sizeof err);
    check(r != 0 && contains(err, "reserves"), "metadata key crc32 is reserved for the writer", "%s", err);
}

// ----------------------------------------------------------------------------
// checkpoint directories

// model.safetensors (one tensor holding `step`) and state.safetensors into dir
static int write_ckpt_files(const char *dir, int step) {
    char p[4200], s[32];
    float v[4] = {(float)step, 1, 2, 3};
    StTensor t = {"wte", "F32", v, 1, {4}};
    snprintf(s, sizeof s, "%d", step);
    const char *k[2] = {"format", "step"}, *vals[2] = {"structured-gpt2/1", s};
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    if (safetensors_write(p, &t, 1, k, vals, 2, err, sizeof err) != 0) return -1;
    StTensor m = {"m.wte", "F32", v, 1, {4}};
    snprintf(p, sizeof p, "%s/state.safetensors", dir);
    return safetensors_write(p, &m, 1, k, vals, 2, err, sizeof err);
}

// the value model.safetensors of a checkpoint dir holds, or -1
static int ckpt_value(const char *dir) {
    char p[4200];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    SafeTensors st;
    if (safetensors_read(&st, p, err, sizeof err) != 0) return -1;
    const float *v = safetensors_find(&st, "wte", NULL, NULL, NULL);
    int r = v ? (int)v[0] : -1;
    safetensors_free(&st);
    return r;
}

static int save(const char *run, int step, int value, int keep) {
    char tmp[4096];
    if (checkpoint_begin(run, step, tmp, sizeof tmp, err, sizeof err) != 0) return -1;
    if (write_ckpt_files(tmp, value) != 0) return -1;
    return checkpoint_commit(run, step, keep, err, sizeof err);
}

static void test_checkpoint_dirs(void) {
    const char *run = TMP "/runs/a";  // two levels that do not exist yet
    char dir[4096];
    int step = -7;
    check(checkpoint_latest(run, dir, sizeof dir, &step) == -1, "latest of a missing run dir is -1", "got %d", step);
    int ok = save(run, 100, 100, 2) == 0 && save(run, 200, 200, 2) == 0 && save(run, 300, 300, 2) == 0;
    check(ok, "three begin/write/commit cycles succeed (creating the run dir)", "%s", err);
    check(count_entries(run, "") == 2 && exists(TMP "/runs/a/ckpt_00000200") && exists(TMP "/runs/a/ckpt_00000300") &&
          !exists(TMP "/runs/a/ckpt_00000100"), "keep=2 leaves the two newest checkpoints", "%d entries",
          count_entries(run, ""));
    check(count_entries(run, ".tmp") == 0, "no .tmp directory left after commits", "%d", count_entries(run, ".tmp"));
    int r = checkpoint_latest(run, dir, sizeof dir, &step);
    check(r == 0 && step == 300 && strcmp(dir, TMP "/runs/a/ckpt_00000300") == 0,
          "latest is ckpt_00000300", "r=%d step=%d dir=%s", r, step, dir);

    // a write killed half-way through step 400: its .tmp holds a cut model.safetensors and no state
    char tmp[4096];
    checkpoint_begin(run, 400, tmp, sizeof tmp, err, sizeof err);
    write_ckpt_files(tmp, 400);
    char p[4200];
    snprintf(p, sizeof p, "%s/model.safetensors", tmp);
    int killed = truncate(p, 20) == 0;
    snprintf(p, sizeof p, "%s/state.safetensors", tmp);
    killed = killed && unlink(p) == 0;
    r = checkpoint_latest(run, dir, sizeof dir, &step);
    check(killed && r == 0 && step == 300, "killed write: latest ignores ckpt_00000400.tmp and returns 300",
          "step=%d", step);
    // a directory with the final name but no model.safetensors (not ours to judge) is not complete
    mkdir(TMP "/runs/a/ckpt_00000500", 0755);
    r = checkpoint_latest(run, dir, sizeof dir, &step);
    check(r == 0 && step == 300, "latest ignores a ckpt dir without model.safetensors", "step=%d", step);
    rmdir(TMP "/runs/a/ckpt_00000500");
    check(save(run, 400, 400, 2) == 0, "begin/commit of the killed step succeeds over the stale .tmp", "%s", err);
    r = checkpoint_latest(run, dir, sizeof dir, &step);
    check(r == 0 && step == 400 && ckpt_value(dir) == 400 && count_entries(run, "") == 2 &&
          count_entries(run, ".tmp") == 0, "after the redo: latest 400 with its data, two kept, no .tmp",
          "step=%d entries=%d tmp=%d", step, count_entries(run, ""), count_entries(run, ".tmp"));

    // committing a step that already exists replaces it whole
    check(save(run, 400, 401, 2) == 0, "re-commit of an existing step succeeds", "%s", err);
    r = checkpoint_latest(run, dir, sizeof dir, &step);
    check(r == 0 && step == 400 && ckpt_value(dir) == 401 && count_entries(run, ".tmp") == 0 &&
          count_entries(run, ".old") == 0 && exists(TMP "/runs/a/ckpt_00000300"),
          "re-commit replaced the old contents, kept the other checkpoint, left nothing behind", "value=%d",
          ckpt_value(dir));

    ckpt_no_exchange = 1;
    check(save(run, 400, 402, 2) == 0, "re-commit without RENAME_EXCHANGE succeeds", "%s", err);
    ckpt_no_exchange = 0;
    r = checkpoint_latest(run, dir, sizeof dir, &step);
    check(r == 0 && step == 400 && ckpt_value(dir) == 402 && count_entries(run, ".tmp") == 0 &&
          count_entries(run, ".old") == 0 && count_entries(run, "") == 2,
          "re-commit by setting the old one aside replaced it and left nothing behind", "value=%d", ckpt_value(dir));

    // a stale .tmp of an older step is cleaned up by the next commit; keep <= 0 keeps everything
    mkdir(TMP "/runs/a/ckpt_00000350.tmp", 0755);
    check(save(run, 600, 600, 0) == 0 && !exists(TMP "/runs/a/ckpt_00000350.tmp") && count_entries(run, "") == 3,
          "commit removes stale .tmp of older steps; keep=0 keeps all", "entries=%d", count_entries(run, ""));
    check(save(run, 700, 700, 1) == 0 && count_entries(run, "") == 1 && exists(TMP "/runs/a/ckpt_00000700"),
          "keep=1 leaves only the new checkpoint", "entries=%d", count_entries(run, ""));
    // the new checkpoint is never pruned, even when newer-step ones exist (a run redone from earlier)
    check(save(run, 650, 650, 1) == 0 && exists(TMP "/runs/a/ckpt_00000650") && !exists(TMP "/runs/a/ckpt_00000700"),
          "keep=1 with a newer old checkpoint keeps the one just written", "%s", err);

    checkpoint_begin(run, 800, tmp, sizeof tmp, err, sizeof err);
    r = checkpoint_commit(run, 800, 2, err, sizeof err);
    check(r != 0 && contains(err, "ckpt_00000800.tmp") && contains(err, "model.safetensors"),
          "commit of an empty .tmp refused naming it", "%s", err);
    write_bytes(TMP "/afile", "x", 1);
    r = checkpoint_begin(TMP "/afile", 1, tmp, sizeof tmp, err, sizeof err);
    check(r != 0 && contains(err, TMP "/afile"), "begin under a path that is a file refused naming it", "%s", err);
}

// ----------------------------------------------------------------------------
// llm.c model files

enum { M_MAXT = 3, M_V = 5, M_L = 2, M_NH = 2, M_C = 4, M_VP = 8 };

// llm.c's 16 parameter tensors, sizes listed independently of the header's formula
static size_t model_nparams(void) {
    size_t C = M_C, L = M_L;
    size_t sizes[16] = {M_VP * C, M_MAXT * C, L * C, L * C, L * 3 * C * C, L * 3 * C, L * C * C, L * C,
                        L * C, L * C, L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C, C, C};
    size_t n = 0;
    for (int i = 0; i < 16; i++) n += sizes[i];
    return n;
}

// writes an llm.c file; extra < 0 cuts bytes off, > 0 appends
static void write_model(const char *path, int magic, int version, const float *vals, size_t n, long extra) {
    int32_t h[256] = {magic, version, M_MAXT, M_V, M_L, M_NH, M_C, M_VP};
    size_t elem = version == 5 ? 2 : 4, total = 1024 + n * elem;
    unsigned char *buf = calloc(total + 16, 1);
    memcpy(buf, h, 1024);
    for (size_t i = 0; i < n; i++) {
        if (elem == 4) {
            memcpy(buf + 1024 + 4 * i, &vals[i], 4);
        } else {
            uint32_t bits;
            memcpy(&bits, &vals[i], 4);
            uint16_t top = (uint16_t)(bits >> 16);
            memcpy(buf + 1024 + 2 * i, &top, 2);
        }
    }
    write_bytes(path, buf, (size_t)((long)total + extra));
    free(buf);
}

static void test_llmc_model(void) {
    size_t n = model_nparams();
    float *v = malloc(n * sizeof(float)), *vb = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        v[i] = sinf((float)i * 0.37f) * 3.0f;
        vb[i] = ((float)(i % 97) - 48.0f) * 0.0625f * (i % 3 ? 1.0f : 1024.0f);  // exact in bf16 (<= 8 bits)
    }
    const char *p3 = TMP "/m3.bin", *p5 = TMP "/m5.bin", *pb = TMP "/mbad.bin";
    write_model(p3, 20240326, 3, v, n, 0);
    write_model(p5, 20240326, 5, vb, n, 0);
    int hdr[8];
    float *params = NULL;
    size_t np = 0;
    int r = llmc_model_read(p3, hdr, &params, &np, err, sizeof err);
    check(r == 0 && np == n && hdr[1] == 3 && hdr[4] == M_L && hdr[6] == M_C && hdr[7] == M_VP,
          "llm.c fp32 (v3) model read: header and parameter count", "r=%d np=%zu (want %zu) %s", r, np, n, err);
    check(r == 0 && memcmp(params, v, n * sizeof(float)) == 0, "llm.c fp32 values exact", "differ");
    free(params);
    r = llmc_model_read(p5, hdr, &params, &np, err, sizeof err);
    check(r == 0 && np == n && hdr[1] == 5, "llm.c bf16 (v5) model read", "r=%d %s", r, err);
    check(r == 0 && memcmp(params, vb, n * sizeof(float)) == 0, "llm.c bf16 values converted to fp32 exactly", "differ");
    free(params);

    char want[64], want2[64];
    write_model(pb, 20240326, 3, v, n, -1);
    snprintf(want, sizeof want, "is %zu bytes", 1024 + 4 * n - 1);
    snprintf(want2, sizeof want2, "implies %zu: truncated", 1024 + 4 * n);
    r = llmc_model_read(pb, hdr, &params, &np, err, sizeof err);
    check(r != 0 && params == NULL && contains(err, pb) && contains(err, want) && contains(err, want2),
          "truncated llm.c file refused with file, actual and expected sizes", "%s", err);
    write_model(pb, 20240326, 5, vb, n, 2);
    r = llmc_model_read(pb, hdr, &params, &np, err, sizeof err);
    check(r != 0 && contains(err, pb) && contains(err, "oversized"), "oversized llm.c file refused", "%s", err);
    write_model(pb, 20240520, 3, v, n, 0);
    r = llmc_model_read(pb, hdr, &params, &np, err, sizeof err);
    check(r != 0 && contains(err, pb) && contains(err, "bad magic 20240520"), "wrong magic refused (a token shard)", "%s", err);
    write_model(pb, 20240326, 1, v, n, 0);
    r = llmc_model_read(pb, hdr, &params, &np, err, sizeof err);
    check(r != 0 && contains(err, "version 1 not supported"), "unsupported version refused", "%s", err);
    write_bytes(pb, v, 100);
    r = llmc_model_read(pb, hdr, &params, &np, err, sizeof err);
    check(r != 0 && contains(err, pb) && contains(err, "shorter than the 1024-byte"), "file shorter than the header refused", "%s", err);
    free(v);
    free(vb);
}

// ----------------------------------------------------------------------------
// The sample for test/test_safetensors_torch.py. Its values, by flat index i:
//   a.weight      F32 (3,5)      (i*37 % 101) / 8 - 6
//   b.ids         I32 (2,3,4)    i*i - 7*i
//   c.scalar      F32 ()         3.5
//   d.empty       F32 (0,4)      (none)
//   e.ramp        F32 (1000,)    (i - 500) / 1024          (exact in binary)
//   h.0.mlp_fc.W  F32 (2,2,2,2)  float32(1/(i+1))
// metadata: format "structured-gpt2/1", step "42", note (quotes, backslash, newline, UTF-8), config JSON.
static void write_sample(void) {
    float a[15], c = 3.5f, e[1000], w[16];
    int32_t b[24];
    for (int i = 0; i < 15; i++) a[i] = (float)((i * 37 % 101) / 8.0 - 6.0);
    for (int i = 0; i < 24; i++) b[i] = i * i - 7 * i;
    for (int i = 0; i < 1000; i++) e[i] = (float)(i - 500) / 1024.0f;  // exact: no rounding, no FMA contraction
    for (int i = 0; i < 16; i++) w[i] = (float)(1.0 / (i + 1));
    StTensor t[6] = {
        {"a.weight", "F32", a, 2, {3, 5}}, {"b.ids", "I32", b, 3, {2, 3, 4}}, {"c.scalar", "F32", &c, 0, {0}},
        {"d.empty", "F32", NULL, 2, {0, 4}}, {"e.ramp", "F32", e, 1, {1000}},
        {"h.0.mlp_fc.W", "F32", w, 4, {2, 2, 2, 2}},
    };
    const char *k[4] = {"format", "step", "note", "config"};
    const char *v[4] = {"structured-gpt2/1", "42", "quotes \" backslash \\ newline \n UTF-8 \xc3\xa9 \xe2\x9c\x93",
                        "{\"model\": {\"n_layer\": 2, \"n_embd\": 64}}"};
    const char *path = "build/test/st_sample.safetensors";
    int r = safetensors_write(path, t, 6, k, v, 4, err, sizeof err);
    SafeTensors st;
    int rr = r == 0 ? safetensors_read(&st, path, err, sizeof err) : -1;
    check(r == 0 && rr == 0 && safetensors_count(&st) == 6, "sample for the PyTorch test written and read back",
          "%s", err);
    if (rr == 0) safetensors_free(&st);
}

int main(void) {
    ckpt_rmtree(TMP);
    ckpt_mkdirs(TMP);
    test_crc32();
    test_roundtrip();
    test_truncation();
    test_flips();
    test_malformed();
    test_foreign();
    test_write_errors();
    test_checkpoint_dirs();
    test_llmc_model();
    write_sample();
    ckpt_rmtree(TMP);
    return test_exit();
}
