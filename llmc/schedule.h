// Learning-rate schedule: linear warmup, then cosine, linear or constant decay to lr * final_lr_frac
// at max_steps (the formula of the contracts; steps past max_steps stay at the floor).
// Evaluated in double and rounded once, so every trainer gets the same float for the same step.
#ifndef LLMC_SCHEDULE_H
#define LLMC_SCHEDULE_H

#include <math.h>
#include <string.h>
#include "llmc/config.h"

// step is 0-based: step 0 of a warmup of W already trains at lr/W, never at 0.
static float lr_at_step(const Config *c, int step) {
    double L = c->optim.lr, Lmin = L * c->schedule.final_lr_frac;
    int W = c->schedule.warmup_steps, S = c->train.max_steps;
    if (step < W) return (float)(L * (step + 1) / W);
    double r = (double)(step - W) / (S - W > 1 ? S - W : 1);
    if (r < 0.0) r = 0.0;
    if (r > 1.0) r = 1.0;
    if (!strcmp(c->schedule.type, "cosine")) return (float)(Lmin + 0.5 * (1.0 + cos(M_PI * r)) * (L - Lmin));
    if (!strcmp(c->schedule.type, "linear")) return (float)(L - (L - Lmin) * r);
    return (float)L;
}

#endif
