// The CPU side of the GPU parity test (test/test_gpt2_cuda.cu): runs the CPU trainer on a model
// fixture's config, weights and batch (test/fixtures/gpt2_<structure>.safetensors) and writes what it
// computes, in the fixture's own layout, so the CUDA test compares against the CPU trainer itself:
//   every parameter by name (the starting weights), inputs, targets (B,T) I32, logits (B,T,V),
//   loss (1,), grad.<name> (one backward with loss scale 1), steps.loss (10,) and final.<name>
//   (10 AdamW steps on that batch), accum.grad.<name> (the gradient accumulated over two
//   micro-batches, the batch and the batch with inputs and targets rotated by one row, each with
//   loss scale 1/2), moe.sel.<layer> I32 (B*T, k) the experts each btt_moe layer selected in the
//   first forward; metadata "config" = the fixture's config, "zero_true_grad" = the fixture's list of
//   tensors whose true gradient is exactly 0 ("[]" if it has none).
// Not a test itself (not named test_*): dev/cuda/run_tests builds and runs it for every fixture
// before the CUDA test. Usage: gpt2_cuda_ref [FIXTURE [OUT]]
#include "train_gpt2.c"

static const void *need(const SafeTensors *st, const char *name, const char *dtype) {
    const char *dt;
    const void *p = safetensors_find(st, name, &dt, NULL, NULL);
    if (!p || strcmp(dt, dtype)) { fprintf(stderr, "error: fixture tensor %s (%s) missing\n", name, dtype); exit(1); }
    return p;
}

