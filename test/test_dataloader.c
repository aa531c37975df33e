// Tests of llmc/dataloader.h: shard write/read round trips, every refused-shard message, shuffling,
// order mode, position save/restore and data-parallel sharding.
//
// The synthetic shards make every window identifiable: token i of shard k is k*5000 + i, so a
// window's first input token names its shard and start, and its targets must be inputs + 1.
#include "llmc/dataloader.h"
#include "test/test.h"

#define DIR "build/test/dataloader_tmp"
#define VOCAB 20000
static const int SHARD_LEN[3] = {1001, 1500, 777};  // with T=8: 125 + 187 + 97 = 409 windows

static char err[512];

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) { perror(path); exit(1); }
    fclose(f);
}

// an llm.c file with an arbitrary header (for the bad cases): header ints h0,h1,h2 then n tokens
static void write_llmc_raw(const char *path, int32_t h0, int32_t h1, int32_t h2, const uint16_t *tok, size_t n) {
    size_t bytes = SHARD_HEADER_BYTES + 2 * n;
    char *buf = calloc(1, bytes);
    int32_t h[3] = {h0, h1, h2};
    memcpy(buf, h, sizeof(h));
    memcpy(buf + SHARD_HEADER_BYTES, tok, 2 * n);
    write_bytes(path, buf, bytes);
    free(buf);
}

static uint16_t *synth_tokens(int k, int n) {
    uint16_t *t = malloc(sizeof(uint16_t) * (size_t)n);
    for (int i = 0; i < n; i++) t[i] = (uint16_t)(k * 5000 + i);
    return t;
}

// the three synthetic shards in both formats: DIR/good_{0,1,2}.bin (llmc), DIR/nano_{0,1,2}.bin
static void make_shards(void) {
    char path[256];
    for (int k = 0; k < 3; k++) {
        uint16_t *t = synth_tokens(k, SHARD_LEN[k]);
        snprintf(path, sizeof(path), DIR "/good_%d.bin", k);
        if (shard_write(path, t, (size_t)SHARD_LEN[k], err, sizeof(err)) != 0) { printf("%s\n", err); exit(1); }
        snprintf(path, sizeof(path), DIR "/nano_%d.bin", k);
        write_bytes(path, t, 2 * (size_t)SHARD_LEN[k]);
        free(t);
    }
}

// init that must fail: returns 1 when it failed and the message contains every needle
static int refused_with(const char *pattern, const char *format, int T, const char *const *needles, int n) {
    DataLoader dl;
    err[0] = '\0';
    if (dataloader_init(&dl, pattern, format, 2, T, VOCAB, 1, 1, 0, 1, err, sizeof(err)) == 0) {
        dataloader_free(&dl);
        snprintf(err, sizeof(err), "(accepted)");
        return 0;
    }
    for (int i = 0; i < n; i++) if (!strstr(err, needles[i])) return 0;
    return 1;
}

// a window is named by its first token: shard k, window w -> k*5000 + w*T
static int window_ok(const DataLoader *dl, int i) {
    const int *in = dl->inputs + (size_t)i * dl->T, *tg = dl->targets + (size_t)i * dl->T;
    for (int t = 0; t < dl->T; t++) if (in[t] != in[0] + t || tg[t] != in[0] + t + 1) return 0;
    int k = in[0] / 5000, off = in[0] % 5000;
    return k < 3 && off % dl->T == 0 && off + dl->T < SHARD_LEN[k];
}

// the first tokens of n batches (B samples each), into out (n*B,); 0 if any window is malformed
static int collect(DataLoader *dl, size_t n, int *out) {
    int ok = 1;
    for (size_t b = 0; b < n; b++) {
        if (dataloader_next(dl, err, sizeof(err)) != 0) return 0;
        for (int i = 0; i < dl->B; i++) {
            ok &= window_ok(dl, i);
            out[b * (size_t)dl->B + (size_t)i] = dl->inputs[(size_t)i * dl->T];
        }
    }
    return ok;
}

static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

