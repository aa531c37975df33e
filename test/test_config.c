// Tests of llmc/config.h (JSON config, --set, validation messages, command line), llmc/schedule.h
// and llmc/logger.h. Config files are written to a fresh temporary directory; every error check
// compares the whole message, so the file name, key path, value and suggestion are all checked.
#include "test/test.h"
#include "llmc/config.h"
#include "llmc/schedule.h"
#include "llmc/logger.h"
#include <unistd.h>

static char tmpdir[256];

static const char *write_tmp(const char *name, const char *text) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    if (f) { fputs(text, f); fclose(f); }
    return path;
}

// Loads json (NULL: no file) with one optional --set, and compares the error with expect, where
// "FILE" stands for the temporary file's path.
static void check_error(const char *name, const char *json, const char *set, int world, const char *expect) {
    const char *path = json ? write_tmp("bad.json", json) : NULL;
    char want[1024], err[1024] = "";
    const char *at = strstr(expect, "FILE");
    if (at) snprintf(want, sizeof want, "%.*s%s%s", (int)(at - expect), expect, path, at + 4);
    else snprintf(want, sizeof want, "%s", expect);
    Config c;
    int rc = config_load(&c, path, set ? &set : NULL, set ? 1 : 0, world, err, sizeof err);
    check(rc == -1 && !strcmp(err, want), name, "rc %d\n  got:  %s\n  want: %s", rc, err, want);
}

static Config load_ok(const char *name, const char *json, const char *const *sets, int nsets) {
    Config c;
    char err[1024] = "";
    const char *path = json ? write_tmp("ok.json", json) : NULL;
    int rc = config_load(&c, path, sets, nsets, 1, err, sizeof err);
    check(rc == 0, name, "config_load failed: %s", err);
    return c;
}

static int spec_eq(const LinearSpec *a, const char *type, int blocks, int rank, int in_b, int out_b,
                   int experts, int top_k, const char *wn) {
    return !strcmp(a->type, type) && a->blocks == blocks && a->rank == rank && a->in_blocks == in_b &&
           a->out_blocks == out_b && a->experts == experts && a->top_k == top_k && !strcmp(a->weight_norm, wn);
}

// Field by field, so a mismatch names the field.
static void check_config_equal(const char *name, const Config *a, const Config *b) {
    char bad[256] = "";
#define EQ(f) if (a->f != b->f && !*bad) snprintf(bad, sizeof bad, #f)
#define SEQ(f) if (strcmp(a->f, b->f) && !*bad) snprintf(bad, sizeof bad, #f)
    EQ(model.n_layer); EQ(model.n_head); EQ(model.n_embd); EQ(model.block_size); EQ(model.vocab_size);
    EQ(model.padded_vocab_size); EQ(model.qk_norm); SEQ(model.attn_scale); SEQ(model.parametrization);
    EQ(model.base_width); EQ(model.moe_aux_weight); EQ(model.moe_z_weight);
    for (int p = 0; p < NUM_LINEAR; p++) {
        const LinearSpec *x = &a->model.linear[p], *y = &b->model.linear[p];
        if (!spec_eq(x, y->type, y->blocks, y->rank, y->in_blocks, y->out_blocks, y->experts, y->top_k, y->weight_norm) && !*bad)
            snprintf(bad, sizeof bad, "model.linear.%s", linear_names[p]);
    }
    EQ(optim.lr); EQ(optim.beta1); EQ(optim.beta2); EQ(optim.eps); EQ(optim.weight_decay); EQ(optim.grad_clip);
    SEQ(schedule.type); EQ(schedule.warmup_steps); EQ(schedule.final_lr_frac);
    EQ(train.micro_batch); EQ(train.seq_len); EQ(train.batch_tokens); EQ(train.max_steps); EQ(train.seed);
    SEQ(data.train); SEQ(data.val); SEQ(data.format);
    EQ(eval.every); EQ(eval.batches); EQ(sample.every); EQ(sample.tokens); EQ(checkpoint.every); EQ(checkpoint.keep);
    SEQ(run.dir);
#undef EQ
#undef SEQ
    check(!*bad, name, "field %s differs", bad);
}

