import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Stream } from "effect"
import { execFile } from "node:child_process"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as Teachers from "../layers/Teacher.ts"
import * as Dataset from "../src/data/Dataset.ts"
import { CheckpointError } from "../src/Errors.ts"
import * as Safetensors from "../src/io/Safetensors.ts"
import * as TeacherCacheFormat from "../src/io/TeacherCacheFormat.ts"
import { type Batch, Teacher, TeacherError } from "../src/train/Teacher.ts"
import * as TeacherCache from "../stages/TeacherCache.ts"
import { lcgData, onBackend, sharedFixture } from "./support.ts"

const fixture = sharedFixture("tiny-mistral")
const SEQ = 16
const K = 8

/** A temp folder holding `lcgData`: packed by 16, 8 rows, the last with 11 real tokens. */
const withData = <A, E, R>(test: (dir: string, data: string) => Effect.Effect<A, E, R>) =>
  Effect.acquireUseRelease(
    Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "teacher-cache-"))).pipe(Effect.tap(lcgData)),
    (dir) => test(dir, path.join(dir, "data.jsonl")),
    (dir) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true }))
  ).pipe(onBackend("wasm"))

const write = (data: string, out: string, options: { samples?: number; rowsPerShard?: number; topK?: number } = {}) =>
  TeacherCache.writeCache({ teacherDir: fixture, data, out, seq: SEQ, topK: K, batchSize: 2, rowsPerShard: 3, ...options })

const inProcess = Teachers.inProcess(fixture, { topK: K })

/** Packed rows of `data` by index. */
const rowsOf = (data: string) => Stream.runCollect(Dataset.sequences(data, { vocabSize: 512 }).pipe(Dataset.pack(SEQ)))

const annotate = <E, R>(layer: Layer.Layer<Teacher, E, R>, batches: ReadonlyArray<Batch>) =>
  Effect.gen(function*() {
    const teacher = yield* Teacher
    return yield* Stream.runCollect(teacher.annotate(Stream.fromIterable(batches)))
  }).pipe(Effect.provide(layer))

/** Every file of a folder, by name. */
const filesOf = (dir: string) =>
  Effect.promise(async () => {
    const names = (await fs.readdir(dir)).sort()
    return new Map(await Promise.all(names.map(async (name) => [name, await fs.readFile(path.join(dir, name))] as const)))
  })

