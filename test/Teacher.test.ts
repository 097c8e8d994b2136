import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Context, Effect, Layer, References, Stream } from "effect"
import { HttpServer } from "effect/http"
import * as fs from "node:fs/promises"
import { createServer, type IncomingMessage } from "node:http"
import type { Socket } from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import * as Teachers from "../layers/Teacher.ts"
import * as Dataset from "../src/data/Dataset.ts"
import * as Loss from "../src/train/Loss.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Server from "../src/serve/Server.ts"
import { type Annotated, type Batch, Teacher, TeacherError, toLossTeacher } from "../src/train/Teacher.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import * as Training from "../src/train/Training.ts"
import * as TeacherCache from "../stages/TeacherCache.ts"
import { lcgData, onBackend, readMetrics, sharedFixture, take } from "./support.ts"

const fixture = sharedFixture("tiny-mistral")
const SEQ = 16

/** A temp folder holding `lcgData`: packed by 16, 8 rows, the last with 11 real tokens. */
const writeData = Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "teacher-"))).pipe(
  Effect.flatMap((dir) => Effect.map(lcgData(dir), (data) => ({ dir, data })))
)

/** The packed rows of `data` in batches of `size`, with their indices. */
const batchesOf = (data: string, size: number) =>
  Effect.map(Stream.runCollect(Dataset.sequences(data, { vocabSize: 512 }).pipe(Dataset.pack(SEQ))), (rows) => {
    const batches: Array<Batch> = []
    for (let at = 0; at < rows.length; at += size) {
      batches.push({ rows: rows.slice(at, at + size), indices: rows.slice(at, at + size).map((_, r) => at + r) })
    }
    return batches
  })

/** What the teacher of `layer` says about `batches`. */
const annotateWith = <E, R>(layer: Layer.Layer<Teacher, E, R>, batches: ReadonlyArray<Batch>) =>
  Effect.gen(function*() {
    const teacher = yield* Teacher
    return yield* Stream.runCollect(teacher.annotate(Stream.fromIterable(batches)))
  }).pipe(Effect.provide(layer))

/** KL of `student` against each annotated batch, as training computes it. */
const losses = (student: Model.Model, annotated: ReadonlyArray<Annotated>) =>
  Effect.forEach(annotated, ({ batch, teacher }) =>
    Effect.scoped(Effect.gen(function*() {
      const mask = Dataset.rowMask(batch.rows)
      const lossTeacher = toLossTeacher(teacher, batch.rows.length, SEQ)
      const target = yield* Loss.teacherTarget(lossTeacher, student.config.vocabSize, mask, Loss.defaultOptions)
      tf.dispose(lossTeacher._tag === "Full" ? [lossTeacher.logProbs] : [lossTeacher.ids, lossTeacher.logProbs])
      const logits = Model.forward(student, batch.rows.map((row) => row.ids), { attentionMask: mask }).logits
      const targets = batch.rows.map((row) => [...row.ids.slice(1), 0])
      const { loss, metrics } = Loss.distillation(logits, target, { mask, targets }, Loss.defaultOptions)
      tf.dispose([logits, loss])
      return readMetrics(metrics).kl
    })))

const maxDiff = (a: ReadonlyArray<number>, b: ReadonlyArray<number>) => Math.max(...a.map((x, i) => Math.abs(x - b[i])))

/**
 * `cascade serve` over the fixture (with the tiny BPE tokenizer, whose texts we never use) on a free
 * port, allowing the whole vocabulary as prompt_logprobs (`--max-logprobs 512`).
 */
const serve = Effect.gen(function*() {
  const served = {
    model: yield* Pretrained.load(fixture),
    tokenizer: yield* Tokenizer.load(sharedFixture("tiny-bpe")),
    name: "tiny-mistral",
    maxLogprobs: 512
  }
  const services = yield* Layer.build(Server.layer(served, { host: "127.0.0.1", port: 0 }))
  return HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)
})

/** Runs a test on wasm with the fixture's data; the server's request log is kept quiet. */
const withData = <A, E, R>(test: (data: { dir: string; data: string }) => Effect.Effect<A, E, R>) =>
  Effect.acquireUseRelease(writeData, test, ({ dir }) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true }))).pipe(
    onBackend("wasm"),
    Effect.provideService(References.MinimumLogLevel, "Warn")
  )

