#!/usr/bin/env bash
# End-to-end tests of the tokenize tool (dev/data/tokenize.c) on a small generated corpus: a directory
# of text files, a JSONL file and stdin, cut into shards of 3000 tokens so that several appear; then
# interrupted runs and their reruns, and the JSONL parser (escapes, surrogates, errors).
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
run() {  # run OUTDIR THREADS [extra args]: the standard corpus, shards of $SHARD (default 3000) tokens
    local out=$1 th=$2; shift 2
    "$TOK" -o "$out" --prefix tiny --shard-tokens "${SHARD:-3000}" --threads "$th" "$@" "$C/dir" "$C/docs.jsonl" - \
        < "${STDIN:-$C/stdin.txt}"
}
sums() { (cd "$1" && md5sum "${2:-tiny}"_*.bin); }  # sums OUTDIR [PREFIX]

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
files = sorted((f for f in os.listdir(out) if f.endswith(".bin")), key=lambda f: f[-10:])  # by shard index
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
[ $rc -ne 0 ] && grep -q "holds the finished run" "$W/refuse.err" && grep -q -- "--force" "$W/refuse.err"
check "a finished output is refused without --force" $? "rc $rc: $(cat "$W/refuse.err")"
[ "$(sums "$W/out1")" = "$before" ]; check "refused run leaves the shards unchanged" $? "checksums changed"
run "$W/out1" 2 --resume > "$W/done.out" 2>&1; rc=$?
[ $rc -eq 0 ] && grep -q "already complete" "$W/done.out" && [ "$(sums "$W/out1")" = "$before" ]
check "--resume of a finished output does nothing and succeeds" $? "rc $rc: $(cat "$W/done.out")"
run "$W/out1" 2 --force > /dev/null 2>&1; rc=$?
[ $rc -eq 0 ] && [ "$(sums "$W/out1")" = "$before" ]; check "--force rewrites to the same shards" $? "rc $rc"
touch "$W/out1/tiny_train_000099.bin"
run "$W/out1" 2 --force > /dev/null 2> "$W/stale.err"
[ ! -e "$W/out1/tiny_train_000099.bin" ] && grep -q "removed stale" "$W/stale.err"
check "--force removes stale higher shards" $? "$(cat "$W/stale.err" | tail -2)"
mkdir -p "$W/foreign"; cp "$W/out1/tiny_val_000000.bin" "$W/foreign/"
run "$W/foreign" 2 > /dev/null 2> "$W/foreign.err"; rc=$?
[ $rc -ne 0 ] && grep -q "tiny_val_000000.bin: exists" "$W/foreign.err" && grep -q -- "--force" "$W/foreign.err"
check "shards without a manifest are refused without --force, naming the file" $? "rc $rc: $(cat "$W/foreign.err")"

# Interrupted runs: --max-shards K stops once K shards are complete, which leaves the output as an
# interruption there would. The plain rerun must continue it to exactly the uninterrupted shards, at
# every shard boundary of the corpus (shards of 2000 tokens: cuts inside text files, JSONL lines
# and stdin).
export SHARD=2000
run "$W/ref" 2 > /dev/null 2>&1
ref=$(sums "$W/ref"); nref=$(ls "$W/ref" | grep -c '\.bin$')
bad=""
for k in $(seq 1 $((nref - 1))); do
    o=$W/cut$k
    run "$o" 2 --max-shards $k > "$o.stop" 2>&1 || bad="$bad $k:stop-rc"
    [ "$(ls "$o" | grep -c '\.bin$')" = $k ] || bad="$bad $k:stop-count"
    cp "$o/tiny.tokenize.json" "$W/manifest$k.json"
    run "$o" $((k % 3 + 1)) > "$o.out" 2>&1 || bad="$bad $k:rerun-rc"
    [ "$(sums "$o")" = "$ref" ] || bad="$bad $k:differs"
    grep -q "($((nref - k)) written, $k kept)" "$o.out" || bad="$bad $k:summary"
