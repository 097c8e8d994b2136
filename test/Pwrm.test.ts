import { assert, describe, it, layer } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Context, Effect, Layer, Schema } from "effect"
import { execFile } from "node:child_process"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as Preference from "../layers/Preference.ts"
import { TensorBackend } from "../layers/TensorBackend.ts"
import type * as Model from "../src/model/Model.ts"
import { PairwisePreference } from "../src/rewards/Preference.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Pwrm from "../src/rewards/Pwrm.ts"
import * as Random from "../src/Random.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { type Card, type Labelled, readPairs, train, type TrainOptions } from "../stages/PwrmTrain.ts"
import { tempDir } from "./support.ts"

const parentDir = fileURLToPath(new URL("../assets/parent", import.meta.url))
const main = fileURLToPath(new URL("../src/cli/main.ts", import.meta.url))

/**
 * Seeded arithmetic pairs in the chat format of the embedded parent: the right sum against a
 * refusal or a loop, in a random order. `flip` of the labels are reversed (label noise).
 */
const pairs = (count: number, seed: number, flip = 0): Array<Labelled> => {
  const next = Random.uniform(seed)
  const int = (n: number) => Math.floor(next() * n)
  return Array.from({ length: count }, () => {
    const [x, y] = [10 + int(90), 10 + int(90)]
    const good = `${x + y}`
    const bad = next() < 0.5 ? "I do not know." : `${x + y} and ${x + y} and ${x + y} and ${x + y} and`
    const goodFirst = next() < 0.5
    const flipped = next() < flip
    const aWins = goodFirst !== flipped
    return { prompt: `[INST] ${x} + ${y} = ? [/INST]`, a: goodFirst ? good : bad, b: goodFirst ? bad : good, preferred: aWins ? "a" : "b" }
  })
}

const writePairs = (file: string, lines: ReadonlyArray<object>) =>
  Effect.promise(() => fs.writeFile(file, lines.map((line) => JSON.stringify(line)).join("\n") + "\n")).pipe(Effect.as(file))

const options = (data: string, heldout: string, out: string): TrainOptions => ({
  baseDir: parentDir,
  data,
  heldout,
  out,
  steps: 24,
  batch: 4,
  seq: 48,
  seed: 5,
  learningRate: 1e-3,
  warmupSteps: 3,
  weightDecay: 0.01,
  maxGradNorm: 1,
  saveEvery: 100
})

const readText = (file: string) => Effect.promise(() => fs.readFile(file, "utf8"))

