/**
 * `npm run bench [-- --json] [-- --backend B] [-- --config C] [-- --steps N] [-- --case NAME] [-- --head-chunk N]
 * [-- --precision fp32|mixed] [-- --tiling TM,TN,WX,WY[,staged]]`: the engine's speed on a named configuration of
 * ../shared/bench/README.md, in the precision the training commands would use (mixed: products on a
 * GPU's tensor cores, src/gpu/TensorCoreMatMul.ts; fp32 on CPU backends):
 * - `bench-small` (default): vocab 2048, hidden 256, FFN 768, 4 layers, 8/2 heads, head_dim 32, sequence 256, batch 4;
 * - `bench-gpu`: vocab 32768, hidden 1024, FFN 3072, 12 layers, 16/4 heads, head_dim 64, sequence 1024, batch 8.
 *
 * On a GPU each line also gives the memory tfjs's buffer pool holds after the case: the pool keeps
 * what it allocated, so this is the peak of the process so far (run one `--case` for its own peak).
 *
 * Cases, each the median of several runs after warm-up:
 * - distill-step: one forward-KL training step against full-vocabulary teacher log-probs, AdamW;
 *   the same work as ../shared/bench/ref_distill_bench.py does in PyTorch;
 * - forward: the forward pass of the batch to logits;
 * - decode: greedy decoding with the KV cache, one token per row per step;
 * - profile (only when named): one distill step under `tf.profile`, its kernels' GPU time summed by
 *   kernel name (timestamp queries on webgpu), the largest first, beside the step's wall time;
 * - matmul (only when named): `x @ W^T` at the model's shapes (the attention projection, the FFN, the
 *   LM head over the batch's tokens) and, on a GPU, 8192³, in TFLOP/s: fp32, then mixed with each
 *   `--tiling` (tensor-core fragments TM x TN per subgroup, WX x WY subgroups per workgroup), each
 *   with its largest difference from the fp32 product relative to the largest entry.
 */
import * as tf from "@tensorflow/tfjs"
import { NodeRuntime } from "@effect/platform-node"
import { Console, Effect, Schema } from "effect"
import { parseArgs } from "node:util"
import { type BackendName, TensorBackend } from "../layers/TensorBackend.ts"
import * as Config from "../src/model/Config.ts"
import * as TensorCoreMatMul from "../src/gpu/TensorCoreMatMul.ts"
import * as Loss from "../src/train/Loss.ts"
import { matMul } from "../src/model/MatMul.ts"
import * as Model from "../src/model/Model.ts"
import * as Optimizer from "../src/train/Optimizer.ts"
import * as Random from "../src/Random.ts"
import * as Training from "../src/train/Training.ts"

const { values } = parseArgs({
  options: {
    json: { type: "boolean", default: false },
    backend: { type: "string" },
    steps: { type: "string", default: "5" },
    config: { type: "string", default: "bench-small" },
    case: { type: "string", multiple: true },
    "head-chunk": { type: "string" },
    precision: { type: "string" },
    tiling: { type: "string", multiple: true }
  }
})
const runs = Number(values.steps)
/** Tokens per chunk of the LM head and loss in distill-step and profile (Loss.chunkedDistillation); whole logits when left out. */
const headChunk = values["head-chunk"] === undefined ? undefined : Number(values["head-chunk"])
const cases = values.case ?? ["distill-step", "forward", "decode"]
/** --precision of the timed cases, as the training commands take it (default: mixed where the GPU has tensor cores). */
const precision = values.precision === undefined ? undefined : Schema.decodeUnknownSync(TensorCoreMatMul.Precision)(values.precision)
/** Tilings the matmul case compares in mixed precision, each "TM,TN,WX,WY[,staged]" (default: the kernel's own). */
const tilings = (values.tiling ?? []).map((text): TensorCoreMatMul.Tiling => {
  const [tm, tn, wx, wy] = text.split(",").map(Number)
  return { tm, tn, wx, wy, staged: text.endsWith(",staged") }
})

const shapes = {
  "bench-small": { vocab: 2048, hidden: 256, ffn: 768, layers: 4, heads: 8, kv: 2, headDim: 32, seq: 256, batch: 4 },
  "bench-gpu": { vocab: 32768, hidden: 1024, ffn: 3072, layers: 12, heads: 16, kv: 4, headDim: 64, seq: 1024, batch: 8 }
}
const configName = values.config as keyof typeof shapes
if (!(configName in shapes)) {
  console.error(`bench: --config ${values.config}: no such configuration (${Object.keys(shapes).join(", ")})`)
  process.exit(1)
}
const shape = shapes[configName]

const config = Config.decode({
  model_type: "mistral",
  vocab_size: shape.vocab,
  hidden_size: shape.hidden,
  intermediate_size: shape.ffn,
  num_hidden_layers: shape.layers,
  num_attention_heads: shape.heads,
  num_key_value_heads: shape.kv,
  head_dim: shape.headDim,
  rms_norm_eps: 1e-5,
  sliding_window: null,
  rope_parameters: { rope_type: "default", rope_theta: 1e6 }
}, configName)

