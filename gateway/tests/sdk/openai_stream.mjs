// Drive a live bitnet-gateway with the official `openai` npm SDK, as OpenClaw does: a streamed
// chat call with usage and max_completion_tokens.
//
// Usage: node openai_stream.mjs BASE_URL [MODEL]
//
// BASE_URL ends in /v1; MODEL defaults to falcon3-10b. The SDK is resolved from the
// node_modules beside this file (npm ci --prefix gateway/tests/sdk). Exits 0 when the stream
// holds up; otherwise prints what failed and exits 1.

import OpenAI from "openai";

function check(condition, message) {
  if (!condition) {
    console.error(`openai_stream: ${message}`);
    process.exit(1);
  }
}

const [baseURL, model = "falcon3-10b"] = process.argv.slice(2);
if (!baseURL) {
  console.error("usage: node openai_stream.mjs BASE_URL [MODEL]");
  process.exit(2);
}

// No retries: a failure must show, not be papered over by a second attempt.
const client = new OpenAI({ baseURL, apiKey: "bitnet-local", maxRetries: 0, timeout: 120_000 });
const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "What is 2+2?" }],
  max_completion_tokens: 8,
  temperature: 0,
  stream: true,
  stream_options: { include_usage: true },
});

let chunks = 0;
let text = "";
let finish = null;
let usage = null;
for await (const chunk of stream) {
  chunks += 1;
  check(chunk.object === "chat.completion.chunk", `chunk object ${chunk.object}`);
  for (const choice of chunk.choices) {
    text += choice.delta?.content ?? "";
    finish = choice.finish_reason ?? finish;
  }
  usage = chunk.usage ?? usage;
}
check(chunks >= 2, `stream had ${chunks} chunks`);
check(text !== "", "stream carried no content");
check(finish === "stop" || finish === "length", `finish_reason ${finish}`);
check(usage !== null && usage.completion_tokens > 0, `usage ${JSON.stringify(usage)}`);
console.log(`openai_stream: ok (${chunks} chunks, finish_reason ${finish})`);
