#!/usr/bin/env bash
# End-to-end tests of the tokenize tool (dev/data/tokenize.c) on a small generated corpus: a directory
# of text files, a JSONL file and stdin, cut into shards of 3000 tokens so that several appear.
# Needs ./tokenize built (test/run is preceded by `make all`); TOKENIZE=path overrides it.
set -u
cd "$(dirname "$0")/.."
TOK=${TOKENIZE:-./tokenize}
W=build/test/tokenize_tmp
pass=0; fails=0
ok()   { echo "ok - $1"; pass=$((pass + 1)); }
fail() { echo "FAIL - $1: $2"; fails=$((fails + 1)); }
check() { if [ "$2" = 0 ]; then ok "$1"; else fail "$1" "$3"; fi; }  # check NAME STATUS DETAIL

if [ ! -x "$TOK" ]; then fail "tokenize binary exists" "$TOK missing: run make tokenize"; exit 1; fi
rm -rf "$W"; mkdir -p "$W"

# the corpus: paragraphs of tinyshakespeare, unicode, and a JSONL text equal to a text file's
/usr/bin/python3 - "$W" <<'EOF'
import json, os, sys
w = sys.argv[1]
paras = open("data/tinyshakespeare.txt", encoding="utf-8").read().split("\n\n")
c = os.path.join(w, "corpus")
for d in ("dir/b", "dir/a/deep"):
    os.makedirs(os.path.join(c, d), exist_ok=True)
# 25 files in three folders; sorted by full path, dir/a-1.txt comes first ('-' < '/')
names = ["dir/a-1.txt"] + [f"dir/a/{i:02d}.txt" for i in range(8)] + [f"dir/a/deep/{i:02d}.txt" for i in range(8)] \
      + [f"dir/b/{i:02d}.txt" for i in range(8)]
for k, n in enumerate(names):
    open(os.path.join(c, n), "w", encoding="utf-8").write("\n\n".join(paras[k * 12:(k + 1) * 12]))
open(os.path.join(c, "dir/a/.hidden.txt"), "w").write("never read")
uni = "Ünïcödé — “quotes”, emoji 🤖, 中文, tabs\tand\nnewlines.\n"
open(os.path.join(c, "same.txt"), "w", encoding="utf-8").write(uni)
with open(os.path.join(c, "docs.jsonl"), "w", encoding="utf-8") as f:
    f.write(json.dumps({"text": uni}) + "\n")
    for k in range(30):
        f.write(json.dumps({"text": "\n\n".join(paras[300 + k * 5:300 + (k + 1) * 5]), "id": k}) + "\n")
        if k == 10:
            f.write("   \n")  # blank line: skipped