/** Median seconds of `run` over `runs` timed calls after two warm-ups. */
const median = (run: Effect.Effect<void, unknown>) =>
  Effect.gen(function*() {
    for (let i = 0; i < 2; i++) yield* run
    const times: Array<number> = []
    for (let i = 0; i < runs; i++) {
      const started = performance.now()
      yield* run
      times.push((performance.now() - started) / 1000)
    }
    times.sort((a, b) => a - b)
    return times[Math.floor(times.length / 2)]
  })

/** One distill step under tf.profile: GPU (or CPU) milliseconds per kernel name, the largest first. */
const profile = (step: Effect.Effect<void, unknown>) =>
  Effect.gen(function*() {
    yield* step // warm-up: pipelines compiled, buffers pooled
    const started = performance.now()
    const info = yield* Effect.promise(() => tf.profile(() => Effect.runPromise(step) as Promise<never>))
    const wall = performance.now() - started
    const byKernel = new Map<string, { ms: number; calls: number }>()
    // Composite scopes (customGrad, op wrappers) are recorded too, around kernels already counted.
    for (const kernel of info.kernels.filter((kernel) => tf.getKernel(kernel.name, tf.getBackend()) !== undefined)) {
      const entry = byKernel.get(kernel.name) ?? { ms: 0, calls: 0 }
      entry.ms += kernel.kernelTimeMs as number
      entry.calls++
      byKernel.set(kernel.name, entry)
    }
    const kernelMs = [...byKernel.values()].reduce((sum, entry) => sum + entry.ms, 0)
    const top = [...byKernel].sort((a, b) => b[1].ms - a[1].ms).slice(0, 12)
    yield* Console.log(JSON.stringify({
      case: "profile",
      config: configName,
      kernels: info.kernels.length,
      kernel_ms: kernelMs,
      profiled_wall_ms: wall,
      top: top.map(([name, entry]) => ({ name, ms: Number(entry.ms.toFixed(2)), calls: entry.calls, share: Number((entry.ms / kernelMs).toFixed(3)) }))
    }))
  })