done
[ -z "$bad" ]; check "rerun after stopping at each of the $((nref - 1)) shard boundaries equals the uninterrupted run" $? "$bad"
/usr/bin/python3 - "$W" $((nref - 1)) <<'PY'
import json, sys
w, n = sys.argv[1], int(sys.argv[2])
nxt = [json.load(open(f"{w}/manifest{k}.json"))["next"] for k in range(1, n + 1)]
kinds = {"text file": lambda x: x["file"] < 25, "JSONL": lambda x: x["file"] == 25, "stdin": lambda x: x["file"] == 26}
missing = [name for name, f in kinds.items() if not any(f(x) and x["skip_tokens"] > 1 for x in nxt)]
ok = not missing and any(x["file"] == 25 and x["offset"] > 0 and x["line"] > 0 for x in nxt)
print(("ok - %s" if ok else "FAIL - %s: " + str(missing)) % "the cuts include documents split in a text file, a JSONL line (mid-file) and stdin")
sys.exit(0 if ok else 1)
PY
[ $? -eq 0 ] || fails=$((fails + 1))
k=2; o=$W/cut$k
rm -rf "$o"; run "$o" 2 --max-shards $k > /dev/null 2>&1
inodes=$(stat -c %i "$o/tiny_val_000000.bin" "$o/tiny_train_000001.bin")
run "$o" 2 > /dev/null 2>&1
[ "$(stat -c %i "$o/tiny_val_000000.bin" "$o/tiny_train_000001.bin")" = "$inodes" ]
check "the rerun keeps the complete shards without rewriting them" $? "inodes changed"

unfinished() {  # unfinished OUTDIR: the standard run (2000-token shards) stopped after 3 shards
    rm -rf "$1"; run "$1" 2 --max-shards 3 > /dev/null 2>&1; cp "$1/tiny.tokenize.json" "$W/m.json"
}
unchanged() {  # unchanged OUTDIR: still the 3 shards and the manifest that unfinished left
    local f
    [ "$(ls "$1" | grep -c '\.bin$')" = 3 ] && cmp -s "$1/tiny.tokenize.json" "$W/m.json" || return 1
    for f in "$1"/tiny_*.bin; do cmp -s "$f" "$W/ref/${f##*/}" || return 1; done
}
o=$W/unf
unfinished "$o"
"$TOK" -o "$o" --prefix tiny --shard-tokens 2000 "$C/dir" > /dev/null 2> "$W/other.err"; rc=$?
[ $rc -ne 0 ] && grep -q "unfinished run" "$W/other.err" && grep -q "inputs" "$W/other.err" && grep -q -- "--force" "$W/other.err" && unchanged "$o"
check "an unfinished run of other inputs is refused (and left as it was)" $? "rc $rc: $(cat "$W/other.err")"
SHARD=800 run "$o" 2 > /dev/null 2> "$W/other.err"; rc=$?
[ $rc -ne 0 ] && grep -q -- "--shard-tokens 800, the existing run's is 2000" "$W/other.err" && unchanged "$o"
check "an unfinished run with other --shard-tokens is refused" $? "rc $rc: $(cat "$W/other.err")"
echo "other text" > "$W/stdin2.txt"
STDIN=$W/stdin2.txt run "$o" 2 > /dev/null 2> "$W/other.err"; rc=$?
[ $rc -ne 0 ] && grep -q "changed since" "$W/other.err" && unchanged "$o"
check "an unfinished run of another stdin is refused" $? "rc $rc: $(cat "$W/other.err")"
run "$o" 1 --resume > /dev/null 2>&1; rc=$?
[ $rc -eq 0 ] && [ "$(sums "$o")" = "$ref" ]; check "--resume continues an unfinished run too" $? "rc $rc"
unfinished "$o"
echo junk > "$o/tiny_train_000003.bin.tmp"
cp "$W/ref/tiny_train_000001.bin" "$o/tiny_train_000004.bin"   # complete-looking, but not recorded
run "$o" 2 > /dev/null 2>&1; rc=$?
[ $rc -eq 0 ] && [ "$(sums "$o")" = "$ref" ] && ! ls "$o" | grep -q tmp
check "the rerun replaces a partial .tmp and an unrecorded shard" $? "rc $rc"
unfinished "$o"
rm "$o/tiny_train_000001.bin"
run "$o" 2 > /dev/null 2> "$W/missing1.err"; rc=$?
[ $rc -ne 0 ] && grep -q "tiny_train_000001.bin.*records it complete" "$W/missing1.err"
check "a missing complete shard is refused naming it" $? "rc $rc: $(cat "$W/missing1.err")"
run "$o" 2 --force > /dev/null 2>&1; rc=$?
[ $rc -eq 0 ] && [ "$(sums "$o")" = "$ref" ]; check "--force starts an unfinished run over" $? "rc $rc"
unfinished "$o"
touch -d "2001-02-03 04:05" "$C/dir/b/03.txt"
run "$o" 2 > /dev/null 2> "$W/other.err"; rc=$?
[ $rc -ne 0 ] && grep -q "changed since" "$W/other.err" && unchanged "$o"
check "an unfinished run whose input file changed is refused" $? "rc $rc: $(cat "$W/other.err")"
unset SHARD

