import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Calibration from "../src/prune/Calibration.ts"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Training from "../src/train/Training.ts"
import { calibrate, readManifest } from "../stages/Calibrate.ts"
import { prune } from "../stages/Prune.ts"
import { localFixture, onBackend, sharedFixture, tempDir } from "./support.ts"

const parentDir = sharedFixture("tiny-mistral")

/** A JSONL file of seeded token rows. */
const dataFile = (dir: string, rows: number, length: number) => {
  let state = 12345
  const lines = Array.from({ length: rows }, () =>
    JSON.stringify({
      input_ids: Array.from({ length }, () => {
        state = (state * 1103515245 + 12345) % 2147483648
        return state % 512
      })
    })
  )
  const file = path.join(dir, "calib.jsonl")
  return Effect.promise(() => fs.writeFile(file, lines.join("\n") + "\n")).pipe(Effect.as(file))
}

/** The parent's statistics, calibrated in `dir`/stats on `rows` rows of `length` ids; returns their folder. */
const parentStats = (dir: string, rows: number, length: number) =>
  Effect.gen(function*() {
    const data = yield* dataFile(dir, rows, length)
    const stats = path.join(dir, "stats")
    yield* calibrate(yield* Pretrained.load(parentDir), { modelDir: parentDir, data, out: stats, seq: length })
    return stats
  })

const exists = (file: string) => Effect.promise(() => fs.access(file).then(() => true, () => false))
const mtime = (file: string) => Effect.promise(() => fs.stat(file).then((s) => s.mtimeMs))

/** A checkpoint with tiny-mistral's very config.json and other (seeded random) weights, in `dir`. */
const otherWeights = (dir: string) =>
  Effect.gen(function*() {
    const parent = yield* Pretrained.load(parentDir)
    yield* Pretrained.save(`${dir}.tmp`, yield* Training.initialise(parent.config, 7), { dtype: "F32" })
    yield* Effect.promise(async () => {
      await fs.mkdir(dir)
      await fs.copyFile(path.join(parentDir, "config.json"), path.join(dir, "config.json"))
      await fs.copyFile(path.join(`${dir}.tmp`, "model.safetensors"), path.join(dir, "model.safetensors"))
    })
    return dir
  }).pipe(Effect.scoped)

describe("calibrate", () => {
  it.effect("a run stopped midway resumes and ends with the statistics of an uninterrupted run", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* dataFile(dir, 24, 40)
      const model = yield* Pretrained.load(parentDir)
      const options = { modelDir: parentDir, data, seq: 32, batchSize: 2, saveEvery: 2 }
      const whole = yield* calibrate(model, { ...options, out: path.join(dir, "whole") })

      const out = path.join(dir, "resumed")
      const stop = new Error("stopped")
      const interrupted = yield* Effect.exit(calibrate(model, {
        ...options,
        out,
        onProgress: ({ rows }) => {
          if (rows >= 14) throw stop
        }
      }))
      assert.strictEqual(interrupted._tag, "Failure")
      const partial = yield* readManifest(out)
      assert.isFalse(partial!.complete)
      assert.strictEqual(partial!.rows, 12)

      const resumed = yield* calibrate(model, { ...options, out })
      assert.isTrue(resumed.manifest.complete)
      assert.strictEqual(resumed.manifest.rows, whole.manifest.rows)
      assert.strictEqual(resumed.stats.tokens, whole.stats.tokens)
      assert.deepStrictEqual(resumed.stats.secondMoment, whole.stats.secondMoment)
      assert.deepStrictEqual(resumed.stats.ffnAbsSum, whole.stats.ffnAbsSum)
      assert.deepStrictEqual(resumed.stats.layerRatioSum, whole.stats.layerRatioSum)
      // What is on disk is what was returned.
      const saved = yield* Calibration.read(path.join(out, "statistics.safetensors"))
      assert.deepStrictEqual(saved.secondMoment, whole.stats.secondMoment)
    }).pipe(onBackend("wasm")))

  it.effect("statistics of other weights (the same config) are refused naming the weights, and made again with replace", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* dataFile(dir, 8, 32)
      const other = yield* otherWeights(path.join(dir, "other"))
      const stats = path.join(dir, "stats")
      const options = { data, out: stats, seq: 32 }
      const parents = yield* calibrate(yield* Pretrained.load(parentDir), { ...options, modelDir: parentDir })
      const model = yield* Pretrained.load(other)
      const refused = yield* Effect.flip(calibrate(model, { ...options, modelDir: other }))
      assert.include(refused.message, "holds statistics of other inputs: the model's weights")
      const child = path.join(dir, "child")
      const misfit = yield* Effect.flip(prune({ modelDir: other, statsDir: stats, out: child, targets: { layers: 3 } }))
      assert.include(misfit.message, "were made from other weights")
      assert.isFalse(yield* exists(child), "nothing written")

      const replaced = yield* calibrate(model, { ...options, modelDir: other, replace: true })
      assert.strictEqual(replaced.manifest.weights, yield* Checkpoint.fingerprint(other))
      assert.notDeepEqual(replaced.stats.secondMoment, parents.stats.secondMoment)
      assert.deepStrictEqual((yield* Calibration.read(path.join(stats, "statistics.safetensors"))).secondMoment, replaced.stats.secondMoment)
      yield* prune({ modelDir: other, statsDir: stats, out: child, targets: { layers: 3 } })
    }).pipe(onBackend("wasm")))
})

