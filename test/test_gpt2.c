// The CPU trainer against the PyTorch reference (test/fixtures/gpt2_<tag>.safetensors, written by
// dev/reference/make_fixtures.py from DESIGN's formulas, not from this code) and against finite
// differences: the dense model, then every structure in every projection (blockdiag, lowrank,
// monarch, btt of rank 2, and a mixed model under mup with qk_norm, attn_scale mup and rms_cap).
// Also writes build/test/gpt2_c/ (our checkpoint and logits) for test_gpt2_torch.py.
//
// Tolerances, all measured as max|ours - ref| / max|ref| over a tensor (error relative to the
// tensor's scale, so entries that are near zero by chance do not dominate):
//   forward logits and loss: 1e-5. Both sides are fp32 and differ only in summation order; a dot
//     product of length K <= 256 accumulates ~sqrt(K) * 6e-8 ~ 1e-6 relative error per layer.
//   gradients: 1e-4. Backward chains about twice as many fp32 reductions, through the softmax
//     (whose outputs are differences of nearly equal numbers) and over all B*T tokens.
//   10 AdamW steps: losses 1e-4, parameters 1e-4 of the tensor's scale. Adam divides by sqrt(v), so a
//     gradient entry near zero turns rounding noise into an update of up to lr = 1e-3 on one entry;
//     the key slice of attn_qkv.b, whose true gradient is zero, gets that bound (see below); every
//     other entry must be within 1e-4 of its tensor's scale.
#include "train_gpt2.c"
#include "test/test.h"

#define FIXTURE "test/fixtures/gpt2_dense.safetensors"
static const char *fixture_path = FIXTURE;   // the fixture being checked, for messages

static const float *fixture_f32(const SafeTensors *st, const char *name, size_t want) {
    const char *dtype;
    int ndim;
    long long shape[4];
    const float *p = safetensors_find(st, name, &dtype, &ndim, shape);
    size_t n = 1;
    for (int d = 0; p && d < ndim; d++) n *= (size_t)shape[d];
    if (!p || strcmp(dtype, "F32") || (want && n != want)) {
        fprintf(stderr, "fixture %s: tensor %s missing or of the wrong size\n", fixture_path, name);
        exit(1);
    }
    return p;
}

static const int *fixture_i32(const SafeTensors *st, const char *name) {
    const char *dtype;
    int ndim;
    long long shape[4];
    const int *p = safetensors_find(st, name, &dtype, &ndim, shape);
    if (!p || strcmp(dtype, "I32")) { fprintf(stderr, "fixture: %s missing\n", name); exit(1); }
    return p;
}

// logits (B*T, Vp) of the model's last forward, compared on the first V columns with ref (B*T, V)
static double logits_err(GPT2 *m, const float *ref, int N) {
    double worst = 0.0, scale = max_abs(ref, (size_t)N * m->V);
    for (int n = 0; n < N; n++) {
        double e = max_rel_err(m->acts.logits + (size_t)n * m->Vp, ref + (size_t)n * m->V, m->V, scale);
        if (e > worst) worst = e;
    }
    return worst;
}

// The experts every btt_moe layer selected in the last forward (N*k ints per layer, layers in order),
// into sel (store) or compared with it (returns 1 when the routing is the same).
static int routing(GPT2 *m, int *sel, size_t cap, int store) {
    size_t n = 0;
    int N = m->B * m->T;
    for (int l = 0; l < m->L; l++) {
        for (int k = 0; k < NUM_LINEAR; k++) {
            const Linear *lin = &m->layers[l].lin[k];
            if (lin->G < 0) continue;
            size_t Nk = (size_t)N * lin->s.top_k;
            MoeSaved sv = moe_saved_view(&lin->s, m->acts.lin_saved + lin->saved, Nk * moe_mid(&lin->s), N);
            if (n + Nk > cap) { fprintf(stderr, "routing: buffer too small\n"); exit(1); }
            if (store) memcpy(sel + n, sv.sel, Nk * sizeof(int));
            else if (memcmp(sel + n, sv.sel, Nk * sizeof(int))) return 0;
            n += Nk;
        }
    }
    return 1;
}

// The objective the gradients are of: cross-entropy plus aux_weight times the btt_moe layers' mean aux loss.
static double loss_at(GPT2 *m, const int *in, const int *tg, int B, int T) {
    gpt2_forward(m, in, tg, B, T);
    return (double)m->mean_loss + (double)m->cfg.model.moe_aux_weight * m->aux_loss;
}