describe("TeacherCache", () => {
  it.live("read back, in any order, it gives the in-process teacher's top-k, log-probs to float16 rounding", () =>
    withData((dir, data) =>
      Effect.gen(function*() {
        const out = path.join(dir, "cache")
        const manifest = yield* write(data, out).pipe(Effect.provide(inProcess))
        assert.deepInclude(manifest, { seq: SEQ, topK: K, rows: 8, shards: 3, rowsPerShard: 3, complete: true, tokenizerHash: null })
        assert.deepStrictEqual([...(yield* filesOf(out)).keys()], [
          "manifest.json",
          "shard-00000.safetensors",
          "shard-00001.safetensors",
          "shard-00002.safetensors"
        ])
        const last = yield* Effect.scoped(Effect.gen(function*() {
          const file = yield* Safetensors.open(TeacherCacheFormat.shardFile(out, 2))
          return {
            ids: yield* file.info("ids"),
            logprobs: yield* file.info("logprobs"),
            lengths: yield* file.readInt32("lengths")
          }
        }))
        assert.deepStrictEqual(last, {
          ids: { dtype: "I32", shape: [2, SEQ, K] },
          logprobs: { dtype: "F16", shape: [2, SEQ, K] },
          lengths: Int32Array.from([16, 11])
        })

        const rows = yield* rowsOf(data)
        const batches = [[7, 0], [3, 4, 5], [1, 6, 2]].map((indices) => ({ indices, rows: indices.map((i) => rows[i]) }))
        const cached = yield* annotate(Teachers.offlineCache(out, { data, seq: SEQ, tokenizerHash: null }), batches)
        const direct = yield* annotate(inProcess, batches)
        for (const [i, { teacher }] of cached.entries()) {
          const expected = direct[i].teacher
          assert(teacher._tag === "TopK" && expected._tag === "TopK" && teacher.k === K)
          assert.deepStrictEqual(teacher.ids, expected.ids)
          // float16 keeps 11 significant bits: rounding moves a value by at most 2^-11 of itself.
          teacher.logProbs.forEach((value, j) => assert.isAtMost(Math.abs(value - expected.logProbs[j]), 2 ** -11 * Math.abs(expected.logProbs[j])))
        }
      })
    ))

  it.live("a cache for other data, another tokenizer or seq, or missing the rows asked for, fails naming what differs", () =>
    withData((dir, data) =>
      Effect.gen(function*() {
        const out = path.join(dir, "cache")
        yield* write(data, out, { samples: 5 }).pipe(Effect.provide(inProcess))
        const other = path.join(dir, "other.jsonl")
        yield* Effect.promise(() => fs.writeFile(other, JSON.stringify({ input_ids: [1, 2, 3] }) + "\n"))
        const failure = (options: Teachers.OfflineCacheOptions, batches: ReadonlyArray<Batch> = []) =>
          Effect.flip(annotate(Teachers.offlineCache(out, options), batches))

        const otherData = yield* failure({ data: other, seq: SEQ, tokenizerHash: null })
        assert.instanceOf(otherData, TeacherError)
        assert.include(otherData.message, `it was made from other data (${path.resolve(data)}`)
        const otherTokenizer = yield* failure({ data, seq: SEQ, tokenizerHash: "0123456789abcdef" })
        assert.include(otherTokenizer.message, "it was made with another tokenizer (tokenizer.json none; this run's: sha256 0123456789ab)")
        const otherSeq = yield* failure({ data, seq: 32, tokenizerHash: null })
        assert.include(otherSeq.message, "it holds rows of 16 tokens, not 32 (--seq)")

        const rows = yield* rowsOf(data)
        const missing = yield* failure({ data, seq: SEQ, tokenizerHash: null }, [{ rows: [rows[4], rows[6]], indices: [4, 6] }])
        assert.instanceOf(missing, TeacherError)
        assert.strictEqual(missing.request, "row 6")
        assert.include(missing.reason, "the cache holds rows 0..4")

        const again = yield* Effect.flip(write(data, out, { samples: 5, topK: 4 }).pipe(Effect.provide(Teachers.inProcess(fixture, { topK: 4 }))))
        assert.instanceOf(again, CheckpointError)
        assert.include(again.message, "holds a teacher cache with another --top-k")
      })
    ))

  it.live("a killed run resumes at its last complete shard and writes the same files as an uninterrupted one", () =>
    withData((dir, data) =>
      Effect.gen(function*() {
        const whole = path.join(dir, "whole")
        const resumed = path.join(dir, "resumed")
        yield* write(data, whole).pipe(Effect.provide(inProcess))

        // The teacher dies after 3 batches of 2, 2 and 1 rows: shard 0 is complete, shard 1 half done.
        const dying = Layer.effect(
          Teacher,
          Effect.gen(function*() {
            const teacher = yield* Teacher
            return Teacher.of({
              ...teacher,
              annotate: (batches) =>
                teacher.annotate(batches).pipe(Stream.take(3), Stream.concat(Stream.fail(new TeacherError({ source: "test", reason: "killed" }))))
            })
          })
        ).pipe(Layer.provide(inProcess))
        const killed = yield* Effect.flip(write(data, resumed).pipe(Effect.provide(dying)))
        assert.strictEqual(killed.message, "teacher test: killed")
        assert.deepInclude(yield* TeacherCacheFormat.readManifest(resumed), { rows: 3, shards: 1, complete: false })
        // What a kill during a write leaves behind (a failure removes its own temp file).
        yield* Effect.promise(() => fs.writeFile(path.join(resumed, ".shard-00001.safetensors.0000.tmp"), "partial"))

        const batches: Array<ReadonlyArray<number>> = []
        const watched = Layer.effect(
          Teacher,
          Effect.gen(function*() {
            const teacher = yield* Teacher
            return Teacher.of({
              ...teacher,
              annotate: (stream) => teacher.annotate(stream.pipe(Stream.tap((batch) => Effect.sync(() => batches.push(batch.indices)))))
            })
          })
        ).pipe(Layer.provide(inProcess))
        yield* write(data, resumed).pipe(Effect.provide(watched))
        assert.deepStrictEqual(batches, [[3, 4], [5], [6, 7]], "the resumed run starts at shard 1")
        assert.deepStrictEqual(yield* filesOf(resumed), yield* filesOf(whole))
      })
    ))

  it.live("cascade teacher-cache writes what the stage writes, and reuses a finished cache", () =>
    withData((dir, data) =>
      Effect.gen(function*() {
        const staged = path.join(dir, "staged")
        yield* TeacherCache.writeCache({ teacherDir: fixture, data, out: staged, seq: SEQ, topK: K, batchSize: 3 }).pipe(Effect.provide(inProcess))
        const out = path.join(dir, "cli")
        const args = ["teacher-cache", "--teacher", fixture, "--data", data, "--top-k", String(K), "--seq", String(SEQ), "--batch", "3", "--out", out]
        for (let run = 0; run < 2; run++) {
          const { code, stdout, stderr } = yield* cascade(args)
          assert.strictEqual(code, 0, stderr)
          assert.include(stdout, `cached the top-${K} of 8 rows of ${SEQ} in 1 shard -> ${out}`)
        }
        assert.deepStrictEqual(yield* filesOf(out), yield* filesOf(staged))
      })
    ))
})

const main = fileURLToPath(new URL("../src/cli/main.ts", import.meta.url))

const cascade = (args: ReadonlyArray<string>) =>
  Effect.callback<{ code: number; stdout: string; stderr: string }>((resume) => {
    execFile(process.execPath, [main, ...args], { timeout: 60_000 }, (error, stdout, stderr) => {
      resume(Effect.succeed({ code: error ? (typeof error.code === "number" ? error.code : 1) : 0, stdout, stderr }))
    })
  })