static void test_defaults(void) {
    Config c;
    config_defaults(&c);
    int model_ok = c.model.n_layer == 12 && c.model.n_head == 12 && c.model.n_embd == 768 &&
                   c.model.block_size == 1024 && c.model.vocab_size == 50257 && c.model.padded_vocab_size == 50304 &&
                   c.model.qk_norm == 0 && !strcmp(c.model.attn_scale, "standard") &&
                   !strcmp(c.model.parametrization, "standard") && c.model.base_width == 768 &&
                   c.model.moe_aux_weight == 0.01f && c.model.moe_z_weight == 0.1f;
    for (int p = 0; p < NUM_LINEAR; p++) model_ok &= spec_eq(&c.model.linear[p], "dense", 0, 0, 0, 0, 0, 0, "");
    check(model_ok, "defaults: model is GPT-2 124M, dense everywhere", "a model field differs from DESIGN 4");
    check(c.optim.lr == 6e-4f && c.optim.beta1 == 0.9f && c.optim.beta2 == 0.95f && c.optim.eps == 1e-8f &&
          c.optim.weight_decay == 0.1f && c.optim.grad_clip == 1.0f, "defaults: optim", "differs from DESIGN 4");
    check(!strcmp(c.schedule.type, "cosine") && c.schedule.warmup_steps == 700 && c.schedule.final_lr_frac == 0.0f &&
          c.train.micro_batch == 16 && c.train.seq_len == 1024 && c.train.batch_tokens == 524288 &&
          c.train.max_steps == 18865 && c.train.seed == 1337, "defaults: schedule and train", "differs from DESIGN 4");
    check(!strcmp(c.data.train, "data/tinyshakespeare/tiny_shakespeare_train.bin") &&
          !strcmp(c.data.val, "data/tinyshakespeare/tiny_shakespeare_val.bin") && !strcmp(c.data.format, "llmc") &&
          c.eval.every == 250 && c.eval.batches == 20 && c.sample.every == 500 && c.sample.tokens == 144 &&
          c.checkpoint.every == 1000 && c.checkpoint.keep == 2 && !strcmp(c.run.dir, "runs/default"),
          "defaults: data, eval, sample, checkpoint, run", "differs from DESIGN 4");
    Config d = load_ok("config_load with no file and no --set succeeds", NULL, NULL, 0);
    check_config_equal("config_load with no file gives the defaults", &d, &c);
}

// DESIGN section 4's example with every projection dense (equal to the defaults); the example with its
// structures is checked separately (test_design_structures).
static const char *design_example =
    "{\n"
    "  \"model\": {\n"
    "    \"n_layer\": 12, \"n_head\": 12, \"n_embd\": 768, \"block_size\": 1024,\n"
    "    \"vocab_size\": 50257, \"padded_vocab_size\": 50304,\n"
    "    \"qk_norm\": false, \"attn_scale\": \"standard\",\n"
    "    \"parametrization\": \"standard\", \"base_width\": 768,\n"
    "    \"linear\": {\n"
    "      \"default\":   {\"type\": \"dense\"},\n"
    "      \"attn_qkv\":  {\"type\": \"dense\"},\n"
    "      \"attn_proj\": {\"type\": \"dense\"},\n"
    "      \"mlp_fc\":    {\"type\": \"dense\"},\n"
    "      \"mlp_proj\":  {\"type\": \"dense\"}\n"
    "    },\n"
    "    \"moe\": {\"aux_weight\": 0.01, \"z_weight\": 0.1}\n"
    "  },\n"
    "  \"optim\": {\"lr\": 6e-4, \"beta1\": 0.9, \"beta2\": 0.95, \"eps\": 1e-8, \"weight_decay\": 0.1, \"grad_clip\": 1.0},\n"
    "  \"schedule\": {\"type\": \"cosine\", \"warmup_steps\": 700, \"final_lr_frac\": 0.0},\n"
    "  \"train\": {\"micro_batch\": 16, \"seq_len\": 1024, \"batch_tokens\": 524288, \"max_steps\": 18865, \"seed\": 1337},\n"
    "  \"data\": {\"train\": \"data/tinyshakespeare/tiny_shakespeare_train.bin\",\n"
    "           \"val\": \"data/tinyshakespeare/tiny_shakespeare_val.bin\", \"format\": \"llmc\"},\n"
    "  \"eval\": {\"every\": 250, \"batches\": 20},\n"
    "  \"sample\": {\"every\": 500, \"tokens\": 144},\n"
    "  \"checkpoint\": {\"every\": 1000, \"keep\": 2},\n"
    "  \"run\": {\"dir\": \"runs/default\"}\n"
    "}\n";

// Every key away from its default, so reading it back proves each key is read.
static const char *all_changed =
    "{\"model\": {\"n_layer\": 3, \"n_head\": 4, \"n_embd\": 64, \"block_size\": 128, \"vocab_size\": 500,\n"
    "  \"padded_vocab_size\": 512, \"qk_norm\": true, \"attn_scale\": \"mup\", \"parametrization\": \"mup\",\n"
    "  \"base_width\": 256, \"linear\": {\"default\": {\"type\": \"dense\", \"weight_norm\": \"rms_cap\"},\n"
    "  \"mlp_proj\": {\"type\": \"dense\", \"weight_norm\": \"none\"}}, \"moe\": {\"aux_weight\": 0.02, \"z_weight\": 0.3}},\n"
    " \"optim\": {\"lr\": 3e-4, \"beta1\": 0.8, \"beta2\": 0.99, \"eps\": 1e-6, \"weight_decay\": 0.05, \"grad_clip\": 0.5},\n"
    " \"schedule\": {\"type\": \"linear\", \"warmup_steps\": 7, \"final_lr_frac\": 0.1},\n"
    " \"train\": {\"micro_batch\": 4, \"seq_len\": 64, \"batch_tokens\": 1024, \"max_steps\": 50, \"seed\": 9007199254740991},\n"
    " \"data\": {\"train\": \"d/train_*.bin\", \"val\": \"d/\\\"val\\\".bin\", \"format\": \"nanogpt\"},\n"
    " \"eval\": {\"every\": 0, \"batches\": 3}, \"sample\": {\"every\": 7, \"tokens\": 9},\n"
    " \"checkpoint\": {\"every\": 11, \"keep\": 5}, \"run\": {\"dir\": \"runs/x y\"}}\n";

