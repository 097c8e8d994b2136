import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Layer, Stream } from "effect"
import { execFile } from "node:child_process"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as Teacher from "../layers/Teacher.ts"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as ChatData from "../src/data/ChatData.ts"
import * as Dataset from "../src/data/Dataset.ts"
import * as Loss from "../src/train/Loss.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Random from "../src/Random.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { sft, type SftOptions, type StepMetrics } from "../stages/Sft.ts"
import { onBackend, tempDir } from "./support.ts"

const parentDir = fileURLToPath(new URL("../assets/parent", import.meta.url))
const instruct = fileURLToPath(new URL("../data/post/sft-instruct.jsonl", import.meta.url))
const main = fileURLToPath(new URL("../src/cli/main.ts", import.meta.url))


/** The first `count` chats of the shipped instruct set. */
const chats = (file: string, count: number) =>
  Effect.promise(async () => {
    const lines = (await fs.readFile(instruct, "utf8")).split("\n").slice(0, count)
    await fs.writeFile(file, lines.join("\n") + "\n")
    return file
  })

const options = (modelDir: string, data: string, out: string): SftOptions => ({
  modelDir,
  data,
  out,
  seq: 64,
  steps: 12,
  seed: 5,
  batch: 4,
  accumulate: 1,
  learningRate: 1e-3,
  minLearningRate: 1e-4,
  warmupSteps: 2,
  weightDecay: 0.01,
  maxGradNorm: 1,
  distillWeight: 0,
  saveEvery: 4
})

const metrics = (out: string) =>
  Effect.promise(() => fs.readFile(path.join(out, "metrics.jsonl"), "utf8")).pipe(
    Effect.map((text) => text.trim().split("\n").map((line) => JSON.parse(line) as StepMetrics))
  )
const mean = (values: ReadonlyArray<number>) => values.reduce((a, b) => a + b, 0) / values.length

/** The model's mean cross-entropy on the assistant tokens of a chat file. */
const assistantCe = (modelDir: string, data: string) =>
  Effect.gen(function*() {
    const model = yield* Pretrained.load(modelDir)
    const tokenizer = yield* Tokenizer.load(modelDir)
    const rows = ChatData.pack(yield* Stream.runCollect(ChatData.examples(data, tokenizer)), 64, 7)
    const sums = tf.tidy(() => {
      const logits = Model.forward(model, rows.map((row) => row.ids), { attentionMask: Dataset.rowMask(rows) }).logits
      const logProbs = Loss.tokenLogProbs(logits, rows.map((row) => row.ids.map((_, i) => row.ids[i + 1] ?? 0)))
      const mask = tf.tensor2d(rows.map(ChatData.lossMask))
      return [tf.neg(tf.sum(tf.mul(logProbs, mask))).dataSync()[0], tf.sum(mask).dataSync()[0]]
    })
    return sums[0] / sums[1]
  }).pipe(Effect.scoped)

/** The parent with noise on every matrix, as a student the parent can teach. */
const perturbedParent = (dir: string) =>
  Effect.gen(function*() {
    const parent = yield* Pretrained.load(parentDir)
    const next = Random.uniform(9)
    const tensors = new Map([...Model.tensorsOfWeights(parent.config, parent.weights)].map(([name, tensor]) => [
      name,
      tensor.rank === 1 ? tensor.clone() : tf.tidy(() => tf.add(tensor, tf.tensor(Random.normals(next, tensor.size, 0.03), tensor.shape)))
    ]))
    const student = Model.make(parent.config, Model.weightsFromTensors(parent.config, tensors))
    yield* Pretrained.save(dir, student, { dtype: "F32" })
    Model.dispose(student)
    for (const file of ["tokenizer.json", "tokenizer_config.json"]) {
      yield* Effect.promise(() => fs.copyFile(path.join(parentDir, file), path.join(dir, file)))
    }
    return dir
  }).pipe(Effect.scoped)

