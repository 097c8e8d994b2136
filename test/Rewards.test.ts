import { assert, describe, it } from "@effect/vitest"
import { Context, Effect, Layer, Logger, Schema } from "effect"
import { HttpServer } from "effect/http"
import { createServer, type IncomingMessage } from "node:http"
import type { Socket } from "node:net"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import * as Rewards from "../layers/Rewards.ts"
import * as tf from "@tensorflow/tfjs"
import type { ModelConfig } from "../src/model/Config.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import { Rewards as RewardsService, type Sample, type Score, type Task } from "../src/rewards/Reward.ts"
import * as Server from "../src/serve/Server.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { onBackend, sharedFixture } from "./support.ts"

const score = <E>(layer: Layer.Layer<RewardsService, E>, sample: Sample) =>
  Effect.gen(function*() {
    const rewards = yield* RewardsService
    return yield* rewards.score(sample)
  }).pipe(Effect.provide(layer))

const tempDir = Effect.acquireRelease(
  Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "cascade-rewards-"))),
  (dir) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true }))
)

describe("Rewards.layer", () => {
  const layer = Rewards.layer({ code: { timeoutMs: 500, memoryMb: 32 } })
  const sample = (response: string, task: Task): Sample => ({ prompt: "a question", response, task })

  it.live("checks numeric and exact answers, formats and code here", () =>
    Effect.gen(function*() {
      const numeric = yield* score(layer, sample("[THINK]or 1,233?[/THINK]It is 1,234.", { kind: "numeric", answer: "1234" }))
      assert.strictEqual(numeric.reward, 1)
      const exact = yield* score(layer, sample("[THINK]green?[/THINK]red", { kind: "exact", answer: "red" }))
      assert.strictEqual(exact.reward, 1)
      const format = yield* score(layer, sample("[THINK]x[/THINK]\\boxed{3}", { kind: "format", pattern: "\\\\boxed\\{\\d+\\}$" }))
      assert.strictEqual(format.reward, 1)
      const code = yield* score(layer, sample("```js\nconst double = (x) => x * 2\n```", {
        kind: "code",
        entry: "double",
        tests: "test('one', () => assert.equal(double(1), 2)); test('big', () => assert.equal(double(1e9), 3e9))"
      }))
      assert.deepStrictEqual(code, {
        reward: 0.5,
        checks: [{ name: "one", passed: true }, { name: "big", passed: false, note: "Error: expected 3000000000, got 2000000000" }]
      })
    }))

  it.effect("a task that cannot be checked fails with a RewardError, as does a rubric with no judge", () =>
    Effect.gen(function*() {
      const failures: ReadonlyArray<[Task, RegExp]> = [
        [{ kind: "numeric", answer: "many" }, /^reward numeric: the expected answer "many" is not a number$/],
        [{ kind: "format", pattern: "(" }, /^reward format: the pattern is not a regular expression/],
        [{ kind: "code", entry: "f", tests: "test(" }, /^reward code: the tests do not parse/],
        [{ kind: "rubric", items: ["is kind"] }, /^reward rubric: no judge is configured to check rubrics$/]
      ]
      for (const [task, message] of failures) {
        const error = yield* Effect.flip(score(layer, sample("const f = () => 1", task)))
        assert.strictEqual(error._tag, "RewardError")
        assert.match(error.message, message)
      }
    }))
})

// ---------------------------------------------------------------------------------------------
// A judge over real HTTP

type Fault = "ok" | "500" | "429" | "400" | "hang" | "garbage" | "notjson" | "truncate" | "reset"

/** What the judge server does with an item: the keyword to look for, and a fault per try (then "ok"). */
interface Script {
  readonly keyword: string
  readonly faults: ReadonlyArray<Fault>
}

const readBody = (request: IncomingMessage) =>
  new Promise<string>((resolve, reject) => {
    const chunks: Array<Buffer> = []
    request.on("data", (chunk: Buffer) => chunks.push(chunk)).on("end", () => resolve(Buffer.concat(chunks).toString())).on("error", reject)
  })

const count = (text: string, word: string) => text.split(word).length - 1

/**
 * A chat-completions server on a free loopback port that judges deterministically: "Yes" iff the
 * item's keyword appears in the question beside the item itself (so in the prompt or response).
 * The item is recognised by its text; its n-th request gets `faults[n]`.
 */