// DESIGN section 4's example as written: a different structure in every projection.
static void test_design_structures(void) {
    const char *json =
        "{\"model\": {\"linear\": {\"default\": {\"type\": \"dense\"},\n"
        "  \"attn_qkv\": {\"type\": \"monarch\", \"blocks\": 4}, \"attn_proj\": {\"type\": \"btt\", \"rank\": 2},\n"
        "  \"mlp_fc\": {\"type\": \"btt_moe\", \"experts\": 8, \"top_k\": 2}, \"mlp_proj\": {\"type\": \"lowrank\", \"rank\": 128}}}}";
    Config c = load_ok("DESIGN section 4's example with its structures loads", json, NULL, 0);
    const LinearSpec *l = c.model.linear;
    check(!strcmp(l[LIN_ATTN_QKV].type, "monarch") && l[LIN_ATTN_QKV].blocks == 4 && !strcmp(l[LIN_ATTN_PROJ].type, "btt") &&
          l[LIN_ATTN_PROJ].rank == 2 && !strcmp(l[LIN_MLP_FC].type, "btt_moe") && l[LIN_MLP_FC].experts == 8 &&
          l[LIN_MLP_FC].top_k == 2 && !strcmp(l[LIN_MLP_PROJ].type, "lowrank") && l[LIN_MLP_PROJ].rank == 128,
          "DESIGN's example: each projection gets its own structure and keys", "specs differ");
}

static void test_valid_files(void) {
    Config c = load_ok("DESIGN section 4's example (dense) loads", design_example, NULL, 0), d;
    config_defaults(&d);
    check_config_equal("DESIGN's example equals the defaults", &c, &d);

    c = load_ok("a file changing every key loads", all_changed, NULL, 0);
    check(c.model.n_layer == 3 && c.model.qk_norm == 1 && !strcmp(c.model.attn_scale, "mup") &&
          c.model.moe_z_weight == 0.3f && c.optim.lr == 3e-4f && !strcmp(c.schedule.type, "linear") &&
          c.train.batch_tokens == 1024 && c.train.seed == 9007199254740991ULL &&
          !strcmp(c.data.val, "d/\"val\".bin") && !strcmp(c.data.format, "nanogpt") && c.checkpoint.keep == 5 &&
          !strcmp(c.run.dir, "runs/x y"), "the changed values are read", "a value was not read");

    // model.linear: the default reaches projections without an entry; an entry replaces it whole.
    check(spec_eq(&c.model.linear[LIN_ATTN_QKV], "dense", 0, 0, 0, 0, 0, 0, "rms_cap") &&
          spec_eq(&c.model.linear[LIN_MLP_FC], "dense", 0, 0, 0, 0, 0, 0, "rms_cap") &&
          spec_eq(&c.model.linear[LIN_MLP_PROJ], "dense", 0, 0, 0, 0, 0, 0, "none"),
          "linear default applies where a projection has no entry", "qkv wn %s, mlp_proj wn %s",
          c.model.linear[LIN_ATTN_QKV].weight_norm, c.model.linear[LIN_MLP_PROJ].weight_norm);
    c = load_ok("an entry without weight_norm loads",
                "{\"model\": {\"linear\": {\"default\": {\"type\": \"dense\", \"weight_norm\": \"rms_cap\"},"
                " \"attn_proj\": {\"type\": \"dense\"}}}}", NULL, 0);
    check(!strcmp(c.model.linear[LIN_ATTN_PROJ].weight_norm, "") && !strcmp(c.model.linear[LIN_ATTN_QKV].weight_norm, "rms_cap"),
          "a projection's entry replaces the default whole (no merging)", "attn_proj weight_norm \"%s\"",
          c.model.linear[LIN_ATTN_PROJ].weight_norm);
}

