#!/usr/bin/env bash
# dev/tools/sweep and dev/tools/plot: the files and names a sweep writes, its refusals of bad keys and values
# (checked against the trainer's key table in llmc/config.h), run_all.sh skipping finished points and resuming
# interrupted ones (with a stand-in trainer that records its calls, then the real one on a tiny model), and plot
# drawing PNGs from log.jsonl files. The shipped configs/*.json pass the same key check.
set -u
cd "$(dirname "$0")/.."
ok() { echo "ok - $1"; }
fail() { echo "FAIL - $1: $2"; }
expect() { if [ "$1" -eq 0 ]; then ok "$2"; else fail "$2" "$3"; fi; }
PY=/usr/bin/python3
SWEEP=dev/tools/sweep
PLOT=dev/tools/plot
W=build/test/tools; rm -rf "$W"; mkdir -p "$W"

# ---- sweep: files and names
S=$W/s1
$SWEEP configs/default.json --grid model.linear.default.type=dense,monarch,btt_moe \
    --grid model.linear.default.experts=4,8 --grid optim.lr=1e-3,3e-3 --out $S > "$W/s1.out" 2>&1
expect $? "sweep over type x experts x lr runs" "$(cat "$W/s1.out")"
want="type=btt_moe_experts=4_lr=1e-3 type=btt_moe_experts=4_lr=3e-3 type=btt_moe_experts=8_lr=1e-3
type=btt_moe_experts=8_lr=3e-3 type=dense_lr=1e-3 type=dense_lr=3e-3 type=monarch_lr=1e-3 type=monarch_lr=3e-3"
got=$(ls $S/configs | sed 's/\.json$//' | sort | tr '\n' ' ')
[ "$got" = "$(echo $want | tr ' ' '\n' | sort | tr '\n' ' ')" ]
expect $? "8 points: experts only on btt_moe, names key=value joined by _" "$got"
[ "$(wc -l < $S/points.tsv)" -eq 9 ] && head -1 $S/points.tsv | grep -q "^name	config	run_dir	model.linear.default.type	model.linear.default.experts	optim.lr$" \
    && grep -q "^type=dense_lr=3e-3	$S/configs/type=dense_lr=3e-3.json	$S/runs/type=dense_lr=3e-3	dense	-	3e-3$" $S/points.tsv
expect $? "points.tsv: header, one row per point, '-' where a key does not apply" "$(cat $S/points.tsv)"
$PY - "$S" <<'EOF'
import json, sys
S = sys.argv[1]
moe = json.load(open(f"{S}/configs/type=btt_moe_experts=4_lr=3e-3.json"))
dense = json.load(open(f"{S}/configs/type=dense_lr=1e-3.json"))
base = json.load(open("configs/default.json"))
assert moe["model"]["linear"]["default"] == {"type": "btt_moe", "experts": 4}, moe["model"]["linear"]
assert moe["optim"]["lr"] == 3e-3 and moe["run"]["dir"] == f"{S}/runs/type=btt_moe_experts=4_lr=3e-3"
assert dense["model"]["linear"]["default"] == {"type": "dense"} and dense["optim"]["lr"] == 1e-3
for k in base:
    if k not in ("optim", "run", "model"):
        assert dense[k] == base[k], k
EOF
expect $? "point configs: overrides applied, the rest of the base kept, run.dir per point" "see above"
[ -x $S/run_all.sh ] && bash -n $S/run_all.sh && [ "$(grep -c '^run_point ' $S/run_all.sh)" -eq 8 ]
expect $? "run_all.sh: executable, valid bash, one run_point per point" "$(grep -c '^run_point ' $S/run_all.sh)"
$SWEEP configs/default.json --grid model.linear.default.type=btt,monarch --grid model.linear.default.blocks=2,4 \
    --grid model.linear.mlp_fc.rank=2 --out $W/s2 > "$W/s2.out" 2>&1