open(os.path.join(c, "stdin.txt"), "w", encoding="utf-8").write("\n\n".join(paras[500:530]))
with open(os.path.join(c, "bad.jsonl"), "w") as f:
    f.write('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
with open(os.path.join(c, "notext.jsonl"), "w") as f:
    f.write('{"text": "fine"}\n{"title": "no text"}\n')
print(25 + 31 + 1, file=open(os.path.join(w, "ndocs"), "w"))
EOF
C=$W/corpus
NDOCS=$(cat "$W/ndocs")
run() {  # run OUTDIR THREADS [extra args]: the standard corpus
    local out=$1 th=$2; shift 2
    "$TOK" -o "$out" --prefix tiny --shard-tokens 3000 --threads "$th" "$@" "$C/dir" "$C/docs.jsonl" - < "$C/stdin.txt"
}
sums() { (cd "$1" && md5sum tiny_*.bin); }

# --help
help=$("$TOK" --help); rc=$?
echo "$help" | grep -q -- '--shard-tokens' && echo "$help" | grep -q -- '--resume' && echo "$help" | grep -q -- '--force' \
    && echo "$help" | grep -q -- '--threads' && echo "$help" | grep -q 'jsonl'
check "--help exits 0 and describes the options" $(( rc != 0 || $? != 0 )) "rc $rc"

# thread-count independence
for th in 1 2 3; do
    run "$W/out$th" $th > "$W/run$th.out" 2> "$W/run$th.err"
    check "runs with --threads $th" $? "$(tail -2 "$W/run$th.err")"
done
s1=$(sums "$W/out1"); s2=$(sums "$W/out2"); s3=$(sums "$W/out3")
[ "$s1" = "$s2" ] && [ "$s1" = "$s3" ]
check "shards byte-identical for 1, 2 and 3 threads" $? "$(diff <(echo "$s1") <(echo "$s2") | head -3)"
nshards=$(ls "$W/out1" | grep -c '^tiny_.*\.bin$')
[ "$nshards" -ge 4 ]; check "several shards written" $? "$nshards shards"
ls "$W"/out*/ | grep -q '\.tmp$'; check "no .tmp files left" $(( ! $? )) "$(ls "$W"/out*/ | grep tmp)"
grep -q "$NDOCS documents" "$W/run1.out"; check "summary counts $NDOCS documents" $? "$(cat "$W/run1.out")"

# the shards: names, headers, sizes, and the token stream's documents
"$TOK" -o "$W/single_first" --prefix s "$C/dir/a-1.txt" > /dev/null 2>&1
"$TOK" -o "$W/single_same" --prefix s "$C/same.txt" > /dev/null 2>&1
"$TOK" -o "$W/single_stdin" --prefix s - < "$C/stdin.txt" > /dev/null 2>&1
/usr/bin/python3 - "$W" "$NDOCS" <<'EOF'
import glob, os, struct, sys
w, ndocs = sys.argv[1], int(sys.argv[2])
def report(name, cond, detail):
    global failed
    print(("ok - %s" % name) if cond else ("FAIL - %s: %s" % (name, detail)))
    failed |= not cond
failed = False
def read(path):
    b = open(path, "rb").read()
    magic, version, n = struct.unpack("<3i", b[:12])
    toks = list(struct.unpack("<%dH" % ((len(b) - 1024) // 2), b[1024:]))
    return magic, version, n, len(b), toks
out = os.path.join(w, "out1")
files = sorted(os.listdir(out), key=lambda f: f[-10:])  # by shard index
want = ["tiny_val_000000.bin"] + ["tiny_train_%06d.bin" % k for k in range(1, len(files))]
report("shard 0 is tiny_val_000000.bin, then tiny_train_000001.bin ...", files == want, files)
stream, bad = [], []
for i, f in enumerate(files):
    magic, version, n, size, toks = read(os.path.join(out, f))
    full = i < len(files) - 1
    if magic != 20240520 or version != 1 or size != 1024 + 2 * n or (full and n != 3000) or not 0 < n <= 3000:
        bad.append((f, magic, version, n, size))
    stream += toks
report("every shard has a valid header, 3000 tokens but the last", not bad, bad)
report("the token stream starts with <|endoftext|>", stream[:1] == [50256], stream[:3])
report("one <|endoftext|> per document", stream.count(50256) == ndocs, "%d for %d docs" % (stream.count(50256), ndocs))
report("every token < 50257", max(stream) < 50257, max(stream))
starts = [i for i, t in enumerate(stream) if t == 50256] + [len(stream)]
docs = [stream[a:b] for a, b in zip(starts, starts[1:])]
single = lambda d: read(os.path.join(w, d, "s_val_000000.bin"))[4]
report("first document is the first file in sorted path order (dir/a-1.txt)",
       docs[0] == single("single_first"), "%s vs %s" % (docs[0][:5], single("single_first")[:5]))
report("a JSONL text tokenizes like the same text in a file", docs[25] == single("single_same"),
       "%s vs %s" % (docs[25][:8], single("single_same")[:8]))
report("stdin is the last document", docs[-1] == single("single_stdin"), "%s vs %s" % (docs[-1][:5], single("single_stdin")[:5]))
sys.exit(1 if failed else 0)
EOF
[ $? -eq 0 ] || fails=$((fails + 1))  # the python checks above print their own lines

# refusing to overwrite
before=$(sums "$W/out1")
run "$W/out1" 2 > /dev/null 2> "$W/refuse.err"; rc=$?
[ $rc -ne 0 ] && grep -q "tiny_val_000000.bin: exists" "$W/refuse.err" && grep -q -- "--force" "$W/refuse.err"
check "existing shards refused without --force, naming the file" $? "rc $rc: $(cat "$W/refuse.err")"
[ "$(sums "$W/out1")" = "$before" ]; check "refused run leaves the shards unchanged" $? "checksums changed"
run "$W/out1" 2 --force > /dev/null 2>&1; rc=$?
[ $rc -eq 0 ] && [ "$(sums "$W/out1")" = "$before" ]; check "--force rewrites to the same shards" $? "rc $rc"
touch "$W/out1/tiny_train_000099.bin"
run "$W/out1" 2 --force > /dev/null 2> "$W/stale.err"
[ ! -e "$W/out1/tiny_train_000099.bin" ] && grep -q "removed stale" "$W/stale.err"
check "--force removes stale higher shards" $? "$(cat "$W/stale.err" | tail -2)"

# resume: delete the last two shards and truncate the one before; complete ones are kept as they are
byindex() { ls "$1" | sort -t_ -k3; }
last=$(byindex "$W/out2" | tail -1); prev=$(byindex "$W/out2" | tail -2 | head -1); third=$(byindex "$W/out2" | tail -3 | head -1)
rm "$W/out2/$last" "$W/out2/$prev"
truncate -s 2000 "$W/out2/$third"
inode0=$(stat -c %i "$W/out2/tiny_val_000000.bin")
run "$W/out2" 2 --resume > "$W/resume.out" 2> "$W/resume.err"; rc=$?
check "--resume after an interruption succeeds" $rc "$(tail -2 "$W/resume.err")"
[ "$(sums "$W/out2")" = "$before" ]; check "resumed shards identical to an uninterrupted run" $? "checksums differ"
[ "$(stat -c %i "$W/out2/tiny_val_000000.bin")" = "$inode0" ] && grep -q "3 written, $((nshards - 3)) kept" "$W/resume.out"
check "resume keeps the complete shards without rewriting them" $? "$(cat "$W/resume.out")"
"$TOK" -o "$W/out2" --prefix tiny --shard-tokens 3000 --resume "$C/dir" > /dev/null 2> "$W/differ.err"; rc=$?
[ $rc -ne 0 ] && grep -q "tiny_.*differs" "$W/differ.err" && [ "$(sums "$W/out2")" = "$before" ]
check "resume with other input refused naming the differing shard" $? "rc $rc: $(cat "$W/differ.err")"

# bad input: message, non-zero exit, nothing written or overwritten
"$TOK" -o "$W/bad" --prefix tiny "$C/same.txt" "$C/bad.jsonl" > /dev/null 2> "$W/bad.err"; rc=$?
[ $rc -ne 0 ] && grep -q "bad.jsonl:3: invalid JSON" "$W/bad.err"
check "bad JSONL line refused naming file:line" $? "rc $rc: $(cat "$W/bad.err")"
[ -z "$(ls "$W/bad")" ]; check "bad input writes no shard" $? "$(ls "$W/bad")"
"$TOK" -o "$W/bad" --prefix tiny "$C/notext.jsonl" > /dev/null 2> "$W/notext.err"; rc=$?
[ $rc -ne 0 ] && grep -q 'notext.jsonl:2: expected an object with a string "text"' "$W/notext.err"
check "JSONL line without a text string refused naming file:line" $? "rc $rc: $(cat "$W/notext.err")"
"$TOK" -o "$W/out1" --prefix tiny --force "$C/dir" "$C/missing.txt" > /dev/null 2> "$W/missing.err"; rc=$?
[ $rc -ne 0 ] && grep -q "missing.txt: No such file" "$W/missing.err" && [ "$(sums "$W/out1")" = "$before" ]
check "missing input refused before anything is overwritten (even with --force)" $? "rc $rc: $(cat "$W/missing.err")"
"$TOK" -o "$W/x" --shard-tokens 0 "$C/same.txt" > /dev/null 2> "$W/usage.err"; rc=$?
[ $rc -eq 2 ] && grep -q -- "--shard-tokens 0" "$W/usage.err"
check "bad --shard-tokens is a usage error" $? "rc $rc: $(cat "$W/usage.err")"

echo "tokenize tests: $pass ok, $fails failed"
[ $fails -eq 0 ]