static void test_errors(void) {
    {
        char err[512], want[600], path[512];
        Config c;
        snprintf(path, sizeof path, "%s/missing.json", tmpdir);
        snprintf(want, sizeof want, "%s: cannot read: No such file or directory", path);
        int rc = config_load(&c, path, NULL, 0, 1, err, sizeof err);
        check(rc == -1 && !strcmp(err, want), "unreadable file names the file and the reason", "got %s", err);
    }
    check_error("invalid JSON gives line and column", "{\n  \"model\": {\n    \"n_layer\" 12\n  }\n}\n", NULL, 1,
                "FILE: line 3, column 15: invalid JSON near '12'");
    check_error("truncated JSON", "{\"model\": {", NULL, 1, "FILE: line 1, column 12: invalid JSON (unexpected end)");
    check_error("top level must be an object", "[1]", NULL, 1, "FILE: (top level): [1]: must be an object (got an array)");
    check_error("a section must be an object", "{\"optim\": 3}", NULL, 1, "FILE: optim: 3: must be an object (got a number)");
    check_error("unknown top-level key with suggestion", "{\"modle\": {}}", NULL, 1, "FILE: modle: unknown key (did you mean model?)");
    check_error("unknown nested key with suggestion", "{\"model\": {\"n_layers\": 4}}", NULL, 1,
                "FILE: model.n_layers: unknown key (did you mean model.n_layer?)");
    check_error("unknown key in another section suggests the right one", "{\"optim\": {\"warmup_steps\": 4}}", NULL, 1,
                "FILE: optim.warmup_steps: unknown key (did you mean schedule.warmup_steps?)");
    check_error("unknown key without a close match", "{\"train\": {\"zzzzzz\": 1}}", NULL, 1, "FILE: train.zzzzzz: unknown key");
    check_error("unknown key in a linear spec with suggestion", "{\"model\": {\"linear\": {\"mlp_fc\": {\"type\": \"dense\", \"rnak\": 3}}}}",
                NULL, 1, "FILE: model.linear.mlp_fc.rnak: unknown key (did you mean model.linear.mlp_fc.rank?)");
    check_error("unknown projection name with suggestion", "{\"model\": {\"linear\": {\"mlp_fcc\": {\"type\": \"dense\"}}}}", NULL, 1,
                "FILE: model.linear.mlp_fcc: unknown key (did you mean model.linear.mlp_fc?)");
    check_error("duplicate key", "{\"model\": {\"n_layer\": 2, \"n_layer\": 3}}", NULL, 1, "FILE: model.n_layer: duplicate key");
    check_error("wrong type: string for an integer", "{\"model\": {\"n_layer\": \"12\"}}", NULL, 1,
                "FILE: model.n_layer: \"12\": must be an integer (got a string)");
    check_error("wrong type: string for a float", "{\"optim\": {\"lr\": \"1e-3\"}}", NULL, 1,
                "FILE: optim.lr: \"1e-3\": must be a number (got a string)");
    check_error("wrong type: float for an integer", "{\"train\": {\"micro_batch\": 2.5}}", NULL, 1,
                "FILE: train.micro_batch: 2.5: must be an integer");
    check_error("wrong type: number for a bool", "{\"model\": {\"qk_norm\": 1}}", NULL, 1,
                "FILE: model.qk_norm: 1: must be true or false (got a number)");
    check_error("wrong type: number for a string", "{\"run\": {\"dir\": 5}}", NULL, 1, "FILE: run.dir: 5: must be a string (got a number)");
    check_error("wrong type: null", "{\"eval\": {\"every\": null}}", NULL, 1, "FILE: eval.every: null: must be an integer (got null)");
    check_error("integer beyond int", "{\"model\": {\"n_embd\": 3000000000}}", NULL, 1, "FILE: model.n_embd: 3000000000: must be <= 2147483647");
    check_error("float beyond float", "{\"optim\": {\"lr\": 1e39}}", NULL, 1, "FILE: optim.lr: 1e+39: out of range of a 32-bit float");
    check_error("seed beyond 2^53", "{\"train\": {\"seed\": 1e17}}", NULL, 1,
                "FILE: train.seed: 1e+17: must be <= 2^53 (larger integers are not exact in JSON)");
    check_error("empty string", "{\"data\": {\"train\": \"\"}}", NULL, 1, "FILE: data.train: \"\": must not be empty");

    // Ranges, one of each class.
    static const struct { const char *name, *json, *msg; } ranges[] = {
        {"range: n_layer >= 1", "{\"model\": {\"n_layer\": 0}}", "FILE: model.n_layer: 0: must be >= 1"},
        {"range: lr > 0", "{\"optim\": {\"lr\": 0}}", "FILE: optim.lr: 0: must be > 0"},
        {"range: beta1 in [0, 1)", "{\"optim\": {\"beta1\": 1}}", "FILE: optim.beta1: 1: must be in [0, 1)"},
        {"range: beta2 >= 0", "{\"optim\": {\"beta2\": -0.5}}", "FILE: optim.beta2: -0.5: must be in [0, 1)"},
        {"range: eps > 0", "{\"optim\": {\"eps\": -1e-8}}", "FILE: optim.eps: -1e-08: must be > 0"},
        {"range: weight_decay >= 0", "{\"optim\": {\"weight_decay\": -0.1}}", "FILE: optim.weight_decay: -0.1: must be >= 0"},
        {"range: grad_clip >= 0", "{\"optim\": {\"grad_clip\": -1}}", "FILE: optim.grad_clip: -1: must be >= 0"},
        {"range: warmup_steps >= 0", "{\"schedule\": {\"warmup_steps\": -1}}", "FILE: schedule.warmup_steps: -1: must be >= 0"},
        {"range: final_lr_frac in [0, 1]", "{\"schedule\": {\"final_lr_frac\": 1.5}}", "FILE: schedule.final_lr_frac: 1.5: must be in [0, 1]"},
        {"range: micro_batch >= 1", "{\"train\": {\"micro_batch\": 0}}", "FILE: train.micro_batch: 0: must be >= 1"},
        {"range: max_steps >= 1", "{\"train\": {\"max_steps\": 0}}", "FILE: train.max_steps: 0: must be >= 1"},
        {"range: eval.every >= 0", "{\"eval\": {\"every\": -1}}", "FILE: eval.every: -1: must be >= 0"},
        {"range: sample.every >= 0", "{\"sample\": {\"every\": -5}}", "FILE: sample.every: -5: must be >= 0"},
        {"range: checkpoint.every >= 0", "{\"checkpoint\": {\"every\": -1}}", "FILE: checkpoint.every: -1: must be >= 0"},
        {"range: checkpoint.keep >= 1", "{\"checkpoint\": {\"keep\": 0}}", "FILE: checkpoint.keep: 0: must be >= 1"},
        {"range: linear rank >= 1", "{\"model\": {\"linear\": {\"default\": {\"type\": \"lowrank\", \"rank\": 0}}}}",
         "FILE: model.linear.default.rank: 0: must be >= 1"},
        {"range: n_embd divisible by n_head", "{\"model\": {\"n_embd\": 100}}", "FILE: model.n_embd: 100: must be divisible by model.n_head (12)"},
        {"range: padded_vocab_size >= vocab_size", "{\"model\": {\"padded_vocab_size\": 50000}}",
         "FILE: model.padded_vocab_size: 50000: must be >= model.vocab_size (50257)"},
        {"range: block_size >= seq_len", "{\"model\": {\"block_size\": 512}}", "FILE: train.seq_len: 1024: must be <= model.block_size (512)"},
        {"enum: attn_scale", "{\"model\": {\"attn_scale\": \"sqrt\"}}", "FILE: model.attn_scale: \"sqrt\": must be one of standard, mup"},
        {"enum: parametrization", "{\"model\": {\"parametrization\": \"ntk\"}}",
         "FILE: model.parametrization: \"ntk\": must be one of standard, mup"},
        {"enum: schedule.type", "{\"schedule\": {\"type\": \"cos\"}}", "FILE: schedule.type: \"cos\": must be one of cosine, linear, constant"},
        {"enum: data.format", "{\"data\": {\"format\": \"npy\"}}", "FILE: data.format: \"npy\": must be one of llmc, nanogpt"},
        {"enum: linear type", "{\"model\": {\"linear\": {\"mlp_fc\": {\"type\": \"sparse\"}}}}",
         "FILE: model.linear.mlp_fc.type: \"sparse\": must be one of dense, blockdiag, lowrank, monarch, btt, btt_moe"},
        {"enum: weight_norm", "{\"model\": {\"linear\": {\"default\": {\"type\": \"dense\", \"weight_norm\": \"l2\"}}}}",
         "FILE: model.linear.default.weight_norm: \"l2\": must be one of none, rms_cap"},
        {"key of another structure type", "{\"model\": {\"linear\": {\"mlp_proj\": {\"type\": \"lowrank\", \"blocks\": 4}}}}",
         "FILE: model.linear.mlp_proj.blocks: 4: not a key of type \"lowrank\" (it takes: rank, weight_norm)"},
        {"dense takes no structure key", "{\"model\": {\"linear\": {\"default\": {\"rank\": 4}}}}",
         "FILE: model.linear.default.rank: 4: not a key of type \"dense\" (it takes: weight_norm)"},
        {"btt_moe: top_k <= experts", "{\"model\": {\"linear\": {\"mlp_fc\": {\"type\": \"btt_moe\", \"experts\": 4, \"top_k\": 5}}}}",
         "FILE: model.linear.mlp_fc.top_k: 5: must be <= experts (4)"},
        {"monarch: blocks must divide the layer",
         "{\"model\": {\"n_layer\": 1, \"n_head\": 2, \"n_embd\": 12, \"linear\": {\"attn_qkv\": {\"type\": \"monarch\", \"blocks\": 8}}}}",
         "FILE: model.linear.attn_qkv.blocks: 8: must divide d_in and d_out of attn_qkv (12 -> 36); valid: 1 2 3 4 6 12"},
        {"monarch: the default blocks is checked too",
         "{\"model\": {\"n_head\": 2, \"n_embd\": 6, \"linear\": {\"default\": {\"type\": \"monarch\"}}}}",
         "FILE: model.linear.default.blocks: 4 (default): must divide d_in and d_out of attn_qkv (6 -> 18); valid: 1 2 3 6"},
        {"btt: in_blocks must divide d_in", "{\"model\": {\"linear\": {\"mlp_proj\": {\"type\": \"btt\", \"in_blocks\": 5}}}}",
         "FILE: model.linear.mlp_proj.in_blocks: 5: must divide d_in of mlp_proj (3072 -> 768); valid: 1 2 3 4 6 8 12 16 24 32 48 64 96 128 192 256 384 512 768 1024 1536 3072"},
        {"lowrank: rank <= min(d_in, d_out)", "{\"model\": {\"linear\": {\"mlp_fc\": {\"type\": \"lowrank\", \"rank\": 800}}}}",
         "FILE: model.linear.mlp_fc.rank: 800: must be in [1, 768] for mlp_fc (768 -> 3072)"},
    };
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) check_error(ranges[i].name, ranges[i].json, NULL, 1, ranges[i].msg);

    check_error("batch_tokens must divide by micro_batch * seq_len", "{\"train\": {\"batch_tokens\": 1000}}", NULL, 1,
                "FILE: train.batch_tokens: 1000: must be a multiple of micro_batch * seq_len * world_size = 16 * 1024 * 1 = 16384");
    check_error("batch_tokens must divide by the world size too", "{\"train\": {\"micro_batch\": 4, \"seq_len\": 256, \"batch_tokens\": 4096}}",
                NULL, 3, "FILE: train.batch_tokens: 4096: must be a multiple of micro_batch * seq_len * world_size = 4 * 256 * 3 = 3072");
    check_error("--set of an unknown key", "{}", "model.n_layers=4", 1, "--set: model.n_layers: unknown key (did you mean model.n_layer?)");
    check_error("--set of an unknown section", NULL, "optm.lr=1", 1, "--set: optm: unknown key (did you mean optim?)");
    check_error("--set with a bad value", NULL, "model.n_layer=abc", 1, "--set: model.n_layer: \"abc\": must be an integer (got a string)");
    check_error("--set without =", NULL, "model.n_layer", 1, "--set: \"model.n_layer\": expected key.path=value");
    check_error("--set making keys disagree blames --set", "{\"model\": {\"n_embd\": 96}}", "model.n_head=7", 1,
                "--set: model.n_embd: 96: must be divisible by model.n_head (7)");
    check_error("--set of a structure key on a dense projection", NULL, "model.linear.mlp_fc.rank=8", 1,
                "--set: model.linear.mlp_fc.rank: 8: not a key of type \"dense\" (it takes: weight_norm)");
}

