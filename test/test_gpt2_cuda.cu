// The CUDA trainer against the CPU trainer (needs a GPU; run by `make test-cuda`). The CPU side is
// build/test/gpt2_cuda_ref.safetensors, written by test/gpt2_cuda_ref.c from the dense fixture:
// the same config, starting weights and batch. Checked: logits, loss, every gradient, gradient
// accumulation over two micro-batches, 10 AdamW steps (losses and parameters), determinism and a
// bit-exact resume from a checkpoint, and the checkpoint's format.
//
// Tolerances. Errors are max|gpu - cpu| / max|cpu| over a tensor (relative to its scale). bf16 keeps
// 8 significant bits: each rounding of a parameter, an activation or a gradient is off by at most
// u = 2^-9 ~ 2e-3 of its value. The fixture's model (2 layers) rounds each value along a path about
// 20 times in forward (weights, LayerNorm, qkv, attention scores and probabilities, projections,
// residuals, GELU, logits), and the errors add up like a random walk: ~sqrt(20) u ~ 1e-2.
//   logits 2e-2: that estimate with a factor 2 of margin.
//   loss 5e-3 relative: the mean over 128 tokens of log-sum-exp errors, which average out.
//   gradients 5e-2: backward repeats the chain in reverse on bf16 gradients (twice the roundings,
//     through the softmax, whose outputs are differences of nearly equal numbers) and the LM head
//     and encoder sum over all tokens; 2.5x the logits' bound.
//   10-step losses 2e-2 relative: Adam moves every parameter by about lr per step whatever the
//     size of its gradient, so entries whose gradient is within bf16 noise of zero (the key slice
//     of attn_qkv.b has a true gradient of exactly 0) may move differently; the loss is an average
//     over many parameters and stays within the logits' bound.
//   final parameters: per tensor the MEAN |gpu - cpu| must be below 0.1 * (sum of the 10 lrs), i.e.
//     on average the updates agree to 10% of the distance Adam can move a parameter; an error in the
//     schedule, the bias correction, weight decay or clipping moves every entry and fails it. (A max
//     bound would be 2 * sum(lr) for the noise-dominated entries, which no bug could exceed.)
// Resume and determinism are exact: 10 steps straight and 5 + checkpoint + resume + 5 must give
// identical bits in master weights and AdamW moments, and identical losses.
#define TESTING
#include "train_gpt2.cu"
#include "test/test.h"

static const char *REF = "build/test/gpt2_cuda_ref.safetensors";
#define RUN_DIR "build/test/gpt2_cuda"

static const float *ref_f32(const SafeTensors *st, const char *name, size_t want) {
    const char *dtype;
    int ndim;
    long long shape[4];
    const float *p = (const float *)safetensors_find(st, name, &dtype, &ndim, shape);
    size_t n = 1;
    for (int d = 0; p && d < ndim; d++) n *= (size_t)shape[d];
    if (!p || strcmp(dtype, "F32") || (want && n != want)) {
        printf("FAIL - reference %s: tensor %s missing or of the wrong size (run build/test/gpt2_cuda_ref)\n", REF, name);
        exit(1);
    }
    return p;
}
static const int *ref_i32(const SafeTensors *st, const char *name) {
    const char *dtype;
    const int *p = (const int *)safetensors_find(st, name, &dtype, NULL, NULL);
    if (!p || strcmp(dtype, "I32")) { printf("FAIL - reference: %s missing\n", name); exit(1); }
    return p;
}

