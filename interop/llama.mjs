// Run a GGUF file in llama.cpp through node-llama-cpp (the prebuilt CPU binary; nothing is
// built or downloaded). Used by the tests and benchmarks of micro-transformer's GGUF export.
//
//   node interop/llama.mjs REQUEST.json      prints one JSON object on stdout
//
// REQUEST: {"model": "m.gguf", "prompts": ["..."], "max_tokens": 64, "threads": 1,
//           "bench": {"prompt": [ids], "tokens": 128, "repeats": 3, "batch": 1}}  (optional;
//           batch: that many sequences decoded in parallel in one context, default 1)
// RESULT:  {"tokens": [[ids]...]            prompt ids, special-token strings parsed,
//           "tokens_plain": [[ids]...]      prompt ids, special-token strings as text,
//           "greedy": [[ids]...]            up to max_tokens greedy ids after each prompt's
//                                           tokens, ending after an end-of-text token if any,
//           "bench": {"tokens_per_s": [..], "tokens": n, "batch": b,
//                     "eval_tokens_per_s": [..]}}
//           tokens_per_s: generated tokens (all sequences) / wall time of a repeat (prompt,
//           decoding and the node side, as a Node user sees it); eval_tokens_per_s: llama.cpp's
//           own timer for the one-token decode calls of a repeat (its `eval time` line;
//           batch 1 only, since it counts a batched decode call as prompt evaluation).
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const threads = request.threads ?? 1;
const batch = request.bench?.batch ?? 1;
const perfLines = []; // llama.cpp's timing lines (printTimings), kept off stdout
const logger = (level, message) => {
  if (message.includes("llama_perf_context_print")) perfLines.push(message);
  else if (level === LlamaLogLevel.error || level === LlamaLogLevel.fatal) {
    process.stderr.write(message + "\n");
  }
};
const llama = await getLlama({
  gpu: false, build: "never", logger,
  logLevel: request.bench ? LlamaLogLevel.info : LlamaLogLevel.error,
});
const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
// Best settings for 2-3M-parameter models on a small CPU: no flash attention, f32 KV cache.
const contextOptions = {
  contextSize: model.trainContextSize, batchSize: model.trainContextSize, threads,
  flashAttention: false, experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
};
const context = await model.createContext({
  ...contextOptions, sequences: Math.max(1, batch), performanceTracking: Boolean(request.bench),
});

async function greedy(promptIds, count, stopAtEog = true) {
  // Up to `count` tokens after `promptIds`, temperature 0 (argmax), from an empty sequence.
  // With `stopAtEog` it ends after an end-of-text token (included), as `microtransformer
  // generate` does; without, it always runs `count` tokens (for timing).
  const sequence = context.getSequence();
  const out = [];
  try {
    if (count > 0) {
      const options = { temperature: 0, yieldEogToken: true };
      for await (const token of sequence.evaluate(promptIds, options)) {
        out.push(token);
        if (out.length >= count || (stopAtEog && model.isEogToken(token))) break;
      }
    }
  } finally {
    sequence.dispose();
  }
  return out;
}

const result = { tokens: [], tokens_plain: [], greedy: [] };
for (const prompt of request.prompts ?? []) {
  const ids = Array.from(model.tokenize(prompt, true));
  result.tokens.push(ids);
  result.tokens_plain.push(Array.from(model.tokenize(prompt, false)));
  result.greedy.push(await greedy(ids, request.max_tokens ?? 0));
}
async function evalTimer() {
  // llama.cpp's cumulative one-token decode time and calls ("eval time = X ms / N runs")
  perfLines.length = 0;
  await context.printTimings();
  for (const line of perfLines) {
    const m = /\beval time =\s*([\d.]+) ms \/\s*(\d+) runs/.exec(line);
    if (m && !line.includes("prompt eval")) return { ms: Number(m[1]), runs: Number(m[2]) };
  }
  return null;
}

if (request.bench) {
  const { prompt, tokens, repeats } = request.bench;
  const all = () => Promise.all(Array.from({ length: batch }, () => greedy(prompt, tokens, false)));
  await Promise.all(Array.from({ length: batch }, () => greedy(prompt, Math.min(8, tokens), false)));
  result.bench = { tokens, batch, tokens_per_s: [], eval_tokens_per_s: [] };
  for (let r = 0; r < (repeats ?? 3); r++) {
    const before = await evalTimer();
    const start = performance.now();
    const got = await all();
    const seconds = (performance.now() - start) / 1000;
    const after = await evalTimer();
    result.bench.tokens_per_s.push(got.reduce((n, g) => n + g.length, 0) / seconds);
    if (batch === 1 && before && after && after.ms > before.ms) {
      result.bench.eval_tokens_per_s.push((after.runs - before.runs) / ((after.ms - before.ms) / 1000));
    }
  }
}
await context.dispose();
await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify(result) + "\n");
