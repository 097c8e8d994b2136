import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Cascade from "../stages/Cascade.ts"
import { markovData, onBackend, sharedFixture, tempDir } from "./support.ts"

const mtime = (file: string) => Effect.promise(() => fs.stat(file).then((s) => s.mtimeMs))

describe("Cascade.run", () => {
  it.effect("runs generations with lineage and a report, and a run stopped midway resumes instead of starting over", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 40, 40, 1)
      const heldout = yield* markovData(path.join(dir, "heldout.jsonl"), 6, 40, 2)
      const config = yield* Cascade.decodeConfig({
        run: path.join(dir, "run"),
        parent: sharedFixture("tiny-mistral"),
        data: { train: data, calib: data, heldout },
        sizes: [{ name: "a", layers: 3, hidden: 56 }, { name: "b", layers: 2, hidden: 48, ffn: 128 }],
        short: { seq: 32, steps: 6, batch: 4, lr: 3e-3 },
        long: { seq: 64, steps: 2, batch: 2, lr: 1e-3, factor: 2 }
      })
      // Stop during the second generation's short distillation.
      const stop = new Error("stopped")
      const first = yield* Effect.exit(Cascade.run(config, {
        onStep: (label, metrics) => {
          if (label.includes("2/2") && metrics.step === 3) throw stop
        }
      }))
      assert.strictEqual(first._tag, "Failure")
      const gen1 = path.join(config.run, "1-a", "short", "model.safetensors")
      const before = yield* mtime(gen1)

      const labels = new Set<string>()
      const rows = yield* Cascade.run(config, { onStep: (label) => labels.add(label) })
      assert.strictEqual(yield* mtime(gen1), before, "the finished generation was not redone")
      assert.notInclude([...labels].join(), "1/2", "no step of the first generation ran again")
      assert.deepStrictEqual(rows.map((r) => r.model), ["parent", "1-a short", "1-a long", "2-b short", "2-b long"])
      assert.deepStrictEqual(rows.map((r) => r.layers), [4, 3, 3, 2, 2])
      assert.isTrue(rows.every((r) => Number.isFinite(r.nll)))

      const manifest = JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(config.run, "manifest.json"), "utf8")))
      assert.strictEqual(manifest.generations[1].parent, path.join(config.run, "1-a", "short"), "each generation is pruned from the previous short model")
      assert.strictEqual(manifest.generations[1].teacher, sharedFixture("tiny-mistral"), "the teacher is the root parent")
      // The long phase makes a Ministral 3: YaRN over the short context, queries scaled by position.
      const longConfig = JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(config.run, "1-a", "long", "config.json"), "utf8")))
      assert.deepStrictEqual(
        [longConfig.model_type, longConfig.architectures, longConfig.rope_parameters.rope_type, longConfig.rope_parameters.original_max_position_embeddings, longConfig.rope_parameters.llama_4_scaling_beta],
        ["ministral3", ["Ministral3ForCausalLM"], "yarn", 32, 0.1]
      )
      const report = yield* Effect.promise(() => fs.readFile(path.join(config.run, "report.md"), "utf8"))
      assert.include(report, "| 2-b short |")
      assert.include(report, "Ran on wasm: cpu (WebAssembly)")
      for (const plot of ["loss-curves.svg", "retention-accuracy.svg", "retention-nll.svg"]) {
        assert.include(yield* Effect.promise(() => fs.readFile(path.join(config.run, plot), "utf8")), "<svg")
      }
    }).pipe(onBackend("wasm")), { timeout: 180_000 })

  it.effect("a generation retrained with another learning rate redoes the next generation's calibration, pruning and distillation; with nothing changed, nothing runs again", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const data = yield* markovData(path.join(dir, "train.jsonl"), 24, 40, 3)
      const heldout = yield* markovData(path.join(dir, "heldout.jsonl"), 4, 40, 4)
      const configOf = (lr: number) =>
        Cascade.decodeConfig({
          run: path.join(dir, "run"),
          parent: sharedFixture("tiny-mistral"),
          data: { train: data, calib: data, heldout },
          sizes: [{ name: "a", layers: 3 }, { name: "b", layers: 2, ffn: 128 }],
          short: { seq: 32, steps: 3, batch: 4, lr }
        })
      const run = (lr: number) =>
        Effect.gen(function*() {
          const labels = new Set<string>()
          const rows = yield* Cascade.run(yield* configOf(lr), { onStep: (label) => labels.add(label) })
          return { rows, labels: [...labels].sort() }
        })
      const second = path.join(dir, "run", "2-b")
      const outputs = [
        path.join(second, "stats", "statistics.safetensors"),
        path.join(second, "pruned", "model.safetensors"),
        path.join(second, "short", "model.safetensors"),
        path.join(dir, "run", "evals", "1-a_short.json")
      ]
      const times = Effect.forEach(outputs, mtime)
      const nllOf = (rows: ReadonlyArray<Cascade.Measurement>, model: string) => rows.find((row) => row.model === model)!.nll

      const first = yield* run(3e-3)
      const before = yield* times

      const retrained = yield* run(1e-3)
      assert.deepStrictEqual(retrained.labels, ["[1/2 a] short", "[2/2 b] short"], "both distillations ran again")
      const after = yield* times
      outputs.forEach((file, i) => assert.notStrictEqual(after[i], before[i], `${path.relative(dir, file)} was made again`))
      assert.notStrictEqual(nllOf(retrained.rows, "1-a short"), nllOf(first.rows, "1-a short"), "the retrained model was measured again")

      const unchanged = yield* run(1e-3)
      assert.deepStrictEqual(unchanged.labels, [], "no distillation ran again")
      assert.deepStrictEqual(yield* times, after, "no output was made again")
      assert.deepStrictEqual(unchanged.rows.map((row) => row.nll), retrained.rows.map((row) => row.nll))
    }).pipe(onBackend("wasm")), { timeout: 180_000 })
})
