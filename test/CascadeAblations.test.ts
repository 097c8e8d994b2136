/**
 * The ablation flags of `cascade run` (src/cli/run.ts), through the command line as a user runs
 * them: `--teacher previous`, `--teacher DIR` and `--ce-weight W`, each writing to its suffixed run
 * folder, on a tiny two-generation cascade of the fixture.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import type { StepMetrics } from "../stages/Distill.ts"
import { cascadeCli, localFixture, markovData, sharedFixture, tempDir } from "./support.ts"

const readJson = (file: string) => Effect.promise(() => fs.readFile(file, "utf8").then((text) => JSON.parse(text)))

const exists = (file: string) => Effect.promise(() => fs.access(file).then(() => true, () => false))

/** A config file for two tiny generations (short phase only unless `long`), under `dir`/run. */
const tinyConfig = (dir: string, options: { readonly long?: boolean } = {}) =>
  Effect.gen(function*() {
    const data = yield* markovData(path.join(dir, "train.jsonl"), 12, 24, 1)
    const heldout = yield* markovData(path.join(dir, "heldout.jsonl"), 2, 24, 2)
    const file = path.join(dir, "config.json")
    const config = {
      run: path.join(dir, "run"),
      parent: sharedFixture("tiny-mistral"),
      data: { train: data, calib: data, heldout },
      sizes: [{ name: "a", layers: 3, hidden: 56 }, { name: "b", layers: 2, hidden: 48 }],
      short: { seq: 16, steps: 2, batch: 2, lr: 1e-3 },
      ...(options.long ? { long: { seq: 32, steps: 1, batch: 1, lr: 1e-3, factor: 2 } } : {})
    }
    yield* Effect.promise(() => fs.writeFile(file, JSON.stringify(config)))
    return { file, run: config.run }
  })

/** The teacher a distillation folder was trained against, as its finished state records it. */
const teacherOf = (dir: string) =>
  Effect.map(readJson(path.join(dir, "state.json")), (state) => {
    assert.isTrue(state.complete, `${dir} finished`)
    return JSON.parse(state.identity).teacher as string
  })

/** How the in-process teacher of `dir` describes itself (the cascade gives it the full distribution). */
const inProcess = (dir: string) => Effect.map(Checkpoint.fingerprint(dir), (fingerprint) => `in-process ${dir} (weights ${fingerprint.slice(0, 16)}), full distribution`)

const metricsOf = (dir: string) =>
  Effect.promise(() => fs.readFile(path.join(dir, "metrics.jsonl"), "utf8")).pipe(
    Effect.map((text) => text.split("\n").filter(Boolean).map((line) => JSON.parse(line) as StepMetrics))
  )

describe("cascade run ablations", () => {
  it.effect("--teacher previous: each generation is distilled from the previous generation's short model", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const { file, run } = yield* tinyConfig(dir)
      const result = yield* cascadeCli(["run", file, "--teacher", "previous"], 120_000)
      assert.strictEqual(result.code, 0, result.stderr)
      const folder = `${run}-teacher-previous`
      assert.isFalse(yield* exists(run), "the config's own run folder is left alone")
      const manifest = yield* readJson(path.join(folder, "manifest.json"))
      const gen1Short = path.join(folder, "1-a", "short")
      assert.deepStrictEqual(manifest.generations.map((g: { teacher: string }) => g.teacher), [sharedFixture("tiny-mistral"), gen1Short])
      assert.strictEqual(yield* teacherOf(gen1Short), yield* inProcess(sharedFixture("tiny-mistral")))
      assert.strictEqual(yield* teacherOf(path.join(folder, "2-b", "short")), yield* inProcess(gen1Short))
    }), { timeout: 120_000 })

  it.effect("--teacher DIR: every generation is distilled from that folder", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const { file, run } = yield* tinyConfig(dir)
      // Another model of the fixture's vocabulary, so that it cannot be mistaken for the root.
      const teacher = localFixture("mistral-tied")
      const result = yield* cascadeCli(["run", file, "--teacher", teacher], 120_000)
      assert.strictEqual(result.code, 0, result.stderr)
      const folder = `${run}-teacher-mistral-tied`
      const manifest = yield* readJson(path.join(folder, "manifest.json"))
      assert.deepStrictEqual(manifest.generations.map((g: { teacher: string }) => g.teacher), [teacher, teacher])
      for (const generation of ["1-a", "2-b"]) {
        assert.strictEqual(yield* teacherOf(path.join(folder, generation, "short")), yield* inProcess(teacher), generation)
      }
    }), { timeout: 120_000 })

  it.effect("--ce-weight W: writes to the run folder suffixed ceW, and each step's loss is KL + W CE", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const { file, run } = yield* tinyConfig(dir, { long: true })
      const result = yield* cascadeCli(["run", file, "--ce-weight", "0.5"], 120_000)
      assert.strictEqual(result.code, 0, result.stderr)
      const folder = `${run}-ce0.5`
      assert.isFalse(yield* exists(run), "the config's own run folder is left alone")
      assert.strictEqual((yield* readJson(path.join(folder, "manifest.json"))).config.short.ceWeight, 0.5)
      for (const phase of ["1-a/short", "1-a/long", "2-b/short", "2-b/long"]) {
        const metrics = yield* metricsOf(path.join(folder, phase))
        assert.isAbove(metrics.length, 0, phase)
        for (const m of metrics) {
          assert.isAbove(m.ce, 0, phase)
          assert.approximately(m.loss, m.kl + 0.5 * m.ce, 1e-5 * m.loss, `${phase} step ${m.step}`)
        }
      }
    }), { timeout: 120_000 })
})