const judgeServer = (scripts: Readonly<Record<string, Script>>, options: { readonly delayMs?: number } = {}) =>
  Effect.acquireRelease(
    Effect.promise(() => {
      const tries = new Map<string, number>()
      const questions: Array<string> = []
      let inFlight = 0
      let maxInFlight = 0
      const sockets = new Set<Socket>()
      const server = createServer(async (request, response) => {
        inFlight++
        maxInFlight = Math.max(maxInFlight, inFlight)
        response.on("close", () => inFlight--)
        const { messages } = JSON.parse(await readBody(request)) as { messages: Array<{ content: string }> }
        const question = messages[0].content
        questions.push(question)
        const item = Object.keys(scripts).find((item) => question.includes(item))
        if (item === undefined) throw new Error(`no scripted item in ${question}`)
        const attempt = tries.get(item) ?? 0
        tries.set(item, attempt + 1)
        const fault = scripts[item].faults[attempt] ?? "ok"
        if (options.delayMs !== undefined) await new Promise((resolve) => setTimeout(resolve, options.delayMs))
        const status = { "500": 500, "429": 429, "400": 400 }[fault as string]
        if (status !== undefined) {
          response.writeHead(status, { "content-type": "application/json" })
          return response.end(JSON.stringify({ error: { message: `injected ${fault}`, type: "test", param: null, code: null } }))
        }
        if (fault === "hang") return // until the client gives up
        if (fault === "reset") return request.socket.destroy()
        const answer = fault === "garbage" ? "Perhaps." : count(question, scripts[item].keyword) > 1 ? "Yes." : "No."
        const body = fault === "notjson"
          ? "<html>busy</html>"
          : JSON.stringify({ object: "chat.completion", choices: [{ index: 0, message: { role: "assistant", content: answer }, finish_reason: "stop" }] })
        response.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) })
        if (fault === "truncate") response.write(body.slice(0, body.length >> 1), () => request.socket.destroy())
        else response.end(body)
      })
      server.on("connection", (socket) => {
        sockets.add(socket)
        socket.on("close", () => sockets.delete(socket))
      })
      return new Promise<{
        url: string
        requests: () => number
        tries: (item: string) => number
        questions: ReadonlyArray<string>
        maxInFlight: () => number
        close: () => Promise<void>
      }>((resolve) =>
        server.listen(0, "127.0.0.1", () =>
          resolve({
            url: `http://127.0.0.1:${(server.address() as { port: number }).port}`,
            requests: () => questions.length,
            tries: (item) => tries.get(item) ?? 0,
            questions,
            maxInFlight: () => maxInFlight,
            close: () =>
              new Promise((closed) => {
                sockets.forEach((socket) => socket.destroy())
                server.close(() => closed())
              })
          }))
      )
    }),
    (server) => Effect.promise(server.close)
  )

/** Fast retries and a short timeout, so that each fault costs milliseconds. */
const fast = { retries: 3, backoff: "5 millis", timeout: "500 millis" } as const

const rubric = (items: ReadonlyArray<string>, response: string): Sample => ({ prompt: "Write about fruit.", response, task: { kind: "rubric", items } })

const verdicts = (result: Score) => result.checks.map(({ passed }) => passed)