// Entries whose true gradient is exactly zero: a bias added to every key shifts all of a query's
// scores by the same amount, which the softmax ignores. Without qk_norm that is the key slice of
// attn_qkv.b; with qk_norm, the key LayerNorm's bias qk_norm.k.b (the attn_qkv.b slice then
// passes through the LayerNorm and does matter).
static int true_grad_zero(const GPT2 *m, const ParamTensor *t, size_t j) {
    if (m->cfg.model.qk_norm) return strstr(t->name, ".qk_norm.k.b") != NULL;
    return strstr(t->name, "attn_qkv.b") && j >= (size_t)m->C && j < 2 * (size_t)m->C;
}

// One model fixture: the model built from the fixture's config with its weights; forward, every
// gradient, finite differences, 10 AdamW steps, all against the fixture (the reference). Leaves
// the model loaded with the fixture's initial weights in *m (built) and the config in *cfg.
static void check_model_fixture(const char *path, const char *tag, SafeTensors *fx, Config *cfg, GPT2 *mp) {
    char err[ERRLEN], name[128], label[200];
    fixture_path = path;
    if (safetensors_read(fx, path, err, sizeof err)) { printf("FAIL - fixture: %s\n", err); exit(1); }
    if (config_from_json_string(cfg, safetensors_meta(fx, "config"), path, NULL, 0, err, sizeof err)) {
        printf("FAIL - fixture config: %s\n", err);
        exit(1);
    }
    int B = cfg->train.micro_batch, T = cfg->train.seq_len, N = B * T;
    const int *inputs = fixture_i32(fx, "inputs"), *targets = fixture_i32(fx, "targets");
    GPT2 m;
    gpt2_build(&m, cfg, B, T);
    snprintf(label, sizeof label, "%s: load fixture weights", tag);
    check(param_load(&m.pt, fx, path, "", m.params, err, ERRLEN) == 0, label, "%s", err);
    float *initial = xmalloc(m.num_params * sizeof(float));
    memcpy(initial, m.params, m.num_params * sizeof(float));

    // forward: logits and loss
    gpt2_forward(&m, inputs, NULL, B, T);
    const float *ref_logits = fixture_f32(fx, "logits", (size_t)N * m.V);
    double e = logits_err(&m, ref_logits, N);
    snprintf(label, sizeof label, "%s: forward logits vs PyTorch", tag);
    check(e < 1e-5, label, "rel err %.3g >= 1e-5", e);
    gpt2_forward(&m, inputs, targets, B, T);
    double ref_loss = fixture_f32(fx, "loss", 1)[0];
    snprintf(label, sizeof label, "%s: loss vs PyTorch", tag);
    check(fabs(m.mean_loss - ref_loss) < 1e-5 * fabs(ref_loss), label, "ours %.8f ref %.8f", m.mean_loss, ref_loss);
    if (m.n_moe) {   // btt_moe: every layer's aux loss, and the total the gradients are of
        int bad = 0;
        char worst[160] = "";
        for (int l = 0; l < m.L; l++) {
            for (int k = 0; k < NUM_LINEAR; k++) {
                const Linear *lin = &m.layers[l].lin[k];
                if (lin->G < 0) continue;
                snprintf(name, sizeof name, "aux.%d.%s", l, linear_names[k]);
                double ref = fixture_f32(fx, name, 1)[0];
                if (fabs(lin->aux - ref) > 1e-5 * fabs(ref)) { bad++; snprintf(worst, sizeof worst, "%s: %.8f vs %.8f", name, lin->aux, ref); }
            }
        }
        snprintf(label, sizeof label, "%s: every layer's aux loss vs PyTorch (1e-5 relative)", tag);
        check(bad == 0, label, "%d off; last %s", bad, worst);
        double total = fixture_f32(fx, "loss_total", 1)[0], ours = m.mean_loss + (double)cfg->model.moe_aux_weight * m.aux_loss;
        snprintf(label, sizeof label, "%s: total loss (cross-entropy + aux_weight * mean aux) vs PyTorch", tag);
        check(fabs(ours - total) < 1e-5 * fabs(total), label, "ours %.8f ref %.8f", ours, total);
    }

    // backward: every gradient
    gpt2_zero_grad(&m);
    gpt2_backward(&m, 1.0f);
    for (int i = 0; i < m.pt.n; i++) {
        ParamTensor *t = &m.pt.t[i];
        snprintf(name, sizeof name, "grad.%s", t->name);
        const float *ref = fixture_f32(fx, name, t->size);
        double scale = max_abs(ref, t->size);
        snprintf(label, sizeof label, "%s: gradient %s vs PyTorch", tag, t->name);
        if (scale == 0.0) {  // the padded rows of wte and nothing else may have an all-zero gradient
            check(max_abs(m.grads + t->offset, t->size) == 0.0, label, "reference is zero, ours is not");
            continue;
        }
        if (true_grad_zero(&m, t, 0)) {   // rounding noise on both sides (~1e-9): ours must be noise too
            double a = max_abs(m.grads + t->offset, t->size);
            check(a < 1e-6 && scale < 1e-6, label, "true gradient is 0; ours max %.3g, reference max %.3g", a, scale);
            continue;
        }
        e = max_rel_err(m.grads + t->offset, ref, t->size, scale);
        check(e < 1e-4, label, "rel err %.3g >= 1e-4", e);
    }

    // btt_moe's top-k is piecewise: an entry whose perturbation changes any token's experts is skipped
    // (the routing of the unperturbed forward is the reference). At h = 1e-2 about 3 in 4 of the
    // tiny fixture's entries reroute some token, so at least 16 entries must be checked there;
    // layer-level finite differences in double precision away from ties are in test_moe.c.
    // finite differences on the C forward itself: a 5-point stencil at h = 1e-2 and 5e-3, combined by
    // Richardson extrapolation (truncation O(h^6): mup's 8/hs attention scale and qk_norm make the
    // loss curved enough that O(h^4) alone was 2% off), on the 2 largest-gradient entries of every
    // tensor. The loss is fp32 (rounding ~6e-8 * 6 per evaluation, ~1e-4 in the estimate at
    // h = 5e-3), so entries are chosen where the gradient is large and the tolerance is 2% of the
    // gradient plus 1e-4 absolute.
    {
        float *grads = xmalloc(m.num_params * sizeof(float));
        memcpy(grads, m.grads, m.num_params * sizeof(float));
        int bad = 0, checked = 0, rerouted = 0;
        char worst[256] = "";
        size_t cap = (size_t)N * 64 * NUM_LINEAR * m.L;
        int *sel = xmalloc(cap * sizeof(int));
        loss_at(&m, inputs, targets, B, T);
        routing(&m, sel, cap, 1);
        for (int i = 0; i < m.pt.n; i++) {
            ParamTensor *t = &m.pt.t[i];
            size_t best[2] = {0, 0};
            for (size_t j = 0; j < t->size; j++) {
                float g = fabsf(grads[t->offset + j]);
                if (g > fabsf(grads[t->offset + best[0]])) { best[1] = best[0]; best[0] = j; }
                else if (j != best[0] && g > fabsf(grads[t->offset + best[1]])) best[1] = j;
            }
            for (int k = 0; k < 2; k++) {
                size_t idx = t->offset + best[k];
                if (grads[idx] == 0.0f) continue;
                float p0 = m.params[idx];
                double fdh[2];
                int same = 1;
                for (int r = 0; r < 2; r++) {
                    float h = r ? 5e-3f : 1e-2f;
                    double f[4];
                    const float steps[4] = {-2, -1, 1, 2};
                    for (int s = 0; s < 4; s++) {
                        m.params[idx] = p0 + steps[s] * h;
                        f[s] = loss_at(&m, inputs, targets, B, T);
                        same = same && routing(&m, sel, cap, 0);
                    }
                    fdh[r] = (f[0] - 8 * f[1] + 8 * f[2] - f[3]) / (12.0 * h);
                }
                m.params[idx] = p0;
                if (!same) { rerouted++; continue; }
                double fd = (16.0 * fdh[1] - fdh[0]) / 15.0;   // Richardson: the h^4 terms cancel
                double diff = fabs(fd - grads[idx]);
                checked++;
                if (diff > 0.02 * fabs(grads[idx]) + 1e-4) {
                    bad++;
                    snprintf(worst, sizeof worst, "%s[%zu]: analytic %.6g fd %.6g", t->name, best[k], grads[idx], fd);
                }
            }
        }
        snprintf(label, sizeof label, "%s: finite differences (5-point, fp32 forward) on %d entries%s", tag, checked,
                 m.n_moe ? " whose perturbation keeps the routing" : "");
        check(bad == 0 && checked + rerouted > 2 * m.pt.n - 4 && checked >= (m.n_moe ? 16 : m.pt.n), label,
              "%d of %d entries off (%d skipped: rerouted); last: %s", bad, checked, rerouted, worst);
        free(sel);
        free(grads);
    }

    // 10 AdamW steps on the same batch: loss trajectory and final parameters
    memcpy(m.params, initial, m.num_params * sizeof(float));
    memset(m.m, 0, m.num_params * sizeof(float));
    memset(m.v, 0, m.num_params * sizeof(float));
    const float *ref_losses = fixture_f32(fx, "steps.loss", 10);
    float losses[10];
    double lr_sum = 0.0;
    for (int step = 0; step < 10; step++) {
        gpt2_zero_grad(&m);
        gpt2_forward(&m, inputs, targets, B, T);
        losses[step] = m.mean_loss;
        gpt2_backward(&m, 1.0f);
        float lr;
        gpt2_optimizer_step(&m, step, &lr);
        lr_sum += lr;
    }
    e = max_rel_err(losses, ref_losses, 10, 0.0);
    snprintf(label, sizeof label, "%s: 10-step loss trajectory vs PyTorch", tag);
    check(e < 1e-4, label, "rel err %.3g (first %.6f vs %.6f, last %.6f vs %.6f)",
          e, losses[0], ref_losses[0], losses[9], ref_losses[9]);
    snprintf(label, sizeof label, "%s: 10 steps reduce the loss", tag);
    check(losses[9] < losses[0] - 0.1, label, "%.4f -> %.4f", losses[0], losses[9]);
    int bad = 0;
    char worst[256] = "";
    for (int i = 0; i < m.pt.n; i++) {
        ParamTensor *t = &m.pt.t[i];
        snprintf(name, sizeof name, "final.%s", t->name);
        const float *ref = fixture_f32(fx, name, t->size);
        double scale = max_abs(ref, t->size);
        for (size_t j = 0; j < t->size; j++) {
            double d = fabs((double)m.params[t->offset + j] - ref[j]);
            // Where the true gradient is exactly zero both sides hold pure rounding noise that Adam
            // normalizes into steps of up to lr: there the bound is the sum of the 10 learning rates.
            // Elsewhere 1e-4 of the tensor's scale, plus 1e-3 of the most Adam can move an entry
            // (lr_sum * lr_mult): an entry whose gradient is ~1e-3 of its tensor's scale carries a
            // relative fp32 error ~1e-3 into its normalized step (this matters under mup, where a
            // core's lr multiplier reaches 8 in the mixed_mup fixture).
            double tol = true_grad_zero(&m, t, j) ? lr_sum * t->lr_mult : 1e-4 * scale + 1e-3 * lr_sum * t->lr_mult;
            if (d > tol) { bad++; snprintf(worst, sizeof worst, "%s[%zu] off by %.3g > %.3g", t->name, j, d, tol); }
        }
    }
    snprintf(label, sizeof label, "%s: parameters after 10 AdamW steps vs PyTorch", tag);
    check(bad == 0, label, "%d entries off; last %s", bad, worst);
    *mp = m;
    free(initial);
}