describe("Teacher.inProcess", () => {
  it.live("gives the log-softmax of the forward pass at each position, or its top-k largest first, zero at padding", () =>
    withData(({ data }) =>
      Effect.gen(function*() {
        const batches = yield* batchesOf(data, 3)
        const model = yield* Pretrained.load(fixture)
        const before = tf.memory().numTensors
        const full = yield* annotateWith(Teachers.inProcess(fixture), batches)
        const top = yield* annotateWith(Teachers.inProcess(fixture, { topK: 5 }), batches)
        assert.strictEqual(tf.memory().numTensors, before, "the teachers leave no tensors behind")
        for (const [i, batch] of batches.entries()) {
          const logits = take(Model.forward(model, batch.rows.map((row) => row.ids), { attentionMask: Dataset.rowMask(batch.rows) }).logits)
          const fullOutput = full[i].teacher
          const topOutput = top[i].teacher
          assert(fullOutput._tag === "Full" && topOutput._tag === "TopK")
          batch.rows.forEach((row, r) =>
            row.ids.forEach((_, t) => {
              const at = (r * SEQ + t) * 512
              const logProbs = fullOutput.logProbs.subarray(at, at + 512)
              const ids = topOutput.ids.subarray((r * SEQ + t) * 5, (r * SEQ + t + 1) * 5)
              const values = topOutput.logProbs.subarray((r * SEQ + t) * 5, (r * SEQ + t + 1) * 5)
              if (t >= row.length) {
                assert(logProbs.every((x) => x === 0) && values.every((x) => x === 0), "padding holds zeros")
                return
              }
              const row64 = Array.from(logits.subarray(at, at + 512))
              const max = Math.max(...row64)
              const logSum = Math.log(row64.reduce((sum, x) => sum + Math.exp(x - max), 0))
              assert(maxDiff(Array.from(logProbs), row64.map((x) => x - max - logSum)) < 1e-5)
              const sorted = Array.from(logProbs.keys()).sort((a, b) => logProbs[b] - logProbs[a])
              assert.deepStrictEqual(Array.from(ids), sorted.slice(0, 5))
              assert.deepStrictEqual(Array.from(values), Array.from(ids, (id) => logProbs[id]))
            })
          )
        }
      })
    ))

  it.live("computes at most batchAhead batches ahead of a slow consumer", () =>
    withData(({ data }) =>
      Effect.gen(function*() {
        const batches = yield* batchesOf(data, 1)
        for (const batchAhead of [0, 1, 2]) {
          const ahead = yield* maxAhead(Teachers.inProcess(fixture, { topK: 4, batchAhead }), batches)
          assert.isAtMost(ahead, batchAhead)
          if (batchAhead > 0) assert.isAtLeast(ahead, 1, "it does compute ahead")
        }
      })
    ))
})

/** The most batches a source has pulled beyond the one its consumer is working on, the consumer being slow. */
const maxAhead = <E, R>(layer: Layer.Layer<Teacher, E, R>, batches: ReadonlyArray<Batch>) =>
  Effect.gen(function*() {
    const teacher = yield* Teacher
    let pulled = 0
    let consumed = 0
    let ahead = 0
    const source = Stream.fromIterable(batches).pipe(Stream.rechunk(1), Stream.tap(() => Effect.sync(() => pulled++)))
    yield* teacher.annotate(source).pipe(Stream.runForEach(() =>
      Effect.gen(function*() {
        yield* Effect.sleep(40)
        ahead = Math.max(ahead, pulled - consumed - 1)
        consumed++
      })
    ))
    return ahead
  }).pipe(Effect.provide(layer))