static void test_set(void) {
    const char *sets[] = {"model.n_layer=6", "run.dir=runs/abc", "model.qk_norm=true", "optim.lr=1e-3",
                          "data.format=\"nanogpt\"", "schedule={\"type\": \"constant\", \"warmup_steps\": 0}",
                          "model.moe.z_weight=0.5"};
    Config c = load_ok("--set overrides load", "{\"model\": {\"n_layer\": 4}, \"schedule\": {\"final_lr_frac\": 0.5}}", sets, 7);
    check(c.model.n_layer == 6, "--set number overrides the file", "n_layer %d", c.model.n_layer);
    check(!strcmp(c.run.dir, "runs/abc"), "--set unquoted string", "run.dir %s", c.run.dir);
    check(!strcmp(c.data.format, "nanogpt"), "--set quoted JSON string", "format %s", c.data.format);
    check(c.model.qk_norm == 1, "--set bool", "qk_norm %d", c.model.qk_norm);
    check(c.optim.lr == 1e-3f, "--set float", "lr %g", c.optim.lr);
    check(!strcmp(c.schedule.type, "constant") && c.schedule.warmup_steps == 0 && c.schedule.final_lr_frac == 0.5f,
          "--set of a section object sets its keys, keeps the others", "type %s warmup %d final %g",
          c.schedule.type, c.schedule.warmup_steps, c.schedule.final_lr_frac);
    check(c.model.moe_z_weight == 0.5f, "--set nested key", "z_weight %g", c.model.moe_z_weight);

    // A --set of one key of a projection without an entry starts from the default spec.
    const char *lin[] = {"model.linear.mlp_fc.weight_norm=rms_cap"};
    c = load_ok("--set of a projection key loads", "{\"model\": {\"linear\": {\"default\": {\"type\": \"dense\", \"weight_norm\": \"none\"}}}}", lin, 1);
    check(!strcmp(c.model.linear[LIN_MLP_FC].weight_norm, "rms_cap") && !strcmp(c.model.linear[LIN_ATTN_QKV].weight_norm, "none"),
          "--set of a projection key changes only that projection", "mlp_fc %s attn_qkv %s",
          c.model.linear[LIN_MLP_FC].weight_norm, c.model.linear[LIN_ATTN_QKV].weight_norm);
    const char *whole[] = {"model.linear.attn_proj={\"type\": \"dense\"}"};
    c = load_ok("--set of a projection object loads", "{\"model\": {\"linear\": {\"attn_proj\": {\"type\": \"dense\", \"weight_norm\": \"rms_cap\"}}}}", whole, 1);
    check(!strcmp(c.model.linear[LIN_ATTN_PROJ].weight_norm, ""), "--set of a projection object replaces the entry whole",
          "weight_norm %s", c.model.linear[LIN_ATTN_PROJ].weight_norm);
}