describe("Rewards.judge", () => {
  it.live("retries 500, 429, hangs, resets, unreadable and cut-short answers, and then has its verdicts", () =>
    Effect.gen(function*() {
      const scripts: Record<string, Script> = {
        "mentions apple": { keyword: "apple", faults: ["500", "500"] },
        "mentions pear": { keyword: "pear", faults: ["429"] },
        "mentions plum": { keyword: "plum", faults: ["hang", "reset"] },
        "mentions fig": { keyword: "fig", faults: ["garbage", "notjson"] },
        "mentions kiwi": { keyword: "kiwi", faults: ["truncate", "truncate", "truncate"] }
      }
      const server = yield* judgeServer(scripts)
      const result = yield* score(Rewards.judge({ urls: [server.url], ...fast }), rubric(Object.keys(scripts), "An apple, a plum and a kiwi."))
      assert.deepStrictEqual(result, {
        reward: 3 / 5,
        checks: [
          { name: "mentions apple", passed: true },
          { name: "mentions pear", passed: false },
          { name: "mentions plum", passed: true },
          { name: "mentions fig", passed: false },
          { name: "mentions kiwi", passed: true }
        ]
      })
      for (const [item, { faults }] of Object.entries(scripts)) assert.strictEqual(server.tries(item), faults.length + 1, item)
    }))

  it.live("an item without a verdict after its retries is left out of the reward, never counted as a miss", () =>
    Effect.gen(function*() {
      const scripts: Record<string, Script> = {
        "mentions apple": { keyword: "apple", faults: [] },
        "mentions pear": { keyword: "pear", faults: ["500", "500", "500", "500"] },
        "mentions plum": { keyword: "plum", faults: ["garbage", "garbage", "garbage", "garbage"] },
        "mentions fig": { keyword: "fig", faults: ["hang", "hang", "hang", "hang"] },
        "mentions kiwi": { keyword: "kiwi", faults: ["400", "400"] }
      }
      const server = yield* judgeServer(scripts)
      const result = yield* score(Rewards.judge({ urls: [server.url], ...fast }), rubric(Object.keys(scripts), "An apple, a pear, a plum, a fig, a kiwi."))
      assert.strictEqual(result.reward, 1, "one item decided, and satisfied")
      assert.deepStrictEqual(verdicts(result), [true, undefined, undefined, undefined, undefined])
      const notes = result.checks.map(({ note }) => note)
      assert.match(notes[1]!, /^StatusCode.*500.*\(after 4 tries\)$/)
      assert.strictEqual(notes[2], 'the judge answered "Perhaps.", neither yes nor no (after 4 tries)')
      assert.strictEqual(notes[3], "no answer within 500ms (after 4 tries)")
      assert.match(notes[4]!, /^StatusCode.*400/)
      assert.strictEqual(server.tries("mentions kiwi"), 1, "a 400 is not tried again")
      assert.strictEqual(server.tries("mentions pear"), 4, "the first try and 3 retries")

      const none = yield* score(Rewards.judge({ urls: [server.url], ...fast }), rubric(["mentions kiwi"], "A kiwi."))
      assert.isUndefined(none.reward, "no item decided: no reward")
    }))

  it.live("judges the response without its thinking", () =>
    Effect.gen(function*() {
      const server = yield* judgeServer({ "mentions apple": { keyword: "apple", faults: [] } })
      const result = yield* score(Rewards.judge({ urls: [server.url], ...fast }), rubric(["mentions apple"], "[THINK]an apple?[/THINK]A pear."))
      assert.strictEqual(result.reward, 0)
      assert.notInclude(server.questions[0], "THINK")
      assert.include(server.questions[0], "Write about fruit.\n\nResponse:\nA pear.\n\nDoes the response satisfy: mentions apple? Answer yes or no.")
    }))

  it.live("caches verdicts: a rerun replays them without a request, and asks again only about items that failed", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const cacheDir = path.join(dir, "judge")
      const scripts: Record<string, Script> = {
        "mentions apple": { keyword: "apple", faults: [] },
        "mentions pear": { keyword: "pear", faults: [] },
        "mentions plum": { keyword: "plum", faults: ["500", "500", "500", "500"] }
      }
      const sample = rubric(Object.keys(scripts), "An apple and a plum.")
      const server = yield* judgeServer(scripts)
      const judge = () => Rewards.judge({ urls: [server.url], model: "judge-1", cacheDir, ...fast })
      const first = yield* score(judge(), sample)
      assert.deepStrictEqual(verdicts(first), [true, false, undefined])
      assert.strictEqual(server.requests(), 6)

      const second = yield* score(judge(), sample)
      assert.deepStrictEqual(verdicts(second), [true, false, true], "the plum was asked again, the others replayed")
      assert.strictEqual(server.requests(), 7)
      assert.strictEqual(server.tries("mentions plum"), 5)

      // A line cut short by a crash is skipped, and the next verdict is not glued to it.
      yield* Effect.promise(() => fs.appendFile(path.join(cacheDir, "verdicts.jsonl"), '{"key":"abc","pas'))
      const replayed = yield* score(judge(), sample)
      assert.deepStrictEqual(replayed, second)
      assert.strictEqual(server.requests(), 7, "all replayed")
      const other = rubric(["mentions apple"], "No fruit here.")
      yield* score(judge(), other)
      assert.strictEqual(server.requests(), 8)
      yield* score(judge(), other)
      assert.strictEqual(server.requests(), 8, "the verdict written after the cut line reads back")

      const otherJudge = yield* score(Rewards.judge({ urls: [server.url], model: "judge-2", cacheDir, ...fast }), other)
      assert.strictEqual(otherJudge.reward, 0)
      assert.strictEqual(server.requests(), 9, "another judge's verdicts are its own")
    }))

  it.live("keeps at most `concurrency` requests in flight, and tries go to the servers in turn", () =>
    Effect.gen(function*() {
      const items = Array.from({ length: 8 }, (_, i) => `mentions fruit${i}x`)
      const scripts = Object.fromEntries(items.map((item, i) => [item, { keyword: `fruit${i}x`, faults: [] as Array<Fault> }]))
      const server = yield* judgeServer(scripts, { delayMs: 30 })
      const result = yield* score(Rewards.judge({ urls: [server.url], concurrency: 3, ...fast }), rubric(items, "fruit1x fruit2x"))
      assert.strictEqual(result.reward, 2 / 8)
      assert.strictEqual(server.maxInFlight(), 3)

      const down = yield* judgeServer(Object.fromEntries(items.map((item) => [item, { keyword: "x", faults: Array<Fault>(9).fill("500") }])))
      const shared = yield* score(Rewards.judge({ urls: [down.url, server.url], concurrency: 3, ...fast }), rubric(items, "fruit1x fruit2x"))
      assert.strictEqual(shared.reward, 2 / 8, "each item's retry went to the server that answers")
    }))

  const Pattern = Schema.Struct({
    satisfied: Schema.Boolean,
    faults: Schema.Array(Schema.Literals(["500", "429", "garbage", "notjson", "truncate", "reset", "hang"])).check(Schema.isMaxLength(4))
  })

  it.live.prop(
    "a rubric reward is in [0, 1], the share of decided items satisfied: failed judge calls are left out",
    { patterns: Schema.Array(Pattern).check(Schema.isMinLength(1), Schema.isMaxLength(6)) },
    ({ patterns }) =>
      Effect.gen(function*() {
        const retries = 2
        const items = patterns.map((_, i) => `mentions fruit${i}x`)
        const server = yield* judgeServer(Object.fromEntries(items.map((item, i) => [item, { keyword: `fruit${i}x`, faults: patterns[i].faults }])))
        const response = patterns.flatMap(({ satisfied }, i) => (satisfied ? [`fruit${i}x`] : [])).join(" ")
        const result = yield* score(Rewards.judge({ urls: [server.url], ...fast, retries, timeout: "250 millis" }), rubric(items, response))
        const expected = patterns.map(({ satisfied, faults }) => (faults.length > retries ? undefined : satisfied))
        assert.deepStrictEqual(verdicts(result), expected)
        const decided = expected.filter((verdict) => verdict !== undefined)
        if (decided.length === 0) assert.isUndefined(result.reward)
        else {
          assert.strictEqual(result.reward, decided.filter(Boolean).length / decided.length)
          assert.isTrue(result.reward! >= 0 && result.reward! <= 1)
        }
        for (const [i, { faults }] of patterns.entries()) assert.strictEqual(server.tries(items[i]), Math.min(faults.length, retries) + 1)
      }),
    { arbitrary: { runs: 25 } }
  )

  it.effect("fails with a RewardError for tasks other than rubrics, empty rubrics and bad options", () =>
    Effect.gen(function*() {
      const judge = Rewards.judge({ urls: ["http://127.0.0.1:9"] })
      const numeric = yield* Effect.flip(score(judge, { prompt: "p", response: "1", task: { kind: "numeric", answer: "1" } }))
      assert.strictEqual(numeric.message, "reward judge http://127.0.0.1:9: the judge checks rubrics, not numeric tasks")
      const empty = yield* Effect.flip(score(judge, rubric([], "r")))
      assert.strictEqual(empty.reason, "the rubric has no items")
      const none = yield* Effect.flip(score(Rewards.judge({ urls: [] }), rubric(["x"], "r")))
      assert.strictEqual(none.reason, "no judge URL given")
      const retries = yield* Effect.flip(score(Rewards.judge({ urls: ["http://127.0.0.1:9"], retries: -1 }), rubric(["x"], "r")))
      assert.match(retries.reason, /retries a non-negative/)
    }))
})

