// The page's logic: load the bundle (bundle/model.onnx, tokenizer.json, labels.json,
// bundle.json), then classify what the person types, ?text=... from the URL, or, for scripts,
// every text of the JSON list at ?texts=URL. The answer goes into #result; its data-json
// attribute holds it as JSON and data-state says "done" or "error".
import * as ort from "./ort/ort.wasm.min.mjs";
import { BundleTokenizer } from "./tokenizer.mjs";

ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one thread is the honest baseline

const $ = (id) => document.getElementById(id);
const BATCH = 64;

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

async function loadBundle() {
  const [meta, labels, tokenizer] = await Promise.all(
    ["bundle/bundle.json", "bundle/labels.json", "bundle/tokenizer.json"].map(fetchJson),
  );
  const session = await ort.InferenceSession.create("bundle/model.onnx", {
    executionProviders: ["wasm"],
  });
  return {
    meta,
    labels: labels.labels,
    tokenizer: new BundleTokenizer(tokenizer, meta.max_len, "bundle/tokenizer.json"),
    session,
  };
}

function softmax(row) {
  const top = Math.max(...row);
  const e = row.map((v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

// Classify texts in batches of BATCH, right-padded with id 0 as Python's pad_batch does.
async function classify(bundle, texts) {
  const results = [];
  for (let start = 0; start < texts.length; start += BATCH) {
    const chunk = texts.slice(start, start + BATCH);
    const ids = chunk.map((t) => bundle.tokenizer.encode(t));
    ids.forEach((seq, i) => {
      if (bundle.tokenizer.ownIds(seq).length === 0) throw new Error(`text #${start + i + 1} gives no token; nothing to classify`);
    });
    const width = Math.max(...ids.map((s) => s.length));
    const tokens = new BigInt64Array(chunk.length * width);
    ids.forEach((seq, row) => seq.forEach((id, col) => (tokens[row * width + col] = BigInt(id))));
    const lengths = BigInt64Array.from(ids, (s) => BigInt(s.length));
    const out = await bundle.session.run({
      tokens: new ort.Tensor("int64", tokens, [chunk.length, width]),
      lengths: new ort.Tensor("int64", lengths, [chunk.length]),
    });
    const logits = out.logits.data;
    const classes = bundle.labels.length;
    chunk.forEach((text, row) => {
      const p = softmax(Array.from(logits.subarray(row * classes, (row + 1) * classes)));
      const best = p.indexOf(Math.max(...p));
      results.push({ text, label: bundle.labels[best], probabilities: p, ids: ids[row] });
    });
  }
  return results;
}

function show(bundle, result) {
  const order = [...bundle.labels.keys()].sort((a, b) => result.probabilities[b] - result.probabilities[a]);
  const rows = order.slice(0, 5).map((k, i) => {
    const p = result.probabilities[k];
    return `<tr class="${i === 0 ? "top" : ""}"><td>${escape(bundle.labels[k])}</td>` +
      `<td>${p.toFixed(3)}</td><td class="bar"><div style="width:${(100 * p).toFixed(1)}%"></div></td></tr>`;
  });
  $("result").innerHTML = `<p><b>${escape(result.label)}</b> for “${escape(result.text)}”</p><table>${rows.join("")}</table>`;
}

function escape(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function finish(state, payload) {
  $("result").dataset.json = JSON.stringify(payload);
  $("result").dataset.state = state;
}

async function main() {
  const query = new URLSearchParams(location.search);
  let bundle;
  try {
    bundle = await loadBundle();
  } catch (err) {
    $("status").textContent = `Cannot load the model: ${err.message}`;
    finish("error", { error: err.message });
    return;
  }
  $("status").textContent = `Model ${bundle.meta.variant} (${bundle.tokenizer.level} level), in this page.`;
  $("form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("text").value;
    if (!text.trim()) return;
    try {
      show(bundle, (await classify(bundle, [text]))[0]);
    } catch (err) {
      $("result").textContent = err.message;
    }
  });
  try {
    if (query.has("texts")) {
      const texts = await fetchJson(query.get("texts"));
      const started = performance.now();
      const results = await classify(bundle, texts);
      const seconds = (performance.now() - started) / 1000;
      $("result").textContent = `${results.length} texts in ${seconds.toFixed(2)} s`;
      finish("done", { results, seconds, texts_per_second: results.length / seconds, batch: BATCH });
    } else if (query.has("text")) {
      $("text").value = query.get("text");
      const [result] = await classify(bundle, [query.get("text")]);
      show(bundle, result);
      finish("done", result);
    }
  } catch (err) {
    $("result").textContent = err.message;
    finish("error", { error: err.message });
  }
}

main();
