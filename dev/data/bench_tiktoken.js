#!/usr/bin/env node
// npm tiktoken's GPT-2 encoder (WASM build of the Rust core) on one thread, for bench_tokenizer.
//   node dev/data/bench_tiktoken.js TEXT_FILE
// Same documents as bench_tokenizer.c (the text split on "\n\n", empty pieces dropped), each
// encoded with encode_ordinary. Prints "tokens=N single_s=S single_tok_s=R": best of 3 after a warm-up.
"use strict";
const fs = require("fs");
const { get_encoding } = require("tiktoken");

const docs = fs.readFileSync(process.argv[2], "utf8").split("\n\n").filter((d) => d.length > 0);
const enc = get_encoding("gpt2");

function encodeAll() {
  let total = 0;
  for (const d of docs) total += enc.encode_ordinary(d).length;
  return total;
}

encodeAll();
let best = Infinity, tokens = 0;
for (let r = 0; r < 3; r++) {
  const t0 = process.hrtime.bigint();
  tokens = encodeAll();
  const dt = Number(process.hrtime.bigint() - t0) / 1e9;
  if (dt < best) best = dt;
}
console.log(`tokens=${tokens} single_s=${best.toFixed(4)} single_tok_s=${Math.round(tokens / best)}`);
enc.free();