[ $? -eq 0 ] && [ "$(ls $W/s2/configs | tr '\n' ' ')" = "type=btt.json type=monarch_blocks=2.json type=monarch_blocks=4.json " ] \
    && grep -q '"rank": 2' "$W/s2/configs/type=btt.json" && ! grep -q '"rank"' "$W/s2/configs/type=monarch_blocks=2.json"
expect $? "single-value grid keys stay out of names; a projection without an entry starts from the default" \
    "$(ls $W/s2/configs; cat $W/s2.out)"

# ---- sweep: refusals, before anything is written
refuse() {  # WHAT EXPECTED_MESSAGE ARGS...
    local what=$1 msg=$2; shift 2
    rm -rf "$W/bad"
    $SWEEP "$@" --out "$W/bad" > "$W/bad.out" 2>&1
    local rc=$?
    if [ $rc -ne 0 ] && grep -qF -- "$msg" "$W/bad.out" && [ ! -e "$W/bad" ]; then ok "sweep refuses $what"
    else fail "sweep refuses $what" "rc $rc, wanted '$msg': $(cat "$W/bad.out")"; fi
}
refuse "an unknown key, with a suggestion" "optim.lrr: unknown key (did you mean optim.lr?)" configs/default.json --grid optim.lrr=1e-3,2e-3
refuse "an unknown projection" "model.linear.qkv.type: unknown key (did you mean model.linear.attn_qkv.type?)" \
    configs/default.json --grid model.linear.qkv.type=dense,monarch
refuse "a key in the wrong section" "warmup_steps: unknown key (did you mean schedule.warmup_steps?)" configs/default.json --set warmup_steps=10
refuse "a string for a number" 'optim.lr=abc: optim.lr: "abc": must be a number' configs/default.json --grid optim.lr=1e-3,abc
refuse "a value out of range" "optim.lr: 0: must be > 0" configs/default.json --grid optim.lr=0,1e-3
refuse "a non-integer step count" "train.max_steps: 1.5: must be an integer" configs/default.json --grid train.max_steps=10,1.5
refuse "an unknown choice" '"cos": must be one of cosine, linear, constant' configs/default.json --grid schedule.type=cos
refuse "an unknown structure type" '"mnarch": must be one of dense, blockdiag' configs/default.json --grid model.linear.default.type=mnarch
refuse "a key no point's structure takes" "model.linear.default.rank: no point's structure type takes this key" \
    configs/default.json --grid model.linear.default.type=dense,monarch --grid model.linear.default.rank=2,4
refuse "top_k above experts" "model.linear.default.top_k: 16: must be <= experts (8)" \
    configs/default.json --set model.linear.default.type=btt_moe --grid model.linear.default.top_k=2,16
refuse "an empty grid value" "expected distinct, non-empty values" configs/default.json --grid optim.lr=1e-3,,2e-3
echo '{"model": {"n_layer": 2, "n_laye": 3}}' > "$W/badbase.json"
refuse "an unknown key in the base config" "badbase.json: model.n_laye: unknown key (did you mean model.n_layer?)" "$W/badbase.json"
$SWEEP configs/default.json --grid optim.lr=1e-3,2e-3 --out $S > "$W/again.out" 2>&1
[ $? -ne 0 ] && grep -q "already holds a sweep" "$W/again.out" && [ ! -e "$S/configs/lr=1e-3.json" ]
expect $? "sweep refuses to regenerate an existing sweep without --force" "$(cat "$W/again.out")"

