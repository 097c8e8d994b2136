import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { execFile, spawn } from "node:child_process"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as Teacher from "../layers/Teacher.ts"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as Dataset from "../src/data/Dataset.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import { calibrate } from "../stages/Calibrate.ts"
import { distill, type DistillOptions } from "../stages/Distill.ts"
import { evaluate } from "../stages/Evaluate.ts"
import { prune } from "../stages/Prune.ts"
import { localFixture, markovData, sharedFixture, tempDir } from "./support.ts"

const parentDir = sharedFixture("tiny-mistral")
const main = fileURLToPath(new URL("../src/cli/main.ts", import.meta.url))

/** A child of tiny-mistral pruned on all three axes, in `dir`. */
const prunedChild = (dir: string, data: string) =>
  Effect.gen(function*() {
    yield* calibrate(yield* Pretrained.load(parentDir), { modelDir: parentDir, data, out: path.join(dir, "stats"), seq: 32 })
    yield* prune({ modelDir: parentDir, statsDir: path.join(dir, "stats"), out: path.join(dir, "child"), targets: { layers: 3, hidden: 48, ffn: 128 } })
    return path.join(dir, "child")
  }).pipe(Effect.scoped)

const options = (student: string, data: string, out: string): DistillOptions => ({
  studentDir: student,
  data,
  out,
  seq: 32,
  steps: 40,
  seed: 3,
  batch: 4,
  accumulate: 2,
  learningRate: 3e-3,
  minLearningRate: 3e-4,
  warmupSteps: 4,
  weightDecay: 0.01,
  maxGradNorm: 1,
  loss: { temperature: 1, crossEntropyWeight: 0, restBucket: false, maxOutsideMass: 1e-3 },
  saveEvery: 10
})

const heldoutNll = (dir: string, data: string) =>
  Effect.gen(function*() {
    const model = yield* Pretrained.load(dir)
    return (yield* evaluate(model, Dataset.sequences(data, { vocabSize: 512 }))).nll
  }).pipe(Effect.scoped)

const metrics = (out: string) =>
  Effect.promise(() => fs.readFile(path.join(out, "metrics.jsonl"), "utf8")).pipe(
    Effect.map((text) => text.trim().split("\n").map((line) => JSON.parse(line) as { step: number; kl: number; loss: number; lr: number; tokens: number }))
  )

const withTeacher = Layer.provideMerge(Teacher.inProcess(parentDir), TensorBackend.layer("wasm"))