describe("Pwrm", () => {
  const Triple = Schema.Struct({
    prompt: Schema.String.check(Schema.isMaxLength(80)),
    a: Schema.String.check(Schema.isMaxLength(80)),
    b: Schema.String.check(Schema.isMaxLength(80))
  })

  it.effect.prop("P(A, B) + P(B, A) is exactly 1, P(A, A) is 1/2, all in [0, 1]", { pairs: Schema.Array(Triple).check(Schema.isMaxLength(4)) }, ({ pairs }) =>
    Effect.gen(function*() {
      const backbone = yield* Pretrained.load(parentDir)
      const tokenizer = yield* Tokenizer.load(parentDir)
      // A random head, so that the scores differ and the two orders disagree.
      const head = yield* Effect.acquireRelease(
        Effect.sync(() => tf.tensor2d(Random.normals(Random.uniform(7), 128, 0.5), [1, 128])),
        (tensor) => Effect.sync(() => tensor.dispose())
      )
      const pwrm: Pwrm.Pwrm = { scorer: Pwrm.scorer(backbone, head), tokenizer, seq: 40, temperature: 0.7 }
      const before = tf.memory().numTensors
      const forward = yield* Effect.promise(() => Pwrm.probabilities(pwrm, pairs))
      const backward = yield* Effect.promise(() => Pwrm.probabilities(pwrm, pairs.map(({ prompt, a, b }) => ({ prompt, a: b, b: a }))))
      const same = yield* Effect.promise(() => Pwrm.probabilities(pwrm, pairs.map(({ prompt, a }) => ({ prompt, a, b: a }))))
      assert.strictEqual(tf.memory().numTensors, before, "scoring leaves no tensors behind")
      pairs.forEach((_, i) => {
        assert.isTrue(forward[i] >= 0 && forward[i] <= 1)
        assert.strictEqual(forward[i] + backward[i], 1)
        assert.strictEqual(same[i], 0.5)
      })
    }).pipe(Effect.scoped, Effect.provide(TensorBackend.layer("wasm"))), { timeout: 60_000, arbitrary: { runs: 8 } })

  it.effect("a pair is rendered within seq, thinking stripped, the prompt's end and the responses' beginnings kept", () =>
    Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.load(parentDir)
      const prompt = "[INST] " + "long question ".repeat(40) + "17 + 25 = ? [/INST]"
      const a = "[THINK]Ones: 7 + 5 = 12.[/THINK]42 " + "and more ".repeat(40)
      const b = "43"
      const ids = Pwrm.encode(tokenizer, 64, { prompt, a, b })
      assert.strictEqual(ids.length, 64)
      const text = tokenizer.decode(ids)
      assert.notInclude(text, "THINK")
      assert.include(text, "= ? [/INST]\n[A] 42 and more")
      assert.include(text, "\n[B] 43\nBetter:")
      // Swapping the responses swaps their tokens and nothing else.
      const swapped = tokenizer.decode(Pwrm.encode(tokenizer, 64, { prompt, a: b, b: a }))
      const [head, rest] = text.split("\n[A] ")
      const [first, second] = rest.replace("\nBetter:", "").split("\n[B] ")
      assert.strictEqual(swapped, `${head}\n[A] ${second}\n[B] ${first}\nBetter:`)
    }))

  it.effect("the temperature fit and the calibration error on known scores", () =>
    Effect.sync(() => {
      // Labels drawn from sigmoid(s); a model that says 4 s is over-confident by a factor 4.
      const next = Random.uniform(3)
      const judged = Array.from({ length: 4000 }, () => {
        const s = 4 * (next() - 0.5)
        return { ab: 4 * s, ba: -4 * s, aWins: next() < 1 / (1 + Math.exp(-s)) }
      })
      const tau = Pwrm.fitTemperature(judged)
      assert.approximately(tau, 4, 0.4)
      const [before, after] = [Pwrm.calibration(judged, 1), Pwrm.calibration(judged, tau)]
      assert.isBelow(after.nll, before.nll)
      assert.isBelow(after.ece, before.ece / 3)
      assert.strictEqual(after.accuracy, before.accuracy, "a temperature changes no decision")
    }))

  it.effect("a line that is not a pair fails naming the file and line", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const file = yield* writePairs(path.join(dir, "bad.jsonl"), [
        { prompt: "p", a: "x", b: "y", preferred: "a", kind: "extra fields are fine" },
        { prompt: "p", a: "x", b: "y", preferred: "c" }
      ])
      const error = yield* Effect.flip(readPairs(file))
      assert.include(error.message, `${file}:2`)
    }))
})

/** One PWRM trained on synthetic pairs, shared by the tests that use a trained model. */
class Trained extends Context.Service<Trained, { readonly dir: string; readonly card: Card }>()("test/Trained") {}

const trainedLayer = Layer.effect(
  Trained,
  Effect.gen(function*() {
    const dir = yield* tempDir
    const data = yield* writePairs(path.join(dir, "train.jsonl"), pairs(96, 1))
    const heldout = yield* writePairs(path.join(dir, "heldout.jsonl"), pairs(32, 2))
    const out = path.join(dir, "pwrm")
    const card = yield* train(options(data, heldout, out)).pipe(Effect.scoped)
    return { dir: out, card }
  })
).pipe(Layer.provideMerge(TensorBackend.layer("wasm")))

layer(trainedLayer, { timeout: 120_000 })("a trained PWRM", (it) => {
  it.effect("a short run lifts held-out accuracy well above chance and writes its folder", () =>
    Effect.gen(function*() {
      const { dir, card } = yield* Trained
      assert.isAtLeast(card.heldoutMetrics.accuracy, 0.9)
      const lines = (yield* readText(path.join(dir, "metrics.jsonl"))).trim().split("\n").map((line) => JSON.parse(line))
      assert.strictEqual(lines.length, 24)
      for (const file of ["config.json", "model.safetensors", "tokenizer.json", Pwrm.headFile, Pwrm.cardFile]) {
        yield* Effect.promise(() => fs.access(path.join(dir, file)))
      }
      assert.deepStrictEqual(JSON.parse(yield* readText(path.join(dir, Pwrm.cardFile))), card)
    }))

  it.effect("the layer answers probabilities in [0, 1] that prefer the right answer", () =>
    Effect.gen(function*() {
      const { dir } = yield* Trained
      yield* Effect.gen(function*() {
        const preference = yield* PairwisePreference
        const prompt = "[INST] 31 + 48 = ? [/INST]"
        const p = yield* preference.probability(prompt, "79", "I do not know.")
        const q = yield* preference.probability(prompt, "I do not know.", "79")
        assert.isTrue(p > 0.5 && p <= 1)
        assert.strictEqual(p + q, 1)
        // Thinking is stripped before the model sees a response.
        assert.strictEqual(yield* preference.probability(prompt, "[THINK]1 + 8 = 9, carry 0. 3 + 4 = 7.[/THINK]79", "I do not know."), p)
      }).pipe(Effect.provide(Preference.fromPwrm(dir)))
    }))

  it.effect("an over-confident PWRM (its head scaled up) is calibrated again by the fitted temperature", () =>
    Effect.gen(function*() {
      const { dir } = yield* Trained
      const pwrm = yield* Pwrm.load(dir)
      const scaled = yield* Effect.acquireRelease(
        Effect.sync(() => tf.mul(Pwrm.head(pwrm.scorer), 8) as tf.Tensor2D),
        (tensor) => Effect.sync(() => tensor.dispose())
      )
      const overConfident = Pwrm.scorer(pwrm.scorer, scaled) // the same backbone, the head scaled by 8
      // Held-out labels with a fifth reversed: no model should be sure of any of them.
      const heldout = pairs(32, 9, 0.2)
      const judge = (scorer: Model.Model) =>
        Effect.promise(() => Pwrm.scores(scorer, pwrm.tokenizer, pwrm.seq, heldout)).pipe(
          Effect.map((scores) => scores.map((s, i) => ({ ...s, aWins: heldout[i].preferred === "a" })))
        )
      const [plain, confident] = [yield* judge(pwrm.scorer), yield* judge(overConfident)]
      const tau = Pwrm.fitTemperature(confident)
      assert.approximately(tau / Pwrm.fitTemperature(plain), 8, 8e-3, "scores 8 times larger need a temperature 8 times higher")
      const [before, after] = [Pwrm.calibration(confident, 1), Pwrm.calibration(confident, tau)]
      assert.isBelow(after.nll, before.nll)
      assert.isBelow(after.ece, before.ece)
    }).pipe(Effect.scoped))
})

