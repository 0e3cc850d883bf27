// The page's generator: the exported ONNX model in ONNX Runtime Web (WebAssembly, files shipped
// beside this script), the run's tokenizer in tokenizer.js, sampling as `microtransformer
// generate` does it (temperature 0 = greedy, then top-k, then top-p). Everything is a static
// file; no server code runs.
//
// URL parameters fill the form: ?prompt=…&max_tokens=…&temperature=…&top_k=…&top_p=…&seed=…
// and &autorun=1 starts generating once the model is loaded. The text goes to #output, which
// gets data-done="1" when generation ends; #stats shows tokens per second.
import * as ort from "./ort/ort.wasm.min.mjs";
import { Tokenizer } from "./tokenizer.js";

const $ = (id) => document.getElementById(id);
const FIELDS = ["temperature", "top_k", "top_p", "max_tokens", "seed"];
const REPLACEMENT = "\ufffd";
const UI_EVERY_MS = 30; // hand the page a frame this often while generating

let session = null;
let tokenizer = null;
let info = null;
let stopRequested = false;

// A small seeded generator (mulberry32): the same seed gives the same samples in this page.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

// The next token from last-position logits (Float32Array, V): greedy at temperature 0, else
// softmax(logits / temperature) restricted to the top-k, then to the top-p nucleus.
function sample(logits, { temperature, topK, topP }, random) {
  if (temperature === 0) return argmax(logits);
  let order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
  if (topK > 0 && topK < order.length) order = order.slice(0, topK);
  const top = logits[order[0]];
  let probs = order.map((i) => Math.exp((logits[i] - top) / temperature));
  let total = probs.reduce((s, p) => s + p, 0);
  probs = probs.map((p) => p / total);
  if (topP < 1) {
    let cum = 0;
    let keep = 0;
    while (keep < probs.length && (keep === 0 || cum < topP)) cum += probs[keep++];
    order = order.slice(0, keep);
    probs = probs.slice(0, keep);
    total = probs.reduce((s, p) => s + p, 0);
    probs = probs.map((p) => p / total);
  }
  let r = random();
  for (let i = 0; i < probs.length; i++) {
    r -= probs[i];
    if (r < 0) return order[i];
  }
  return order[order.length - 1];
}

function readSettings() {
  const num = (id, fallback) => {
    const v = $(id).value.trim();
    return v === "" ? fallback : Number(v);
  };
  const settings = {
    prompt: $("prompt").value,
    temperature: num("temperature", 0.8),
    topK: Math.trunc(num("top_k", 0)),
    topP: num("top_p", 1),
    maxTokens: Math.trunc(num("max_tokens", 200)),
    seed: $("seed").value.trim() === "" ? null : Math.trunc(Number($("seed").value)),
  };
  const bad = [];
  if (!(settings.temperature >= 0)) bad.push("temperature must be >= 0");
  if (!(settings.topK >= 0)) bad.push("top-k must be >= 0");
  if (!(settings.topP > 0 && settings.topP <= 1)) bad.push("top-p must be in (0, 1]");
  if (!(settings.maxTokens >= 1)) bad.push("max tokens must be >= 1");
  if (settings.seed !== null && !Number.isFinite(settings.seed)) bad.push("seed must be a number");
  if (bad.length) throw new Error(bad.join("; "));
  return settings;
}

function shareLink() {
  const params = new URLSearchParams();
  params.set("prompt", $("prompt").value);
  for (const f of FIELDS) if ($(f).value.trim() !== "") params.set(f, $(f).value.trim());
  params.set("autorun", "1");
  const url = new URL(location.href);
  url.search = params.toString();
  $("share").href = url.href;
}

// Decoding with a KV cache: `present` of one step is `past` of the next. Past max_seq_len the
// context slides: every step runs the last max_seq_len tokens from an empty cache, as
// `microtransformer generate` recomputes its window.
function emptyPast() {
  return new ort.Tensor("float32", new Float32Array(0),
                        [info.num_layers, 2, 1, info.num_heads, 0, info.head_dim]);
}

async function step(tokens, past) {
  const input = new ort.Tensor("int64", BigInt64Array.from(tokens, (x) => BigInt(x)),
                               [1, tokens.length]);
  const out = await session.run({ input_ids: input, past });
  return [out.logits.data, out.present]; // Float32Array (V): the last position's logits
}