describe("distill", () => {
  it.effect("distilling a pruned child from its parent lowers the KL and the held-out NLL", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 48, 40, 1)
      const heldout = yield* markovData(path.join(dir, "heldout.jsonl"), 8, 40, 99)
      const student = yield* prunedChild(dir, data)
      const out = path.join(dir, "distilled")
      const state = yield* distill(options(student, data, out)).pipe(Effect.scoped)
      assert.isTrue(state.complete)
      const curve = yield* metrics(out)
      assert.strictEqual(curve.length, 40)
      const mean = (xs: Array<{ kl: number }>) => xs.reduce((a, b) => a + b.kl, 0) / xs.length
      assert.isBelow(mean(curve.slice(-5)), 0.6 * mean(curve.slice(0, 5)))
      const parent = yield* heldoutNll(parentDir, heldout)
      const before = yield* heldoutNll(student, heldout)
      const after = yield* heldoutNll(out, heldout)
      assert.isBelow(Math.abs(after - parent), Math.abs(before - parent))
    }).pipe(Effect.provide(withTeacher)), { timeout: 120_000 })

  it.effect("the long-context phase switches the student to YaRN and saves it so", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 16, 64, 2)
      const out = path.join(dir, "long")
      yield* distill({ ...options(parentDir, data, out), seq: 64, steps: 3, yarn: { factor: 4, originalMax: 16 } }).pipe(Effect.scoped)
      const config = JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(out, "config.json"), "utf8")))
      assert.deepInclude(config.rope_parameters, { rope_type: "yarn", factor: 4, original_max_position_embeddings: 16 })
      assert.strictEqual(config.max_position_embeddings, 64)
      const model = yield* Pretrained.load(out)
      assert.strictEqual(model.config.rope.type, "yarn")
      assert.isTrue((yield* metrics(out)).every((m) => Number.isFinite(m.loss)))
    }).pipe(Effect.scoped, Effect.provide(withTeacher)))

  /** The KL and its token count of a first step on `documents` (rows of ids), before any update. */
  const firstStep = (dir: string, name: string, documents: ReadonlyArray<ReadonlyArray<number>>, documentMask: boolean) =>
    Effect.gen(function*() {
      const data = path.join(dir, `${name}.jsonl`)
      yield* Effect.promise(() => fs.writeFile(data, documents.map((ids) => JSON.stringify({ input_ids: ids })).join("\n") + "\n"))
      const out = path.join(dir, name)
      // Student and teacher differ: the KL is far from 0.
      yield* distill({ ...options(localFixture("mistral-tied"), data, out), steps: 1, batch: 1, accumulate: 1, documentMask }).pipe(Effect.scoped)
      return (yield* metrics(out))[0]
    })
  const documentA = Array.from({ length: 12 }, (_, i) => (i * 37 + 5) % 512)
  const documentB = Array.from({ length: 9 }, (_, i) => (i * 91 + 200) % 512)

  it.effect("the KL counts every real token of a row, the last one included (its teacher distribution needs no next token)", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const step = yield* firstStep(dir, "one", [documentA], false)
      assert.strictEqual(step.tokens, documentA.length)
    }).pipe(Effect.provide(withTeacher)))

  it.effect("with document masking, a packed row's KL is the token-weighted KL of its documents distilled alone", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const packed = yield* firstStep(dir, "packed", [documentA, documentB], true)
      const a = yield* firstStep(dir, "a", [documentA], true)
      const b = yield* firstStep(dir, "b", [documentB], true)
      assert.strictEqual(packed.tokens, a.tokens + b.tokens)
      assert.approximately(packed.kl, (a.tokens * a.kl + b.tokens * b.kl) / packed.tokens, 1e-5)
      // Without it, B reads A: another KL.
      const whole = yield* firstStep(dir, "whole", [documentA, documentB], false)
      assert.isAbove(Math.abs(whole.kl - packed.kl), 1e-3)
    }).pipe(Effect.provide(withTeacher)))

  it.effect("the LM head applied a chunk of tokens at a time (headChunk) gives the same steps up to rounding, untied and tied", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 24, 40, 5)
      const loss = { temperature: 2, crossEntropyWeight: 0.3, restBucket: false, maxOutsideMass: 1e-3 }
      for (const student of [yield* prunedChild(dir, data), localFixture("mistral-tied")]) {
        const run = (name: string, headChunk: number | undefined) =>
          Effect.gen(function*() {
            const out = path.join(dir, name)
            yield* distill({ ...options(student, data, out), steps: 4, loss, headChunk }).pipe(Effect.scoped)
            return yield* metrics(out)
          })
        const name = path.basename(student)
        const whole = yield* run(`${name}-whole`, undefined)
        const chunked = yield* run(`${name}-chunked`, 37)
        whole.forEach((step, i) => {
          assert.approximately(chunked[i].loss, step.loss, 1e-5 * Math.abs(step.loss), `${name} step ${step.step} loss`)
          assert.approximately(chunked[i].kl, step.kl, 1e-5 * Math.abs(step.kl), `${name} step ${step.step} kl`)
        })
      }
    }).pipe(Effect.provide(withTeacher)))

  it.effect("a run in OUT is not continued without --resume", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 16, 40, 4)
      const out = path.join(dir, "run")
      const stop = new Error("stop")
      yield* Effect.exit(distill({ ...options(parentDir, data, out), onStep: (m) => { if (m.step === 12) throw stop } }).pipe(Effect.scoped))
      const error = yield* Effect.flip(distill(options(parentDir, data, out)).pipe(Effect.scoped))
      assert.include(error.message, "pass --resume")
    }).pipe(Effect.provide(withTeacher)))

  it.effect("a finished run is found finished only with the same settings: another learning rate, temperature or teacher top-k is refused, or replaced with replace", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 8, 40, 5)
      const out = path.join(dir, "run")
      const base = { ...options(parentDir, data, out), steps: 2, saveEvery: 1 }
      const run = (opts: DistillOptions, teacher = withTeacher) => {
        let steps = 0
        return distill({ ...opts, onStep: () => steps++ }).pipe(Effect.scoped, Effect.provide(teacher), Effect.map((state) => ({ state, steps })))
      }
      const done = yield* run(base)
      assert.strictEqual(done.steps, 2)
      assert.deepStrictEqual(yield* run(base), { state: done.state, steps: 0 }, "the same run is finished")

      const changes: Array<[string, DistillOptions, typeof withTeacher]> = [
        ["learningRate", { ...base, learningRate: 1e-3 }, withTeacher],
        ["loss", { ...base, loss: { ...base.loss, temperature: 2 } }, withTeacher],
        ["teacher", base, Layer.provideMerge(Teacher.inProcess(parentDir, { topK: 8 }), TensorBackend.layer("wasm"))]
      ]
      for (const [field, changed, teacher] of changes) {
        const refused = yield* Effect.flip(run({ ...changed, resume: true }, teacher))
        assert.include(refused.message, `holds a finished run whose ${field} differ`)
      }
      const replaced = yield* run({ ...base, learningRate: 1e-3, replace: true })
      assert.strictEqual(replaced.steps, 2, "the run with another learning rate ran")
      assert.isTrue((yield* metrics(out)).every((m) => m.lr <= 1e-3))
    }))
})