// ---------------------------------------------------------------------------------------------
// Through cascade serve

const chatTemplate = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}" +
  "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}" +
  "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"

/** The fixture model with the fixture tokenizer and a Mistral-style chat template, in a temporary folder. */
const modelFolder = Effect.gen(function*() {
  const dir = yield* tempDir
  yield* Effect.promise(async () => {
    for (const file of ["config.json", "model.safetensors"]) await fs.copyFile(path.join(sharedFixture("tiny-mistral"), file), path.join(dir, file))
    await fs.copyFile(sharedFixture("tiny-bpe/tokenizer.json"), path.join(dir, "tokenizer.json"))
    const config = { bos_token: "<s>", eos_token: "</s>", add_bos_token: true, chat_template: chatTemplate }
    await fs.writeFile(path.join(dir, "tokenizer_config.json"), JSON.stringify(config))
  })
  return dir
})

/**
 * A judge checkpoint whose verdicts are known by construction: it answers "Yes" when the question
 * it is asked holds a "%" and "No" otherwise, then stops. The fixture's shape, its weights zero
 * but for one attention head and a bigram table:
 * - embeddings one-hot: [/INST] in dimension 0, "%" in 1, "Y" "es" "N" "o" in 2-5, the rest in 6;
 * - layer 0's head 0 queries from [/INST] and keys from "%" in the slowest RoPE pair (rotated by
 *   under 2e-3 rad here), scores 40 against 0: at [/INST] it reads "%"'s value (8) into dimension 7
 *   when the question has one, and nothing otherwise; every other output projection is zero;
 * - the LM head, after the final norm: "Y" from dimension 7, "N" from dimension 0, then
 *   "Y" -> "es" -> EOS and "N" -> "o" -> EOS.
 */