// every window of the synthetic shards exactly once: sorted first tokens == all window starts
static int is_every_window_once(const int *firsts, size_t n) {
    if (n != 409) return 0;
    int *s = malloc(sizeof(int) * n);
    memcpy(s, firsts, sizeof(int) * n);
    qsort(s, n, sizeof(int), cmp_int);
    size_t j = 0;
    int ok = 1;
    for (int k = 0; k < 3; k++)
        for (int w = 0; w < (SHARD_LEN[k] - 1) / 8; w++) ok &= s[j++] == k * 5000 + w * 8;
    free(s);
    return ok;
}

static void test_round_trip(void) {
    Shard s;
    int rc = shard_map(&s, DIR "/good_1.bin", "llmc", err, sizeof(err));
    uint16_t *t = synth_tokens(1, SHARD_LEN[1]);
    check(rc == 0 && s.ntok == (size_t)SHARD_LEN[1] && memcmp(s.tokens, t, 2 * s.ntok) == 0,
          "shard_write then shard_map gives the same tokens", "rc %d ntok %zu: %s", rc, s.ntok, err);
    check(s.map_len == SHARD_HEADER_BYTES + 2 * (size_t)SHARD_LEN[1], "llmc shard size is header + 2*ntok",
          "size %zu", s.map_len);
    if (rc == 0) shard_unmap(&s);
    free(t);
    FILE *f = fopen(DIR "/good_1.bin.tmp", "rb");
    check(f == NULL, "shard_write leaves no .tmp file", "found " DIR "/good_1.bin.tmp");
    if (f) fclose(f);

    // both formats, order mode: batch b sample i is window b*B+i of the epoch, in file order
    const char *fmts[2] = {"llmc", "nanogpt"}, *globs[2] = {DIR "/good_*.bin", DIR "/nano_*.bin"};
    for (int m = 0; m < 2; m++) {
        DataLoader dl;
        rc = dataloader_init(&dl, globs[m], fmts[m], 4, 8, VOCAB, 7, 0, 0, 1, err, sizeof(err));
        char name[128];
        snprintf(name, sizeof(name), "%s: loader opens the glob of 3 shards", fmts[m]);
        check(rc == 0 && dl.nshards == 3 && dl.total_windows == 409, name, "rc %d: %s", rc, err);
        if (rc != 0) continue;
        snprintf(name, sizeof(name), "%s: order mode has windows/B batches", fmts[m]);
        check(dataloader_num_batches(&dl) == 409 / 4, name, "%zu", dataloader_num_batches(&dl));
        int firsts[408];
        int ok = collect(&dl, 102, firsts);
        int consecutive = 1;
        size_t j = 0;
        for (int k = 0; k < 3 && j < 408; k++)
            for (int w = 0; w < (SHARD_LEN[k] - 1) / 8 && j < 408; w++) consecutive &= firsts[j++] == k * 5000 + w * 8;
        snprintf(name, sizeof(name), "%s: order mode gives consecutive windows from the first token", fmts[m]);
        check(ok && consecutive, name, "windows ok %d, consecutive %d (first %d %d %d)", ok, consecutive,
              firsts[0], firsts[1], firsts[125]);
        snprintf(name, sizeof(name), "%s: targets are the inputs shifted by one token", fmts[m]);
        check(ok && dl.targets[0] == 1 + dl.inputs[0], name, "in %d tg %d", dl.inputs[0], dl.targets[0]);
        dataloader_next(&dl, err, sizeof(err));
        snprintf(name, sizeof(name), "%s: order mode wraps to epoch 1 at its first window", fmts[m]);
        check(dl.epoch == 1 && dl.inputs[0] == 0, name, "epoch %d first token %d", dl.epoch, dl.inputs[0]);
        dataloader_free(&dl);
    }
}

