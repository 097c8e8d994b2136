/**
 * Does pruning by calibration scores beat pruning at random? For each axis (layers, hidden width,
 * FFN neurons) this prunes a trained parent by scores and at random with several seeds, without any
 * retraining, and prints held-out NLL as a Markdown table.
 *
 *   node scripts/prune-vs-random.ts [--model assets/parent] [--calib data/calib.jsonl]
 *     [--heldout data/heldout.jsonl] [--seeds 5] [--seq 128]
 */
import { NodeRuntime } from "@effect/platform-node"
import { Console, Effect, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { parseArgs } from "node:util"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as Dataset from "../src/data/Dataset.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Pruning from "../src/prune/Pruning.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { calibrate } from "../stages/Calibrate.ts"
import { evaluate } from "../stages/Evaluate.ts"

const { values } = parseArgs({
  options: {
    model: { type: "string", default: "assets/parent" },
    calib: { type: "string", default: "data/calib.jsonl" },
    heldout: { type: "string", default: "data/heldout.jsonl" },
    seeds: { type: "string", default: "5" },
    seq: { type: "string", default: "128" }
  }
})

const program = Effect.gen(function*() {
  const parent = yield* Pretrained.load(values.model)
  const tokenizer = yield* Tokenizer.loadIfPresent(values.model)
  const statsDir = yield* Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "cascade-stats-")))
  const { stats } = yield* calibrate(parent, { modelDir: values.model, data: values.calib, out: statsDir, seq: Number(values.seq), tokenizer })
  // Held-out sequences are read once and replayed for every model.
  const heldout = yield* Dataset.sequences(values.heldout, { vocabSize: parent.config.vocabSize, tokenizer }).pipe(Stream.runCollect)
  const nll = (model: Model.Model) => Effect.map(evaluate(model, Stream.fromIterable(heldout)), (result) => result.nll)

  const { numLayers: l, hiddenSize: d, intermediateSize: f } = parent.config
  const axes: Array<[string, Pruning.Targets]> = [
    [`layers ${l} -> ${l - 2}`, { layers: l - 2 }],
    [`hidden ${d} -> ${(3 * d) / 4}`, { hidden: (3 * d) / 4 }],
    [`ffn ${f} -> ${f / 2}`, { ffn: f / 2 }]
  ]
  const seeds = Array.from({ length: Number(values.seeds) }, (_, i) => i + 1)
  const pruned = (targets: Pruning.Targets, selection: Pruning.Selection) =>
    Effect.acquireUseRelease(
      Pruning.apply(parent, Pruning.plan(parent.config, stats, targets, selection)),
      nll,
      (child) => Effect.sync(() => Model.dispose(child))
    )

  yield* Console.log(`parent held-out NLL: ${(yield* nll(parent)).toFixed(4)} (calibration: ${stats.tokens} tokens)\n`)
  yield* Console.log("| axis | by scores | random (mean ± sd over seeds) | random best | scores beat every seed |")
  yield* Console.log("|---|---|---|---|---|")
  for (const [name, targets] of axes) {
    const byScores = yield* pruned(targets, { kind: "scores" })
    const random = yield* Effect.forEach(seeds, (seed) => pruned(targets, { kind: "random", seed }))
    const mean = random.reduce((a, b) => a + b, 0) / random.length
    const sd = Math.sqrt(random.reduce((a, b) => a + (b - mean) ** 2, 0) / random.length)
    yield* Console.log(
      `| ${name} | ${byScores.toFixed(4)} | ${mean.toFixed(4)} ± ${sd.toFixed(4)} | ${Math.min(...random).toFixed(4)} | ${random.every((r) => byScores < r) ? "yes" : "no"} |`
    )
  }
  yield* Effect.promise(() => fs.rm(statsDir, { recursive: true, force: true }))
}).pipe(Effect.scoped, Effect.provide(TensorBackend.layer()))

NodeRuntime.runMain(program)