describe("prune", () => {
  it.effect("writes a checkpoint of the same architecture, its tokenizer files and a report", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const stats = yield* parentStats(dir, 8, 32)
      const out = path.join(dir, "child")
      const report = yield* prune({ modelDir: parentDir, statsDir: stats, out, targets: { layers: 3, hidden: 40, ffn: 100 } })
      const child = yield* Pretrained.load(out)
      assert.deepStrictEqual(
        [child.config.numLayers, child.config.hiddenSize, child.config.intermediateSize, child.config.headDim],
        [3, 40, 100, 16]
      )
      const config = JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(out, "config.json"), "utf8")))
      assert.strictEqual(config.head_dim, 16) // no longer hidden / heads, so it must be explicit
      assert.deepStrictEqual(config.architectures, ["MistralForCausalLM"])
      assert.strictEqual(report.child.parameters, 3 * (2 * 40 * 16 * 6 + 3 * 40 * 100 + 2 * 40) + 2 * 512 * 40 + 40)
      assert.strictEqual(report.layers.kept.length, 3)
      assert.isAbove(report.hidden!.explainedVariance, 0.5)
      assert.isTrue(yield* exists(path.join(out, "generation_config.json")))
    }).pipe(onBackend("wasm")))

  it.effect("random pruning: the same seed gives the same child, another seed another choice, and the report says so", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const stats = yield* parentStats(dir, 8, 32)
      const targets = { layers: 2, hidden: 40, ffn: 100 }
      const run = (name: string, seed: number) =>
        prune({ modelDir: parentDir, statsDir: stats, out: path.join(dir, name), targets, selection: { kind: "random", seed } })
      const weights = (name: string) => Effect.promise(() => fs.readFile(path.join(dir, name, "model.safetensors")))
      const first = yield* run("a", 7)
      const again = yield* run("b", 7)
      const other = yield* run("c", 8)
      assert.strictEqual(first.selection, "random (seed 7)")
      assert.isTrue((yield* weights("a")).equals(yield* weights("b")), "same seed, same child")
      assert.deepStrictEqual(again.layers, first.layers)
      assert.isFalse((yield* weights("a")).equals(yield* weights("c")), "another seed, another child")
      assert.notDeepEqual([other.layers.kept, other.ffn, other.hidden], [first.layers.kept, first.ffn, first.hidden])
      const child = yield* Pretrained.load(path.join(dir, "a"))
      assert.deepStrictEqual([child.config.numLayers, child.config.hiddenSize, child.config.intermediateSize], [2, 40, 100])
      // Random axes keep less of the second moment than the principal directions.
      const scored = yield* prune({ modelDir: parentDir, statsDir: stats, out: path.join(dir, "s"), targets })
      assert.strictEqual(scored.selection, "calibration scores")
      assert.isAbove(scored.hidden!.explainedVariance, first.hidden!.explainedVariance)
    }).pipe(onBackend("wasm")))

  it.effect("a tied child of an untied parent reports its rule and its errors, and --tie-from needs --tie-embeddings", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const stats = yield* parentStats(dir, 8, 32)
      const out = path.join(dir, "child")
      const report = yield* prune({ modelDir: parentDir, statsDir: stats, out, targets: { hidden: 40, tieEmbeddings: true, tieFrom: "head" } })
      assert.isTrue(report.child.tiedEmbeddings)
      assert.strictEqual(report.tie!.rule, "head")
      assert.isAbove(report.tie!.inputError, 0.1)
      assert.isAtMost(report.tie!.outputError, 1e-6)
      assert.isTrue(report.approximate.some((line) => line.startsWith("tied embeddings (--tie-from head)")))
      const byDefault = yield* prune({ modelDir: parentDir, statsDir: stats, out, targets: { hidden: 40, tieEmbeddings: true } })
      assert.strictEqual(byDefault.tie!.rule, "fit")
      const error = yield* Effect.flip(prune({ modelDir: parentDir, statsDir: stats, out: path.join(dir, "none"), targets: { tieFrom: "embed" } }))
      assert.include(error.message, "--tie-from embed chooses how a tied child's matrix is formed: add --tie-embeddings")
      assert.isFalse(yield* exists(path.join(dir, "none")))
    }).pipe(onBackend("wasm")))

  it.effect("bad requests fail clearly and write nothing", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const stats = yield* parentStats(dir, 1, 8)
      const out = path.join(dir, "child")
      const cases = [
        { modelDir: parentDir, targets: { layers: 5 }, expect: "--layers 5 is larger than the parent's layers (4)" },
        { modelDir: parentDir, targets: { ffn: 0 }, expect: "--ffn must be a positive integer" },
        { modelDir: parentDir, targets: { hidden: 32 }, expect: "too few calibration tokens (8) for a rank-32 rotation" },
        { modelDir: localFixture("mistral-tied"), targets: { layers: 1 }, expect: "statistics were made for another model" }
      ]
      for (const { modelDir, targets, expect } of cases) {
        const error = yield* Effect.flip(prune({ modelDir, statsDir: stats, out, targets }))
        assert.include(error.message, expect)
        assert.isFalse(yield* exists(out), "nothing written")
      }
    }).pipe(onBackend("wasm")))

  it.effect("with reuse, a child of the same inputs is kept and one of other targets made again", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const stats = yield* parentStats(dir, 8, 32)
      const out = path.join(dir, "child")
      const weights = path.join(out, "model.safetensors")
      const options = { modelDir: parentDir, statsDir: stats, out, targets: { layers: 3 }, reuse: true }
      const made = yield* prune(options)
      const before = yield* mtime(weights)
      assert.deepStrictEqual(yield* prune(options), JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(out, "prune-report.json"), "utf8"))))
      assert.strictEqual(yield* mtime(weights), before, "the same inputs keep the child")
      assert.strictEqual(made.inputs.parent, yield* Checkpoint.fingerprint(parentDir))

      const other = yield* prune({ ...options, targets: { layers: 2 } })
      assert.strictEqual(other.child.layers, 2)
      assert.notStrictEqual(yield* mtime(weights), before, "other targets make it again")
    }).pipe(onBackend("wasm")))
})
