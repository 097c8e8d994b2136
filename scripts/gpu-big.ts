/**
 * A 1B-parameter parent on the GPU: initialised, saved, calibrated, pruned and distilled for a few
 * steps on webgpu, printing the time and the GPU memory tfjs's pool holds after each stage.
 *
 *   node scripts/gpu-big.ts [--dir DIR] [--steps N]      (on the GPU machine: bash .gpu/run.sh big)
 *
 * The parent: vocab 32768, hidden 2048, 16 layers, FFN 5632, 16/4 heads of 128 (1.1B parameters),
 * random as transformers initialises; the child keeps 12 layers, hidden 1536 and FFN 4096.
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
import { calibrate } from "../stages/Calibrate.ts"
import { distill } from "../stages/Distill.ts"
import { prune } from "../stages/Prune.ts"

const { values } = parseArgs({ options: { dir: { type: "string" }, steps: { type: "string", default: "3" } } })

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
  yield* stage("initialise and save (bf16)", Effect.scoped(Effect.gen(function*() {
    yield* Pretrained.save(parent, yield* Training.initialise(config, 0), { dtype: "BF16" })
  })))

  // Token ids of a seeded Markov chain over the vocabulary.
  const data = path.join(dir, "data.jsonl")
  const next = Random.uniform(1)
  const rows = Array.from({ length: 48 }, () => {
    const ids = [1 + Math.floor(next() * (vocab - 1))]
    while (ids.length < 512) ids.push(next() < 0.25 ? Math.floor(next() * vocab) : (ids[ids.length - 1] * 7 + 3) % vocab)
    return JSON.stringify({ input_ids: ids })
  })
  yield* Effect.promise(() => fs.writeFile(data, rows.join("\n") + "\n"))

  const stats = path.join(dir, "stats")
  yield* stage("calibrate (32 rows of 256 tokens)", Effect.scoped(Effect.gen(function*() {
    yield* calibrate(yield* Pretrained.load(parent), { modelDir: parent, data, out: stats, seq: 256, samples: 32 })
  })))
  const child = path.join(dir, "child")
  const report = yield* stage("prune to 12 layers, hidden 1536, FFN 4096", Effect.scoped(prune({
    modelDir: parent,
    statsDir: stats,
    out: child,
    targets: { layers: 12, hidden: 1536, ffn: 4096 }
  })))
  yield* Console.log(`child: ${(report.child.parameters / 1e9).toFixed(3)}B parameters`)
  const steps = Number(values.steps)
  yield* stage(`distill ${steps} steps (batch 4 x 256 tokens, full-vocabulary teacher in process)`, distill({
    studentDir: child,
    data,
    out: path.join(dir, "distilled"),
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
    onStep: (m) => console.log(`  step ${m.step}: kl ${m.kl.toFixed(4)}, ${m.tokens_per_s.toFixed(0)} tokens/s`)
  }).pipe(Effect.scoped, Effect.provide(Teacher.inProcess(parent))))
}).pipe(Effect.provide(TensorBackend.layer("webgpu")))

NodeRuntime.runMain(program)
