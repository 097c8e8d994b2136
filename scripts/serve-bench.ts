/**
 * Serving throughput with continuous batching against one request at a time:
 *
 *   node scripts/serve-bench.ts --model DIR [--backend wasm|webgpu] [--concurrency 32] [--tokens 64]
 *
 * Starts `cascade serve`'s server in-process on loopback over the model folder, then sends
 * `concurrency` chat requests (token-id completions when the folder has no tokenizer or chat
 * template), each of exactly `tokens` new tokens (greedy, vLLM's `ignore_eos`), first one after
 * another and then all at once. Prints a JSON line per mode with the total completion tokens per
 * second and the median request latency, and one with the speed-up.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Console, Context, Effect, Layer } from "effect"
import { HttpServer } from "effect/http"
import { parseArgs } from "node:util"
import { type BackendName, TensorBackend } from "../layers/TensorBackend.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import * as Server from "../src/serve/Server.ts"

const { values } = parseArgs({
  options: {
    model: { type: "string", default: "assets/parent" },
    backend: { type: "string" },
    concurrency: { type: "string", default: "32" },
    tokens: { type: "string", default: "64" }
  }
})
const concurrency = Number(values.concurrency)
const tokens = Number(values.tokens)
const modelDir = values.model

/** Request i: a distinct prompt, so that rows differ. */
const requestBody = (chat: boolean, vocab: number, i: number) =>
  chat
    ? { path: "chat/completions", body: { messages: [{ role: "user", content: `Question ${i}: what is ${i} plus ${2 * i + 3}?` }] } }
    : { path: "completions", body: { prompt: [1, ...Array.from({ length: 8 + (i % 8) }, (_, j) => 3 + (i * 37 + j * 11) % (vocab - 3))] } }

const program = Effect.gen(function*() {
  const backend = yield* TensorBackend
  const model = yield* Pretrained.load(modelDir)
  const tokenizer = yield* Tokenizer.loadIfPresent(modelDir)
  const chat = tokenizer !== undefined && (yield* Effect.isSuccess(tokenizer.applyChatTemplate([{ role: "user", content: "hi" }])))
  const services = yield* Layer.build(Server.layer({ model, tokenizer, name: modelDir }, {
    host: "127.0.0.1",
    port: 0,
    logRequests: false,
    maxBatch: concurrency,
    maxQueue: concurrency
  }))
  const url = `${HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)}/v1`

  /** One request of `tokens` new tokens; its completion tokens and seconds. */
  const send = (i: number) =>
    Effect.promise(async () => {
      const { path, body } = requestBody(chat, model.config.vocabSize, i)
      const started = performance.now()
      const response = await fetch(`${url}/${path}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ ...body, max_tokens: tokens, temperature: 0, ignore_eos: true })
      })
      const json = (await response.json()) as { usage?: { completion_tokens: number }; error?: { message: string } }
      if (json.usage === undefined) throw new Error(`serve-bench: ${response.status} ${json.error?.message}`)
      return { tokens: json.usage.completion_tokens, seconds: (performance.now() - started) / 1000 }
    })

  const measure = (mode: string, run: Effect.Effect<ReadonlyArray<{ tokens: number; seconds: number }>>) =>
    Effect.gen(function*() {
      const started = performance.now()
      const replies = yield* run
      const seconds = (performance.now() - started) / 1000
      const total = replies.reduce((sum, reply) => sum + reply.tokens, 0)
      const latencies = replies.map((reply) => reply.seconds).sort((a, b) => a - b)
      const result = {
        case: `serve-${mode}`,
        model: modelDir,
        api: chat ? "chat" : "completions (token ids)",
        backend: backend.name,
        device: backend.device,
        requests: replies.length,
        tokens_per_request: tokens,
        completion_tokens: total,
        seconds,
        tokens_per_s: total / seconds,
        median_latency_s: latencies[Math.floor(latencies.length / 2)]
      }
      yield* Console.log(JSON.stringify(result))
      return result
    })

  const ids = Array.from({ length: concurrency }, (_, i) => i)
  // Warm-up: the backend compiles its kernels for the shapes a batch meets.
  yield* Effect.forEach(ids.slice(0, Math.min(4, concurrency)), send, { concurrency: "unbounded" })
  const alone = yield* measure("one-at-a-time", Effect.forEach(ids, send))
  const batched = yield* measure("batched", Effect.forEach(ids, send, { concurrency: "unbounded" }))
  yield* Console.log(JSON.stringify({ case: "serve-speedup", backend: backend.name, concurrency, speedup: batched.tokens_per_s / alone.tokens_per_s }))
}).pipe(Effect.scoped, Effect.provide(TensorBackend.layer(values.backend as BackendName | undefined)))

NodeRuntime.runMain(program)