describe("pwrm training", () => {
  it.effect("a run interrupted and resumed ends with the metrics and weights of an uninterrupted one", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* writePairs(path.join(dir, "train.jsonl"), pairs(20, 3))
      const heldout = yield* writePairs(path.join(dir, "heldout.jsonl"), pairs(8, 4))
      const short = (out: string): TrainOptions => ({ ...options(data, heldout, out), steps: 7, batch: 2, saveEvery: 3 })
      const whole = path.join(dir, "whole")
      yield* train(short(whole)).pipe(Effect.scoped)

      const killed = path.join(dir, "killed")
      const stop = new Error("stop")
      yield* Effect.exit(train({ ...short(killed), onStep: (m) => { if (m.step === 5) throw stop } }).pipe(Effect.scoped))
      const refused = yield* Effect.flip(train(short(killed)).pipe(Effect.scoped))
      assert.include(refused.message, "pass --resume")
      yield* train({ ...short(killed), resume: true }).pipe(Effect.scoped)

      const losses = (out: string) =>
        readText(path.join(out, "metrics.jsonl")).pipe(Effect.map((text) => text.trim().split("\n").map((line) => JSON.parse(line).loss)))
      assert.deepStrictEqual(yield* losses(killed), yield* losses(whole))
      for (const file of ["model.safetensors", Pwrm.headFile]) {
        const bytes = (out: string) => Effect.promise(() => fs.readFile(path.join(out, file)))
        assert.isTrue((yield* bytes(whole)).equals(yield* bytes(killed)), `${file}: same bytes`)
      }
      const card = (out: string) => readText(path.join(out, Pwrm.cardFile)).pipe(Effect.map((text) => JSON.parse(text).temperature))
      assert.strictEqual(yield* card(killed), yield* card(whole))
    }).pipe(Effect.provide(TensorBackend.layer("wasm"))), { timeout: 120_000 })

  it.effect("cascade pwrm train runs from the command line and reports calibration", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* writePairs(path.join(dir, "train.jsonl"), pairs(8, 5))
      const heldout = yield* writePairs(path.join(dir, "heldout.jsonl"), pairs(4, 6))
      const out = path.join(dir, "pwrm")
      const args = ["pwrm", "train", "--model", parentDir, "--data", data, "--heldout", heldout, "--out", out, "--steps", "2", "--batch", "2", "--seq", "48"]
      const { code, stdout, stderr } = yield* Effect.callback<{ code: number; stdout: string; stderr: string }>((resume) => {
        execFile(process.execPath, [main, ...args], { timeout: 60_000 }, (error, stdout, stderr) => {
          resume(Effect.succeed({ code: error ? (typeof error.code === "number" ? error.code : 1) : 0, stdout, stderr }))
        })
      })
      assert.strictEqual(code, 0, stderr)
      assert.match(stdout, /held-out pairs 4: accuracy [\d.]+/)
      assert.match(stdout, /temperature 1: NLL [\d.]+ ECE [\d.]+/)
      yield* Effect.promise(() => fs.access(path.join(out, Pwrm.cardFile)))
    }), { timeout: 60_000 })
})