const program = Effect.gen(function*() {
  const backend = yield* TensorBackend
  const modelConfig = yield* config
  const { batch: b, seq: t, vocab: v } = shape
  const next = Random.uniform(0)
  const ids = Array.from({ length: b }, () => Array.from({ length: t }, () => Math.floor(next() * v)))
  const mask = ids.map((row) => row.map(() => 1))
  const model = yield* Training.initialise(modelConfig, 0)

  if (!values.json) yield* Console.log(`${configName} on ${backend.device}${backend.features.length ? ` (${backend.features.join(", ")})` : ""}`)
  const report = (name: string, seconds: number, tokens: number) => {
    const poolBytes = backend.gpuMemory()?.allocatedBytes
    return Console.log(
      values.json
        ? JSON.stringify({
          case: name,
          config: configName,
          backend: backend.name,
          device: backend.device,
          features: backend.features,
          precision: TensorCoreMatMul.current(),
          tokens_per_s: tokens / seconds,
          step_s: seconds,
          ...(headChunk === undefined ? {} : { head_chunk: headChunk }),
          ...(poolBytes === undefined ? {} : { gpu_peak_bytes: poolBytes })
        })
        : `${name.padEnd(13)} ${backend.name.padEnd(7)} ${TensorCoreMatMul.current().padEnd(5)} ${(tokens / seconds).toFixed(0).padStart(8)} tokens/s  ${seconds.toFixed(3)} s${
          poolBytes === undefined ? "" : `  peak GPU ${(poolBytes / 2 ** 30).toFixed(2)} GiB`
        }`
    )
  }

  const distillStep = Effect.gen(function*() {
    const trainable = yield* Training.trainable(model)
    const adam = yield* Optimizer.make(trainable.variables, { ...Optimizer.defaultConfig, weightDecay: 0.01 })
    // The teacher's full-vocabulary log-probabilities are given, as in the PyTorch reference.
    const teacherLogProbs = yield* Effect.acquireRelease(
      Effect.sync(() => tf.tidy(() => tf.logSoftmax(tf.randomNormal([b, t, v], 0, 2, "float32", 0)) as tf.Tensor3D)),
      (tensor) => Effect.sync(() => tensor.dispose())
    )
    const target = yield* Loss.teacherTarget({ _tag: "Full", logProbs: teacherLogProbs }, v, mask, Loss.defaultOptions)
    const batch = { ids, mask, targets: ids, target }
    return Effect.asVoid(Training.step(trainable, adam, [batch], (m, x) =>
      Loss.ofModel(m, x.ids, { attentionMask: x.mask }, x.target, x, Loss.defaultOptions, headChunk), {
      learningRate: 1e-3,
      maxGradNorm: undefined
    }))
  })
  // The model, optimiser and teacher are made once; each timed run is one step.
  if (cases.includes("distill-step")) yield* report("distill-step", yield* Effect.scoped(Effect.flatMap(distillStep, median)), b * t)
  if (cases.includes("profile")) yield* Effect.scoped(Effect.flatMap(distillStep, profile))
  if (cases.includes("matmul")) {
    const { hidden: d, ffn: f } = shape
    const products: Array<[string, number, number, number]> = [
      ["attention projection", b * t, d, d],
      ["ffn up", b * t, d, f],
      ["ffn down", b * t, f, d],
      ["lm head", b * t, d, v],
      ...(backend.gpuMemory() === undefined ? [] : [["8192³", 8192, 8192, 8192] as [string, number, number, number]])
    ]
    // fp32 first, then mixed with each tiling asked for (mixed only where the tensor cores are usable).
    const variants: Array<[string, TensorCoreMatMul.Tiling | undefined]> = [
      ["fp32", undefined],
      ...(TensorCoreMatMul.usable() ? (tilings.length ? tilings : [TensorCoreMatMul.defaultTiling]).map((tiling) => ["mixed", tiling] as [string, TensorCoreMatMul.Tiling]) : [])
    ]
    for (const [name, m, k, n] of products) {
      const [x, w] = [tf.randomNormal([m, k]), tf.randomNormal([n, k])]
      let exact: Float32Array | undefined
      for (const [mode, tiling] of variants) {
        if (tiling) TensorCoreMatMul.useTiling(tiling)
        const once = async () => {
          const product = matMul(x, w, false, true)
          const values = (await product.data()) as Float32Array
          product.dispose()
          return values
        }
        // Timed: several products queued back to back, then one entry read, so that reading a
        // whole product back (1 GiB for the LM head) is not what is measured.
        const repeats = 5
        const queued = async () => {
          let last: tf.Tensor | undefined
          for (let r = 0; r < repeats; r++) {
            const product = matMul(x, w, false, true)
            last?.dispose()
            last = product
          }
          const entry = tf.slice(last!, [0, 0], [1, 1])
          await entry.data()
          tf.dispose([last!, entry])
        }
        const inMode = <A, E>(effect: Effect.Effect<A, E>) => effect.pipe(TensorCoreMatMul.withPrecision(mode as TensorCoreMatMul.Precision))
        const seconds = (yield* median(Effect.promise(queued)).pipe(inMode)) / repeats
        const result = yield* Effect.promise(once).pipe(inMode)
        // Worst difference from the fp32 product, relative to the largest fp32 entry.
        let worst = 0
        let largest = 0
        if (exact === undefined) exact = result
        else for (let i = 0; i < exact.length; i++) {
          worst = Math.max(worst, Math.abs(result[i] - exact[i]))
          largest = Math.max(largest, Math.abs(exact[i]))
        }
        const error = largest > 0 ? worst / largest : 0
        const tflops = (2 * m * k * n) / seconds / 1e12
        const label = tiling ? `${mode} ${tiling.tm}x${tiling.tn} tiles, ${tiling.wx}x${tiling.wy} subgroups${tiling.staged ? ", staged" : ""}` : mode
        yield* Console.log(values.json
          ? JSON.stringify({ case: "matmul", config: configName, backend: backend.name, product: name, precision: mode, tiling, m, k, n, seconds, tflops, relative_error: error })
          : `matmul ${name.padEnd(22)} [${m}, ${k}] x [${n}, ${k}]^T  ${label.padEnd(34)} ${tflops.toFixed(2).padStart(7)} TFLOP/s  ${seconds.toFixed(4)} s  error ${error.toExponential(1)}`)
      }
      tf.dispose([x, w])
    }
  }
  if (cases.includes("forward")) {
    const seconds = yield* median(
      Effect.promise(async () => {
        const { logits } = Model.forward(model, ids)
        await logits.data()
        logits.dispose()
      })
    )
    yield* report("forward", seconds, b * t)
  }
  if (cases.includes("decode")) {
    const steps = 32
    const seconds = yield* median(
      Effect.promise(async () => {
        let result = Model.forward(model, ids.map((row) => row.slice(0, 16)), { useCache: true })
        for (let i = 0; i < steps; i++) {
          const lastLogits = tf.tidy(() => result.logits.slice([0, result.logits.shape[1] - 1, 0], [b, 1, v]).argMax(-1))
          const chosen = Array.from(await lastLogits.data(), (id) => [id])
          tf.dispose([lastLogits, result.logits])
          result = Model.forward(model, chosen, { cache: result.cache, useCache: true })
        }
        result.logits.dispose()
        if (result.cache) Model.disposeCache(result.cache)
      })
    )
    yield* report("decode", seconds, b * steps)
  }
}).pipe(Effect.scoped, TensorCoreMatMul.withPrecision(precision), Effect.provide(TensorBackend.layer(values.backend as BackendName | undefined)))

NodeRuntime.runMain(program)
