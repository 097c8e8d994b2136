import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Context, Effect, Layer, Logger, type Scope } from "effect"
import { HttpServer } from "effect/http"
import { spawn } from "node:child_process"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import OpenAI from "openai"
import * as Teacher from "../layers/Teacher.ts"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as Generate from "../src/model/Generate.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Server from "../src/serve/Server.ts"
import type { Teacher as TeacherService } from "../src/train/Teacher.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { distill, type StepMetrics } from "../stages/Distill.ts"
import { localFixture, markovData, onBackend, sharedFixture, take, tempDir } from "./support.ts"

const chatTemplate = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}" +
  "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}" +
  "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"

/** The fixture model with the fixture tokenizer (vocab 400 < the model's 512) and a Mistral-style chat template. */
const modelFolder = Effect.gen(function*() {
  const dir = yield* Effect.acquireRelease(
    Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "cascade-server-"))),
    (dir) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true }))
  )
  yield* Effect.promise(async () => {
    for (const file of ["config.json", "model.safetensors"]) {
      await fs.copyFile(path.join(sharedFixture("tiny-mistral"), file), path.join(dir, file))
    }
    await fs.copyFile(sharedFixture("tiny-bpe/tokenizer.json"), path.join(dir, "tokenizer.json"))
    const config = { bos_token: "<s>", eos_token: "</s>", add_bos_token: true, chat_template: chatTemplate }
    await fs.writeFile(path.join(dir, "tokenizer_config.json"), JSON.stringify(config))
  })
  return dir
})

const main = fileURLToPath(new URL("../src/cli/main.ts", import.meta.url))

/** `cascade serve --model dir` on a free loopback port, killed when the scope closes; its `/v1` URL and what it printed. */
const serveCli = (dir: string, flags: ReadonlyArray<string> = []) =>
  Effect.gen(function*() {
    const child = yield* Effect.acquireRelease(
      Effect.sync(() => spawn(process.execPath, [main, "serve", "--model", dir, "--port", "0", ...flags])),
      (child) => Effect.sync(() => child.kill("SIGKILL"))
    )
    const exited = new Promise<number | null>((resolve) => child.on("exit", resolve))
    const started = yield* Effect.promise(() =>
      new Promise<{ url: string; output: string }>((resolve, reject) => {
        let output = ""
        child.stdout.on("data", (chunk) => {
          output += String(chunk)
          const match = /http:\/\/\S+\/v1/.exec(output)
          if (match) resolve({ url: match[0], output })
        })
        child.stderr.on("data", (chunk) => (output += String(chunk)))
        child.on("exit", () => reject(new Error(`serve exited: ${output}`)))
      })
    )
    return { ...started, child, exited }
  })

interface Fixture {
  readonly model: Model.Model
  readonly tokenizer: Tokenizer.Tokenizer
  /** Starts a server over `model` on an ephemeral loopback port; returns its `/v1` URL. */
  readonly serve: (model: Model.Model, limits?: Partial<Server.Limits>) => Effect.Effect<string, unknown, never>
}

/**
 * Runs a test against servers over the fixture, and checks that the requests it makes leave
 * the tensor count as they found it. Request logs are silenced.
 */
const withServer = <A, E>(test: (fixture: Fixture) => Effect.Effect<A, E, Scope.Scope>) =>
  Effect.gen(function*() {
    const dir = yield* modelFolder
    const model = yield* Pretrained.load(dir)
    const tokenizer = yield* Tokenizer.load(dir)
    const scope = yield* Effect.scope
    const serve = (served: Model.Model, limits?: Partial<Server.Limits>) =>
      Layer.buildWithScope(Server.layer({ model: served, tokenizer, name: "tiny" }, { host: "127.0.0.1", port: 0, ...limits }), scope).pipe(
        Effect.map((services) => `${HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)}/v1`)
      )
    const before = tf.memory().numTensors
    yield* test({ model, tokenizer, serve })
    assert.strictEqual(tf.memory().numTensors, before, "requests leave no tensors behind")
  }).pipe(onBackend("wasm"), Effect.provide(Logger.layer([])))

interface Reply {
  readonly status: number
  readonly json: any
}

const request = (url: string, init?: RequestInit) =>
  Effect.promise(async (): Promise<Reply> => {
    const response = await fetch(url, init)
    return { status: response.status, json: (await response.json()) as any }
  })

const post = (url: string, body: unknown) =>
  request(url, { method: "POST", headers: { "content-type": "application/json" }, body: typeof body === "string" ? body : JSON.stringify(body) })

