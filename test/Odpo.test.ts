import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as Generate from "../src/model/Generate.ts"
import { PairwisePreference } from "../src/rewards/Preference.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { defaultLoop, type Sampled } from "../stages/Grpo.ts"
import { label, odpo, type OdpoMetrics } from "../stages/Odpo.ts"
import { onBackend } from "./support.ts"

const parent = fileURLToPath(new URL("../assets/parent", import.meta.url))

const tempDir = Effect.acquireRelease(
  Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "cascade-odpo-"))),
  (dir) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true }))
)

/** A preference for the shorter response (as the PWRM sees it), certain unless they are as long. */
const preferShorter = (a: string, b: string) => (a.length < b.length ? 1 : a.length > b.length ? 0 : 0.5)

const shorter = Layer.succeed(PairwisePreference, {
  describe: "prefers the shorter response",
  probability: (_prompt, a, b) => Effect.succeed(preferShorter(a, b))
})

/** Questions the parent answers in a word, or rambles on from, when sampling. */
const prompts = [
  "[INST] Who founded Reakath? [/INST]",
  "[INST] What is the capital of Sulis? [/INST]",
  "[INST] Name the founder of Reakath. [/INST]",
  "[INST] Which river flows through Thakor? [/INST]"
]

/**
 * The share of pairs the preference gives to the model in `dir` against the parent: both sample
 * `copies` responses per prompt at T = 0.7 with the same seed, and response i meets response i.
 */
const winRate = (dir: string, copies: number) =>
  Effect.gen(function*() {
    const sampleFrom = (modelDir: string) =>
      Effect.gen(function*() {
        const model = yield* Pretrained.load(modelDir)
        const tokenizer = yield* Tokenizer.load(modelDir)
        const rows = prompts.flatMap((prompt) => new Array<Array<number>>(copies).fill(tokenizer.encode(prompt)))
        const generations = yield* Generate.generate(model, rows, {
          maxNewTokens: 12,
          temperature: 0.7,
          seed: 1234,
          stopTokenIds: [tokenizer.eosId!],
          decode: (ids) => tokenizer.decode(ids)
        })
        return generations.map((g) => Generate.splitThinking(g.text!).answer)
      }).pipe(Effect.scoped)
    const ours = yield* sampleFrom(dir)
    const theirs = yield* sampleFrom(parent)
    return ours.reduce((sum, answer, i) => sum + preferShorter(answer, theirs[i]), 0) / ours.length
  })

const sampled = (text: string, loops = false): Sampled => ({
  completion: { prompt: [1], response: [2] },
  text,
  loops,
  finishReason: loops ? "loop" : "stop"
})

describe("odpo", () => {
  it.effect("a looping response loses outright, and the PWRM sees responses without their thinking", () =>
    Effect.gen(function*() {
      const seen: Array<[string, string]> = []
      // A PWRM that prefers the longer response, so that only the loop rule can make it lose.
      const longer = Layer.succeed(PairwisePreference, {
        describe: "prefers the longer response",
        probability: (_prompt, a, b) => Effect.sync(() => (seen.push([a, b]), 1 - preferShorter(a, b)))
      })
      const run = <A, E>(effect: Effect.Effect<A, E, PairwisePreference>) => Effect.provide(effect, longer)
      const rambling = sampled("[THINK]let me see[/THINK]the river Gloath, I think")
      assert.strictEqual(yield* run(label("q", sampled("Gloath Gloath Gloath Gloath", true), sampled("Gloath"))), 0)
      assert.strictEqual(yield* run(label("q", sampled("Gloath"), sampled("Gloath Gloath Gloath Gloath", true))), 1)
      assert.strictEqual(yield* run(label("q", sampled("a a a", true), sampled("b b b b", true))), 0.5)
      assert.deepStrictEqual(seen, [])
      assert.strictEqual(yield* run(label("q", rambling, sampled("Gloath"))), 1)
      assert.deepStrictEqual(seen, [["the river Gloath, I think", "Gloath"]])
    }))

  it.effect("a short run under a preference for shorter responses wins against the model it started from", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const file = path.join(dir, "prompts.jsonl")
      yield* Effect.promise(() => fs.writeFile(file, prompts.map((prompt) => JSON.stringify({ prompt })).join("\n") + "\n"))
      const out = path.join(dir, "odpo")
      yield* odpo({
        modelDir: parent,
        prompts: file,
        out,
        steps: 6,
        seed: 1,
        batch: 4,
        maxNewTokens: 12,
        temperature: 0.7,
        loop: defaultLoop,
        beta: 0.1,
        microBatch: 4,
        learningRate: 3e-5,
        weightDecay: 0,
        maxGradNorm: 1,
        saveEvery: 100
      }).pipe(Effect.scoped)
      const curve = (yield* Effect.promise(() => fs.readFile(path.join(out, "metrics.jsonl"), "utf8")))
        .trim().split("\n").map((line) => JSON.parse(line) as OdpoMetrics)
      assert.strictEqual(curve.length, 6)
      for (const m of curve) assert.isTrue([m.loss, m.margin, m.agreement, m.kl, m.p_mean].every(Number.isFinite))
      const rate = yield* winRate(out, 8)
      assert.isAbove(rate, 0.6)
    }).pipe(onBackend("wasm"), Effect.provide(shorter)), { timeout: 60_000 })
})