static void test_bad_shards(void) {
    uint16_t tok[64];
    for (int i = 0; i < 64; i++) tok[i] = (uint16_t)i;

    write_llmc_raw(DIR "/magic.bin", 1234, 1, 64, tok, 64);
    const char *magic[] = {DIR "/magic.bin", "offset 0", "magic 1234", "expected 20240520"};
    check(refused_with(DIR "/magic.bin", "llmc", 8, magic, 4), "wrong magic refused with file, offset, value", "%s", err);

    write_llmc_raw(DIR "/version.bin", SHARD_MAGIC, 2, 64, tok, 64);
    const char *version[] = {DIR "/version.bin", "offset 4", "version 2, expected 1"};
    check(refused_with(DIR "/version.bin", "llmc", 8, version, 3), "wrong version refused with file, offset, value", "%s", err);

    char small[100] = {0};
    write_bytes(DIR "/short.bin", small, sizeof(small));
    const char *shorth[] = {DIR "/short.bin", "offset 100", "truncated", "1024-byte"};
    check(refused_with(DIR "/short.bin", "llmc", 8, shorth, 4), "file shorter than the header refused", "%s", err);

    write_llmc_raw(DIR "/count_big.bin", SHARD_MAGIC, 1, 100, tok, 50);
    const char *cbig[] = {DIR "/count_big.bin", "offset 8", "token count 100", "file size 1124", "truncated", "1224 bytes"};
    check(refused_with(DIR "/count_big.bin", "llmc", 8, cbig, 6), "count larger than the file (truncated) refused", "%s", err);

    write_llmc_raw(DIR "/count_small.bin", SHARD_MAGIC, 1, 40, tok, 50);
    const char *csmall[] = {DIR "/count_small.bin", "offset 8", "token count 40", "disagrees", "file size 1124", "extra bytes"};
    check(refused_with(DIR "/count_small.bin", "llmc", 8, csmall, 6), "count smaller than the file refused", "%s", err);

    write_llmc_raw(DIR "/count_neg.bin", SHARD_MAGIC, 1, -5, tok, 50);
    const char *cneg[] = {DIR "/count_neg.bin", "offset 8", "token count -5"};
    check(refused_with(DIR "/count_neg.bin", "llmc", 8, cneg, 3), "negative count refused", "%s", err);

    uint16_t badtok[64];
    memcpy(badtok, tok, sizeof(tok));
    badtok[5] = 60000;
    badtok[40] = 65535;
    write_llmc_raw(DIR "/vocab.bin", SHARD_MAGIC, 1, 64, badtok, 64);
    const char *vocab[] = {DIR "/vocab.bin", "offset 1034", "token 60000 >= vocab_size 20000"};
    check(refused_with(DIR "/vocab.bin", "llmc", 8, vocab, 3), "token >= vocab_size refused at its offset (llmc)", "%s", err);
    write_bytes(DIR "/vocab_nano.bin", badtok, sizeof(badtok));
    const char *vnano[] = {DIR "/vocab_nano.bin", "offset 10:", "token 60000 >= vocab_size 20000"};
    check(refused_with(DIR "/vocab_nano.bin", "nanogpt", 8, vnano, 3), "token >= vocab_size refused at its offset (nanogpt)", "%s", err);

    write_llmc_raw(DIR "/tiny.bin", SHARD_MAGIC, 1, 8, tok, 8);
    const char *tiny[] = {DIR "/tiny.bin", "8 tokens", "fewer than one window of T+1 = 9"};
    check(refused_with(DIR "/tiny.bin", "llmc", 8, tiny, 3), "shard shorter than one window refused", "%s", err);

    write_bytes(DIR "/odd.bin", tok, 63);
    const char *odd[] = {DIR "/odd.bin", "file size 63", "nanogpt"};
    check(refused_with(DIR "/odd.bin", "nanogpt", 8, odd, 3), "nanogpt file of odd size refused", "%s", err);

    const char *empty[] = {DIR "/nothing_*.bin", "no files match"};
    check(refused_with(DIR "/nothing_*.bin", "llmc", 8, empty, 2), "empty glob refused naming the pattern", "%s", err);

    const char *nofile[] = {DIR "/absent.bin: no such file"};
    check(refused_with(DIR "/absent.bin", "llmc", 8, nofile, 1), "missing file (no glob characters) refused", "%s", err);

    const char *fmt[] = {"unknown shard format \"npy\""};
    check(refused_with(DIR "/good_0.bin", "npy", 8, fmt, 1), "unknown format refused", "%s", err);

    // a bad shard anywhere in a glob refuses the whole glob, naming that shard
    write_llmc_raw(DIR "/mixed_0.bin", SHARD_MAGIC, 1, 64, tok, 64);
    write_llmc_raw(DIR "/mixed_1.bin", SHARD_MAGIC, 1, 64, badtok, 64);
    const char *mixed[] = {DIR "/mixed_1.bin", "token 60000"};
    check(refused_with(DIR "/mixed_*.bin", "llmc", 8, mixed, 2), "bad shard inside a glob is named", "%s", err);

    // 64 tokens, T=8: 7 windows, fewer than B*world = 2*4
    DataLoader dl;
    int rc = dataloader_init(&dl, DIR "/mixed_0.bin", "llmc", 2, 8, VOCAB, 1, 1, 0, 4, err, sizeof(err));
    check(rc != 0 && strstr(err, "7 windows") && strstr(err, "fewer than one batch"), "data smaller than one batch refused",
          "rc %d: %s", rc, err);
    if (rc == 0) dataloader_free(&dl);
}