describe("cascade distill", () => {
  const run = (args: Array<string>) =>
    Effect.callback<{ code: number; stderr: string }>((resume) => {
      execFile(process.execPath, [main, "distill", ...args], { timeout: 120_000 }, (error, _stdout, stderr) => {
        resume(Effect.succeed({ code: error ? (typeof error.code === "number" ? error.code : 1) : 0, stderr }))
      })
    })

  /** Starts a run and SIGKILLs it once metrics.jsonl has `steps` lines. */
  const killAfter = (args: Array<string>, out: string, steps: number) =>
    Effect.callback<number>((resume) => {
      const child = spawn(process.execPath, [main, "distill", ...args], { stdio: "ignore" })
      const timer = setInterval(async () => {
        const text = await fs.readFile(path.join(out, "metrics.jsonl"), "utf8").catch(() => "")
        if (text.split("\n").filter(Boolean).length >= steps) {
          child.kill("SIGKILL")
          clearInterval(timer)
        }
      }, 20)
      child.on("exit", (_code, signal) => {
        clearInterval(timer)
        resume(Effect.succeed(signal === "SIGKILL" ? 137 : 0))
      })
    })

  it.effect("a run killed with SIGKILL and resumed ends with the loss and weights of an uninterrupted run", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 32, 40, 5)
      const args = (out: string) => [
        "--student", parentDir, "--teacher", parentDir, "--data", data, "--out", out,
        "--seq", "32", "--steps", "30", "--seed", "7", "--save-every", "5", "--top-k", "64", "--batch", "2"
      ]
      const whole = path.join(dir, "whole")
      assert.strictEqual((yield* run(args(whole))).code, 0)

      const killed = path.join(dir, "killed")
      assert.strictEqual(yield* killAfter(args(killed), killed, 13), 137, "the run was killed midway")
      const partial = yield* metrics(killed)
      assert.isBelow(partial.length, 30)
      const resumed = yield* run([...args(killed), "--resume"])
      assert.strictEqual(resumed.code, 0, resumed.stderr)

      const [a, b] = [yield* metrics(whole), yield* metrics(killed)]
      assert.deepStrictEqual(b.map((m) => m.step), a.map((m) => m.step))
      assert.deepStrictEqual(b.map((m) => m.loss), a.map((m) => m.loss))
      const weights = (out: string) => Effect.promise(() => fs.readFile(path.join(out, "model.safetensors")))
      assert.isTrue((yield* weights(whole)).equals(yield* weights(killed)), "same weights, bit for bit")
    }), { timeout: 180_000 })
})
