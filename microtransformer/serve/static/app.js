// micro-transformer playground: plain JavaScript, no build step, no network beyond this server.
// Talks to the OpenAI-style API documented in docs/SERVING.md: GET v1/models and a streamed
// POST v1/completions (server-sent events read from the fetch body, since EventSource cannot POST).
// Model output is only ever put into the page with textContent, never parsed as HTML.
"use strict";

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const SETTINGS_KEY = "microtransformer.playground.v1"; // prompt + sliders; never the API key
  const BINS = [0.05, 0.2, 0.5, 0.8]; // probability bin edges -> classes p0..p4 (see the legend)
  const SPECIAL = /^<\|[^|]*\|>$/; // special tokens such as <|endoftext|>: they decode to no text

  const el = {
    status: $("#status"), statusText: $("#status-text"),
    modelA: $("#model-a"), modelB: $("#model-b"), infoA: $("#info-a"), infoB: $("#info-b"),
    compare: $("#compare"), modelBGroup: $("#model-b-group"), labelA: $("#label-a"),
    prompt: $("#prompt"), generate: $("#generate"), stop: $("#stop"),
    seed: $("#seed"), dice: $("#dice"), apiKey: $("#api-key"),
    outputs: $("#outputs"), tooltip: $("#tooltip"),
  };
  const sliders = ["temperature", "top_k", "top_p", "max_tokens"].map((id) => $("#" + id));
  const columns = {
    a: makeColumn("a", "Generated text appears here, each token coloured by its probability. " +
      "Hover or focus a token to see the alternatives."),
    b: makeColumn("b", "The same prompt and settings, streamed from the second model."),
  };
  let models = [];
  let running = null; // {controller} while a generation runs

  // ---------- small helpers ----------

  function formatSlider(input) {
    const v = Number(input.value);
    switch (input.id) {
      case "temperature": return v === 0 ? "0 · greedy" : v.toFixed(2);
      case "top_k": return v === 0 ? "off" : String(v);
      case "top_p": return v >= 1 ? "1 · off" : v.toFixed(2);
      default: return String(v);
    }
  }

  function formatCount(n) {
    if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(n >= 1e5 ? 0 : 1) + "k";
    return String(n);
  }

  // Visible form of a token for the tooltip: whitespace and control characters made readable.
  function showToken(s) {
    if (s === "") return "∅";
    return s.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/\r/g, "␍")
      .replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/g,
        (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
  }

  function probClass(p) {
    let i = 0;
    while (i < BINS.length && p >= BINS[i]) i++;
    return "p" + i;
  }

  function pct(p) {
    if (p >= 0.1) return (p * 100).toFixed(1) + "%";
    if (p >= 0.001) return (p * 100).toFixed(2) + "%";
    return p > 0 ? "<0.1%" : "0%";
  }

  function authHeaders() {
    const key = el.apiKey.value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // The message of an OpenAI-shaped error body, or a fallback naming the HTTP status.
  async function errorFrom(response) {
    let text = "";
    try { text = await response.text(); } catch (_) { /* body unreadable */ }
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error;
      if (body && body.detail) return { message: String(body.detail) };
    } catch (_) { /* not JSON */ }
    return { message: `HTTP ${response.status} ${response.statusText}` + (text ? `: ${text.slice(0, 300)}` : "") };
  }

  function setStatus(kind, text) {
    el.status.dataset.kind = kind;
    el.statusText.textContent = text;
    el.statusText.title = text;
  }

  // ---------- settings ----------

  function saveSettings() {
    const s = { prompt: el.prompt.value, seed: el.seed.value, compare: el.compare.checked,
      modelA: el.modelA.value, modelB: el.modelB.value };
    for (const input of sliders) s[input.id] = input.value;
    try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(s)); } catch (_) { /* private mode */ }
  }

  function loadSettings() {
    let s = null;
    try { s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "null"); } catch (_) { s = null; }
    if (!s) return {};
    if (typeof s.prompt === "string") el.prompt.value = s.prompt;
    if (typeof s.seed === "string") el.seed.value = s.seed;
    el.compare.checked = !!s.compare;
    for (const input of sliders) if (s[input.id] !== undefined) input.value = s[input.id];
    return s;
  }

  // ---------- models ----------

  function describeModel(m) {
    if (!m) return "";
    const parts = [];
    if (typeof m.parameters === "number") parts.push(formatCount(m.parameters) + " params");
    if (m.max_model_len) parts.push("context " + m.max_model_len);
    if (m.tokenizer) parts.push(m.tokenizer + " tokenizer");
    if (typeof m.best_val_loss === "number") parts.push("val loss " + m.best_val_loss.toFixed(3));
    if (typeof m.bits_per_byte === "number") parts.push(m.bits_per_byte.toFixed(3) + " bits/byte");
    return parts.join(" · ");
  }

  function fillSelect(select, preferred) {
    select.replaceChildren();
    for (const m of models) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id;
      select.append(opt);
    }
    if (preferred && models.some((m) => m.id === preferred)) select.value = preferred;
  }

  function updateModelInfo() {
    const find = (id) => models.find((m) => m.id === id);
    el.infoA.textContent = describeModel(find(el.modelA.value));
    el.infoB.textContent = describeModel(find(el.modelB.value));
    const chosen = [find(el.modelA.value)].concat(el.compare.checked ? [find(el.modelB.value)] : []);
    const lens = chosen.filter((m) => m && m.max_model_len).map((m) => m.max_model_len);
    if (lens.length) {
      const maxTokens = $("#max_tokens");
      maxTokens.max = String(Math.max(...lens));
      $("#max_tokens-out").textContent = formatSlider(maxTokens);
    }
    columns.a.title.textContent = el.modelA.value || "—";
    columns.b.title.textContent = el.modelB.value || "—";
  }

  async function loadModels(saved) {
    setStatus("busy", "loading models…");
    let response;
    try {
      response = await fetch("v1/models", { headers: authHeaders() });
    } catch (err) {
      setStatus("error", "server unreachable: " + err.message);
      return;
    }
    if (!response.ok) {
      const error = await errorFrom(response);
      setStatus("error", response.status === 401 ? "API key needed: " + error.message : error.message);
      if (response.status === 401) {
        $("details.auth").open = true;
        el.apiKey.focus();
      }
      return;
    }
    const body = await response.json();
    models = Array.isArray(body.data) ? body.data : [];
    fillSelect(el.modelA, saved.modelA);
    fillSelect(el.modelB, saved.modelB);
    if (!saved.modelB && models.length > 1) el.modelB.value = models[1].id;
    updateModelInfo();
    setStatus(models.length ? "ok" : "error",
      models.length ? `${models.length} model${models.length > 1 ? "s" : ""} ready` : "no models served");
  }

  // ---------- output columns ----------

  // An output column (#col-a, #col-b) from the page's template.
  function makeColumn(name, placeholder) {
    const root = $("#column-template").content.firstElementChild.cloneNode(true);
    root.id = "col-" + name;
    root.setAttribute("aria-label", "Output " + name.toUpperCase());
    $(".ab", root).textContent = name.toUpperCase();
    $(".placeholder", root).textContent = placeholder;
    $("#outputs").append(root);
    return {
      root,
      title: $(".col-model", root),
      text: $(".text", root),
      error: $(".error", root),
      note: $(".note", root),
      ttft: $(".stat-ttft", root), tps: $(".stat-tps", root),
      tokens: $(".stat-tokens", root), finish: $(".stat-finish", root),
      copy: $(".copy", root),
      generated: "",
    };
  }

  function resetColumn(col, prompt) {
    col.generated = "";
    col.error.hidden = true;
    col.error.textContent = "";
    col.note.hidden = true;
    col.ttft.textContent = col.tps.textContent = col.tokens.textContent = col.finish.textContent = "–";
    col.text.replaceChildren();
    const p = document.createElement("span");
    p.className = "prompt-echo";
    p.textContent = prompt;
    col.text.append(p);
    col.root.classList.add("running");
  }

  function showError(col, error) {
    col.error.hidden = false;
    col.error.replaceChildren();
    const b = document.createElement("strong");
    b.textContent = "Error" + (error.code ? ` (${error.code})` : "") + ": ";
    col.error.append(b, document.createTextNode(error.message || String(error)));
  }

  // One span per shown piece of text; `entries` are the logprob records of the tokens behind it
  // (several when the server held text back, e.g. an incomplete UTF-8 character).
  function addTokenSpan(col, text, entries, extraClass) {
    const span = document.createElement("span");
    span.className = extraClass ? "tok " + extraClass : "tok";
    if (text.includes("\n")) span.classList.add("nl"); // drawn with a visible return mark
    span.textContent = text;
    span.tabIndex = col.text.querySelector(".tok") ? -1 : 0; // roving tabindex: one tab stop
    if (entries.length) {
      // Joint probability of the tokens that make up this piece of text.
      const logp = entries.reduce((s, e) => s + e.logprob, 0);
      const p = Math.exp(logp);
      span.classList.add(probClass(p));
      span._entries = entries;
      span._prob = p;
    }
    col.text.append(span);
  }

  function renderChunk(col, text, entries) {
    if (text === "") return;
    // Text released together with its tokens: one span per token when they spell it exactly.
    if (entries.length > 1 && entries.map((e) => e.token).join("") === text) {
      for (const e of entries) addTokenSpan(col, e.token, [e]);
    } else {
      addTokenSpan(col, text, entries);
    }
    col.generated += text;
  }

  function logprobEntries(lp) {
    if (!lp || !Array.isArray(lp.tokens)) return [];
    return lp.tokens.map((token, i) => ({
      token,
      logprob: Number(lp.token_logprobs ? lp.token_logprobs[i] : NaN),
      top: (lp.top_logprobs && lp.top_logprobs[i]) || {},
    })).filter((e) => Number.isFinite(e.logprob));
  }

  // ---------- streaming ----------

  async function* sseEvents(body, signal) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (data) yield data;
        }
      }
    } finally {
      if (signal.aborted) reader.cancel().catch(() => {});
    }
  }

  // vLLM's rule: prompt + max_tokens must fit the model's context. Count the prompt's tokens
  // (POST tokenize) and lower max_tokens to what fits, saying so, instead of failing.
  async function fitToContext(col, model, request, signal) {
    const info = models.find((m) => m.id === model);
    if (!info || !info.max_model_len) return request;
    try {
      const r = await fetch("tokenize", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify({ model, prompt: request.prompt }),
        signal,
      });
      if (!r.ok) return request; // the completion request will report the problem
      const room = info.max_model_len - (await r.json()).count;
      if (room >= 1 && room < request.max_tokens) {
        col.note.hidden = false;
        col.note.textContent = `Max tokens ${request.max_tokens} → ${room}, so that prompt and ` +
          `output fit the ${info.max_model_len}-token context.`;
        return { ...request, max_tokens: room };
      }
    } catch (_) { /* aborted or unreachable: the completion request reports it */ }
    return request;
  }

  async function runColumn(col, model, request, signal) {
    request = await fitToContext(col, model, request, signal);
    if (signal.aborted) { col.finish.textContent = "cancelled"; return; }
    const t0 = performance.now();
    let tFirst = null, tLast = null, nTokens = 0, pending = [], finish = null;
    const updateStats = () => {
      if (tFirst !== null) col.ttft.textContent = Math.round(tFirst - t0) + " ms";
      if (nTokens > 1 && tLast > tFirst) {
        col.tps.textContent = ((nTokens - 1) / ((tLast - tFirst) / 1000)).toFixed(1);
      }
      col.tokens.textContent = String(nTokens);
      if (finish) col.finish.textContent = finish;
    };
    let response;
    try {
      response = await fetch("v1/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify({ ...request, model }),
        signal,
      });
    } catch (err) {
      if (signal.aborted) { col.finish.textContent = "cancelled"; return; }
      showError(col, { message: "request failed: " + err.message });
      return;
    }
    if (!response.ok) {
      showError(col, await errorFrom(response));
      return;
    }
    try {
      for await (const data of sseEvents(response.body, signal)) {
        if (data === "[DONE]") break;
        let chunk;
        try { chunk = JSON.parse(data); } catch (_) { showError(col, { message: "bad event: " + data.slice(0, 200) }); break; }
        if (chunk.error) { showError(col, chunk.error); break; }
        const choice = chunk.choices && chunk.choices[0];
        if (choice) {
          const entries = logprobEntries(choice.logprobs);
          const now = performance.now();
          if (entries.length || choice.text) {
            nTokens += Math.max(entries.length, choice.text && !entries.length ? 1 : 0);
            if (tFirst === null) tFirst = now;
            tLast = now;
          }
          if (!choice.text && entries.length && entries.every((e) => SPECIAL.test(e.token))) {
            // A special token (end of text, padding) adds no text: show it as a marker.
            for (const e of entries) addTokenSpan(col, e.token, [e], "special");
          } else {
            pending.push(...entries);
          }
          if (choice.text) {
            renderChunk(col, choice.text, pending);
            pending = [];
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (chunk.usage && typeof chunk.usage.completion_tokens === "number") {
          nTokens = chunk.usage.completion_tokens;
        }
        updateStats();
      }
    } catch (err) {
      if (!signal.aborted) showError(col, { message: "stream broken: " + err.message });
    }
    if (signal.aborted && !finish) finish = "cancelled";
    updateStats();
    if (finish) col.finish.textContent = finish;
  }

  function currentRequest() {
    const req = {
      prompt: el.prompt.value,
      max_tokens: Number($("#max_tokens").value),
      temperature: Number($("#temperature").value),
      top_p: Number($("#top_p").value),
      stream: true,
      logprobs: 5,
      stream_options: { include_usage: true },
    };
    const k = Number($("#top_k").value);
    if (k > 0) req.top_k = k;
    if (el.seed.value.trim() !== "") req.seed = Number(el.seed.value);
    return req;
  }

  async function generate() {
    if (running) return;
    if (!models.length) await loadModels({});
    if (!models.length) {
      showError(columns.a, { message: "no model to ask: " + el.statusText.textContent });
      return;
    }
    hideTooltip();
    saveSettings();
    const request = currentRequest();
    const targets = [["a", el.modelA.value]];
    if (el.compare.checked) targets.push(["b", el.modelB.value]);
    const controller = new AbortController();
    running = { controller };
    el.generate.disabled = true;
    el.stop.disabled = false;
    document.body.classList.add("is-running");
    for (const [name] of targets) resetColumn(columns[name], request.prompt);
    await Promise.all(targets.map(([name, model]) =>
      runColumn(columns[name], model, request, controller.signal)
        .finally(() => columns[name].root.classList.remove("running"))));
    running = null;
    el.generate.disabled = false;
    el.stop.disabled = true;
    document.body.classList.remove("is-running");
  }

  function stop() {
    // Aborting the fetch closes the connection; the server frees the request's slot at once.
    if (running) running.controller.abort();
  }

  // ---------- tooltip ----------

  function showTooltip(span) {
    if (!span._entries) return;
    const tip = el.tooltip;
    tip.replaceChildren();
    const entries = span._entries;
    const head = document.createElement("div");
    head.className = "tip-head";
    const tok = document.createElement("code");
    tok.textContent = showToken(span.textContent);
    const prob = document.createElement("span");
    prob.className = "tip-prob";
    prob.textContent = pct(span._prob);
    head.append(tok, prob);
    const caption = document.createElement("div");
    caption.className = "tip-sub";
    caption.textContent = "most likely next tokens";
    tip.append(head, caption);
    for (const e of entries) {
      if (entries.length > 1) {
        const sub = document.createElement("div");
        sub.className = "tip-sub";
        sub.textContent = `token ${showToken(e.token)} · ${pct(Math.exp(e.logprob))}`;
        tip.append(sub);
      }
      const list = document.createElement("ol");
      list.className = "alts";
      const alts = Object.entries(e.top).map(([t, lp]) => [t, Math.exp(Number(lp))])
        .sort((x, y) => y[1] - x[1]);
      for (const [t, p] of alts) {
        const li = document.createElement("li");
        if (t === e.token) li.className = "chosen";
        const name = document.createElement("code");
        name.textContent = showToken(t);
        const bar = document.createElement("span");
        bar.className = "bar";
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.width = Math.max(2, Math.round(p * 100)) + "%";
        bar.append(fill);
        const val = document.createElement("span");
        val.className = "val";
        val.textContent = pct(p);
        li.append(name, bar, val);
        list.append(li);
      }
      tip.append(list);
    }
    const foot = document.createElement("div");
    foot.className = "tip-foot";
    foot.textContent = `log-prob ${entries.reduce((s, e) => s + e.logprob, 0).toFixed(3)}`;
    tip.append(foot);

    tip.hidden = false;
    span.setAttribute("aria-describedby", "tooltip");
    const r = span.getBoundingClientRect();
    const tw = tip.offsetWidth, th = tip.offsetHeight;
    let left = r.left + r.width / 2 - tw / 2;
    left = Math.max(8, Math.min(left, window.innerWidth - tw - 8));
    let top = r.bottom + 8;
    if (top + th > window.innerHeight - 8) top = Math.max(8, r.top - th - 8);
    tip.style.left = left + window.scrollX + "px";
    tip.style.top = top + window.scrollY + "px";
    document.querySelectorAll(".tok.active").forEach((s) => s.classList.remove("active"));
    span.classList.add("active");
  }

  function hideTooltip() {
    el.tooltip.hidden = true;
    document.querySelectorAll(".tok.active").forEach((s) => {
      s.classList.remove("active");
      s.removeAttribute("aria-describedby");
    });
  }

  function tokenFrom(target) {
    const span = target instanceof Element ? target.closest(".text .tok") : null;
    return span && span._entries ? span : null;
  }

  // ---------- wiring ----------

  function wire() {
    for (const input of sliders) {
      const out = $("#" + input.id + "-out");
      const show = () => { out.textContent = formatSlider(input); };
      input.addEventListener("input", show);
      input.addEventListener("change", saveSettings);
      show();
    }
    const showCompare = () => {
      const on = el.compare.checked;
      el.modelBGroup.hidden = !on;
      columns.b.root.hidden = !on;
      el.outputs.classList.toggle("two", on);
      el.labelA.hidden = !on;
      columns.a.root.querySelector(".ab").hidden = !on;
    };
    el.compare.addEventListener("change", () => { showCompare(); updateModelInfo(); saveSettings(); });
    showCompare();
    el.modelA.addEventListener("change", () => { updateModelInfo(); saveSettings(); });
    el.modelB.addEventListener("change", () => { updateModelInfo(); saveSettings(); });
    el.dice.addEventListener("click", () => { el.seed.value = String(Math.floor(Math.random() * 1e6)); saveSettings(); });
    el.apiKey.addEventListener("change", () => loadModels({ modelA: el.modelA.value, modelB: el.modelB.value }));
    el.generate.addEventListener("click", generate);
    el.stop.addEventListener("click", stop);
    $("#controls").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
      else if (e.key === "Escape") { if (!el.tooltip.hidden) hideTooltip(); else stop(); }
    });

    for (const col of Object.values(columns)) {
      col.copy.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(col.generated);
          col.copy.textContent = "Copied";
        } catch (_) {
          col.copy.textContent = "Copy failed";
        }
        setTimeout(() => { col.copy.textContent = "Copy"; }, 1200);
      });
      // Arrow keys move between tokens (one tab stop per column: roving tabindex).
      col.text.addEventListener("keydown", (e) => {
        const span = e.target.closest && e.target.closest(".tok");
        if (!span) return;
        const toks = Array.from(col.text.querySelectorAll(".tok"));
        const i = toks.indexOf(span);
        let j = null;
        if (e.key === "ArrowRight" || e.key === "ArrowDown") j = Math.min(toks.length - 1, i + 1);
        else if (e.key === "ArrowLeft" || e.key === "ArrowUp") j = Math.max(0, i - 1);
        else if (e.key === "Home") j = 0;
        else if (e.key === "End") j = toks.length - 1;
        if (j === null) return;
        e.preventDefault();
        span.tabIndex = -1;
        toks[j].tabIndex = 0;
        toks[j].focus();
      });
    }
    document.addEventListener("mouseover", (e) => { const s = tokenFrom(e.target); if (s) showTooltip(s); });
    document.addEventListener("mouseout", (e) => { if (tokenFrom(e.target)) hideTooltip(); });
    document.addEventListener("focusin", (e) => { const s = tokenFrom(e.target); if (s) showTooltip(s); else hideTooltip(); });
    window.addEventListener("resize", hideTooltip);
    el.prompt.addEventListener("change", saveSettings);
    // The prompt box grows with its text (up to the CSS max-height, then it scrolls).
    const fitPrompt = () => {
      el.prompt.style.height = "auto";
      el.prompt.style.height = el.prompt.scrollHeight + 2 + "px";
    };
    el.prompt.addEventListener("input", fitPrompt);
    fitPrompt();
  }

  const saved = loadSettings();
  wire();
  loadModels(saved);
})();