int main(void) {
    char err[ERRLEN];
    SafeTensors fx;
    Config cfg;
    GPT2 m;
    // every structure in every projection; then the dense model, kept for the checks below
    const char *tags[] = {"blockdiag", "lowrank", "monarch", "btt", "mixed_mup", "btt_moe"};
    for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
        char path[256];
        snprintf(path, sizeof path, "test/fixtures/gpt2_%s.safetensors", tags[i]);
        check_model_fixture(path, tags[i], &fx, &cfg, &m);
        gpt2_free(&m);
        safetensors_free(&fx);
    }
    check_model_fixture(FIXTURE, "dense", &fx, &cfg, &m);
    int B = cfg.train.micro_batch, T = cfg.train.seq_len, N = B * T;
    const int *inputs = fixture_i32(&fx, "inputs");
    const float *ref_logits = fixture_f32(&fx, "logits", (size_t)N * m.V);
    float *initial = xmalloc(m.num_params * sizeof(float));
    param_load(&m.pt, &fx, FIXTURE, "", initial, err, ERRLEN);
    double e;

    // our checkpoint of the trained model, and its logits, for test_gpt2_torch.py (PyTorch must reproduce them)
    {
        TrainState st = {.step = 10, .tokens = 10LL * N};
        snprintf(st.dataloader, sizeof st.dataloader, "{}");
        system("rm -rf build/test/gpt2_c");
        int rc = gpt2_save_checkpoint(&m, "build/test/gpt2_c", &st, err);
        check(rc == 0, "save checkpoint of the trained model", "%s", err);
        gpt2_forward(&m, inputs, NULL, B, T);
        float *lg = xmalloc((size_t)N * m.V * sizeof(float));
        for (int n = 0; n < N; n++) memcpy(lg + (size_t)n * m.V, m.acts.logits + (size_t)n * m.Vp, m.V * sizeof(float));
        StTensor out[2] = {{"inputs", "I32", inputs, 2, {B, T}}, {"logits", "F32", lg, 3, {B, T, m.V}}};
        rc = safetensors_write("build/test/gpt2_c/logits.safetensors", out, 2, NULL, NULL, 0, err, sizeof err);
        check(rc == 0, "write C logits for the PyTorch check", "%s", err);
        free(lg);
        // the checkpoint loads back bit-exactly
        GPT2 m2;
        gpt2_build(&m2, &cfg, B, T);
        rc = gpt2_init_from(&m2, "build/test/gpt2_c/ckpt_00000010", err);
        check(rc == 0 && memcmp(m2.params, m.params, m.num_params * sizeof(float)) == 0,
              "checkpoint round trip is bit-exact", "%s", rc ? err : "parameters differ");
        gpt2_free(&m2);
    }

    // llm.c model files of the initial weights (written by the reference) give the reference logits
    {
        GPT2 m2;
        gpt2_build(&m2, &cfg, B, T);
        int rc = gpt2_init_from(&m2, "test/fixtures/gpt2_dense_llmc_fp32.bin", err);
        check(rc == 0, "load llm.c fp32 model file", "%s", err);
        check(rc == 0 && memcmp(m2.params, initial, m.num_params * sizeof(float)) == 0,
              "llm.c fp32 file holds exactly the fixture weights", "parameters differ");
        gpt2_forward(&m2, inputs, NULL, B, T);
        e = logits_err(&m2, ref_logits, N);
        check(e < 1e-5, "llm.c fp32 file: logits vs PyTorch", "rel err %.3g", e);
        float *llmc_logits = xmalloc((size_t)N * m.Vp * sizeof(float));
        memcpy(llmc_logits, m2.acts.logits, (size_t)N * m.Vp * sizeof(float));
        memcpy(m2.params, initial, m.num_params * sizeof(float));
        gpt2_forward(&m2, inputs, NULL, B, T);
        check(memcmp(m2.acts.logits, llmc_logits, (size_t)N * m.Vp * sizeof(float)) == 0,
              "llm.c fp32 file: logits bit-equal to the safetensors weights'", "differ");
        free(llmc_logits);

        rc = gpt2_init_from(&m2, "test/fixtures/gpt2_dense_llmc_bf16.bin", err);
        check(rc == 0, "load llm.c bf16 model file", "%s", err);
        SafeTensors bf;
        if (safetensors_read(&bf, "test/fixtures/gpt2_dense_bf16_logits.safetensors", err, sizeof err) == 0) {
            gpt2_forward(&m2, inputs, NULL, B, T);
            e = logits_err(&m2, fixture_f32(&bf, "logits", (size_t)N * m.V), N);
            check(e < 1e-5, "llm.c bf16 file: logits vs PyTorch on the bf16-rounded weights", "rel err %.3g", e);
            safetensors_free(&bf);
        } else {
            check(0, "bf16 logits fixture", "%s", err);
        }
        // a model file whose dimensions disagree with the config is refused, naming both
        Config small = cfg;
        small.model.n_layer = 1;
        GPT2 m3;
        gpt2_build(&m3, &small, B, T);
        rc = gpt2_init_from(&m3, "test/fixtures/gpt2_dense_llmc_fp32.bin", err);
        check(rc != 0 && strstr(err, "n_layer is 2") && strstr(err, "model.n_layer is 1"),
              "llm.c file with other dimensions refused", "rc %d: %s", rc, err);
        gpt2_free(&m3);
        gpt2_free(&m2);
    }

    free(initial);
    gpt2_free(&m);
    safetensors_free(&fx);
    return test_exit();
}
