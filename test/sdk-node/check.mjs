// The official openai-node SDK, unmodified, against a running Levee:
// OpenAI and AzureOpenAI clients, chat (plain and streamed) and embeddings.
// BASE_URL and API_KEY come from the environment; exits non-zero on failure.
import OpenAI, { AzureOpenAI } from "openai";
import assert from "node:assert/strict";

const base = process.env.BASE_URL;
const apiKey = process.env.API_KEY;
const clients = {
  openai: new OpenAI({ baseURL: `${base}/v1`, apiKey }),
  azure: new AzureOpenAI({ endpoint: base, apiKey, apiVersion: "2024-10-21" }),
};

for (const [name, client] of Object.entries(clients)) {
  const params = { model: "gpt-4o", max_tokens: 20, messages: [{ role: "user", content: "Say hello to the levee." }] };
  const cc = await client.chat.completions.create(params);
  assert.equal(cc.choices.length, 1);
  assert.ok(cc.choices[0].message.content.length > 0);
  assert.ok(cc.usage.total_tokens > 0);

  const stream = await client.chat.completions.create({ ...params, stream: true });
  let text = "";
  let usageSeen = false;
  for await (const chunk of stream) {
    if (chunk.usage) usageSeen = true;
    text += chunk.choices[0]?.delta?.content ?? "";
  }
  assert.equal(text, cc.choices[0].message.content);
  assert.equal(usageSeen, false, "usage chunk sent to a client that did not ask for it");

  const emb = await client.embeddings.create({ model: "text-embedding-3-small", input: ["a", "b"] });
  assert.equal(emb.data.length, 2);
  console.log(`${name}: ok`);
}

// The documented batch flow: upload, create, poll until completed, download.
{
  const client = clients.openai;
  const lines = Array.from({ length: 20 }, (_, i) => JSON.stringify({
    custom_id: `n${i}`, method: "POST", url: "/v1/chat/completions",
    body: { model: "gpt-4o", max_tokens: 5, messages: [{ role: "user", content: `line ${i}` }] },
  })).join("\n") + "\n";
  const file = await client.files.create({ file: new File([lines], "batch.jsonl"), purpose: "batch" });
  let batch = await client.batches.create({ input_file_id: file.id, endpoint: "/v1/chat/completions", completion_window: "24h" });
  const deadline = Date.now() + 60_000;
  while (batch.status !== "completed") {
    assert.ok(Date.now() < deadline, `batch still ${batch.status}`);
    await new Promise((r) => setTimeout(r, 200));
    batch = await client.batches.retrieve(batch.id);
  }
  assert.equal(batch.request_counts.completed, 20);
  const out = await (await client.files.content(batch.output_file_id)).text();
  const ids = out.trim().split("\n").map((l) => JSON.parse(l).custom_id).sort();
  assert.equal(new Set(ids).size, 20);
  console.log("batch: ok");

  // A second batch, on a slow model, cancelled midway.
  const slow = Array.from({ length: 100 }, (_, i) => JSON.stringify({
    custom_id: `s${i}`, method: "POST", url: "/v1/chat/completions",
    body: { model: "gpt-4o-slow", max_tokens: 5, messages: [{ role: "user", content: `slow ${i}` }] },
  })).join("\n") + "\n";
  const f2 = await client.files.create({ file: new File([slow], "slow.jsonl"), purpose: "batch" });
  let b2 = await client.batches.create({ input_file_id: f2.id, endpoint: "/v1/chat/completions", completion_window: "24h" });
  while (b2.request_counts.completed < 3) {
    assert.ok(Date.now() < deadline + 60_000, `slow batch still ${b2.status}`);
    await new Promise((r) => setTimeout(r, 100));
    b2 = await client.batches.retrieve(b2.id);
  }
  b2 = await client.batches.cancel(b2.id);
  assert.ok(["cancelling", "cancelled"].includes(b2.status), b2.status);
  while (b2.status !== "cancelled") {
    await new Promise((r) => setTimeout(r, 100));
    b2 = await client.batches.retrieve(b2.id);
  }
  const rc = b2.request_counts;
  assert.ok(rc.completed < 100 && rc.completed + rc.failed === 100, JSON.stringify(rc));
  console.log("cancel: ok");
}