static void test_shuffle(void) {
    DataLoader a, b, c;
    int ra = dataloader_init(&a, DIR "/good_*.bin", "llmc", 1, 8, VOCAB, 1337, 1, 0, 1, err, sizeof(err));
    int rb = dataloader_init(&b, DIR "/good_*.bin", "llmc", 1, 8, VOCAB, 1337, 1, 0, 1, err, sizeof(err));
    int rc = dataloader_init(&c, DIR "/good_*.bin", "llmc", 1, 8, VOCAB, 1338, 1, 0, 1, err, sizeof(err));
    check(ra == 0 && rb == 0 && rc == 0, "shuffled loaders open", "%s", err);
    if (ra || rb || rc) return;
    int ea[2][409], eb[409], ec[409];
    int ok = collect(&a, 409, ea[0]) & collect(&a, 409, ea[1]) & collect(&b, 409, eb) & collect(&c, 409, ec);
    check(ok, "shuffled windows are well-formed (targets = inputs shifted)", "bad window");
    check(memcmp(ea[0], eb, sizeof(eb)) == 0, "same seed gives the same batches", "first %d vs %d", ea[0][0], eb[0]);
    int diff = 0;
    for (int i = 0; i < 409; i++) diff += ea[0][i] != ec[i];
    check(diff > 300, "another seed gives other batches", "%d of 409 windows differ", diff);
    int moved = 0;
    for (int i = 0; i < 409; i++) {
        int k = 0, j = i;
        while (j >= (SHARD_LEN[k] - 1) / 8) { j -= (SHARD_LEN[k] - 1) / 8; k++; }
        moved += ea[0][i] != k * 5000 + j * 8;
    }
    check(moved > 300, "shuffle permutes the windows", "%d of 409 windows out of file order", moved);
    check(is_every_window_once(ea[0], 409), "epoch 0 covers every window exactly once", "coverage");
    check(is_every_window_once(ea[1], 409), "epoch 1 covers every window exactly once", "coverage");
    diff = 0;
    for (int i = 0; i < 409; i++) diff += ea[0][i] != ea[1][i];
    check(diff > 300 && a.epoch == 1, "epoch 1 has its own order", "%d differ, epoch %d", diff, a.epoch);
    // the shards themselves are visited in a shuffled order in some epoch: the shard of the first
    // window is not always shard 0
    int first_shard_seen[3] = {0};
    dataloader_reset(&a);
    for (int e = 0; e < 12; e++) {
        int buf[409];
        collect(&a, 409, buf);
        first_shard_seen[buf[0] / 5000] = 1;
    }
    check(first_shard_seen[0] + first_shard_seen[1] + first_shard_seen[2] >= 2, "shard order changes across epochs",
          "first shards seen %d %d %d", first_shard_seen[0], first_shard_seen[1], first_shard_seen[2]);
    dataloader_reset(&a);
    int again[409];
    collect(&a, 409, again);
    check(a.epoch == 0 && memcmp(again, ea[0], sizeof(again)) == 0, "reset replays epoch 0", "epoch %d", a.epoch);
    dataloader_free(&a); dataloader_free(&b); dataloader_free(&c);
}