describe("Teacher sources", () => {
  it.live("in-process, cached and remote (through cascade serve) give the same distillation loss", () =>
    withData(({ dir, data }) =>
      Effect.gen(function*() {
        const url = yield* serve
        const batches = yield* batchesOf(data, 3)
        const student = yield* Training.initialise((yield* Pretrained.load(fixture)).config, 7)
        const before = tf.memory().numTensors
        const lossesOf = <E, R>(layer: Layer.Layer<Teacher, E, R>) => Effect.flatMap(annotateWith(layer, batches), (annotated) => losses(student, annotated))
        const cached = (topK: number) =>
          Effect.gen(function*() {
            const out = path.join(dir, `cache-${topK}`)
            yield* TeacherCache.writeCache({ teacherDir: fixture, data, out, seq: SEQ, topK, batchSize: 3, rowsPerShard: 3 })
              .pipe(Effect.provide(Teachers.inProcess(fixture, { topK })))
            return yield* lossesOf(Teachers.offlineCache(out, { data, seq: SEQ, tokenizerHash: null }))
          })

        // The whole vocabulary as top-k: the same loss as the full distribution.
        const full = yield* lossesOf(Teachers.inProcess(fixture))
        const fullTopK = yield* lossesOf(Teachers.inProcess(fixture, { topK: 512 }))
        const fullCache = yield* cached(512)
        const fullRemote = yield* lossesOf(Teachers.remote([url], { topK: 512, concurrency: 4 }))
        const top20 = yield* lossesOf(Teachers.inProcess(fixture, { topK: 20 }))
        const cache20 = yield* cached(20)
        const remote20 = yield* lossesOf(Teachers.remote([url], { topK: 20, concurrency: 4 }))
        assert.strictEqual(tf.memory().numTensors, before, "no source leaves tensors behind")

        const report = {
          full: full.map((x) => x.toFixed(6)).join(" "),
          "top-512 in-process": maxDiff(fullTopK, full),
          "top-512 cache": maxDiff(fullCache, full),
          "top-512 remote": maxDiff(fullRemote, full),
          "top-20 in-process": top20.map((x) => x.toFixed(6)).join(" "),
          "top-20 cache": maxDiff(cache20, top20),
          "top-20 remote": maxDiff(remote20, top20)
        }
        console.log("distillation KL per batch and max |difference| to the first of its group:", report)
        assert.isBelow(maxDiff(fullTopK, full), 1e-3)
        assert.isBelow(maxDiff(fullCache, full), 1e-3)
        assert.isBelow(maxDiff(fullRemote, full), 1e-3)
        assert.isBelow(maxDiff(cache20, top20), 1e-3)
        assert.isBelow(maxDiff(remote20, top20), 1e-3)
        assert.isAbove(maxDiff(top20, full), 1e-3, "top-20 is a different target from the full distribution")
      })
    ))
})

type Fault = "ok" | "500" | "429" | "400" | "hang" | "reset" | "truncate" | "positions"

const readBody = (request: IncomingMessage) =>
  new Promise<string>((resolve, reject) => {
    const chunks: Array<Buffer> = []
    request.on("data", (chunk: Buffer) => chunks.push(chunk)).on("end", () => resolve(Buffer.concat(chunks).toString())).on("error", reject)
  })

/**
 * A real HTTP server on a free port that answers its n-th request with `faults[n]` (the last one
 * repeating): an injected failure, or cascade serve's answer at `upstream`, whole or damaged.
 */
