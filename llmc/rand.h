// Deterministic random numbers for weight init and sampling: splitmix64 state, Box-Muller normals.
// Everything random in the trainer flows from one 64-bit state, so a checkpoint stores it as one number.
#ifndef LLMC_RAND_H
#define LLMC_RAND_H
#include <math.h>
#include <stdint.h>

typedef struct { uint64_t state; } Rng;

static void rng_seed(Rng *r, uint64_t seed) { r->state = seed; }

// splitmix64: full-period, passes BigCrush, and cheap to seek by reseeding.
static uint64_t rng_u64(Rng *r) {
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// uniform in [0, 1) with 24 bits, exactly representable in float
static float rng_float(Rng *r) { return (float)(rng_u64(r) >> 40) / 16777216.0f; }

// n standard normals times std, Box-Muller in double (pairs; an odd tail draws one more pair)
static void rng_normal_fill(Rng *r, float *out, size_t n, float std) {
    for (size_t i = 0; i < n; i += 2) {
        double u1 = ((rng_u64(r) >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]: log never sees 0
        double u2 = (rng_u64(r) >> 11) / 9007199254740992.0;
        double rad = sqrt(-2.0 * log(u1));
        out[i] = (float)(rad * cos(2.0 * M_PI * u2)) * std;
        if (i + 1 < n) out[i + 1] = (float)(rad * sin(2.0 * M_PI * u2)) * std;
    }
}

// sample an index from probabilities probs[0..n) (summing to ~1) with a uniform coin in [0,1)
static int sample_from_probs(const float *probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) return i;
    }
    return n - 1;  // rounding left the cdf just below the coin
}
#endif