# A shard that ends exactly where a document ends: 3 documents of 100 tokens (EOT + 99 times " a"),
# as text files and as JSONL lines, in shards of 100.
mkdir -p "$W/exact"
for i in 1 2 3; do printf ' a%.0s' $(seq 99) > "$W/exact/$i.txt"; printf '{"text": "%s"}\n' "$(cat "$W/exact/1.txt")"; done > "$W/exact.jsonl"
for src in "$W/exact" "$W/exact.jsonl"; do
    "$TOK" -o "$W/exact_ref" --prefix e --force --shard-tokens 100 "$src" > /dev/null 2>&1
    rm -rf "$W/exact_cut"
    "$TOK" -o "$W/exact_cut" --prefix e --shard-tokens 100 --max-shards 1 "$src" > /dev/null 2>&1
    "$TOK" -o "$W/exact_cut" --prefix e --shard-tokens 100 "$src" > "$W/exact.out" 2>&1; rc=$?
    n=$(ls "$W/exact_ref" | grep -c '\.bin$')
    [ $rc -eq 0 ] && [ $n = 3 ] && [ "$(sums "$W/exact_ref" e)" = "$(sums "$W/exact_cut" e)" ] \
        && grep -q "3 documents, 300 tokens, 3 shards (2 written, 1 kept)" "$W/exact.out"
    check "rerun after a shard that ends with a document (${src##*/})" $? "rc $rc, $n shards: $(cat "$W/exact.out")"
done
# --max-shards stops cleanly even when a bad line follows in the same chunk; the rerun reports it
{ head -2 "$W/exact.jsonl"; echo '{"text": broken'; } > "$W/exact_bad.jsonl"
rm -rf "$W/exact_bad"
"$TOK" -o "$W/exact_bad" --prefix e --shard-tokens 100 --max-shards 1 "$W/exact_bad.jsonl" > "$W/exact_bad.out" 2>&1; rc=$?
[ $rc -eq 0 ] && grep -q "stopped after 1 shards" "$W/exact_bad.out"
check "--max-shards stops before a bad line in the same chunk" $? "rc $rc: $(cat "$W/exact_bad.out")"
"$TOK" -o "$W/exact_bad" --prefix e --shard-tokens 100 "$W/exact_bad.jsonl" > "$W/exact_bad.out" 2>&1; rc=$?
[ $rc -ne 0 ] && grep -q "exact_bad.jsonl:3: invalid JSON" "$W/exact_bad.out" && [ "$(ls "$W/exact_bad" | grep -c '\.bin$')" = 2 ]
check "the rerun writes the complete shard before the bad line, then refuses it" $? "rc $rc: $(cat "$W/exact_bad.out")"

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

# JSONL parsing: each line's "text" as Python's json module reads it tokenizes like the same text
# given as a file. Where they could differ, the tool's rules: the first of duplicate keys (as cJSON
# takes it), and a surrogate that is not half of a pair becomes U+FFFD (what tiktoken encodes for it).
J=$W/json; mkdir -p "$J/txt"
/usr/bin/python3 - "$J" <<'EOF'
import json, sys
j = sys.argv[1]
lines = [
    r'{"text": "plain"}',
    r'{"text": "q\"b\\s\/f\bb\ff\nn\rr\tt"}',
    r'{"text": "\u00e9\u4E2D \uD83E\uDD16 Ünïcödé 🤖"}',
    r'{"text": "lone \ud800 high, lone \udc00 low, \ud800\u0041, \ud800\ud800\udc00, end \ud800"}',
    r'{"text": "nul \u0000 inside"}',
    r'{"id": -0, "meta": {"a": [1, 2.5e-3, -1E+2, 0.0, true, false, null, {"x": "y"}, []], "b": "\"text\""}, "text": "after nested"}',
    r'{"a": {"text": "nested, not it"}, "te\u0078t": "escaped key"}',
    '  {  "text"  :  "spaces"  ,"z":{}}  \r',
    r'{"text": "first", "text": "second"}',
    r'{"text": ""}',
    '{"text": "raw\ttab and raw \x01 control"}',
]
def first_wins(pairs):
    d = {}
    for k, v in pairs:
        d.setdefault(k, v)
    return d
with open(f"{j}/lines.jsonl", "w", encoding="utf-8") as f:
    for i, line in enumerate(lines):
        f.write(line + "\n")
        t = json.loads(line, strict=False, object_pairs_hook=first_wins)["text"]
        t = t.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # tiktoken's treatment
        open(f"{j}/txt/{i:02d}.txt", "wb").write(t.encode("utf-8"))
bad = [r'{"text": "a" "b"}', r'{"text": "\x"}', r'{"text": "abc', r'{"text": 01}', r'{"text": "a"} x',
       r'{"a": 1,}', r'{"text": "\u12"}', r'{"text": nul}', '{"text": "a"}}', '{"text": "a", }', '{', '[1,]']
for i, line in enumerate(bad):
    open(f"{j}/bad{i:02d}.jsonl", "w").write('{"text": "ok"}\n' + line + "\n")
