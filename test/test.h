// Minimal test harness shared by every C test in test/.
// Each check prints one line, "ok - name" or "FAIL - name: detail"; test/run counts them and
// prints the closing "N passed, N failed" line. A test binary that crashes or exits non-zero
// is counted as one more failure by the runner, so a check can never be skipped silently.
#ifndef TEST_H
#define TEST_H
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <dirent.h>

static int test_failures = 0;

// check(cond, name, fmt, ...): report one named check; fmt describes the failure.
static void check(int cond, const char *name, const char *fmt, ...) {
    if (cond) {
        printf("ok - %s\n", name);
    } else {
        test_failures++;
        printf("FAIL - %s: ", name);
        va_list ap;
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        printf("\n");
    }
    fflush(stdout);
}

// max |a-b| / max(|b|, floor) over n values, the tolerance measure used by every numeric test.
static double max_rel_err(const float *a, const float *b, size_t n, double floor_) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        double s = fabs((double)b[i]);
        double r = d / (s > floor_ ? s : floor_);
        if (!(r <= worst)) worst = r;  // also propagates NaN as "worst"
    }
    return worst;
}

// max |x| over n values: used as the floor above, it turns max_rel_err into
// max|a-b| / max|b|, the error relative to the tensor's scale (entries near zero do not dominate).
static double max_abs(const float *x, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) if (fabs((double)x[i]) > m) m = fabs((double)x[i]);
    return m;
}

// Random test data: uniform in [-1, 1) from splitmix64 (its state set directly to reseed).
static uint64_t test_rng_state = 0x9E3779B97F4A7C15ull;
static float urand(void) {
    uint64_t z = (test_rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((double)(z >> 40) / 8388608.0 - 1.0);
}
static float *rand_buf(size_t n, float scale) {   // malloc'd, n values scale * urand()
    float *b = (float *)malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) b[i] = scale * urand();
    return b;
}
static double *to_double(const float *a, size_t n) {   // malloc'd copy in double
    double *d = (double *)malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) d[i] = a[i];
    return d;
}
// Relative error of a fp32 tensor vs a double reference, relative to the reference's scale (max |ref|).
static double rel_err_d(const float *a, const double *ref, size_t n) {
    double scale = 0, worst = 0;
    for (size_t i = 0; i < n; i++) if (fabs(ref[i]) > scale) scale = fabs(ref[i]);
    if (scale == 0) scale = 1;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - ref[i]) / scale;
        if (!(e <= worst)) worst = e;  // NaN counts as worst
    }
    return worst;
}

// Runs fn on every test/fixtures/PREFIX*.safetensors (directory order); returns the sum of fn's results
// (fn returns 1 for a fixture it compared).
static int each_fixture(const char *prefix, int (*fn)(const char *path)) {
    DIR *dir = opendir("test/fixtures");
    int found = 0;
    size_t np = strlen(prefix);
    struct dirent *e;
    while (dir && (e = readdir(dir))) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, prefix, np) || len < np + 12 || strcmp(e->d_name + len - 12, ".safetensors")) continue;
        char path[512];
        snprintf(path, sizeof path, "test/fixtures/%s", e->d_name);
        found += fn(path);
    }
    if (dir) closedir(dir);
    return found;
}

// Exit code for main: non-zero when any check failed.
static int test_exit(void) { return test_failures ? 1 : 0; }

#endif