const percentJudge = (config: ModelConfig, tokenizer: Tokenizer.Tokenizer) => {
  const id = (token: string) => {
    const ids = tokenizer.encode(token, { addSpecialTokens: false })
    assert.strictEqual(ids.length, 1, token)
    return ids[0]
  }
  const [endOfPrompt, percent, Y, es, N, o] = ["[/INST]", "%", "Y", "es", "N", "o"].map(id)
  const eos = tokenizer.eosId!
  const { hiddenSize: d, headDim: e } = config
  const values = new Map(Model.tensorShapes(config).map(({ name, shape }) => [name, { shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) }]))
  const set = (name: string, row: number, column: number, value: number) => {
    const { shape, data } = values.get(name)!
    data[shape.length === 1 ? row : row * shape[1] + column] = value
  }
  const own = new Map([[endOfPrompt, 0], [percent, 1], [Y, 2], [es, 3], [N, 4], [o, 5]])
  for (let token = 0; token < config.vocabSize; token++) set("model.embed_tokens.weight", token, own.get(token) ?? 6, 1)
  for (let i = 0; i < config.numLayers; i++) {
    for (let j = 0; j < d; j++) {
      set(`model.layers.${i}.input_layernorm.weight`, j, 0, 1)
      set(`model.layers.${i}.post_attention_layernorm.weight`, j, 0, 1)
    }
  }
  for (let j = 0; j < d; j++) set("model.norm.weight", j, 0, 1)
  const slowest = e / 2 - 1
  set("model.layers.0.self_attn.q_proj.weight", slowest, 0, Math.sqrt(2.5))
  set("model.layers.0.self_attn.k_proj.weight", slowest, 1, Math.sqrt(2.5))
  set("model.layers.0.self_attn.v_proj.weight", 0, 1, 1)
  set("model.layers.0.self_attn.o_proj.weight", 7, 0, 1)
  for (const [row, column] of [[Y, 7], [N, 0], [es, 2], [eos, 3], [o, 4], [eos, 5]]) {
    set("lm_head.weight", row, column, row === N ? 2 : 4)
  }
  const tensors = new Map([...values].map(([name, { shape, data }]) => [name, tf.tensor(data, shape)]))
  return Model.make(config, Model.weightsFromTensors(config, tensors))
}

describe("Rewards.judge through cascade serve", () => {
  it.live("asks the served model about each item over the chat API: the reward is the share of items its verdicts satisfy", () =>
    Effect.gen(function*() {
      const dir = yield* modelFolder
      const tokenizer = yield* Tokenizer.load(dir)
      const model = yield* Effect.acquireRelease(
        Effect.map(Pretrained.load(dir), (fixture) => percentJudge(fixture.config, tokenizer)),
        (judge) => Effect.sync(() => Model.dispose(judge))
      )
      const services = yield* Layer.build(Server.layer({ model, tokenizer, name: "percent" }, { host: "127.0.0.1", port: 0 }))
      const url = HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)
      const judge = Rewards.judge({ urls: [url], model: "percent", retries: 0, timeout: "30 seconds", maxTokens: 4 })
      const items = ["uses the % sign", "is polite", "is short"]
      // The "%" of the thinking is not shown to the judge: only the item's own.
      const without = yield* score(judge, rubric(items, "[THINK]50%[/THINK]An apple, please."))
      assert.deepStrictEqual(without, {
        reward: 1 / 3,
        checks: [{ name: items[0], passed: true }, { name: items[1], passed: false }, { name: items[2], passed: false }]
      })
      const withPercent = yield* score(judge, rubric(items, "Apples are 90% water."))
      assert.deepStrictEqual(withPercent, { reward: 1, checks: items.map((name) => ({ name, passed: true })) })
    }).pipe(onBackend("wasm"), Effect.provide(Logger.layer([]))))
})