static void test_round_trip(void) {
    Config c = load_ok("round trip: source loads", all_changed, NULL, 0), d;
    char *json = config_to_json(&c), err[512] = "";
    check(json != NULL, "config_to_json returns text", "NULL");
    if (!json) return;
    cJSON *parsed = cJSON_Parse(json);
    check(parsed && cJSON_GetObjectItem(cJSON_GetObjectItem(parsed, "model"), "linear") &&
          cJSON_GetObjectItem(cJSON_GetObjectItem(parsed, "train"), "seed"), "config_to_json is JSON with every section", "%s", json);
    cJSON_Delete(parsed);
    int rc = config_from_json_string(&d, json, "ckpt/config", NULL, 0, err, sizeof err);
    check(rc == 0, "config_from_json_string reads config_to_json's output", "%s", err);
    check_config_equal("round trip to_json -> from_json is exact", &d, &c);
    free(json);

    // Floats that need all 9 digits survive too.
    const char *odd[] = {"optim.lr=0.000123456789", "optim.eps=3.14159e-7", "model.moe.aux_weight=0.1"};
    c = load_ok("round trip of awkward floats: loads", NULL, odd, 3);
    json = config_to_json(&c);
    rc = config_from_json_string(&d, json, "x", NULL, 0, err, sizeof err);
    check(rc == 0 && d.optim.lr == c.optim.lr && d.optim.eps == c.optim.eps && d.model.moe_aux_weight == c.model.moe_aux_weight,
          "round trip of awkward floats is bit-exact", "rc %d lr %.9g vs %.9g", rc, d.optim.lr, c.optim.lr);
    check(strstr(json, "\"lr\": 0.00012345679,") && strstr(json, "\"aux_weight\": 0.1,"),
          "floats are written in their shortest exact form", "%s", json);
    free(json);

    rc = config_from_json_string(&d, "{\"model\": {\"n_layr\": 1}}", "ckpt/model.safetensors", NULL, 0, err, sizeof err);
    check(rc == -1 && !strcmp(err, "ckpt/model.safetensors: model.n_layr: unknown key (did you mean model.n_layer?)"),
          "config_from_json_string names its origin in errors", "%s", err);
}