// run `skip` batches, save, compare the next n batches of this loader with a fresh one seeked there
static int resume_matches(int B, int world, int rank, int shuffle, size_t skip, size_t n, char *pos, size_t poslen) {
    DataLoader a, b;
    if (dataloader_init(&a, DIR "/good_*.bin", "llmc", B, 8, VOCAB, 42, shuffle, rank, world, err, sizeof(err)) ||
        dataloader_init(&b, DIR "/good_*.bin", "llmc", B, 8, VOCAB, 42, shuffle, rank, world, err, sizeof(err)))
        return 0;
    int *x = malloc(sizeof(int) * n * (size_t)B), *y = malloc(sizeof(int) * n * (size_t)B);
    int *scratch = malloc(sizeof(int) * (skip + 1) * (size_t)B);
    collect(&a, skip, scratch);
    dataloader_position(&a, pos, poslen);
    int ok = dataloader_seek(&b, pos, err, sizeof(err)) == 0;
    ok = ok && collect(&a, n, x) && collect(&b, n, y) && memcmp(x, y, sizeof(int) * n * (size_t)B) == 0;
    ok = ok && a.epoch == b.epoch;
    free(x); free(y); free(scratch);
    dataloader_free(&a); dataloader_free(&b);
    return ok;
}

static void test_position(void) {
    char pos[512];
    // B=3: 409/3 = 136 batches per epoch
    check(resume_matches(3, 1, 0, 1, 50, 30, pos, sizeof(pos)), "seek mid-epoch gives the same next batches", "%s | %s", pos, err);
    check(strstr(pos, "\"epoch\":0,\"batch\":50,\"sample\":150") != NULL, "position names epoch, batch and sample", "%s", pos);
    check(resume_matches(3, 1, 0, 1, 130, 20, pos, sizeof(pos)), "seek before an epoch boundary continues across it",
          "%s | %s", pos, err);
    check(resume_matches(3, 1, 0, 1, 136, 10, pos, sizeof(pos)), "seek at the exact end of an epoch", "%s | %s", pos, err);
    check(strstr(pos, "\"epoch\":1,\"batch\":0,") != NULL, "end of epoch is written as the next epoch's start", "%s", pos);
    check(resume_matches(3, 1, 0, 1, 300, 20, pos, sizeof(pos)), "seek in epoch 2", "%s | %s", pos, err);
    check(resume_matches(4, 2, 1, 1, 40, 20, pos, sizeof(pos)), "seek on rank 1 of 2 across the epoch boundary", "%s | %s", pos, err);
    check(resume_matches(5, 1, 0, 0, 70, 20, pos, sizeof(pos)), "seek in order mode", "%s | %s", pos, err);

    DataLoader dl;
    if (dataloader_init(&dl, DIR "/good_*.bin", "llmc", 3, 8, VOCAB, 42, 1, 0, 1, err, sizeof(err))) {
        check(0, "loader for bad positions opens", "%s", err);
        return;
    }
    char good[512];
    for (int i = 0; i < 7; i++) dataloader_next(&dl, err, sizeof(err));
    dataloader_position(&dl, good, sizeof(good));
    struct { const char *pos; const char *needle; const char *name; } bad[] = {
        {"not json", "not a JSON object", "bad position: not JSON"},
        {"{\"batch\":1}", "\"epoch\": missing", "bad position: missing field"},
        {"{\"epoch\":-1,\"batch\":0}", "\"epoch\": -1 is not an integer", "bad position: negative epoch"},
        {"{\"epoch\":0.5,\"batch\":0}", "\"epoch\": 0.5 is not an integer", "bad position: fractional epoch"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = dataloader_seek(&dl, bad[i].pos, err, sizeof(err));
        check(rc != 0 && strstr(err, bad[i].needle), bad[i].name, "rc %d: %s", rc, err);
    }
    // edits of a real position: each must be refused with its field named
    struct { const char *from, *to, *needle, *name; } edits[] = {
        {"\"seed\":\"42\"", "\"seed\":\"43\"", "\"seed\": 43, this loader's seed is 42", "bad position: other seed"},
        {"\"B\":3", "\"B\":4", "\"B\": 4, this loader has 3", "bad position: other batch size"},
        {"\"windows\":409", "\"windows\":410", "\"windows\": 410, this loader has 409", "bad position: other data"},
        {"\"batch\":7", "\"batch\":500", "\"batch\": 500, an epoch has 136 batches", "bad position: batch past the epoch"},
        {"\"sample\":21", "\"sample\":22", "disagree with epoch 0 batch 7, which start at sample 21", "bad position: inconsistent sample"},
    };
    for (size_t i = 0; i < sizeof(edits) / sizeof(edits[0]); i++) {
        char p[512];
        const char *at = strstr(good, edits[i].from);
        if (!at) { check(0, edits[i].name, "%s not in %s", edits[i].from, good); continue; }
        snprintf(p, sizeof(p), "%.*s%s%s", (int)(at - good), good, edits[i].to, at + strlen(edits[i].from));
        int rc = dataloader_seek(&dl, p, err, sizeof(err));
        check(rc != 0 && strstr(err, edits[i].needle), edits[i].name, "rc %d: %s", rc, err);
    }
    // a refused seek leaves the loader where it was
    char after[512];
    dataloader_position(&dl, after, sizeof(after));
    check(strcmp(after, good) == 0, "refused seeks do not move the loader", "%s vs %s", after, good);
    dataloader_free(&dl);
}

// ranks r of R take epoch samples (b*B+i)*R + r of the world=1 sequence: disjoint, and together the
// epoch's first batches*B*R samples
static void test_ranks(void) {
    DataLoader one;
    dataloader_init(&one, DIR "/good_*.bin", "llmc", 1, 8, VOCAB, 9, 1, 0, 1, err, sizeof(err));
    int seq[409];
    collect(&one, 409, seq);
    dataloader_free(&one);
    const int B = 4;
    for (int R = 1; R <= 3; R++) {
        size_t nb = 409 / (size_t)(B * R);
        int *seen = calloc(409, sizeof(int));  // how many ranks took epoch sample g
        int placed = 1, ok = 1;
        for (int r = 0; r < R; r++) {
            DataLoader dl;
            if (dataloader_init(&dl, DIR "/good_*.bin", "llmc", B, 8, VOCAB, 9, 1, r, R, err, sizeof(err))) { ok = 0; break; }
            ok &= dataloader_num_batches(&dl) == nb;
            int *firsts = malloc(sizeof(int) * nb * B);
            ok &= collect(&dl, nb, firsts);
            for (size_t b = 0; b < nb; b++)
                for (int i = 0; i < B; i++) {
                    size_t g = (b * B + (size_t)i) * (size_t)R + (size_t)r;
                    placed &= firsts[b * B + (size_t)i] == seq[g];
                    seen[g]++;
                }
            free(firsts);
            dataloader_free(&dl);
        }
        int dup = 0, covered = 0;
        for (int g = 0; g < 409; g++) { dup += seen[g] > 1; covered += seen[g] == 1; }
        char name[96];
        snprintf(name, sizeof(name), "world %d: each rank takes samples r, r+R, ... of the epoch", R);
        check(ok && placed, name, "ok %d placed %d: %s", ok, placed, err);
        snprintf(name, sizeof(name), "world %d: ranks disjoint and covering the epoch but < B*R", R);
        check(dup == 0 && covered == (int)(nb * B * R) && 409 - covered < B * R, name,
              "%d duplicates, %d covered", dup, covered);
        free(seen);
    }
}

int main(void) {
    if (system("rm -rf " DIR " && mkdir -p " DIR) != 0) return 1;
    make_shards();
    test_round_trip();
    test_bad_shards();
    test_shuffle();
    test_position();
    test_ranks();
    return test_exit();
}
