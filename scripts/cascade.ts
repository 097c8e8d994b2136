/**
 * The cascade written out in code, stage by stage, on the embedded default: what `cascade run`
 * (stages/Cascade.ts) does from a config, for readers who compose their own pipeline.
 *
 *   node scripts/cascade.ts [--out runs/scripted]
 *
 * Each stage resumes or skips finished work, so the script can be rerun after a kill; a stage whose
 * inputs changed (`replace`, `reuse`: the model it starts from by its weights, the data, the options)
 * is done again, and so is every stage after it.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Console, Effect } from "effect"
import * as path from "node:path"
import { parseArgs } from "node:util"
import * as Teacher from "../layers/Teacher.ts"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { calibrate } from "../stages/Calibrate.ts"
import { measure, table } from "../stages/Cascade.ts"
import { distill } from "../stages/Distill.ts"
import { prune } from "../stages/Prune.ts"

const { values } = parseArgs({ options: { out: { type: "string", default: "runs/scripted" } } })
const out = path.resolve(values.out)
const root = "assets/parent"
const data = { train: "data/train.jsonl", calib: "data/calib.jsonl", heldout: "data/heldout.jsonl", recall: "data/eval-recall.jsonl", arith: "data/eval-arith.jsonl" }
const sizes = [
  { name: "l5", layers: 5, hidden: 112, ffn: 320 },
  { name: "l4", layers: 4, hidden: 96, ffn: 256 }
]

/** Distillation settings shared by both phases, as `cascade distill` takes them. */
const training = (steps: number, seq: number, learningRate: number) => ({
  seq,
  steps,
  seed: 0,
  batch: 8,
  accumulate: 1,
  learningRate,
  minLearningRate: learningRate / 10,
  warmupSteps: Math.floor(steps / 10),
  weightDecay: 0.01,
  maxGradNorm: 1,
  loss: { temperature: 1, crossEntropyWeight: 0, restBucket: false, maxOutsideMass: 1e-3 },
  saveEvery: 20,
  resume: true,
  replace: true
})

const program = Effect.gen(function*() {
  const tokenizer = yield* Tokenizer.loadIfPresent(root)
  // The teacher is the root parent for every generation, as in the recipe.
  const teacher = Teacher.inProcess(root)
  let parent = root
  const models: Array<[string, string]> = [["parent", root]]
  for (const size of sizes) {
    const dir = path.join(out, size.name)
    yield* Effect.scoped(Effect.gen(function*() {
      yield* calibrate(yield* Pretrained.load(parent), { modelDir: parent, data: data.calib, out: path.join(dir, "stats"), seq: 128, tokenizer, replace: true })
    }))
    yield* Effect.scoped(prune({ modelDir: parent, statsDir: path.join(dir, "stats"), out: path.join(dir, "pruned"), targets: size, reuse: true }))
    yield* Effect.scoped(distill({ ...training(80, 128, 2e-3), studentDir: path.join(dir, "pruned"), data: data.train, out: path.join(dir, "short"), tokenizer }))
      .pipe(Effect.provide(teacher))
    yield* Effect.scoped(distill({
      ...training(10, 256, 5e-4),
      studentDir: path.join(dir, "short"),
      data: data.train,
      out: path.join(dir, "long"),
      tokenizer,
      yarn: { factor: 2, originalMax: 128 }
    })).pipe(Effect.provide(teacher))
    models.push([`${size.name} short`, path.join(dir, "short")], [`${size.name} long`, path.join(dir, "long")])
    // The next generation is pruned from this one's short-context model.
    parent = path.join(dir, "short")
  }
  const config = { run: out, data, evaluation: { recallLimit: 100, arithLimit: 100 } }
  const rows = yield* Effect.forEach(models, ([name, dir]) => measure(name, dir, config))
  yield* Console.log(table(rows))
}).pipe(Effect.provide(TensorBackend.layer()))

NodeRuntime.runMain(program)
