// The Spec-LLaVA playground: a chat over the OpenAI-compatible API that asks for each step's
// tree (the `speculation_steps` extension) and draws it. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const SHAPES = {
  adaptive: { mode: "adaptive" },
  dynamic: { mode: "dynamic", depth: 4, branching: 2, budget: 8 },
  chain: { mode: "chain", depth: 4 },
  static: { mode: "static", depth: 3, branching: 2, budget: 6 },
  off: { mode: "off" },
};

let image = null; // data URL of the chosen image
let history = []; // OpenAI messages of the conversation so far
let baselineRate = null; // target-only decode tok/s measured for the last request

function setImage(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    image = reader.result;
    $("preview").src = image;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    $("clear-image").hidden = false;
  };
  reader.readAsDataURL(file);
}

$("image-input").addEventListener("change", (e) => setImage(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  setImage(e.dataTransfer.files[0]);
});
$("clear-image").addEventListener("click", () => {
  image = null;
  $("preview").hidden = true;
  $("drop-hint").hidden = false;
  $("clear-image").hidden = true;
  $("image-input").value = "";
});
$("new-chat").addEventListener("click", () => {
  history = [];
  $("chat").replaceChildren();
  $("steps").replaceChildren();
  $("summary").textContent = "";
});

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function requestBody(messages, mode, stream) {
  const temperature = Number($("temperature").value) || 0;
  return {
    messages,
    max_tokens: Number($("max-tokens").value) || 64,
    temperature,
    seed: Number($("seed").value) || 0,
    stream,
    stream_options: stream ? { include_usage: true } : undefined,
    speculation: SHAPES[mode],
    speculation_steps: stream,
  };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// Streams one completion, calling onChunk for every parsed SSE chunk; resolves at [DONE].
async function stream(body, onChunk) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body),
  });
  if (!resp.ok) {
    const err = await resp.json().catch(() => ({}));
    throw new Error((err.error && err.error.message) || resp.status + " " + resp.statusText);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}

// The tree of one step as nested lists: accepted nodes green, rejected red, the root grey.
function drawTree(step) {
  const accepted = new Set(step.accepted_path);
  const children = step.tokens.map(() => []);
  step.parents.forEach((p, i) => { if (p >= 0) children[p].push(i); });
  const node = (i) => {
    const li = el("li");
    const cls = i === 0 ? "root" : accepted.has(i) ? "accepted" : "rejected";
    li.append(el("span", "tree-node " + cls, JSON.stringify(step.texts[i] || "").slice(1, -1) || "\u2423"));
    if (children[i].length) {
      const ul = el("ul");
      children[i].forEach((c) => ul.append(node(c)));
      li.append(ul);
    }
    return li;
  };
  const ul = el("ul", "tree");
  ul.append(node(0));
  return ul;
}

function showStep(step, emitted) {
  const li = el("li");
  const drafted = step.tokens.length - 1;
  const took = step.accepted_path.length - 1;
  const how = !step.drafted ? "target only" : step.pre_drafted ? "pre-drafted tree" : "drafted tree";
  li.append(el("div", "head",
    `step ${step.index}: ${how}, ${drafted} nodes, ${took} accepted, ${emitted} tokens emitted`));
  li.append(drawTree(step));
  if (emitted > took) li.append(el("span", "tree-node bonus", "+1 from the target"));
  $("steps").prepend(li);
}

function fmt(x, digits) { return Number.isFinite(x) ? x.toFixed(digits) : "-"; }

// The decode rate the server measured for a finished turn of `tokens` tokens: the tokens after
// the first over the time after the first (chunks can reach the page in bursts, so the page's
// own clock only serves the live readout).
function decodeRate(stats, tokens) {
  const ns = stats ? stats.total_ns - stats.time_to_first_token_ns : 0;
  return ns > 0 && tokens > 1 ? ((tokens - 1) * 1e9) / ns : NaN;
}

