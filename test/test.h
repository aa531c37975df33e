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

// Exit code for main: non-zero when any check failed.
static int test_exit(void) { return test_failures ? 1 : 0; }

#endif