const withTeacher = Effect.provide(Layer.provideMerge(Teacher.inProcess(parentDir), TensorBackend.layer("wasm")))

describe("sft", () => {
  it.effect("fine-tuning the parent on chats lowers its cross-entropy on the assistant tokens", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* chats(path.join(dir, "chats.jsonl"), 48)
      const out = path.join(dir, "sft")
      const tensors = tf.memory().numTensors
      const state = yield* sft({ ...options(parentDir, data, out), steps: 16 }).pipe(Effect.scoped)
      assert.isTrue(state.complete)
      assert.strictEqual(tf.memory().numTensors, tensors, "no tensor left behind")
      const curve = yield* metrics(out)
      assert.strictEqual(curve.length, 16)
      assert.isTrue(curve.every((m) => m.kl === undefined && m.loss === m.ce && m.tokens > 0))
      const before = yield* assistantCe(parentDir, data)
      const after = yield* assistantCe(out, data)
      assert.isBelow(after, 0.7 * before, `assistant-token CE ${before} -> ${after}`)
      // The output is a checkpoint with its tokenizer and chat template.
      const tokenizer = yield* Tokenizer.load(out)
      assert.include(yield* tokenizer.applyChatTemplate([{ role: "user", content: "x" }]), "[INST] x [/INST]")
    }).pipe(onBackend("wasm")))

  it.effect("with a teacher, loss = (1 - w) CE + w KL on assistant tokens and the KL falls", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* chats(path.join(dir, "chats.jsonl"), 48)
      const student = yield* perturbedParent(path.join(dir, "student"))
      const out = path.join(dir, "mixed")
      yield* sft({ ...options(student, data, out), steps: 16, distillWeight: 0.25 }).pipe(Effect.scoped)
      const curve = yield* metrics(out)
      for (const m of curve) assert.closeTo(m.loss, 0.75 * m.ce + 0.25 * m.kl!, 1e-5)
      const kl = curve.map((m) => m.kl!)
      assert.isBelow(mean(kl.slice(-4)), 0.6 * mean(kl.slice(0, 4)), `KL ${kl.map((x) => x.toFixed(3))}`)
      // w = 1: the teacher alone.
      const pure = path.join(dir, "pure")
      yield* sft({ ...options(student, data, pure), steps: 2, distillWeight: 1 }).pipe(Effect.scoped)
      for (const m of yield* metrics(pure)) assert.closeTo(m.loss, m.kl!, 1e-6)
    }).pipe(Effect.scoped, withTeacher))

  it.effect("with document masking, the losses of packed conversations are the token-weighted losses of each alone", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const lines = (yield* Effect.promise(() => fs.readFile(instruct, "utf8"))).split("\n").slice(0, 2)
      const student = yield* perturbedParent(path.join(dir, "student"))
      /** The first step's metrics (before any update) on `chats`, all in one row of 256 tokens. */
      const firstStep = (name: string, chats: ReadonlyArray<string>, documentMask: boolean) =>
        Effect.gen(function*() {
          const data = path.join(dir, `${name}.jsonl`)
          yield* Effect.promise(() => fs.writeFile(data, chats.join("\n") + "\n"))
          const out = path.join(dir, name)
          yield* sft({ ...options(student, data, out), seq: 256, steps: 1, batch: 2, distillWeight: 0.5, documentMask }).pipe(Effect.scoped)
          return (yield* metrics(out))[0]
        })
      const packed = yield* firstStep("packed", lines, true)
      const alone = [yield* firstStep("first", lines.slice(0, 1), true), yield* firstStep("second", lines.slice(1), true)]
      assert.strictEqual(packed.tokens, alone[0].tokens + alone[1].tokens)
      const weighted = (pick: (m: StepMetrics) => number) => (alone[0].tokens * pick(alone[0]) + alone[1].tokens * pick(alone[1])) / packed.tokens
      assert.closeTo(packed.ce, weighted((m) => m.ce), 1e-5)
      assert.closeTo(packed.kl!, weighted((m) => m.kl!), 1e-5)
      // Without it, the second conversation reads the first: other losses.
      const whole = yield* firstStep("whole", lines, false)
      assert.isAbove(Math.abs(whole.ce - packed.ce), 1e-4)
    }).pipe(Effect.scoped, withTeacher))

  it.effect("a run interrupted after a checkpoint and resumed ends with the losses and weights of an uninterrupted run", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* chats(path.join(dir, "chats.jsonl"), 24)
      const run = (out: string) => ({ ...options(parentDir, data, path.join(dir, out)), steps: 10, distillWeight: 0.5 })
      yield* sft(run("whole")).pipe(Effect.scoped)

      const stop = new Error("interrupted")
      const interrupted = yield* Effect.exit(sft({ ...run("resumed"), onStep: (m) => { if (m.step === 6) throw stop } }).pipe(Effect.scoped))
      assert.isTrue(interrupted._tag === "Failure")
      assert.strictEqual((yield* metrics(path.join(dir, "resumed"))).length, 6)
      const refused = yield* Effect.flip(sft(run("resumed")).pipe(Effect.scoped))
      assert.include(refused.message, "pass --resume")
      yield* sft({ ...run("resumed"), resume: true }).pipe(Effect.scoped)

      const [whole, resumed] = [yield* metrics(path.join(dir, "whole")), yield* metrics(path.join(dir, "resumed"))]
      assert.deepStrictEqual(resumed.map((m) => [m.step, m.loss, m.epoch]), whole.map((m) => [m.step, m.loss, m.epoch]))
      assert.isAbove(whole[whole.length - 1].epoch, 0, "the run passes an epoch boundary")
      const weights = (out: string) => Effect.promise(() => fs.readFile(path.join(dir, out, "model.safetensors")))
      assert.isTrue((yield* weights("whole")).equals(yield* weights("resumed")), "same weights, bit for bit")
    }).pipe(Effect.scoped, withTeacher))

  it.effect("a distillation weight needs a teacher and must lie in [0, 1]", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* chats(path.join(dir, "chats.jsonl"), 4)
      const missing = yield* Effect.flip(sft({ ...options(parentDir, data, path.join(dir, "a")), distillWeight: 0.5 }).pipe(Effect.scoped))
      assert.include(missing.message, "needs a teacher")
      const outside = yield* Effect.flip(sft({ ...options(parentDir, data, path.join(dir, "b")), distillWeight: 1.5 }).pipe(Effect.scoped))
      assert.include(outside.message, "not in [0, 1]")
    }).pipe(onBackend("wasm")))
})

describe("cascade sft", () => {
  it.effect("fine-tunes from the command line with a teacher", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* chats(path.join(dir, "chats.jsonl"), 8)
      const out = path.join(dir, "out")
      const args = ["sft", "--model", parentDir, "--data", data, "--out", out, "--steps", "2", "--seq", "64", "--batch", "2", "--teacher", parentDir, "--top-k", "16"]
      const { code, stdout, stderr } = yield* Effect.callback<{ code: number; stdout: string; stderr: string }>((resume) => {
        execFile(process.execPath, [main, ...args], { timeout: 60_000 }, (error, stdout, stderr) => {
          resume(Effect.succeed({ code: error ? (typeof error.code === "number" ? error.code : 1) : 0, stdout, stderr }))
        })
      })
      assert.strictEqual(code, 0, stderr)
      assert.include(stdout, "fine-tuned 2 steps")
      const curve = yield* metrics(out)
      assert.isTrue(curve.every((m) => Math.abs(m.loss - (0.5 * m.ce + 0.5 * m.kl!)) < 1e-5), "--teacher defaults to w = 0.5")
    }).pipe(Effect.scoped))
})