async function send(prompt) {
  const mode = $("mode").value;
  const content = [];
  if (image && !history.some((m) => m.role === "user")) {
    content.push({ type: "image_url", image_url: { url: image } });
  }
  content.push({ type: "text", text: prompt });
  const messages = history.concat([{ role: "user", content }]);

  const user = el("div", "msg user");
  if (content.length > 1) { const img = el("img"); img.src = image; user.append(img); }
  user.append(document.createTextNode(prompt));
  const answer = el("div", "msg assistant");
  const text = el("div", "text");
  const meta = el("span", "meta");
  answer.append(text, meta);
  $("chat").append(user, answer);
  $("steps").replaceChildren();
  $("summary").textContent = "";
  $("status").dataset.state = "running";
  $("status").textContent = "generating...";
  $("speedup").dataset.state = "idle";

  let steps = 0, tokens = 0, first = null, last = null, full = "", stats = null, usage = null;
  const started = performance.now();
  const onChunk = (chunk) => {
    if (chunk.usage) usage = chunk.usage;
    if (chunk.speculation) stats = chunk.speculation;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice || !choice.delta || !choice.delta.content) return;
    const now = performance.now();
    const ids = choice.token_ids || [];
    const step = chunk.speculation_step;
    const span = el("span", step ? "step-" + (step.index % 6) : "prefill", choice.delta.content);
    span.title = step ? `step ${step.index}` : "the first token (the target's prefill)";
    text.append(span);
    full += choice.delta.content;
    if (first === null) first = now; else tokens += ids.length;
    last = now;
    if (step) { steps += 1; showStep(step, ids.length); }
    const rate = last > first ? (tokens * 1000) / (last - first) : NaN;
    $("r-steps").textContent = steps;
    $("r-tokens").textContent = tokens + 1;
    $("r-tps").textContent = steps ? fmt(tokens / steps, 2) : "-";
    $("r-rate").textContent = fmt(rate, 1);
    if (baselineRate) $("speedup").textContent = fmt(rate / baselineRate, 2) + "x (live, vs the last baseline)";
  };
  try {
    await stream(Object.assign(requestBody(messages, mode, true), { return_token_ids: true }), onChunk);
  } catch (e) {
    answer.classList.add("error");
    text.textContent = e.message;
    $("status").dataset.state = "error";
    $("status").textContent = "failed";
    return;
  }
  const rate = decodeRate(stats, tokens + 1);
  $("r-rate").textContent = fmt(rate, 1);
  history = messages.concat([{ role: "assistant", content: full }]);
  meta.textContent = `${tokens + 1} tokens in ${fmt((performance.now() - started) / 1000, 2)} s` +
    (usage ? `, prompt ${usage.prompt_tokens} tokens (images counted as their tokens)` : "");
  if (stats) {
    $("summary").textContent = `Turn: ${stats.steps} steps, ${stats.drafted} drafted tokens, ` +
      `${stats.accepted} accepted, mean accepted length ${fmt(stats.mean_accepted_length, 2)}, ` +
      `acceptance by depth ${stats.acceptance_per_depth.map((a) => fmt(a, 2)).join(" / ") || "-"}, ` +
      `first token ${fmt(stats.time_to_first_token_ns / 1e6, 0)} ms.`;
  }
  $("status").dataset.state = "done";
  $("status").textContent = "done";
  // The same request target-only, measured the same way: the speedup of this answer.
  if (mode === "off") {
    baselineRate = rate;
    $("speedup").textContent = "1.00x (this is target-only)";
    $("speedup").dataset.state = "done";
    return;
  }
  $("speedup").textContent = "measuring target-only...";
  let bStats = null, bTokens = 0;
  try {
    await stream(Object.assign(requestBody(messages, "off", true), { return_token_ids: true, speculation_steps: false }), (chunk) => {
      if (chunk.speculation) bStats = chunk.speculation;
      const c = chunk.choices && chunk.choices[0];
      if (c) bTokens += (c.token_ids || []).length;
    });
    baselineRate = decodeRate(bStats, bTokens);
    $("speedup").textContent = fmt(rate / baselineRate, 2) + "x (" + fmt(baselineRate, 1) + " tok/s target-only)";
  } catch (e) {
    $("speedup").textContent = "baseline failed: " + e.message;
  }
  $("speedup").dataset.state = "done";
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || $("status").dataset.state === "running") return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