int main(int argc, char **argv) {
    const char *fixture = argc > 1 ? argv[1] : "test/fixtures/gpt2_dense.safetensors";
    const char *out = argc > 2 ? argv[2] : "build/test/gpt2_cuda_ref.safetensors";
    char err[ERRLEN];
    SafeTensors fx;
    if (safetensors_read(&fx, fixture, err, sizeof err)) fail(err);
    const char *config = safetensors_meta(&fx, "config");
    Config cfg;
    if (!config || config_from_json_string(&cfg, config, fixture, NULL, 0, err, sizeof err)) fail(config ? err : "no config");
    int B = cfg.train.micro_batch, T = cfg.train.seq_len, N = B * T;
    const int *inputs = need(&fx, "inputs", "I32"), *targets = need(&fx, "targets", "I32");
    GPT2 m;
    gpt2_build(&m, &cfg, B, T);
    if (param_load(&m.pt, &fx, fixture, "", m.params, err, ERRLEN)) fail(err);
    size_t P = m.num_params;
    float *initial = xmalloc(P * sizeof(float)), *grads = xmalloc(P * sizeof(float));
    float *accum = xmalloc(P * sizeof(float)), *logits = xmalloc((size_t)N * m.V * sizeof(float));
    memcpy(initial, m.params, P * sizeof(float));

    gpt2_forward(&m, inputs, NULL, B, T);
    for (int n = 0; n < N; n++) memcpy(logits + (size_t)n * m.V, m.acts.logits + (size_t)n * m.Vp, m.V * sizeof(float));
    gpt2_forward(&m, inputs, targets, B, T);
    float loss = m.mean_loss;
    // the routing of every btt_moe layer in this forward (moe.h keeps it in the layer's saved state)
    int nmoe = 0;
    int **sel = xmalloc((size_t)NUM_LINEAR * m.L * sizeof(int *));
    char (*sel_names)[96] = xmalloc((size_t)NUM_LINEAR * m.L * sizeof *sel_names);
    int *sel_k = xmalloc((size_t)NUM_LINEAR * m.L * sizeof(int));
    for (int l = 0; l < m.L; l++)
        for (int k = 0; k < NUM_LINEAR; k++) {
            const Linear *lin = &m.layers[l].lin[k];
            if (lin->G < 0) continue;
            MoeSaved sv = moe_saved_view(&lin->s, m.acts.lin_saved + lin->saved, (size_t)N * lin->s.top_k * moe_mid(&lin->s), N);
            sel[nmoe] = xmalloc((size_t)N * lin->s.top_k * sizeof(int));
            memcpy(sel[nmoe], sv.sel, (size_t)N * lin->s.top_k * sizeof(int));
            sel_k[nmoe] = lin->s.top_k;
            snprintf(sel_names[nmoe], sizeof sel_names[0], "moe.sel.h.%d.%s", l, linear_names[k]);
            nmoe++;
        }
    gpt2_zero_grad(&m);
    gpt2_backward(&m, 1.0f);
    memcpy(grads, m.grads, P * sizeof(float));

    // two micro-batches: the batch, then its rows rotated by one
    int *in2 = xmalloc((size_t)N * sizeof(int)), *tg2 = xmalloc((size_t)N * sizeof(int));
    for (int b = 0; b < B; b++) {
        memcpy(in2 + (size_t)b * T, inputs + (size_t)((b + 1) % B) * T, T * sizeof(int));
        memcpy(tg2 + (size_t)b * T, targets + (size_t)((b + 1) % B) * T, T * sizeof(int));
    }
    gpt2_zero_grad(&m);
    gpt2_forward(&m, inputs, targets, B, T);
    gpt2_backward(&m, 0.5f);
    gpt2_forward(&m, in2, tg2, B, T);
    gpt2_backward(&m, 0.5f);
    memcpy(accum, m.grads, P * sizeof(float));

    float losses[10];
    for (int step = 0; step < 10; step++) {
        gpt2_zero_grad(&m);
        gpt2_forward(&m, inputs, targets, B, T);
        losses[step] = m.mean_loss;
        gpt2_backward(&m, 1.0f);
        float lr;
        gpt2_optimizer_step(&m, step, &lr);
    }

    int nt = m.pt.n, n = 0;
    StTensor *ts = xmalloc((size_t)(4 * nt + 5 + nmoe) * sizeof(StTensor));
    char (*names)[96] = xmalloc((size_t)(4 * nt) * sizeof *names);
    const char *prefix[4] = {"", "grad.", "final.", "accum.grad."};
    float *base[4] = {initial, grads, m.params, accum};
    for (int k = 0; k < 4; k++) {
        for (int i = 0; i < nt; i++) {
            ParamTensor *t = &m.pt.t[i];
            snprintf(names[k * nt + i], sizeof names[0], "%s%s", prefix[k], t->name);
            StTensor s = {names[k * nt + i], "F32", base[k] + t->offset, t->ndim,
                          {t->shape[0], t->shape[1], t->shape[2], t->shape[3]}};
            ts[n++] = s;
        }
    }
    StTensor extra[5] = {{"inputs", "I32", inputs, 2, {B, T}}, {"targets", "I32", targets, 2, {B, T}},
                         {"logits", "F32", logits, 3, {B, T, m.V}}, {"loss", "F32", &loss, 1, {1}},
                         {"steps.loss", "F32", losses, 1, {10}}};
    for (int i = 0; i < 5; i++) ts[n++] = extra[i];
    for (int j = 0; j < nmoe; j++) {
        StTensor s = {sel_names[j], "I32", sel[j], 2, {N, sel_k[j]}};
        ts[n++] = s;
    }
    const char *zero = safetensors_meta(&fx, "zero_true_grad");
    const char *keys[] = {"config", "zero_true_grad"}, *vals[] = {config, zero ? zero : "[]"};
    ckpt_mkdirs("build/test");
    if (safetensors_write(out, ts, n, keys, vals, 2, err, sizeof err)) fail(err);
    printf("wrote %s: CPU loss %.6f, 10-step loss %.6f -> %.6f\n", out, loss, losses[0], losses[9]);
    for (int j = 0; j < nmoe; j++) free(sel[j]);
    free(sel);
    free(sel_k);
    free(sel_names);
    gpt2_free(&m);
    safetensors_free(&fx);
    return 0;
}