notext = ['[1]', '"text"', '{"text": 5}', '{"Text": "x"}', '{}', '{"text": null, "text": "second"}']
for i, line in enumerate(notext):
    open(f"{j}/notext{i}.jsonl", "w").write('{"text": "ok"}\n' + line + "\n")
# a JSONL file larger than the tool's 256 KiB chunks; the same with CRLF, blank lines and no final
# newline; and with a bad line far in
paras = [p for p in open("data/tinyshakespeare.txt", encoding="utf-8").read().split("\n\n") if p]
docs = [json.dumps({"text": paras[i % len(paras)], "n": i}) for i in range(6000)]
open(f"{j}/big.jsonl", "w").write("\n".join(docs) + "\n")
open(f"{j}/big_crlf.jsonl", "w", newline="").write(
    "\r\n".join(d + ("\r\n \t" if i % 97 == 0 else "") for i, d in enumerate(docs)))
docs[4320] = docs[4320][:-1]
open(f"{j}/bigbad.jsonl", "w").write("\n".join(docs) + "\n")
EOF
"$TOK" -o "$J/a" --prefix j "$J/lines.jsonl" > /dev/null 2>&1 && "$TOK" -o "$J/b" --prefix j "$J/txt" > /dev/null 2>&1
cmp -s "$J/a/j_val_000000.bin" "$J/b/j_val_000000.bin"
check "JSONL escapes, surrogates, nesting, key escapes and whitespace decode as Python's json reads them" $? \
    "$(cmp "$J/a/j_val_000000.bin" "$J/b/j_val_000000.bin" 2>&1)"
bad=""
for f in "$J"/bad*.jsonl; do
    "$TOK" -o "$J/x" --prefix j --force "$f" > /dev/null 2> "$J/err" && bad="$bad ${f##*/}:accepted"
    grep -q "${f##*/}:2: invalid JSON at column" "$J/err" || bad="$bad ${f##*/}: $(cat "$J/err")"
done
[ -z "$bad" ]; check "invalid JSON lines refused as FILE:LINE: invalid JSON" $? "$bad"
"$TOK" -o "$J/x" --prefix j --force "$J/bad02.jsonl" > /dev/null 2> "$J/err"
grep -q "bad02.jsonl:2: invalid JSON at column 14" "$J/err"
check "the column of a JSON error (an unterminated string: the line's end)" $? "$(cat "$J/err")"
bad=""
for f in "$J"/notext*.jsonl; do
    "$TOK" -o "$J/x" --prefix j --force "$f" > /dev/null 2> "$J/err" && bad="$bad ${f##*/}:accepted"
    grep -q "${f##*/}:2: expected an object with a string \"text\"" "$J/err" || bad="$bad ${f##*/}: $(cat "$J/err")"
done
[ -z "$bad" ]; check "valid JSON without a top-level string \"text\" (the first such key) refused" $? "$bad"
for th in 1 2; do "$TOK" -o "$J/big$th" --prefix j --threads $th "$J/big.jsonl" > /dev/null 2>&1; done
"$TOK" -o "$J/crlf" --prefix j "$J/big_crlf.jsonl" > /dev/null 2>&1
cmp -s "$J/big1/j_val_000000.bin" "$J/big2/j_val_000000.bin" && cmp -s "$J/big1/j_val_000000.bin" "$J/crlf/j_val_000000.bin"
check "a JSONL file of several chunks: the same shards with CRLF, blank lines and no final newline" $? "shards differ"
"$TOK" -o "$J/bad" --prefix j --shard-tokens 20000 --threads 2 "$J/bigbad.jsonl" > /dev/null 2> "$J/err"; rc=$?
nbad=$(ls "$J/bad" | grep -c '\.bin$')
[ $rc -ne 0 ] && grep -q "bigbad.jsonl:4321: invalid JSON" "$J/err" && [ "$nbad" -ge 2 ] && ! ls "$J/bad" | grep -q tmp
check "a bad line far into a large JSONL: its line number; the complete shards before it kept" $? "rc $rc, $nbad shards: $(cat "$J/err")"
rm -rf "$J/bad"
"$TOK" -o "$J/bad" --prefix j --shard-tokens 20000 --max-shards 1 "$J/bigbad.jsonl" > /dev/null 2>&1
"$TOK" -o "$J/bad" --prefix j --shard-tokens 20000 "$J/bigbad.jsonl" > /dev/null 2> "$J/err"
grep -q "bigbad.jsonl:4321: invalid JSON" "$J/err"; check "line numbers stay right in a continued run" $? "$(cat "$J/err")"

echo "tokenize tests: $pass ok, $fails failed"
[ $fails -eq 0 ]
