/**
 * A 0.86B-parameter parent on the GPU: initialised, saved, calibrated, pruned and distilled for a few
 * steps on webgpu, printing the time and the GPU memory tfjs's pool holds after each stage.
 *
 *   node scripts/gpu-big.ts [--dir DIR] [--steps N] [--precision fp32|mixed] [--child LAYERS,HIDDEN,FFN]
 *                                                        (on the GPU machine: bash .gpu/run.sh big ...)
 *
 * The parent: vocab 32768, hidden 2048, 16 layers, FFN 5632, 16/4 heads of 128 (0.856B parameters),
 * random as transformers initialises; the child keeps 12 layers, hidden 1536 and FFN 4096 unless
 * --child says otherwise (16,2048,5632 keeps the parent's size: a 0.856B student). The distillation
 * runs in --precision (default: mixed where the GPU has tensor cores), and the last line gives the
 * mean tokens/s of its steps after the first and the peak of tfjs's GPU buffer pool.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Console, Effect } from "effect"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { parseArgs } from "node:util"
import * as Teacher from "../layers/Teacher.ts"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Config from "../src/model/Config.ts"
import * as Random from "../src/Random.ts"
import * as Training from "../src/train/Training.ts"
import * as TensorCoreMatMul from "../src/gpu/TensorCoreMatMul.ts"
import { calibrate } from "../stages/Calibrate.ts"
import { distill } from "../stages/Distill.ts"
import { prune } from "../stages/Prune.ts"

const { values } = parseArgs({
  options: {
    dir: { type: "string" },
    steps: { type: "string", default: "3" },
    precision: { type: "string" },
    child: { type: "string", default: "12,1536,4096" }
  }
})
const precision = values.precision === undefined ? undefined : TensorCoreMatMul.Precision.literals.find((p) => p === values.precision)
if (values.precision !== undefined && precision === undefined) throw new Error(`--precision must be one of ${TensorCoreMatMul.Precision.literals.join(", ")}, not ${values.precision}`)
const [childLayers, childHidden, childFfn] = values.child.split(",").map(Number)

const vocab = 32768
const parentConfig = {
  model_type: "mistral",
  vocab_size: vocab,
  hidden_size: 2048,
  intermediate_size: 5632,
  num_hidden_layers: 16,
  num_attention_heads: 16,
  num_key_value_heads: 4,
  head_dim: 128,
  rms_norm_eps: 1e-5,
  sliding_window: null,
  tie_word_embeddings: false,
  rope_parameters: { rope_type: "default", rope_theta: 1e6 }
}

const gib = (bytes: number | undefined) => (bytes === undefined ? "-" : `${(bytes / 2 ** 30).toFixed(2)} GiB`)

const program = Effect.gen(function*() {
  const backend = yield* TensorBackend
  const dir = values.dir ?? (yield* Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "cascade-1b-"))))
  const stage = <A, E, R>(name: string, effect: Effect.Effect<A, E, R>) =>
    Effect.gen(function*() {
      const started = performance.now()
      const result = yield* effect
      const memory = backend.gpuMemory()
      yield* Console.log(
        `${name}: ${((performance.now() - started) / 1000).toFixed(1)} s, GPU memory in use ${gib(memory?.inUseBytes)}, pool ${gib(memory?.allocatedBytes)}`
      )
      return result
    })
  yield* Console.log(`on ${backend.device} (${backend.features.join(", ")}), folder ${dir}`)

  const parent = path.join(dir, "parent")
  const config = yield* Config.decode(parentConfig, "1b-parent")
  yield* Console.log(`parent: ${(Config.parameterCount(config) / 1e9).toFixed(3)}B parameters`)
  const stats = path.join(dir, "stats")
  // A folder of an earlier run keeps its parent (saved atomically) and its statistics (calibration resumes).
  const saved = yield* Effect.promise(() => fs.access(path.join(parent, "config.json")).then(() => true, () => false))
  if (!saved) {
    yield* stage("initialise and save (bf16)", Effect.scoped(Effect.gen(function*() {
      yield* Pretrained.save(parent, yield* Training.initialise(config, 0), { dtype: "BF16" })
    })))
  }

  // Token ids of a seeded Markov chain over the vocabulary.
  const data = path.join(dir, "data.jsonl")
  const next = Random.uniform(1)
  const rows = Array.from({ length: 48 }, () => {
    const ids = [1 + Math.floor(next() * (vocab - 1))]
    while (ids.length < 512) ids.push(next() < 0.25 ? Math.floor(next() * vocab) : (ids[ids.length - 1] * 7 + 3) % vocab)
    return JSON.stringify({ input_ids: ids })
  })
  yield* Effect.promise(() => fs.writeFile(data, rows.join("\n") + "\n"))

  yield* stage("calibrate (32 rows of 256 tokens)", Effect.scoped(Effect.gen(function*() {
    yield* calibrate(yield* Pretrained.load(parent), { modelDir: parent, data, out: stats, seq: 256, samples: 32 })
  })))
  const child = path.join(dir, `child-${values.child.replaceAll(",", "-")}`)
  const pruned = yield* Effect.promise(() => fs.access(path.join(child, "config.json")).then(() => true, () => false))
  if (!pruned) {
    yield* stage(`prune to ${childLayers} layers, hidden ${childHidden}, FFN ${childFfn}`, Effect.scoped(prune({
      modelDir: parent,
      statsDir: stats,
      out: child,
      targets: { layers: childLayers, hidden: childHidden, ffn: childFfn }
    })))
  }
  const childJson = yield* Effect.promise(() => fs.readFile(path.join(child, "config.json"), "utf8"))
  const childParameters = Config.parameterCount(yield* Config.decode(JSON.parse(childJson), child))
  yield* Console.log(`child: ${(childParameters / 1e9).toFixed(3)}B parameters`)
  const steps = Number(values.steps)
  const speeds: Array<number> = []
  yield* stage(`distill ${steps} steps in ${TensorCoreMatMul.current()} precision (batch 4 x 256 tokens, full-vocabulary teacher in process)`, distill({
    studentDir: child,
    data,
    out: path.join(dir, `distilled-${values.child.replaceAll(",", "-")}-${TensorCoreMatMul.current()}`),
    seq: 256,
    steps,
    seed: 0,
    batch: 4,
    accumulate: 1,
    learningRate: 1e-4,
    minLearningRate: 1e-5,
    warmupSteps: 1,
    weightDecay: 0.01,
    maxGradNorm: 1,
    loss: { temperature: 1, crossEntropyWeight: 0, restBucket: false, maxOutsideMass: 1e-3 },
    saveEvery: steps,
    onStep: (m) => {
      speeds.push(m.tokens_per_s)
      console.log(`  step ${m.step}: kl ${m.kl.toFixed(4)}, ${m.tokens_per_s.toFixed(0)} tokens/s`)
    }
  }).pipe(Effect.scoped, Effect.provide(Teacher.inProcess(parent))))
  const steady = speeds.slice(1)
  yield* Console.log(JSON.stringify({
    child_parameters: childParameters,
    precision: TensorCoreMatMul.current(),
    tokens_per_s: steady.length === 0 ? null : steady.reduce((a, b) => a + b, 0) / steady.length,
    peak_pool_gib: (backend.gpuMemory()?.allocatedBytes ?? 0) / 2 ** 30
  }))
}).pipe(TensorCoreMatMul.withPrecision(precision), Effect.provide(TensorBackend.layer("webgpu")))

NodeRuntime.runMain(program)