// device bf16 (num_params) -> host fp32
static void bf16_to_host(GPT2 *m, const bf16 *dev, float *host) {
    bf16 *tmp = (bf16 *)xmalloc(m->num_params * sizeof(bf16));
    cudaCheck(cudaMemcpy(tmp, dev, m->num_params * sizeof(bf16), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < m->num_params; i++) host[i] = bf16_to_float_host(tmp[i]);
    free(tmp);
}

// every tensor of host (padded layout) against the reference tensors prefix+name
static void check_grads(GPT2 *m, const SafeTensors *ref, const float *host, const char *prefix, const char *what, double tol) {
    double worst = 0.0;
    char worst_name[80] = "";
    for (int i = 0; i < m->ntensors; i++) {
        ParamTensor *t = &m->tensors[i];
        char name[96];
        snprintf(name, sizeof name, "%s%s", prefix, t->name);
        const float *r = ref_f32(ref, name, t->size);
        double scale = max_abs(r, t->size);
        double e = scale == 0.0 ? max_abs(host + t->offset, t->size) : max_rel_err(host + t->offset, r, t->size, scale);
        if (!(e <= worst)) { worst = e; snprintf(worst_name, sizeof worst_name, "%s", t->name); }
        char label[200];
        snprintf(label, sizeof label, "%s %s vs CPU (rel err %.2e, tol %.0e)", what, t->name, e, tol);
        check(e < tol, label, "rel err %.3g >= %.3g", e, tol);
    }
    printf("# %s: worst %s rel err %.3e\n", what, worst_name, worst);
}

static void load_ref_params(GPT2 *m, const SafeTensors *ref) {
    char err[ERRLEN];
    float *host = (float *)xcalloc(m->num_params * sizeof(float));
    if (load_tensors(m, ref, REF, "", host, err)) { printf("FAIL - load reference weights: %s\n", err); exit(1); }
    gpt2_upload_params(m, host);
    free(host);
}

// n optimizer steps from step `first` on the reference batch; losses[i] of each step's forward
static void train_steps(GPT2 *m, const int *in, const int *tg, int first, int n, float *losses, double *lr_sum) {
    for (int s = first; s < first + n; s++) {
        gpt2_zero_grad(m);
        gpt2_forward(m, in, tg, m->Bmax, m->Tmax);
        losses[s] = m->mean_loss;
        gpt2_backward(m, 1.0f);
        float lr;
        gpt2_optimizer_step(m, s, &lr);
        if (lr_sum) *lr_sum += lr;
    }
}

int main(int argc, char **argv) {
    if (argc > 1) REF = argv[1];
    char err[ERRLEN];
    SafeTensors ref;
    if (safetensors_read(&ref, REF, err, sizeof err)) {
        printf("FAIL - reference: %s (make build/test/gpt2_cuda_ref && build/test/gpt2_cuda_ref)\n", err);
        return 1;
    }
    Config cfg;
    if (config_from_json_string(&cfg, safetensors_meta(&ref, "config"), REF, NULL, 0, err, sizeof err) ||
        gpt2_check_supported(&cfg, 1, err)) {
        printf("FAIL - reference config: %s\n", err);
        return 1;
    }
    Dist dist;
    dist_init(&dist, "build/test");
    int B = cfg.train.micro_batch, T = cfg.train.seq_len, N = B * T;
    const int *inputs = ref_i32(&ref, "inputs"), *targets = ref_i32(&ref, "targets");
    GPT2 *m = (GPT2 *)xcalloc(sizeof(GPT2));
    gpt2_build(m, &cfg, &dist, B, T);
    load_ref_params(m, &ref);
    printf("# GPU %s, model %d layers C=%d V=%d, batch %d x %d\n", device_prop.name, m->L, m->C, m->V, B, T);

    // forward: logits and loss
    gpt2_forward(m, inputs, NULL, B, T);
    bf16 *lg = (bf16 *)xmalloc((size_t)N * m->Vp * sizeof(bf16));
    cudaCheck(cudaMemcpy(lg, m->acts.logits, (size_t)N * m->Vp * sizeof(bf16), cudaMemcpyDeviceToHost));
    float *logits = (float *)xmalloc((size_t)N * m->V * sizeof(float));
    for (int n = 0; n < N; n++)
        for (int v = 0; v < m->V; v++) logits[(size_t)n * m->V + v] = bf16_to_float_host(lg[(size_t)n * m->Vp + v]);
    const float *ref_logits = ref_f32(&ref, "logits", (size_t)N * m->V);
    double e = max_rel_err(logits, ref_logits, (size_t)N * m->V, max_abs(ref_logits, (size_t)N * m->V));
    char label[200];
    snprintf(label, sizeof label, "forward logits vs CPU (rel err %.2e, tol 2e-2)", e);
    check(e < 2e-2, label, "rel err %.3g", e);
    gpt2_forward(m, inputs, targets, B, T);
    float loss1 = m->mean_loss, ref_loss = ref_f32(&ref, "loss", 1)[0];
    e = fabs(loss1 - ref_loss) / fabs(ref_loss);
    snprintf(label, sizeof label, "loss vs CPU (gpu %.6f cpu %.6f, rel err %.2e, tol 5e-3)", loss1, ref_loss, e);
    check(e < 5e-3, label, "differs");

    // backward: every gradient, once and accumulated over two micro-batches
    float *host = (float *)xmalloc(m->num_params * sizeof(float));
    gpt2_zero_grad(m);
    gpt2_backward(m, 1.0f);
    bf16_to_host(m, m->grads, host);
    check_grads(m, &ref, host, "grad.", "gradient", 5e-2);
    int *in2 = (int *)xmalloc((size_t)N * sizeof(int)), *tg2 = (int *)xmalloc((size_t)N * sizeof(int));
    for (int b = 0; b < B; b++) {
        memcpy(in2 + (size_t)b * T, inputs + (size_t)((b + 1) % B) * T, T * sizeof(int));
        memcpy(tg2 + (size_t)b * T, targets + (size_t)((b + 1) % B) * T, T * sizeof(int));
    }
    gpt2_zero_grad(m);
    gpt2_forward(m, inputs, targets, B, T);
    check(m->mean_loss == loss1, "forward is deterministic (same loss bits twice)", "%.9g vs %.9g", m->mean_loss, loss1);
    gpt2_backward(m, 0.5f);
    gpt2_forward(m, in2, tg2, B, T);
    gpt2_backward(m, 0.5f);
    bf16_to_host(m, m->grads, host);
    check_grads(m, &ref, host, "accum.grad.", "accumulated gradient", 5e-2);

    // 10 AdamW steps on the batch: losses and final master weights
    float losses[10], losses2[10];
    double lr_sum = 0.0;
    load_ref_params(m, &ref);
    train_steps(m, inputs, targets, 0, 10, losses, &lr_sum);
    const float *ref_losses = ref_f32(&ref, "steps.loss", 10);
    e = max_rel_err(losses, ref_losses, 10, 0.0);
    snprintf(label, sizeof label, "10-step losses vs CPU (rel err %.2e, tol 2e-2; gpu %.4f -> %.4f, cpu %.4f -> %.4f)",
             e, losses[0], losses[9], ref_losses[0], ref_losses[9]);
    check(e < 2e-2, label, "differ");
    check(losses[9] < losses[0] - 0.1, "10 steps reduce the loss", "%.4f -> %.4f", losses[0], losses[9]);
    float *master10 = (float *)xmalloc(m->num_params * sizeof(float) * 3);
    float *m10 = master10 + m->num_params, *v10 = m10 + m->num_params;
    gpt2_gather_shards(m, m->master, master10);
    gpt2_gather_shards(m, m->m, m10);
    gpt2_gather_shards(m, m->v, v10);
    int bad = 0;
    char worst[200] = "";
    for (int i = 0; i < m->ntensors; i++) {
        ParamTensor *t = &m->tensors[i];
        char name[96];
        snprintf(name, sizeof name, "final.%s", t->name);
        const float *r = ref_f32(&ref, name, t->size);
        double mean = 0.0;
        for (size_t j = 0; j < t->size; j++) mean += fabs((double)master10[t->offset + j] - r[j]);
        mean /= t->size;
        if (mean >= 0.1 * lr_sum) { bad++; snprintf(worst, sizeof worst, "%s: mean |diff| %.3g", t->name, mean); }
    }
    snprintf(label, sizeof label, "parameters after 10 steps vs CPU (mean |diff| per tensor < 0.1 * sum(lr) = %.2e)", 0.1 * lr_sum);
    check(bad == 0, label, "%d tensors off; last %s", bad, worst);

    // bit-exact resume: 5 steps, checkpoint, a fresh model resumed from it, 5 more steps
    load_ref_params(m, &ref);
    cudaCheck(cudaMemset(m->m, 0, m->shard_size * sizeof(float)));
    cudaCheck(cudaMemset(m->v, 0, m->shard_size * sizeof(float)));
    train_steps(m, inputs, targets, 0, 5, losses2, NULL);
    TrainState st;
    memset(&st, 0, sizeof st);
    st.step = 5;
    st.tokens = 5LL * N;
    snprintf(st.dataloader, sizeof st.dataloader, "{}");
    ckpt_rmtree(RUN_DIR);
    int rc = gpt2_save_checkpoint(m, RUN_DIR, &st, err);
    check(rc == 0, "GPU checkpoint written", "%s", err);
    gpt2_free(m);
    CliArgs args;
    memset(&args, 0, sizeof args);
    args.resume_dir = RUN_DIR;
    Config cfg2;
    TrainState st2;
    memset(&st2, 0, sizeof st2);
    rc = gpt2_resume(m, &cfg2, &dist, &args, &st2, err);
    check(rc == 0 && st2.step == 5, "GPU checkpoint resumes", "%s", rc ? err : "wrong step");
    if (rc == 0) {
        train_steps(m, inputs, targets, 5, 5, losses2, NULL);
        check(memcmp(losses, losses2, sizeof losses) == 0, "5 + resume + 5 steps: losses bit-identical to 10 straight",
              "step 10: %.9g vs %.9g", losses2[9], losses[9]);
        float *h = (float *)xmalloc(m->num_params * sizeof(float));
        int same = 1;
        gpt2_gather_shards(m, m->master, h);
        same &= memcmp(h, master10, m->num_params * sizeof(float)) == 0;
        gpt2_gather_shards(m, m->m, h);
        same &= memcmp(h, m10, m->num_params * sizeof(float)) == 0;
        gpt2_gather_shards(m, m->v, h);
        same &= memcmp(h, v10, m->num_params * sizeof(float)) == 0;
        check(same, "5 + resume + 5 steps: master weights and AdamW moments bit-identical to 10 straight", "differ");
        free(h);
    }

    // the checkpoint is in the CPU trainer's format: every tensor by name, fp32, our metadata
    SafeTensors ck;
    rc = safetensors_read(&ck, RUN_DIR "/ckpt_00000005/model.safetensors", err, sizeof err);
    if (rc == 0) {
        const char *fmt = safetensors_meta(&ck, "format");
        int ok = fmt && !strcmp(fmt, "structured-gpt2/1") && safetensors_count(&ck) == m->ntensors;
        float *tmp = (float *)xcalloc(m->num_params * sizeof(float));
        ok = ok && load_tensors(m, &ck, "checkpoint", "", tmp, err) == 0;
        check(ok, "GPU checkpoint: format, tensor names, F32 shapes as the CPU trainer's", "%s", err);
        free(tmp);
        safetensors_free(&ck);
    } else {
        check(0, "GPU checkpoint readable by checkpoint.h (CRCs)", "%s", err);
    }

    free(lg); free(logits); free(host); free(in2); free(tg2); free(master10);
    gpt2_free(m);
    free(m);
    dist_free(&dist);
    safetensors_free(&ref);
    return test_exit();
}
