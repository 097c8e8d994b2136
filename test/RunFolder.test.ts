import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Files from "../src/io/Files.ts"
import * as Optimizer from "../src/train/Optimizer.ts"
import * as RunFolder from "../src/train/RunFolder.ts"
import { onBackend, tempDir } from "./support.ts"

const State = Schema.Struct({ step: Schema.Int, identity: Schema.String, complete: Schema.Boolean })

const startingPoint = (out: string, identity: string, resume: boolean) =>
  RunFolder.startingPoint(out, State, { identity, resume, differs: "options" })

/** A checkpoint of run `identity` at step 3, with the moments of one small variable. */
const checkpoint = (out: string, identity: string) =>
  Effect.gen(function*() {
    const weight = yield* Effect.acquireRelease(Effect.sync(() => tf.variable(tf.zeros([2]))), (v) => Effect.sync(() => v.dispose()))
    const adam = yield* Optimizer.make(new Map([["w", weight]]), Optimizer.defaultConfig)
    // The weights are the stage's to write; here they are an empty folder.
    yield* RunFolder.saveCheckpoint(out, adam, { step: 3, identity, complete: false }, (dir) => Effect.promise(() => fs.mkdir(dir)))
  })

describe("RunFolder.startingPoint", () => {
  it.effect("an empty folder starts a fresh run", () =>
    Effect.gen(function*() {
      const out = yield* tempDir
      assert.deepStrictEqual(yield* startingPoint(out, "a", false), { finished: undefined, resume: undefined })
    }).pipe(Effect.scoped))

  it.effect("a complete state of the same run is finished; of another run, it is refused naming what differs, or replaced with replace", () =>
    Effect.gen(function*() {
      const out = yield* tempDir
      const identity = (lr: number) => JSON.stringify({ data: "d", learningRate: lr })
      const done = { step: 5, identity: identity(1), complete: true }
      yield* Files.writeJson(path.join(out, "state.json"), done)
      assert.deepStrictEqual((yield* startingPoint(out, identity(1), false)).finished, done)
      const refused = yield* Effect.flip(startingPoint(out, identity(2), true))
      assert.include(refused.message, "holds a finished run whose learningRate differ")
      assert.include((yield* Effect.flip(startingPoint(out, "b", false))).message, "whose options differ")
      const replacing = RunFolder.startingPoint(out, State, { identity: identity(2), resume: true, differs: "options", replace: true })
      assert.deepStrictEqual(yield* replacing, { finished: undefined, resume: undefined })
      assert.isUndefined(yield* Files.readJsonIfPresent(path.join(out, "state.json")), "the replaced run no longer passes for finished")
    }).pipe(Effect.scoped))

  it.effect("a checkpoint resumes only with --resume and only its own run", () =>
    Effect.gen(function*() {
      const out = yield* tempDir
      yield* checkpoint(out, "a")
      assert.include((yield* Effect.flip(startingPoint(out, "a", false))).message, "pass --resume")
      assert.include((yield* Effect.flip(startingPoint(out, "b", true))).message, "belongs to a run with other options")
      const { finished, resume } = yield* startingPoint(out, "a", true)
      assert.isUndefined(finished)
      assert.deepStrictEqual(resume?.state, { step: 3, identity: "a", complete: false })
      assert.strictEqual(resume?.moments.expAvg.get("w")?.length, 2)
    }).pipe(onBackend("cpu")))

  it.effect("with replace, a checkpoint of another run is no obstacle: the new run starts over", () =>
    Effect.gen(function*() {
      const out = yield* tempDir
      yield* checkpoint(out, "a")
      const replacing = (identity: string) => RunFolder.startingPoint(out, State, { identity, resume: true, differs: "options", replace: true })
      assert.deepStrictEqual(yield* replacing("b"), { finished: undefined, resume: undefined })
      assert.strictEqual((yield* replacing("a")).resume?.state.step, 3, "its own checkpoint still resumes")
    }).pipe(onBackend("cpu")))
})