const faultServer = (upstream: string, faults: ReadonlyArray<Fault>) =>
  Effect.acquireRelease(
    Effect.promise(() => {
      let requests = 0
      const sockets = new Set<Socket>()
      const server = createServer(async (request, response) => {
        const fault = faults[Math.min(requests++, faults.length - 1)]
        const body = await readBody(request)
        const status = { "500": 500, "429": 429, "400": 400 }[fault as string]
        if (status !== undefined) {
          response.writeHead(status, { "content-type": "application/json" })
          response.end(JSON.stringify({ error: { message: `injected ${fault}`, type: "test", param: null, code: null } }))
          return
        }
        if (fault === "reset") return request.socket.destroy()
        if (fault === "hang") return // until the client gives up
        const answer = await fetch(`${upstream}${request.url}`, { method: "POST", headers: { "content-type": "application/json" }, body })
        let text = await answer.text()
        if (fault === "positions") {
          const json = JSON.parse(text)
          json.choices[0].prompt_logprobs.pop()
          text = JSON.stringify(json)
        }
        response.writeHead(answer.status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) })
        if (fault === "truncate") response.write(text.slice(0, text.length >> 1), () => request.socket.destroy())
        else response.end(text)
      })
      server.on("connection", (socket) => {
        sockets.add(socket)
        socket.on("close", () => sockets.delete(socket))
      })
      return new Promise<{ url: string; requests: () => number; close: () => Promise<void> }>((resolve) =>
        server.listen(0, "127.0.0.1", () =>
          resolve({
            url: `http://127.0.0.1:${(server.address() as { port: number }).port}`,
            requests: () => requests,
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

describe("Teacher.remote", () => {
  /** Retries fast, so that the fault tests take well under a second each. */
  const options = { topK: 6, concurrency: 1, retries: 3, backoff: "10 millis", timeout: "400 millis" } as const

  it.live("retries 500, 429, timeouts, resets, truncated and misshapen answers to the same result; fails at once on a 400", () =>
    withData(({ data }) =>
      Effect.gen(function*() {
        const url = yield* serve
        const batches = (yield* batchesOf(data, 2)).slice(3) // rows 6 and 7, the second padded
        const direct = yield* annotateWith(Teachers.remote([url], options), batches)
        const local = yield* annotateWith(Teachers.inProcess(fixture, { topK: 6 }), batches)
        const [remoteOutput, localOutput] = [direct[0].teacher, local[0].teacher]
        assert(remoteOutput._tag === "TopK" && localOutput._tag === "TopK")
        assert.deepStrictEqual(remoteOutput.ids, localOutput.ids)
        assert(maxDiff(Array.from(remoteOutput.logProbs), Array.from(localOutput.logProbs)) < 1e-5)

        const scenarios: ReadonlyArray<{ faults: ReadonlyArray<Fault>; requests: number }> = [
          { faults: ["500", "500", "ok"], requests: 3 },
          { faults: ["429", "ok"], requests: 2 },
          { faults: ["hang", "ok"], requests: 2 },
          { faults: ["reset", "ok"], requests: 2 },
          { faults: ["truncate", "ok"], requests: 2 },
          { faults: ["positions", "ok"], requests: 2 }
        ]
        for (const { faults, requests } of scenarios) {
          const server = yield* faultServer(url, faults)
          // One row, so that the n-th request is the n-th try.
          const result = yield* annotateWith(Teachers.remote([server.url], options), batches.slice(0, 1).map((b) => ({ rows: b.rows.slice(0, 1), indices: [6] })))
          assert.strictEqual(server.requests(), requests, faults.join(", "))
          const output = result[0].teacher
          assert(output._tag === "TopK" && remoteOutput._tag === "TopK")
          assert.deepStrictEqual(output.ids, remoteOutput.ids.slice(0, SEQ * 6), faults.join(", "))
          assert.deepStrictEqual(output.logProbs, remoteOutput.logProbs.slice(0, SEQ * 6), faults.join(", "))
        }

        const refused = yield* faultServer(url, ["400"])
        const error = yield* Effect.flip(annotateWith(Teachers.remote([refused.url], options), batches))
        assert.strictEqual(refused.requests(), 1, "a 400 is not retried")
        assert.instanceOf(error, TeacherError)
        assert.include(error.message, `remote ${refused.url}`)
        assert.include(error.message, "HTTP 400: injected 400")
        assert.include(error.message, "row 6, a prompt of 17 tokens")
      })
    ))

  it.live("a request that keeps failing fails the stream with a TeacherError naming endpoint, row and last failure", () =>
    withData(({ data }) =>
      Effect.gen(function*() {
        const url = yield* serve
        const batches = (yield* batchesOf(data, 2)).slice(3)
        for (const [fault, reason] of [["500", "HTTP 500: injected 500"], ["positions", "prompt_logprobs has 16 positions for a prompt of 17 tokens"]] as const) {
          const server = yield* faultServer(url, [fault])
          const error = yield* Effect.flip(annotateWith(Teachers.remote([server.url], options), batches))
          assert.instanceOf(error, TeacherError)
          assert.strictEqual(error.source, `remote ${server.url}`)
          assert.strictEqual(error.request, "row 6, a prompt of 17 tokens")
          assert.strictEqual(error.reason, `${reason} (after 4 tries)`)
          assert.strictEqual(server.requests(), 4, "the first try and 3 retries")
        }
      })
    ))

  it.live("endpoints share the load, and a failing one is routed around", () =>
    withData(({ data }) =>
      Effect.gen(function*() {
        const url = yield* serve
        const batches = yield* batchesOf(data, 4)
        const direct = yield* annotateWith(Teachers.remote([url], options), batches)
        const [a, b, broken] = [yield* faultServer(url, ["ok"]), yield* faultServer(url, ["ok"]), yield* faultServer(url, ["500"])]
        const shared = yield* annotateWith(Teachers.remote([a.url, b.url], { ...options, concurrency: 4 }), batches)
        assert.deepStrictEqual(shared, direct)
        assert.strictEqual(a.requests() + b.requests(), 8)
        assert(a.requests() >= 2 && b.requests() >= 2, `requests: ${a.requests()} and ${b.requests()}`)
        const routed = yield* annotateWith(Teachers.remote([broken.url, a.url], options), batches)
        assert.deepStrictEqual(routed, direct)
      })
    ))

  it.live("keeps at most `concurrency` rows in flight beyond the batch its consumer holds", () =>
    withData(({ data }) =>
      Effect.gen(function*() {
        const url = yield* serve
        const batches = yield* batchesOf(data, 1)
        for (const concurrency of [1, 2, 3]) {
          const ahead = yield* maxAhead(Teachers.remote([url], { topK: 4, concurrency }), batches)
          assert.isAtMost(ahead, concurrency)
        }
      })
    ))
})

describe("Teacher sources with document masking", () => {
  it.live("in process and remote, each document of a row is read alone; the cache, made from whole rows, refuses", () =>
    withData(({ dir, data }) =>
      Effect.gen(function*() {
        const url = yield* serve
        const batches = (yield* batchesOf(data, 3)).map((batch): Batch => ({ ...batch, documentMask: true }))
        assert.isTrue(batches.some((batch) => batch.rows.some((row) => row.starts.length > 1)), "some row holds two documents")
        const local = yield* annotateWith(Teachers.inProcess(fixture, { topK: 6 }), batches)
        const remote = yield* annotateWith(Teachers.remote([url], { topK: 6, concurrency: 4 }), batches)

        // Each document alone, as its own row: the teacher's top-6 at its positions.
        const model = yield* Pretrained.load(fixture)
        for (const [b, { batch, teacher }] of local.entries()) {
          const other = remote[b].teacher
          assert(teacher._tag === "TopK" && other._tag === "TopK")
          assert.deepStrictEqual(other.ids, teacher.ids)
          assert.isBelow(maxDiff(Array.from(other.logProbs), Array.from(teacher.logProbs)), 1e-5)
          for (const [r, row] of batch.rows.entries()) {
            row.starts.forEach((from, d) => {
              const to = row.starts[d + 1] ?? row.length
              const [values, indices] = tf.tidy(() => {
                const { values, indices } = tf.topk(tf.logSoftmax(Model.forward(model, [row.ids.slice(from, to)]).logits), 6)
                return [take(values), take(indices)]
              })
              const at = (r * SEQ + from) * 6
              assert.deepStrictEqual(Array.from(teacher.ids.subarray(at, at + (to - from) * 6)), Array.from(indices), `row ${batch.indices[r]} from ${from}`)
              assert.isBelow(maxDiff(Array.from(teacher.logProbs.subarray(at, at + (to - from) * 6)), Array.from(values)), 1e-4)
            })
          }
        }

        const out = path.join(dir, "cache")
        yield* TeacherCache.writeCache({ teacherDir: fixture, data, out, seq: SEQ, topK: 6, batchSize: 3 })
          .pipe(Effect.provide(Teachers.inProcess(fixture, { topK: 6 })))
        const error = yield* Effect.flip(annotateWith(Teachers.offlineCache(out, { data, seq: SEQ, tokenizerHash: null }), batches))
        assert.instanceOf(error, TeacherError)
        assert.include(error.message, "--no-document-mask")
      }).pipe(Effect.scoped)
    ))
})
