#!/usr/bin/env bash
# The trainer as a user runs it: exact resume (20 steps straight = 10, resume, 10), SIGINT writes a
# checkpoint and the resumed run ends bit-identical, refusals of damaged checkpoints, --eval, --help.
set -u
cd "$(dirname "$0")/.."
. test/train_lib.sh
[ -x ./train_gpt2 ] || { fail "train_gpt2 built" "./train_gpt2 missing (run make first)"; exit 1; }
[ -f data/tinyshakespeare/tiny_shakespeare_train.bin ] || { fail "data" "run make data first"; exit 1; }

W=build/test/train; rm -rf "$W"; mkdir -p "$W"
CFG=$W/tiny.json RUN=$W/run
tiny_config "$CFG" "$RUN"
# 1-2. 20 straight steps; stop after 10, --resume, 10 more: bit-identical
check_straight_and_resume ./train_gpt2 "$CFG" "$RUN" "$W"
# 3. SIGINT mid-run writes a checkpoint and exits 0; the resumed run ends bit-identical
check_sigint ./train_gpt2 "$CFG" "$RUN" "$W"

# 4. refusals
out=$(./train_gpt2 "$CFG" 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "already holds checkpoints"
expect $? "a new run into a run dir with checkpoints is refused" "rc $rc: $out"
mkdir -p "$RUN/ckpt_00000030.tmp"; echo junk > "$RUN/ckpt_00000030.tmp/model.safetensors"
out=$(./train_gpt2 --resume "$RUN" --eval data/tinyshakespeare/tiny_shakespeare_val.bin 2>&1); rc=$?
[ $rc -eq 0 ] && echo "$out" | grep -q "resuming from $RUN/ckpt_00000020" && echo "$out" | grep -Eq "eval .*: loss [0-9.]+ over [0-9]+ tokens"
expect $? "a left-over .tmp checkpoint is ignored; --eval prints loss and tokens" "rc $rc: $out"
cp -r "$RUN/ckpt_00000020" "$W/good20"
f=$RUN/ckpt_00000020/model.safetensors
truncate -s $(( $(stat -c %s "$f") - 1000 )) "$f"
out=$(./train_gpt2 --resume "$RUN" 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "$f"
expect $? "a truncated checkpoint is refused naming the file" "rc $rc: $out"
rm -rf "$RUN/ckpt_00000020"; cp -r "$W/good20" "$RUN/ckpt_00000020"
/usr/bin/python3 - "$f" <<'PY'
import json, struct, sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
off = h["h.1.mlp_fc.W"]["data_offsets"][0]
b[8 + n + off + 5] ^= 0x40
open(p, "wb").write(b)
PY
out=$(./train_gpt2 --resume "$RUN" 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "h.1.mlp_fc.W" && echo "$out" | grep -qi "crc"
expect $? "a flipped byte is refused naming the tensor" "rc $rc: $out"

# 4b. dense -> monarch by dev/tools/project, then a fine-tune from the projected weights starts and trains
P=$W/projected; mkdir -p "$P"
out=$(dev/tools/project "$W/straight/ckpt_00000020" "$P/monarch.safetensors" --to monarch --config-out "$P/monarch.json" 2>&1); rc=$?
expect $rc "dev/tools/project turns the trained dense checkpoint into monarch" "$out"
./train_gpt2 "$P/monarch.json" --init-from "$P/monarch.safetensors" --set run.dir="$P/ft" --set train.max_steps=3 \
    --set eval.every=3 --set sample.every=0 > "$W/ft.out" 2>&1; rc=$?
[ $rc -eq 0 ] && grep -q "weights from $P/monarch.safetensors" "$W/ft.out" && grep -q "monarch b=4" "$W/ft.out" \
    && [ -d "$P/ft/ckpt_00000003" ]
expect $? "a fine-tune from the projected monarch checkpoint starts, trains 3 steps and checkpoints" "rc $rc: $(tail -3 "$W/ft.out")"

# 5. command line
./train_gpt2 --help > "$W/help.out" 2>&1; rc=$?
for flag in --set --resume --init-from --eval --help; do grep -q -- "$flag" "$W/help.out" || rc=1; done
expect $rc "--help lists every flag" "$(cat "$W/help.out")"
out=$(./train_gpt2 "$CFG" --set model.n_layers=3 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q "model.n_layers: unknown key (did you mean model.n_layer?)"
expect $? "a config error exits non-zero with file: key: message" "rc $rc: $out"
out=$(./train_gpt2 --bogus 2>&1); rc=$?
[ $rc -ne 0 ] && echo "$out" | grep -q -- "--bogus"
expect $? "an unknown flag is refused naming it" "rc $rc: $out"

# 6. structured layers: every type in one model under mup (qk_norm, attn_scale mup, rms_cap);
#    the start-up summary is printed and logged, and 4 + resume + 4 steps are bit-identical to 8.
SCFG=$W/structured.json
cat > "$SCFG" <<JSON
{"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "qk_norm": true, "attn_scale": "mup",
           "parametrization": "mup", "base_width": 32,
           "linear": {"attn_qkv": {"type": "monarch", "blocks": 4}, "attn_proj": {"type": "btt"},
                      "mlp_fc": {"type": "lowrank", "rank": 8}, "mlp_proj": {"type": "blockdiag", "blocks": 2, "weight_norm": "rms_cap"}}},
 "train": {"micro_batch": 4, "seq_len": 32, "batch_tokens": 256, "max_steps": 8, "seed": 7},
 "eval": {"every": 4, "batches": 2}, "sample": {"every": 0, "tokens": 8},
 "checkpoint": {"every": 4, "keep": 3}, "run": {"dir": "$W/srun"}}
JSON
SRUN=$W/srun
./train_gpt2 "$SCFG" > "$W/s_straight.out" 2>&1
expect $? "structured model (monarch, btt, lowrank, blockdiag+rms_cap, mup, qk_norm) trains" "$(tail -3 "$W/s_straight.out")"
grep -q "monarch b=4" "$W/s_straight.out" && grep -q "rms_cap" "$W/s_straight.out" && grep -q '^totals' "$W/s_straight.out" \
    && grep -q '"type": "model"' "$SRUN/log.jsonl"
expect $? "start-up summary: structures, rms_cap, totals printed; model record logged" "$(head -12 "$W/s_straight.out")"
mv "$SRUN" "$W/s_straight"
./train_gpt2 "$SCFG" --set train.max_steps=8 > /dev/null 2>&1
rm -rf "$SRUN/ckpt_00000008"
./train_gpt2 --resume "$SRUN" > "$W/s_resume.out" 2>&1
same_ckpt "$W/s_straight/ckpt_00000008" "$SRUN/ckpt_00000008"
expect $? "structured: 4 + resume + 4 steps bit-identical to 8 straight" "$(tail -3 "$W/s_resume.out")"
missing=""
for t in attn_proj.W0 attn_proj.W1 attn_proj.gamma0 attn_proj.gamma1 attn_qkv.W0 mlp_fc.W1 mlp_proj.W mlp_proj.gamma0 qk_norm.k.w; do
    grep -q "\"h.1.$t\"" "$SRUN/ckpt_00000008/model.safetensors" || missing="$missing h.1.$t"
done
grep -q '"m.h.1.mlp_proj.gamma0"' "$SRUN/ckpt_00000008/state.safetensors" || missing="$missing m.h.1.mlp_proj.gamma0"
[ -z "$missing" ]
expect $? "checkpoints carry every core, gamma and qk_norm tensor under its DESIGN name" "missing:$missing"