static void test_cli(void) {
    CliArgs a;
    char err[512];
    char *argv1[] = {"train_gpt2", "cfg.json", "--set", "a.b=1", "--set", "c=2", "--resume", "runs/r", "--eval", "val.bin"};
    int rc = cli_parse(10, argv1, &a, err, sizeof err);
    check(rc == 0 && !strcmp(a.config_path, "cfg.json") && a.nsets == 2 && !strcmp(a.sets[0], "a.b=1") &&
          !strcmp(a.sets[1], "c=2") && !strcmp(a.resume_dir, "runs/r") && !strcmp(a.eval_shard, "val.bin") &&
          !a.init_from && !a.help, "cli_parse reads every flag", "rc %d %s", rc, err);
    char *argv2[] = {"train_gpt2", "--init-from", "gpt2_124M.bin", "--help"};
    rc = cli_parse(4, argv2, &a, err, sizeof err);
    check(rc == 0 && a.help && !a.config_path && !strcmp(a.init_from, "gpt2_124M.bin"), "cli_parse --help and no CONFIG",
          "rc %d %s", rc, err);
    static const struct { int argc; char *argv[4]; const char *msg; } bad[] = {
        {2, {"t", "--frobnicate"}, "--frobnicate: unknown option (see --help)"},
        {2, {"t", "--set"}, "--set: needs a value (see --help)"},
        {3, {"t", "a.json", "b.json"}, "b.json: a second CONFIG (already a.json)"},
        {3, {"t", "--eval", "v.bin"}, "--eval: needs --init-from FILE or --resume RUN_DIR (the model to evaluate)"},
        {4, {"t", "--resume", "r", "--resume"}, "--resume: needs a value (see --help)"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char name[96];
        snprintf(name, sizeof name, "cli_parse refuses: %s", bad[i].msg);
        rc = cli_parse(bad[i].argc, (char **)bad[i].argv, &a, err, sizeof err);
        check(rc == -1 && !strcmp(err, bad[i].msg), name, "rc %d got %s", rc, err);
    }
    char help[4096] = "";
    FILE *f = tmpfile();
    if (f) { cli_print_help(f, "train_gpt2"); rewind(f); help[fread(help, 1, sizeof help - 1, f)] = '\0'; fclose(f); }
    check(strstr(help, "--set key.path=value") && strstr(help, "--resume RUN_DIR") && strstr(help, "--init-from FILE") &&
          strstr(help, "--eval SHARD") && strstr(help, "--help") && strstr(help, "configs/default.json") &&
          strstr(help, "OMP_NUM_THREADS"), "help lists every flag, the default config and OMP_NUM_THREADS", "%s", help);
}

// The contract's formula, computed independently in double.
static double lr_ref(const char *type, double L, int W, int S, double frac, int s) {
    double Lmin = L * frac;
    if (s < W) return L * (s + 1) / W;
    double r = (double)(s - W) / (S - W > 1 ? S - W : 1);
    r = r < 0 ? 0 : r > 1 ? 1 : r;
    if (!strcmp(type, "cosine")) return Lmin + 0.5 * (1 + cos(3.14159265358979323846 * r)) * (L - Lmin);
    if (!strcmp(type, "linear")) return L - (L - Lmin) * r;
    return L;
}

static void test_schedule(void) {
    static const char *types[] = {"cosine", "linear", "constant"};
    static const int steps[] = {0, 1, 4, 9, 10, 11, 37, 55, 99, 100, 250};
    for (int t = 0; t < 3; t++) {
        Config c;
        config_defaults(&c);
        strcpy(c.schedule.type, types[t]);
        c.optim.lr = 1e-3f; c.schedule.warmup_steps = 10; c.train.max_steps = 100; c.schedule.final_lr_frac = 0.1f;
        float got[11];
        float want[11];
        for (int i = 0; i < 11; i++) {
            got[i] = lr_at_step(&c, steps[i]);
            want[i] = (float)lr_ref(types[t], c.optim.lr, 10, 100, c.schedule.final_lr_frac, steps[i]);
        }
        char name[96];
        snprintf(name, sizeof name, "schedule %s matches the formula (warmup 10, 100 steps)", types[t]);
        double e = max_rel_err(got, want, 11, 1e-12);
        check(e < 1e-6, name, "max rel err %g", e);
    }
    Config c;
    config_defaults(&c);
    c.optim.lr = 1e-3f; c.schedule.warmup_steps = 10; c.train.max_steps = 100; c.schedule.final_lr_frac = 0.1f;
    check(fabsf(lr_at_step(&c, 0) - 1e-4f) < 1e-10f && fabsf(lr_at_step(&c, 9) - 1e-3f) < 1e-10f &&
          fabsf(lr_at_step(&c, 100) - 1e-4f) < 1e-10f && fabsf(lr_at_step(&c, 55) - 5.5e-4f) < 1e-9f,
          "cosine: lr/W at step 0, lr at the end of warmup, midpoint, floor at max_steps", "%g %g %g %g",
          lr_at_step(&c, 0), lr_at_step(&c, 9), lr_at_step(&c, 55), lr_at_step(&c, 100));
    c.schedule.warmup_steps = 0; c.train.max_steps = 1;
    check(lr_at_step(&c, 0) == 1e-3f && fabsf(lr_at_step(&c, 1) - 1e-4f) < 1e-10f,
          "no warmup and max_steps == warmup: no division by zero", "%g %g", lr_at_step(&c, 0), lr_at_step(&c, 1));
}

static int count_json_lines(const char *path, int *lines) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char buf[1024];
    int ok = 1;
    *lines = 0;
    while (fgets(buf, sizeof buf, f)) {
        (*lines)++;
        cJSON *j = cJSON_Parse(buf);
        ok &= cJSON_IsObject(j);
        cJSON_Delete(j);
    }
    fclose(f);
    return ok;
}