// The Responses API: plain, streamed, and a follow-up that continues the
// first (served by the deployment that stores it).
{
  const client = clients.openai;
  const first = await client.responses.create({ model: "gpt-4o", instructions: "Be brief.", input: "Say hello to the levee." });
  assert.equal(first.status, "completed");
  assert.ok(first.output_text.length > 0);
  assert.ok(first.usage.input_tokens > 0 && first.usage.output_tokens > 0);

  const stream = await client.responses.create({ model: "gpt-4o", input: [{ role: "user", content: [{ type: "input_text", text: "Say hello to the levee." }] }], stream: true });
  let text = "";
  let seq = -1;
  let completed = null;
  for await (const ev of stream) {
    assert.equal(ev.sequence_number, seq + 1);
    seq = ev.sequence_number;
    if (ev.type === "response.output_text.delta") text += ev.delta;
    if (ev.type === "response.completed") completed = ev.response;
  }
  assert.ok(completed && completed.usage.total_tokens > 0);
  assert.equal(text, completed.output.flatMap((o) => o.content ?? []).map((c) => c.text).join(""));

  const next = await client.responses.create({ model: "gpt-4o", previous_response_id: first.id, input: "And again." });
  assert.equal(next.previous_response_id, first.id);
  assert.ok(next.usage.input_tokens > first.usage.input_tokens, "the conversation was carried");
  const got = await client.responses.retrieve(first.id);
  assert.equal(got.output_text, first.output_text);
  console.log("responses: ok");

  // A background response: queued at once, polled until completed,
  // announced by a webhook that the SDK's unwrap verifies; another
  // cancelled at once.
  const events = [];
  let secret = "";
  const http = await import("node:http");
  const srv = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", async () => {
      try {
        events.push(await client.webhooks.unwrap(body, req.headers, secret));
        res.writeHead(204).end();
      } catch (e) {
        console.error("unwrap:", e.message);
        res.writeHead(400).end();
      }
    });
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  const ep = await (await fetch(`${base}/v1/webhook_endpoints`, {
    method: "POST", headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: JSON.stringify({ url: `http://127.0.0.1:${srv.address().port}/hook`, events: ["response.completed"] }),
  })).json();
  secret = ep.secret;
  const bg = await client.responses.create({ model: "gpt-4o", input: "In the background, please.", background: true });
  assert.ok(["queued", "in_progress"].includes(bg.status), bg.status);
  assert.equal(bg.background, true);
  let polled = bg;
  const until = Date.now() + 30_000;
  while (polled.status !== "completed") {
    assert.ok(Date.now() < until, `background response still ${polled.status}`);
    await new Promise((r) => setTimeout(r, 100));
    polled = await client.responses.retrieve(bg.id);
  }
  assert.equal(polled.id, bg.id);
  assert.ok(polled.output_text.length > 0);
  while (!events.some((e) => e.type === "response.completed" && e.data.id === bg.id)) {
    assert.ok(Date.now() < until, "no response.completed webhook");
    await new Promise((r) => setTimeout(r, 100));
  }
  srv.close();
  const other = await client.responses.create({ model: "gpt-4o", input: "Never mind.", background: true });
  const cancelled = await client.responses.cancel(other.id);
  assert.ok(["cancelled", "completed"].includes(cancelled.status), cancelled.status);
  console.log("background: ok");

  // A streamed background response, left midway and resumed from the last
  // event seen.
  const s1 = await client.responses.create({ model: "gpt-4o", input: "Stream it in the background.", background: true, stream: true });
  const seqs = [];
  let bid = "";
  let btext = "";
  for await (const ev of s1) {
    seqs.push(ev.sequence_number);
    if (ev.type === "response.created") bid = ev.response.id;
    if (ev.type === "response.output_text.delta") {
      btext += ev.delta;
      break; // the connection drops
    }
  }
  assert.ok(bid.startsWith("resp_lv"), bid);
  const s2 = await client.responses.retrieve(bid, { stream: true, starting_after: seqs.at(-1) });
  let bfinal = null;
  for await (const ev of s2) {
    seqs.push(ev.sequence_number);
    if (ev.type === "response.output_text.delta") btext += ev.delta;
    if (ev.type === "response.completed") bfinal = ev.response;
  }
  assert.deepEqual(seqs, seqs.map((_, i) => i));
  assert.ok(bfinal && bfinal.id === bid);
  assert.equal(btext, bfinal.output.flatMap((o) => o.content ?? []).map((c) => c.text).join(""));
  console.log("background stream: ok");
}

try {
  await new OpenAI({ baseURL: `${base}/v1`, apiKey: "lv-wrong-key-0000000000", maxRetries: 0 })
    .chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "x" }] });
  assert.fail("a wrong key was accepted");
} catch (e) {
  assert.equal(e.status, 401);
  assert.equal(e.code, "invalid_api_key");
  console.log("errors: ok");
}