/** Log-softmax in float64 of one row of logits. */
const logSoftmax = (logits: ArrayLike<number>): Array<number> => {
  const values = Array.from(logits)
  const max = Math.max(...values)
  const logSum = Math.log(values.reduce((sum, logit) => sum + Math.exp(logit - max), 0))
  return values.map((logit) => logit - max - logSum)
}

/** What the server passes to Generate for a request with only these fields. */
const generateLike = (fixture: Fixture, prompts: ReadonlyArray<ReadonlyArray<number>>, options: Partial<Generate.Options>) =>
  Generate.generate(fixture.model, prompts, {
    maxNewTokens: 16,
    stopTokenIds: [2],
    decode: (ids) => fixture.tokenizer.decode(ids, { skipSpecialTokens: true }),
    ...options
  })

const prompts = [[1, 58, 321, 361, 89, 355], [1, 294, 32]]

describe("Server", () => {
  it.live("prompt_logprobs are the log-softmax of Model.forward's logits, in vLLM's shape", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        const url = yield* fixture.serve(fixture.model)
        const k = 3
        const reply = yield* post(`${url}/completions`, { prompt: prompts, max_tokens: 0, prompt_logprobs: k })
        assert.strictEqual(reply.status, 200, JSON.stringify(reply.json))
        const v = fixture.model.config.vocabSize
        for (const [i, prompt] of prompts.entries()) {
          const choice = reply.json.choices[i]
          assert.strictEqual(choice.text, "")
          assert.strictEqual(choice.finish_reason, "length")
          const logits = take(Model.forward(fixture.model, [prompt]).logits)
          assert.strictEqual(choice.prompt_logprobs.length, prompt.length)
          assert.isNull(choice.prompt_logprobs[0])
          for (let j = 1; j < prompt.length; j++) {
            const expected = logSoftmax(logits.subarray((j - 1) * v, j * v))
            const top = expected.map((logprob, id) => ({ logprob, id })).sort((a, b) => b.logprob - a.logprob).slice(0, k)
            const entries = choice.prompt_logprobs[j]
            const ids = new Set([prompt[j], ...top.map(({ id }) => id)])
            assert.sameMembers(Object.keys(entries), [...ids].map(String))
            for (const id of ids) {
              const entry = entries[String(id)]
              assert.sameMembers(Object.keys(entry), ["logprob", "rank", "decoded_token"])
              assert.closeTo(entry.logprob, expected[id], 1e-5)
              assert.strictEqual(entry.rank, expected.filter((logprob) => logprob >= expected[id]).length)
              assert.strictEqual(entry.decoded_token, fixture.tokenizer.decode([id]))
            }
          }
        }
        assert.deepStrictEqual(reply.json.usage, { prompt_tokens: 9, completion_tokens: 0, total_tokens: 9 })
      })
    ))

  it.live("greedy completions equal Generate's, with legacy logprobs, echo and stop strings", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        const url = yield* fixture.serve(fixture.model)
        const text = "Question: what is 12 plus 30?"
        const greedy = { maxNewTokens: 12, temperature: 0, topLogprobs: 2 }
        const expected = yield* generateLike(fixture, prompts, greedy)
        const reply = yield* post(`${url}/completions`, {
          model: "tiny",
          prompt: prompts,
          max_tokens: 12,
          temperature: 0,
          logprobs: 2
        })
        assert.strictEqual(reply.status, 200, JSON.stringify(reply.json))
        assert.strictEqual(reply.json.choices.length, prompts.length)
        reply.json.choices.forEach((choice: any, i: number) => {
          const generation = expected[i]
          assert.strictEqual(choice.index, i)
          assert.strictEqual(choice.text, generation.text)
          assert.strictEqual(choice.finish_reason, generation.finishReason)
          assert.deepStrictEqual(choice.logprobs.tokens, generation.tokens.map((id) => fixture.tokenizer.decode([id])))
          choice.logprobs.token_logprobs.forEach((logprob: number, j: number) => assert.closeTo(logprob, generation.logprobs[j].logprob, 1e-5))
          choice.logprobs.top_logprobs.forEach((top: Record<string, number>) => assert.isAtMost(Object.keys(top).length, 3))
          assert.strictEqual(choice.logprobs.text_offset[0], 0)
        })

        // A text prompt, echoed: the prompt's tokens come first, the first without a log-prob.
        const ids = fixture.tokenizer.encode(text)
        const [fromText] = yield* generateLike(fixture, [ids], greedy)
        const echoed = yield* post(`${url}/completions`, { prompt: text, max_tokens: 12, temperature: 0, logprobs: 1, echo: true })
        assert.strictEqual(echoed.status, 200, JSON.stringify(echoed.json))
        const [choice] = echoed.json.choices
        assert.strictEqual(choice.text, text + fromText.text)
        assert.deepStrictEqual(choice.logprobs.tokens, [...ids, ...fromText.tokens].map((id) => fixture.tokenizer.decode([id])))
        assert.isNull(choice.logprobs.token_logprobs[0])
        assert.isNull(choice.logprobs.top_logprobs[0])
        assert.deepStrictEqual(echoed.json.usage, {
          prompt_tokens: ids.length,
          completion_tokens: fromText.tokens.length,
          total_tokens: ids.length + fromText.tokens.length
        })

        // max_tokens 0 and 1.
        const none = yield* post(`${url}/completions`, { prompt: text, max_tokens: 0, echo: true })
        assert.strictEqual(none.json.choices[0].text, text)
        assert.strictEqual(none.json.usage.completion_tokens, 0)
        const one = yield* post(`${url}/completions`, { prompt: prompts[0], max_tokens: 1, temperature: 0 })
        assert.strictEqual(one.json.choices[0].text, fixture.tokenizer.decode(expected[0].tokens.slice(0, 1), { skipSpecialTokens: true }))
        assert.strictEqual(one.json.usage.completion_tokens, 1)

        // A stop string cuts the text before it.
        const full = expected[1].text!
        const stop = full.slice(3, 5)
        const stopped = yield* post(`${url}/completions`, { prompt: prompts[1], max_tokens: 12, temperature: 0, stop: [stop] })
        assert.strictEqual(stopped.json.choices[0].text, full.slice(0, full.indexOf(stop)))
        assert.strictEqual(stopped.json.choices[0].finish_reason, "stop")
        assert.strictEqual(stopped.json.choices[0].stop_reason, stop)
      })
    ))

  it.live("chat completions go through the chat template", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        const url = yield* fixture.serve(fixture.model)
        const messages = [{ role: "user", content: "what is 12 plus 30?" }]
        const templated = yield* fixture.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true })
        const ids = fixture.tokenizer.encode(templated, { addSpecialTokens: false })
        assert.strictEqual(ids[0], 1, "the template's BOS")
        const [expected] = yield* generateLike(fixture, [ids], { maxNewTokens: 8, temperature: 0, topLogprobs: 2 })
        const reply = yield* post(`${url}/chat/completions`, {
          messages: [{ role: "user", content: [{ type: "text", text: "what is 12 plus 30?" }] }],
          max_completion_tokens: 8,
          temperature: 0,
          logprobs: true,
          top_logprobs: 2
        })
        assert.strictEqual(reply.status, 200, JSON.stringify(reply.json))
        const [choice] = reply.json.choices
        assert.deepStrictEqual(choice.message, { role: "assistant", content: expected.text })
        assert.strictEqual(choice.finish_reason, expected.finishReason)
        assert.strictEqual(choice.logprobs.content.length, expected.tokens.length)
        choice.logprobs.content.forEach((entry: any, j: number) => {
          assert.strictEqual(entry.token, fixture.tokenizer.decode([expected.tokens[j]]))
          assert.closeTo(entry.logprob, expected.logprobs[j].logprob, 1e-5)
          assert.deepStrictEqual(entry.bytes, [...new TextEncoder().encode(entry.token)])
          assert.strictEqual(entry.top_logprobs.length, 2)
        })
        assert.deepStrictEqual(reply.json.usage, {
          prompt_tokens: ids.length,
          completion_tokens: expected.tokens.length,
          total_tokens: ids.length + expected.tokens.length
        })

        // The same seed samples the same text.
        const sampled = { messages, max_tokens: 10, temperature: 1, top_p: 0.95, seed: 3 }
        const first = yield* post(`${url}/chat/completions`, sampled)
        const again = yield* post(`${url}/chat/completions`, sampled)
        assert.strictEqual(first.json.choices[0].message.content, again.json.choices[0].message.content)
      })
    ))

  it.live("bad requests get OpenAI-style 4xx errors and the server goes on answering", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        const url = yield* fixture.serve(fixture.model)
        const long = Array.from({ length: 2049 }, (_, i) => i % 400)
        const cases: Array<{ path: string; body: unknown; status: number; param: string | null; code?: string }> = [
          { path: "completions", body: "{\"prompt\": ", status: 400, param: null },
          { path: "completions", body: "[1, 2]", status: 400, param: null },
          { path: "completions", body: { prompt: 5 }, status: 400, param: "prompt" },
          { path: "completions", body: { max_tokens: 3 }, status: 400, param: "prompt" },
          { path: "completions", body: { prompt: "x", max_tokens: -1 }, status: 400, param: "max_tokens" },
          { path: "completions", body: { prompt: "x", temperature: "hot" }, status: 400, param: "temperature" },
          { path: "completions", body: { prompt: "x", logprobs: 21 }, status: 400, param: "logprobs" },
          { path: "completions", body: { prompt: [1, 512] }, status: 400, param: "prompt" },
          { path: "completions", body: { prompt: [[1, 2], [-1]] }, status: 400, param: "prompt" },
          { path: "completions", body: { prompt: [] }, status: 400, param: "prompt" },
          { path: "completions", body: { prompt: long, max_tokens: 0 }, status: 400, param: "prompt", code: "context_length_exceeded" },
          { path: "completions", body: { prompt: [1, 2], max_tokens: 2047 }, status: 400, param: "max_tokens", code: "context_length_exceeded" },
          { path: "completions", body: { prompt: "x", model: "gpt-4" }, status: 404, param: "model", code: "model_not_found" },
          { path: "completions", body: { prompt: "x", stream: "yes" }, status: 400, param: "stream" },
          { path: "completions", body: { prompt: "x", stream: true, max_tokens: -1 }, status: 400, param: "max_tokens" },
          { path: "completions", body: { prompt: "x", stream_options: { include_usage: true } }, status: 400, param: "stream_options" },
          { path: "completions", body: { prompt: "x", stream: true, stream_options: { include_usage: 1 } }, status: 400, param: "stream_options" },
          { path: "completions", body: { prompt: "x", n: 0 }, status: 400, param: "n" },
          { path: "completions", body: { prompt: "x", stream: true, n: 33 }, status: 400, param: "n" },
          { path: "chat/completions", body: { messages: [], stream: true }, status: 400, param: "messages" },
          { path: "chat/completions", body: { messages: [] }, status: 400, param: "messages" },
          { path: "chat/completions", body: { messages: [{ role: "user" }] }, status: 400, param: "messages" },
          { path: "chat/completions", body: { messages: [{ role: "user", content: "hi" }], top_logprobs: 2 }, status: 400, param: "top_logprobs" },
          { path: "nowhere", body: {}, status: 404, param: null, code: "unknown_url" }
        ]
        for (const { path: endpoint, body, status, param, code } of cases) {
          const reply = yield* post(`${url}/${endpoint}`, body)
          const label = `${endpoint} ${typeof body === "string" ? body : JSON.stringify(body).slice(0, 80)}`
          assert.strictEqual(reply.status, status, label)
          assert.sameMembers(Object.keys(reply.json.error), ["message", "type", "param", "code"], label)
          assert.isString(reply.json.error.message)
          assert.strictEqual(reply.json.error.type, "invalid_request_error", label)
          assert.strictEqual(reply.json.error.param, param, label)
          assert.strictEqual(reply.json.error.code, code ?? null, label)
        }
        const models = yield* request(`${url}/models`)
        assert.strictEqual(models.status, 200)
        assert.deepStrictEqual(models.json.data.map((model: any) => [model.id, model.object]), [["tiny", "model"]])
        const after = yield* post(`${url}/completions`, { prompt: "still here", max_tokens: 2 })
        assert.strictEqual(after.status, 200)
      })
    ))

  it.live("an internal failure is a 500 with a JSON error, and the server goes on serving", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        // A final norm of the wrong size makes every forward pass throw.
        const norm = tf.zeros([3]) as tf.Tensor1D
        return yield* Effect.gen(function*() {
          const before = tf.memory().numTensors
          const url = yield* fixture.serve(Model.make(fixture.model.config, { ...fixture.model.weights, norm }))
          for (let attempt = 0; attempt < 2; attempt++) {
            const reply = yield* post(`${url}/completions`, { prompt: [1, 2, 3], max_tokens: 4 })
            assert.strictEqual(reply.status, 500)
            assert.strictEqual(reply.json.error.type, "server_error")
            assert.strictEqual(tf.memory().numTensors, before, "a failed forward pass leaves no tensors behind")
          }
          // Streaming, the failure is an error event before [DONE].
          const streamed = yield* Effect.promise(() =>
            fetch(`${url}/completions`, {
              method: "POST",
              headers: { "content-type": "application/json" },
              body: JSON.stringify({ prompt: [1, 2, 3], max_tokens: 4, stream: true })
            }).then(async (response) => ({ status: response.status, body: await response.text() }))
          )
          assert.strictEqual(streamed.status, 200)
          const events = streamed.body.split("\n\n").filter((event) => event !== "")
          assert.strictEqual(events.length, 2)
          assert.strictEqual(JSON.parse(events[0].replace(/^data: /, "")).error.type, "server_error")
          assert.strictEqual(events[1], "data: [DONE]")
          assert.strictEqual(tf.memory().numTensors, before)
          const models = yield* request(`${url}/models`)
          assert.strictEqual(models.status, 200)
        }).pipe(Effect.ensuring(Effect.sync(() => norm.dispose())))
      })
    ))

  it.live("concurrent requests decode in one batch, and each gets what it gets alone", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        const url = yield* fixture.serve(fixture.model, { maxBatch: 4 })
        // Prompts and completions of different lengths, so that rows join and leave a running batch.
        const cases = Array.from({ length: 10 }, (_, i) => ({
          prompt: [1, ...Array.from({ length: 2 + (i * 3) % 7 }, (_, j) => 3 + (i * 31 + j * 17) % 390)],
          max_tokens: 4 + (i % 3) * 5
        }))
        const alone = yield* Effect.forEach(cases, ({ prompt, max_tokens }) =>
          generateLike(fixture, [prompt], { maxNewTokens: max_tokens, temperature: 0, topLogprobs: 1 }))
        const replies = yield* Effect.all(
          cases.map((body) => post(`${url}/completions`, { ...body, temperature: 0, logprobs: 1 })),
          { concurrency: "unbounded" }
        )
        replies.forEach((reply, i) => {
          assert.strictEqual(reply.status, 200, JSON.stringify(reply.json))
          const [expected] = alone[i]
          const [choice] = reply.json.choices
          assert.strictEqual(choice.text, expected.text, `request ${i}`)
          assert.strictEqual(choice.finish_reason, expected.finishReason, `request ${i}`)
          choice.logprobs.token_logprobs.forEach((logprob: number, j: number) => assert.closeTo(logprob, expected.logprobs[j].logprob, 1e-4))
        })
      })
    ))

  it.live("the openai client streams completions and chats: the chunks add up to the text without stream, at temperature 0", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        const url = yield* fixture.serve(fixture.model)
        const client = new OpenAI({ baseURL: url, apiKey: "unused", maxRetries: 0 })
        const prompt = "Question: what is 12 plus 30?"
        const [greedy] = yield* generateLike(fixture, [fixture.tokenizer.encode(prompt)], { maxNewTokens: 12, temperature: 0 })
        const fullText = greedy.text!
        // Without a stop string, and with one that cuts the text (streamed text is held back while it may begin one).
        for (const stop of [undefined, fullText.slice(4, 6)]) {
          const body = { model: "tiny", prompt, max_tokens: 12, temperature: 0, logprobs: 1, n: 2, stop } as const
          const whole = yield* Effect.promise(() => client.completions.create(body))
          const chunks = yield* Effect.promise(async () => {
            const out: Array<OpenAI.Completions.Completion> = []
            for await (const chunk of await client.completions.create({ ...body, stream: true, stream_options: { include_usage: true } })) out.push(chunk)
            return out
          })
          assert.strictEqual(whole.choices.length, 2)
          whole.choices.forEach((choice, index) => {
            const mine = chunks.flatMap((chunk) => chunk.choices.filter((c) => c.index === index))
            assert.strictEqual(mine.map((c) => c.text).join(""), choice.text, `stop ${stop}`)
            assert.strictEqual(choice.text, stop === undefined ? fullText : fullText.slice(0, fullText.indexOf(stop)))
            assert.deepStrictEqual(mine.flatMap((c) => c.logprobs?.tokens ?? []), choice.logprobs?.tokens)
            assert.deepStrictEqual(mine.flatMap((c) => c.logprobs?.text_offset ?? []), choice.logprobs?.text_offset)
            assert.deepStrictEqual(mine.map((c) => c.finish_reason).filter((reason) => reason !== null), [choice.finish_reason])
          })
          const last = chunks[chunks.length - 1]
          assert.deepStrictEqual(last.choices, [])
          assert.deepStrictEqual(last.usage, whole.usage)
        }

        const messages = [{ role: "user" as const, content: "what is 12 plus 30?" }]
        const chat = { model: "tiny", messages, max_tokens: 10, temperature: 0, logprobs: true, top_logprobs: 1, n: 2 }
        const whole = yield* Effect.promise(() => client.chat.completions.create(chat))
        const chunks = yield* Effect.promise(async () => {
          const out: Array<OpenAI.Chat.Completions.ChatCompletionChunk> = []
          for await (const chunk of await client.chat.completions.create({ ...chat, stream: true, stream_options: { include_usage: true } })) out.push(chunk)
          return out
        })
        assert.strictEqual(whole.choices.length, 2)
        whole.choices.forEach((choice, index) => {
          const mine = chunks.flatMap((chunk) => chunk.choices.filter((c) => c.index === index))
          assert.strictEqual(mine[0].delta.role, "assistant")
          assert.strictEqual(mine.map((c) => c.delta.content).join(""), choice.message.content)
          assert.deepStrictEqual(mine.flatMap((c) => c.logprobs?.content ?? []), choice.logprobs?.content)
          assert.deepStrictEqual(mine.map((c) => c.finish_reason).filter((reason) => reason !== null), [choice.finish_reason])
        })
        assert.deepStrictEqual(chunks[chunks.length - 1].usage, whole.usage)
      })
    ))

  it.live("n samples per prompt: seeded, each with its own finish reason and log-probs, prompt by prompt", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        const url = yield* fixture.serve(fixture.model)
        const client = new OpenAI({ baseURL: url, apiKey: "unused", maxRetries: 0 })
        const sampled = (seed: number) =>
          Effect.promise(() =>
            client.chat.completions.create({
              model: "tiny",
              messages: [{ role: "user", content: "hi" }],
              n: 4,
              temperature: 1.5,
              max_tokens: 10,
              seed,
              logprobs: true
            })
          )
        const first = yield* sampled(7)
        assert.deepStrictEqual(first.choices.map((choice) => choice.index), [0, 1, 2, 3])
        for (const choice of first.choices) {
          assert.include(["stop", "length"], choice.finish_reason)
          const tokens = fixture.tokenizer.encode(choice.message.content ?? "", { addSpecialTokens: false })
          assert.isAtLeast(choice.logprobs!.content!.length, tokens.length > 0 ? 1 : 0)
          assert.isAtMost(choice.logprobs!.content!.length, 10)
        }
        const texts = (reply: typeof first) => reply.choices.map((choice) => choice.message.content)
        assert.isAbove(new Set(texts(first)).size, 1, "the samples differ")
        assert.deepStrictEqual(texts(yield* sampled(7)), texts(first), "the same seed samples the same")
        assert.notDeepEqual(texts(yield* sampled(8)), texts(first))
        assert.strictEqual(first.usage?.completion_tokens, first.choices.reduce((sum, choice) => sum + choice.logprobs!.content!.length, 0))

        // Two token-id prompts, two greedy samples each: choices 0 and 1 continue the first prompt, 2 and 3 the second.
        const expected = yield* generateLike(fixture, prompts, { maxNewTokens: 6, temperature: 0 })
        const grouped = yield* Effect.promise(() => client.completions.create({ model: "tiny", prompt: prompts, n: 2, max_tokens: 6, temperature: 0 }))
        assert.deepStrictEqual(grouped.choices.map((choice) => [choice.index, choice.text]), [
          [0, expected[0].text],
          [1, expected[0].text],
          [2, expected[1].text],
          [3, expected[1].text]
        ])
        assert.strictEqual(grouped.usage?.prompt_tokens, prompts[0].length + prompts[1].length)
      })
    ))

  it.live("a client gone mid-stream, 200 requests against a queue of 64 and timeouts leave the server serving and its tensors where they were", () =>
    withServer((fixture) =>
      Effect.gen(function*() {
        const before = tf.memory().numTensors
        const url = yield* fixture.serve(fixture.model, { maxBatch: 8, maxQueue: 64 })
        const client = new OpenAI({ baseURL: url, apiKey: "unused", maxRetries: 0 })
        const serving = Effect.gen(function*() {
          const reply = yield* post(`${url}/completions`, { prompt: prompts[1], max_tokens: 8 })
          assert.strictEqual(reply.status, 200, JSON.stringify(reply.json))
        })

        // The client reads three chunks of a long generation and goes away: its rows leave the batch.
        const read = yield* Effect.promise(async () => {
          const controller = new AbortController()
          const stream = await client.completions.create(
            { model: "tiny", prompt: prompts[0], max_tokens: 2000, temperature: 0, stream: true },
            { signal: controller.signal }
          )
          let chunks = 0
          try {
            for await (const _ of stream) if (++chunks === 3) controller.abort()
          } catch (error) {
            if (!(error instanceof Error && /abort/i.test(error.name + error.message))) throw error
          }
          return chunks
        })
        assert.strictEqual(read, 3)
        yield* serving
        assert.strictEqual(tf.memory().numTensors, before, "the abandoned generation stopped and freed its tensors")

        // Eight long generations fill the batch, each client holding its stream after one chunk;
        // then 200 requests at once: 64 wait for a place, the rest are told to come back.
        const holders = yield* Effect.promise(() =>
          Promise.all(Array.from({ length: 8 }, async () => {
            const controller = new AbortController()
            const stream = await client.completions.create(
              { model: "tiny", prompt: prompts[0], max_tokens: 2000, temperature: 0, stream: true },
              { signal: controller.signal }
            )
            await stream[Symbol.asyncIterator]().next()
            return controller
          }))
        )
        const flood = yield* Effect.promise(async () => {
          let refusals = 0
          let allRefused = () => {}
          const refused = new Promise<void>((resolve) => (allRefused = resolve))
          const replies = Array.from({ length: 200 }, async () => {
            const response = await fetch(`${url}/completions`, {
              method: "POST",
              headers: { "content-type": "application/json" },
              body: JSON.stringify({ prompt: prompts[0], max_tokens: 8, temperature: 0 })
            })
            const reply = { status: response.status, retryAfter: response.headers.get("retry-after"), json: (await response.json()) as any }
            if (reply.status === 429 && ++refusals === 200 - 64) allRefused()
            return reply
          })
          await Promise.race([refused, Promise.all(replies)])
          // The holders go away mid-stream: their rows leave the batch and the queue drains.
          for (const controller of holders) controller.abort()
          return Promise.all(replies)
        })
        const refused = flood.filter(({ status }) => status === 429)
        assert.strictEqual(refused.length, 200 - 64)
        assert.strictEqual(flood.filter(({ status }) => status === 200).length, 64)
        for (const reply of refused) {
          assert.strictEqual(reply.retryAfter, "1")
          assert.strictEqual(reply.json.error.code, "queue_full")
        }
        yield* serving
        assert.strictEqual(tf.memory().numTensors, before)

        // A request past its time limit: a 408, or an error event when streaming.
        const hurried = yield* fixture.serve(fixture.model, { requestTimeout: 0 })
        const late = yield* post(`${hurried}/completions`, { prompt: prompts[0], max_tokens: 4 })
        assert.strictEqual(late.status, 408)
        assert.strictEqual(late.json.error.code, "request_timeout")
        const lateStream = yield* Effect.promise(async () => {
          const stream = await new OpenAI({ baseURL: hurried, apiKey: "unused", maxRetries: 0 }).completions.create({
            model: "tiny",
            prompt: prompts[0],
            max_tokens: 4,
            stream: true
          })
          try {
            for await (const _ of stream) { /* no chunk comes */ }
            return "finished"
          } catch (error) {
            return error instanceof OpenAI.APIError ? error.message : String(error)
          }
        })
        assert.include(lateStream, "--request-timeout")
        yield* serving
        assert.strictEqual(tf.memory().numTensors, before)
      })
    ))

  it.live("logs a line per request, and none with logRequests false", () =>
    Effect.gen(function*() {
      const dir = yield* modelFolder
      const served = { model: yield* Pretrained.load(dir), tokenizer: yield* Tokenizer.load(dir), name: "tiny" }
      const lines: Array<string> = []
      const capture = Logger.layer([Logger.make(({ message }) => lines.push(([] as Array<unknown>).concat(message).join(" ")))])
      const linesOf = (logRequests: boolean | undefined) =>
        Effect.gen(function*() {
          lines.length = 0
          const services = yield* Layer.build(Server.layer(served, { host: "127.0.0.1", port: 0, logRequests }))
          const url = HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)
          assert.strictEqual((yield* request(`${url}/v1/models`)).status, 200)
          return [...lines]
        }).pipe(Effect.scoped, Effect.provide(capture))
      const logged = yield* linesOf(undefined)
      assert.strictEqual(logged.length, 1)
      assert.match(logged[0], /^GET \/v1\/models 200 \d+ms$/)
      assert.deepStrictEqual(yield* linesOf(false), [])
    }).pipe(onBackend("wasm")))

  it.live("cascade serve prints its URL, answers, takes its limits from flags, and stops on SIGINT", () =>
    Effect.gen(function*() {
      const dir = yield* modelFolder
      // No request may wait: the queue flag reaches the server.
      const { url, child, exited } = yield* serveCli(dir, ["--max-queue", "0", "--max-batch", "2", "--request-timeout", "5"])
      const models = yield* request(`${url}/models`)
      assert.strictEqual(models.status, 200)
      assert.strictEqual(models.json.data[0].id, dir)
      const refused = yield* post(`${url}/completions`, { prompt: prompts[0], max_tokens: 2 })
      assert.strictEqual(refused.status, 429)
      assert.strictEqual((yield* post(`${url}/completions`, { prompt: prompts[0], n: 3 })).json.error.param, "n")
      child.kill("SIGINT")
      assert.strictEqual(yield* Effect.promise(() => exited), 130)
    }).pipe(Effect.scoped))

  it.live("cascade serve of a folder without tokenizer.json serves token-id prompts to a distilling student, and text gets a 400", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const folder = path.join(dir, "model")
      yield* Effect.promise(async () => {
        await fs.mkdir(folder)
        for (const file of ["config.json", "model.safetensors"]) {
          await fs.copyFile(path.join(sharedFixture("tiny-mistral"), file), path.join(folder, file))
        }
      })
      const { url, output } = yield* serveCli(folder)
      assert.include(output, "token-id prompts only")
      const base = url.replace(/\/v1$/, "")

      // Another model distils for two steps from the server, and from the folder run in process: the same losses.
      const data = yield* markovData(path.join(dir, "train.jsonl"), 16, 24, 5)
      const distilled = (teacher: Layer.Layer<TeacherService, unknown, TensorBackend>, out: string) =>
        Effect.gen(function*() {
          const steps: Array<StepMetrics> = []
          yield* distill({
            studentDir: localFixture("mistral-mqa"), data, out: path.join(dir, out), seq: 16, steps: 2, seed: 1, batch: 2, accumulate: 1,
            learningRate: 1e-3, minLearningRate: 1e-4, warmupSteps: 0, weightDecay: 0, maxGradNorm: 1, saveEvery: 2,
            loss: { temperature: 1, crossEntropyWeight: 0, restBucket: false, maxOutsideMass: 1 },
            onStep: (metrics) => steps.push(metrics)
          }).pipe(Effect.scoped, Effect.provide(Layer.provideMerge(teacher, TensorBackend.layer("wasm"))))
          return steps
        })
      const remote = yield* distilled(Teacher.remote([base], { topK: 8 }), "remote")
      const local = yield* distilled(Teacher.inProcess(folder, { topK: 8 }), "local")
      assert.strictEqual(remote.length, 2)
      remote.forEach((step, i) => assert.closeTo(step.kl, local[i].kl, 1e-4, `step ${i + 1}`))

      // Token ids in, token ids out: empty text, legacy log-probs naming token ids, no decoded tokens.
      const [expected] = yield* Effect.gen(function*() {
        const model = yield* Pretrained.load(folder)
        return yield* Generate.generate(model, [prompts[0]], { maxNewTokens: 4, temperature: 0, stopTokenIds: [2] })
      }).pipe(Effect.scoped, onBackend("wasm"))
      const reply = yield* post(`${url}/completions`, { prompt: prompts[0], max_tokens: 4, temperature: 0, logprobs: 1, prompt_logprobs: 1 })
      assert.strictEqual(reply.status, 200, JSON.stringify(reply.json))
      const [choice] = reply.json.choices
      assert.strictEqual(choice.text, "")
      assert.deepStrictEqual(choice.logprobs.tokens, expected.tokens.map((id) => `token_id:${id}`))
      assert.include(Object.keys(choice.logprobs.top_logprobs[0]), `token_id:${expected.tokens[0]}`)
      assert.isNull(choice.prompt_logprobs[1][String(prompts[0][1])].decoded_token)

      // What needs the tokenizer is a 400 saying that the folder has none; the server goes on serving.
      const refused: Array<[string, unknown, string]> = [
        ["completions", { prompt: "What is 2 plus 2?" }, "prompt"],
        ["completions", { prompt: ["two", "texts"] }, "prompt"],
        ["completions", { prompt: prompts[0], stop: ["."] }, "stop"],
        ["completions", { prompt: prompts[0], echo: true }, "echo"],
        ["chat/completions", { messages: [{ role: "user", content: "hi" }] }, "messages"]
      ]
      for (const [endpoint, body, param] of refused) {
        const answer = yield* post(`${url}/${endpoint}`, body)
        assert.strictEqual(answer.status, 400, JSON.stringify(body))
        assert.strictEqual(answer.json.error.param, param)
        assert.include(answer.json.error.message, `The model folder ${folder} has no tokenizer (tokenizer.json)`)
      }
      const after = yield* post(`${url}/completions`, { prompt: prompts[1], max_tokens: 2 })
      assert.strictEqual(after.status, 200)
    }).pipe(Effect.scoped))
})