static void test_logger(void) {
    Logger lg = {0};
    char err[512] = "", path[512];
    snprintf(path, sizeof path, "%s/log.jsonl", tmpdir);
    int rc = logger_open(&lg, tmpdir, 0, err, sizeof err);
    check(rc == 0, "logger_open creates log.jsonl", "%s", err);
    if (rc) return;
    logger_write(&lg, "{\"step\": 0, \"loss\": 10.9}");
    int lines = 0;
    int ok = count_json_lines(path, &lines);
    check(ok && lines == 1, "a written line is on disk before close (flushed)", "lines %d", lines);
    logger_write(&lg, "{\"step\": 1, \"loss\": 10.5}");
    logger_close(&lg);
    // A crash mid-line, then a resume that appends.
    FILE *f = fopen(path, "a");
    if (f) { fputs("{\"step\": 2, \"lo", f); fclose(f); }
    rc = logger_open(&lg, tmpdir, 1, err, sizeof err);
    logger_write(&lg, "{\"step\": 2, \"loss\": 10.1}");
    logger_close(&lg);
    ok = count_json_lines(path, &lines);
    check(rc == 0 && lines == 4, "append keeps earlier lines and starts a new line after a partial one", "rc %d lines %d", rc, lines);
    rc = logger_open(&lg, tmpdir, 0, err, sizeof err);
    logger_write(&lg, "{\"step\": 0}");
    logger_close(&lg);
    ok = count_json_lines(path, &lines);
    check(rc == 0 && ok && lines == 1, "a fresh run truncates the log and every line parses as JSON", "lines %d", lines);
    char missing[600], want[700];
    snprintf(missing, sizeof missing, "%s/no/such", tmpdir);
    snprintf(want, sizeof want, "%s/log.jsonl: cannot open for writing: No such file or directory", missing);
    rc = logger_open(&lg, missing, 0, err, sizeof err);
    check(rc == -1 && !strcmp(err, want), "logger_open names the file when it cannot open it", "%s", err);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_config_XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    test_defaults();
    test_valid_files();
    test_design_structures();
    test_errors();
    test_set();
    test_round_trip();
    test_cli();
    test_schedule();
    test_logger();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    return test_exit();
}
