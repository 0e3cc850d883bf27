// N greedy sequences decoded concurrently in llama.cpp through node-llama-cpp's batched API
// (one context with `sequences: N`; the N evaluations queued together are decoded in the same
// llama.cpp batches), timed: the llama.cpp column of benchmarks/serve.py.
//
//   node interop/llama_parallel.mjs REQUEST.json      prints one JSON object on stdout
//
// REQUEST: {"model": "m.gguf", "prompt": [ids], "sequences": 32, "tokens": 64,
//           "repeats": 3, "threads": 1}
// RESULT:  {"sequences": N, "tokens": M, "threads": T, "context_size": per-sequence cells,
//           "runs": [{"wall_s", "tokens_per_s" (all tokens / wall), "ttft_ms": [per sequence],
//                     "generated": [tokens per sequence]}, ...],
//           "tokens_out": [[ids] per sequence]   (the last run's greedy tokens)}
// Every sequence starts from the same prompt ids and runs exactly `tokens` greedy tokens
// (temperature 0; end-of-text does not stop it), as the server benchmark's requests do
// (`ignore_eos`). A warm-up round of 8 tokens per sequence runs first, untimed.
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const n = request.sequences ?? 1;
const count = request.tokens ?? 64;
const threads = request.threads ?? 1;
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
// The settings of llama.mjs (no flash attention, f32 KV cache), with N sequences of the
// model's whole context each.
const context = await model.createContext({
  contextSize: model.trainContextSize, batchSize: model.trainContextSize, sequences: n, threads,
  flashAttention: false, experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
});
const prompt = request.prompt;
const sequences = Array.from({ length: n }, () => context.getSequence());
let lastTokens = [];

async function one(sequence, tokens, start) {
  // `tokens` greedy tokens after the prompt on `sequence`; the time its first token came.
  let ttft = null;
  const ids = [];
  const options = { temperature: 0, yieldEogToken: true };
  for await (const token of sequence.evaluate(prompt, options)) {
    if (ttft === null) ttft = performance.now() - start;
    ids.push(token);
    if (ids.length >= tokens) break;
  }
  return { ttft, got: ids.length, ids };
}

async function round(tokens) {
  // All N sequences at once, each from an empty history: their evaluations are queued in
  // the same tick and batched.
  await Promise.all(sequences.map((s) => s.clearHistory()));
  const start = performance.now();
  const results = await Promise.all(sequences.map((s) => one(s, tokens, start)));
  const wall = (performance.now() - start) / 1000;
  const total = results.reduce((a, r) => a + r.got, 0);
  lastTokens = results.map((r) => r.ids);
  return { wall_s: wall, tokens_per_s: total / wall, ttft_ms: results.map((r) => r.ttft),
           generated: results.map((r) => r.got) };
}

await round(Math.min(8, count)); // warm-up
const result = { sequences: n, tokens: count, threads, context_size: context.contextSize,
                 runs: [] };
for (let r = 0; r < (request.repeats ?? 3); r++) result.runs.push(await round(count));
result.tokens_out = lastTokens;
for (const s of sequences) s.dispose();
await context.dispose();
await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify(result) + "\n");