# ---- every shipped config passes the trainer's key table
$PY - configs/*.json <<'EOF'
import importlib.machinery, importlib.util, json, sys
loader = importlib.machinery.SourceFileLoader("sweep", "dev/tools/sweep")
sweep = importlib.util.module_from_spec(importlib.util.spec_from_loader("sweep", loader))
loader.exec_module(sweep)
validator = sweep.Validator()
for path in sys.argv[1:]:
    try:
        validator.check(json.load(open(path)), path)
        print(f"ok - {path}: every key is one the trainer accepts")
    except (sweep.SweepError, ValueError) as e:
        print(f"FAIL - {path}: every key is one the trainer accepts: {e}")
EOF

# ---- run_all.sh: skip finished points, resume interrupted ones (a stand-in trainer)
FAKE=$W/fake_trainer.sh
cat > "$FAKE" <<'EOF'
#!/usr/bin/env bash
# Stands in for train_gpt2: records its arguments; "trains" by creating the checkpoint directories.
# STOP_AT=NAME: that point stops after its first checkpoint and exits 0, as after SIGINT.
echo "$*" >> "$CALLS"
if [ "$1" = "--resume" ]; then dir=$2; else
    dir=$(grep -o '"dir": "[^"]*"' "$1" | sed 's/"dir": "\(.*\)"/\1/')
    mkdir -p "$dir"; cp "$1" "$dir/config.json"; fi
steps=$(grep -o '"max_steps": *[0-9]*' "$dir/config.json" | grep -o '[0-9]*$')
mkdir -p "$dir/ckpt_00000001"
case "$dir" in *"${STOP_AT:-none}") exit 0;; esac
mkdir -p "$dir/ckpt_$(printf %08d "$steps")"
EOF
chmod +x "$FAKE"
S=$W/s3
$SWEEP configs/default.json --grid optim.lr=1e-3,2e-3,3e-3 --set train.max_steps=5 --out $S > /dev/null 2>&1
export CALLS=$W/calls
: > "$CALLS"
STOP_AT=lr=2e-3 TRAINER=$FAKE $S/run_all.sh > "$W/run1.out" 2>&1
rc=$?
[ $rc -ne 0 ] && [ "$(cat "$CALLS" | tr '\n' ';')" = "$S/configs/lr=1e-3.json;$S/configs/lr=2e-3.json;" ] \
    && grep -q "lr=2e-3: stopped" "$W/run1.out" && [ -e "$S/runs/lr=1e-3/sweep_done" ] && [ ! -e "$S/runs/lr=2e-3/sweep_done" ]
expect $? "run_all.sh stops at an interrupted point, the finished one marked done" "rc $rc: $(cat "$CALLS") $(cat "$W/run1.out")"
: > "$CALLS"
TRAINER=$FAKE $S/run_all.sh > "$W/run2.out" 2>&1
rc=$?
[ $rc -eq 0 ] && [ "$(cat "$CALLS" | tr '\n' ';')" = "--resume $S/runs/lr=2e-3;$S/configs/lr=3e-3.json;" ] \
    && grep -q "lr=1e-3: done" "$W/run2.out" && grep -q "all points done" "$W/run2.out"
expect $? "rerun: skips the finished point, resumes the interrupted one, starts the rest" "rc $rc: $(cat "$CALLS")"
: > "$CALLS"
TRAINER=$FAKE $S/run_all.sh > /dev/null 2>&1
[ $? -eq 0 ] && [ ! -s "$CALLS" ]
expect $? "a finished sweep runs nothing" "$(cat "$CALLS")"

# ---- run_all.sh with the real trainer on a tiny model, then plot its runs
if [ -x ./train_gpt2 ] && [ -f data/tinyshakespeare/tiny_shakespeare_val.bin ]; then
    S=$W/s4
    $SWEEP configs/default.json --grid model.linear.default.type=dense,monarch --set model.n_layer=1 \
        --set model.n_embd=32 --set model.n_head=2 --set train.micro_batch=2 --set train.seq_len=32 \
        --set train.batch_tokens=64 --set train.max_steps=4 --set eval.every=2 --set eval.batches=1 \
        --set sample.every=0 --set sample.tokens=1 --set checkpoint.every=2 --out $S > /dev/null 2>&1
    OMP_NUM_THREADS=1 $S/run_all.sh > "$W/real.out" 2>&1
    [ $? -eq 0 ] && [ -e "$S/runs/type=dense/sweep_done" ] && [ -e "$S/runs/type=monarch/sweep_done" ] \
        && grep -q '"type": "monarch"' "$S/runs/type=monarch/config.json"
    expect $? "run_all.sh trains every point with ./train_gpt2" "$(tail -5 "$W/real.out")"
    $PLOT "$S" -o "$W/real.png" > "$W/realplot.out" 2>&1
    [ $? -eq 0 ] && grep -q "(2 runs)" "$W/realplot.out" && [ "$(head -c 4 "$W/real.png" | od -An -c | tr -d ' ')" = '211PNG' ]
    expect $? "plot of a sweep directory: both runs' logs, a PNG" "$(cat "$W/realplot.out")"
else
    fail "run_all.sh trains every point with ./train_gpt2" "needs ./train_gpt2 and make data"
fi

# ---- plot: synthetic logs
$PY - "$W/logs" <<'EOF'
import json, math, os, sys
root = sys.argv[1]
for name, fpt in (("a", 1e8), ("b", None)):
    os.makedirs(f"{root}/{name}")
    with open(f"{root}/{name}/log.jsonl", "w") as f:
        for s in range(0, 21):
            if s % 10 == 0:
                f.write(json.dumps({"type": "val", "step": s, "val_loss": 5 + 5 * math.exp(-s / 8), "tokens": 64 * s}) + "\n")
            if s:
                r = {"type": "train", "step": s, "loss": 5 + 5 * math.exp(-s / 8), "tokens": 64 * s}
                if fpt:
                    r["flops_per_token"] = fpt
                elif s > 10:
                    r["flops"] = 1e9 * s      # a cumulative count instead
                f.write(json.dumps(r) + "\n")
        if name == "a":   # a resumed run logs step 20 again; then the line a killed run left half-written
            f.write(json.dumps({"type": "train", "step": 20, "loss": 1.0, "tokens": 1280, "flops_per_token": fpt}) + "\n")
            f.write('{"type": "train", "step": 21, "lo')
EOF
$PLOT "$W/logs/a" "$W/logs/b" -o "$W/p3.png" --smooth 3 --title test > "$W/p3.out" 2>&1
[ $? -eq 0 ] && [ "$(head -c 4 "$W/p3.png" | od -An -c | tr -d ' ')" = '211PNG' ] && [ "$(stat -c %s "$W/p3.png")" -gt 10000 ]
expect $? "plot: two runs, three panels, a PNG" "$(cat "$W/p3.out")"
$PLOT "$W/logs/a" -o "$W/p1.png" --x flops > "$W/p1.out" 2>&1
[ $? -eq 0 ] && [ -s "$W/p1.png" ]
expect $? "plot --x flops: one panel" "$(cat "$W/p1.out")"
$PY - "$W/logs" <<'EOF'
import importlib.machinery, importlib.util, sys
loader = importlib.machinery.SourceFileLoader("plot", "dev/tools/plot")
plot = importlib.util.module_from_spec(importlib.util.spec_from_loader("plot", loader))
loader.exec_module(plot)
a = plot.read_log(sys.argv[1] + "/a/log.jsonl")
b = plot.read_log(sys.argv[1] + "/b/log.jsonl")
assert [r[0] for r in a["train"]] == list(range(1, 21)) and a["train"][-1][3] == 1.0, "last record of a step wins"
assert a["train"][4][2] == 64 * 5 * 1e8, "flops = tokens * flops_per_token"
assert a["val"][1][2] == 640 * 1e8, "val records take the run's flops_per_token"
assert b["train"][4][2] is None and b["train"][14][2] == 15e9, "a record's cumulative flops is used as is"
EOF
expect $? "plot reads steps, tokens and FLOPs as documented" "see above"
$PLOT "$W/nothere" -o "$W/x.png" > "$W/px.out" 2>&1
[ $? -ne 0 ] && grep -q "nothere: not a directory" "$W/px.out" && [ ! -e "$W/x.png" ]
expect $? "plot refuses a missing run directory" "$(cat "$W/px.out")"
$PLOT "$W/logs/a" -o "$W/x.png" --x steps > "$W/px.out" 2>&1
[ $? -ne 0 ] && grep -q "expected step, tokens or flops" "$W/px.out"
expect $? "plot refuses an unknown axis" "$(cat "$W/px.out")"