async function nextLogits(ids, state) {
  const cached = state.past ? state.past.dims[4] : 0;
  if (ids.length > info.max_seq_len) { // the window slides: no cache can be reused
    const [logits] = await step(ids.slice(-info.max_seq_len), emptyPast());
    state.past = null;
    return logits;
  }
  const [logits, present] = await step(ids.slice(cached), state.past ?? emptyPast());
  state.past = present;
  return logits;
}

async function generate() {
  const output = $("output");
  output.removeAttribute("data-done");
  $("error").textContent = "";
  $("stats").textContent = "";
  $("generate").disabled = true;
  $("stop").disabled = false;
  stopRequested = false;
  let count = 0;
  const start = performance.now();
  try {
    const s = readSettings();
    shareLink();
    const promptIds = s.prompt ? tokenizer.encode(s.prompt) : [];
    if (promptIds.length > info.max_seq_len) {
      throw new Error(`the prompt is ${promptIds.length} tokens but the model's context is `
                      + `${info.max_seq_len}; shorten it`);
    }
    const ids = promptIds.length ? [...promptIds] : [info.eos_token_id];
    const generated = [];
    const random = rng(s.seed ?? Math.floor(Math.random() * 2 ** 32));
    output.textContent = tokenizer.decode(promptIds);
    let lastUi = performance.now();
    let firstToken = null;
    const state = { past: null };
    while (count < s.maxTokens && !stopRequested) {
      const next = sample(await nextLogits(ids, state), s, random);
      ids.push(next);
      generated.push(next);
      count++;
      if (firstToken === null) firstToken = performance.now() - start;
      // trailing U+FFFD: a character split over tokens, shown once the next token completes it
      output.textContent = tokenizer.decode([...promptIds, ...generated])
        .replace(new RegExp(REPLACEMENT + "+$"), "");
      if (next === info.eos_token_id) break;
      if (performance.now() - lastUi > UI_EVERY_MS) {
        const secs = (performance.now() - start) / 1000;
        $("stats").textContent = `${count} tokens, ${(count / secs).toFixed(1)} tokens/s`;
        await new Promise((resolve) => setTimeout(resolve, 0));
        lastUi = performance.now();
      }
    }
    output.textContent = tokenizer.decode([...promptIds, ...generated]);
    const secs = (performance.now() - start) / 1000;
    const rate = count / secs;
    $("stats").textContent = `${count} tokens in ${secs.toFixed(2)} s: ${rate.toFixed(1)} `
      + `tokens/s (first token after ${(firstToken ?? 0).toFixed(0)} ms)`
      + (stopRequested ? ", stopped" : "");
    $("stats").dataset.tokens = String(count);
    $("stats").dataset.tokensPerS = String(rate);
  } catch (err) {
    $("error").textContent = String(err.message ?? err);
  } finally {
    output.setAttribute("data-done", "1");
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

async function main() {
  const params = new URLSearchParams(location.search);
  if (params.has("prompt")) $("prompt").value = params.get("prompt");
  for (const f of FIELDS) if (params.has(f)) $(f).value = params.get(f);
  for (const el of [$("prompt"), ...FIELDS.map($)]) el.addEventListener("input", shareLink);
  shareLink();
  try {
    const [infoResp, tokResp] = await Promise.all([fetch("model.json"), fetch("tokenizer.json")]);
    info = await infoResp.json();
    tokenizer = new Tokenizer(await tokResp.json());
    ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
    ort.env.wasm.numThreads = Number(params.get("threads") ?? 1); // >1 needs cross-origin isolation
    session = await ort.InferenceSession.create("model.onnx", {
      executionProviders: ["wasm"], graphOptimizationLevel: "all",
    });
  } catch (err) {
    $("model-info").textContent = "could not load the model";
    $("error").textContent = String(err.message ?? err);
    $("output").setAttribute("data-done", "1");
    return;
  }
  $("model-info").textContent = `${info.name}: ${info.parameters.toLocaleString()} parameters, `
    + `${info.tokenizer} tokenizer, context ${info.max_seq_len} tokens; ONNX Runtime Web `
    + `${info.onnxruntime_web} (WebAssembly, ${ort.env.wasm.numThreads} thread)`;
  $("generate").disabled = false;
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => { stopRequested = true; });
  if (params.get("autorun") === "1") generate();
}

main();
