/**
 * `npm run test:gpu`: what must hold on a GPU (the webgpu backend), checked against the CPU in the
 * same process. Without a GPU adapter every check is skipped, with the reason. The GPU machine has
 * no Node, so the same checks also run from a bundle (`scripts/gpu.ts test`, see ../shared/gpu/).
 *
 * - every fixture of test/fixtures (made with transformers) within 1e-4 of its reference logits (the
 *   shared tiny-mistral's padded references through it: CASCADE_TINY_MISTRAL names its folder where
 *   ../shared is not beside the repository);
 * - calibration and pruning of a fixture on the GPU give the CPU's child;
 * - a 30-step distillation of that child gives the CPU's per-step losses within 1e-4 relative;
 * - a run killed at step 15 and resumed ends with the losses of the uninterrupted one;
 * - greedy generation with the KV cache gives the CPU's tokens;
 * - a vocabulary matrix larger than one storage binding (a tied 1-layer model of vocabulary 131072
 *   and hidden 4096, 2 GiB in fp32) is made, saved and loaded in row blocks, gives the CPU's logits,
 *   trains a step, and logits past the binding fail early with LogitsTooLarge. A CPU backend has no
 *   binding limit: there a small vocabulary is split by force, and the check runs the same code.
 *
 * `--backend B` checks another backend than webgpu the same way (e.g. wasm, to try the suite on a CPU);
 * `--only TEXT` runs only the checks whose name holds TEXT.
 * Prints a line per check and `N passed, N failed, N skipped`; exits 1 when a check failed.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Cause, Console, Effect, Exit, Layer } from "effect"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { parseArgs } from "node:util"
import * as Teacher from "../layers/Teacher.ts"
import { type BackendName, TensorBackend } from "../layers/TensorBackend.ts"
import * as tf from "@tensorflow/tfjs"
import { LogitsTooLarge } from "../src/Errors.ts"
import * as TensorCoreMatMul from "../src/gpu/TensorCoreMatMul.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Reference from "../src/io/Reference.ts"
import { maxAbsDiff } from "../src/io/Reference.ts"
import * as Config from "../src/model/Config.ts"
import * as Generate from "../src/model/Generate.ts"
import { matMul } from "../src/model/MatMul.ts"
import * as Model from "../src/model/Model.ts"
import * as RowBlocks from "../src/model/RowBlocks.ts"
import * as Vision from "../src/model/Vision.ts"
import * as Optimizer from "../src/train/Optimizer.ts"
import * as Training from "../src/train/Training.ts"
import { calibrate } from "../stages/Calibrate.ts"
import { distill, type DistillOptions } from "../stages/Distill.ts"
import { prune } from "../stages/Prune.ts"
import { markovData } from "../test/support.ts"

const args = parseArgs({ options: { backend: { type: "string", default: "webgpu" }, only: { type: "string", default: "" } } }).values
const underTest = args.backend as BackendName
const fixtures = fileURLToPath(new URL("../test/fixtures/", import.meta.url))
/** The model of fixtures that hold only references (tiny-mistral-padded): the shared tiny-mistral. */
const tinyMistral = process.env.CASCADE_TINY_MISTRAL ?? fileURLToPath(new URL("../../shared/fixtures/tiny-mistral", import.meta.url))
const parent = path.join(fixtures, "mistral-headdim")

class CheckFailed extends Error {}
const expect = (ok: boolean, message: string) => (ok ? Effect.void : Effect.die(new CheckFailed(message)))

const onBackend = (name: BackendName) => <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  effect.pipe(Effect.scoped, Effect.provide(TensorBackend.layer(name)))

const losses = (out: string) =>
  Effect.promise(() => fs.readFile(path.join(out, "metrics.jsonl"), "utf8")).pipe(
    Effect.map((text) => text.trim().split("\n").map((line) => (JSON.parse(line) as { loss: number }).loss))
  )

const worstRelative = (a: ReadonlyArray<number>, b: ReadonlyArray<number>) =>
  Math.max(...a.map((x, i) => Math.abs(x - b[i]) / Math.max(Math.abs(b[i]), 1e-12)))

const fixtureParity = Effect.gen(function*() {
  const lines: Array<string> = []
  for (const name of (yield* Effect.promise(() => fs.readdir(fixtures, { withFileTypes: true }))).filter((e) => e.isDirectory()).map((e) => e.name).sort()) {
    const dir = path.join(fixtures, name)
    const modelDir = (yield* Effect.promise(() => fs.access(path.join(dir, "config.json")).then(() => true, () => false))) ? dir : tinyMistral
    const references = (yield* Effect.promise(() => fs.readdir(dir))).filter((file) => /^reference.*\.safetensors$/.test(file)).sort()
    for (const file of references) {
      const diff = yield* Effect.scoped(Effect.gen(function*() {
        return yield* Reference.compare(yield* Pretrained.load(modelDir), yield* Reference.open(path.join(dir, file)))
      }))
      lines.push(`${name}/${file} ${diff.logits.toExponential(2)}`)
      yield* expect(diff.logits <= 1e-4, `${name}/${file}: max |Δlogits| ${diff.logits} > 1e-4`)
    }
  }
  return lines.join(", ")
}).pipe(onBackend(underTest))

/** Mistral 3's image side (test/fixtures/vision): encoder and projected features, spliced embeddings and logits within 1e-4 of transformers'. */
const visionParity = Effect.gen(function*() {
  const lines: Array<string> = []
  const root = path.join(fixtures, "vision")
  for (const name of (yield* Effect.promise(() => fs.readdir(root, { withFileTypes: true }))).filter((e) => e.isDirectory() && e.name.startsWith("vl-")).map((e) => e.name).sort()) {
    const dir = path.join(root, name)
    for (const file of (yield* Effect.promise(() => fs.readdir(dir))).filter((f) => /^reference-.*\.safetensors$/.test(f)).sort()) {
      const diff = yield* Effect.scoped(Effect.gen(function*() {
        return yield* Reference.compareImages(yield* Pretrained.load(dir), yield* Vision.load(dir), path.join(dir, file))
      }))
      const worst = Math.max(...diff.encoded, diff.projected, diff.embeddings, diff.logits)
      lines.push(`${name}/${file} ${worst.toExponential(2)}`)
      yield* expect(worst <= 1e-4, `${name}/${file}: ${JSON.stringify(diff)}`)
    }
  }
  return lines.join(", ")
}).pipe(onBackend(underTest))

/** Calibration statistics and a pruned child of `parent` made on `backend` into `dir`. */
const prunedChild = (dir: string, data: string, backend: BackendName) =>
  Effect.gen(function*() {
    yield* calibrate(yield* Pretrained.load(parent), { modelDir: parent, data, out: path.join(dir, "stats"), seq: 32 })
    yield* prune({ modelDir: parent, statsDir: path.join(dir, "stats"), out: path.join(dir, "child"), targets: { layers: 2, hidden: 48, ffn: 128 } })
    return path.join(dir, "child")
  }).pipe(onBackend(backend))

const distillOptions = (student: string, data: string, out: string): DistillOptions => ({
  studentDir: student,
  data,
  out,
  seq: 32,
  steps: 30,
  seed: 3,
  batch: 4,
  accumulate: 2,
  learningRate: 3e-3,
  minLearningRate: 3e-4,
  warmupSteps: 3,
  weightDecay: 0.01,
  maxGradNorm: 1,
  loss: { temperature: 1, crossEntropyWeight: 0, restBucket: false, maxOutsideMass: 1e-3 },
  saveEvery: 5
})

const distillOn = (backend: BackendName, options: DistillOptions) =>
  distill(options).pipe(Effect.scoped, Effect.provide(Layer.provideMerge(Teacher.inProcess(parent, { topK: 32 }), TensorBackend.layer(backend))))

const training = (dir: string) =>
  Effect.gen(function*() {
    const data = yield* markovData(path.join(dir, "train.jsonl"), 48, 40, 1)
    const cpuChild = yield* prunedChild(path.join(dir, "cpu"), data, "cpu")
    const gpuChild = yield* prunedChild(path.join(dir, "gpu"), data, underTest)
    const childDiff = yield* Effect.promise(async () => {
      const [a, b] = await Promise.all([cpuChild, gpuChild].map((child) => fs.readFile(path.join(child, "prune-report.json"), "utf8")))
      const kept = (report: string) => JSON.stringify((JSON.parse(report) as { layers: { kept: Array<{ index: number }> } }).layers.kept.map((layer) => layer.index))
      return kept(a) === kept(b)
    })
    yield* expect(childDiff, "the GPU's calibration kept other layers than the CPU's")
    yield* distillOn("cpu", distillOptions(cpuChild, data, path.join(dir, "distill-cpu")))
    yield* distillOn(underTest, distillOptions(cpuChild, data, path.join(dir, "distill-gpu")))
    const cpu = yield* losses(path.join(dir, "distill-cpu"))
    const gpu = yield* losses(path.join(dir, "distill-gpu"))
    yield* expect(cpu.length === 30 && gpu.length === 30, `steps: cpu ${cpu.length}, gpu ${gpu.length}`)
    const relative = worstRelative(gpu, cpu)
    yield* expect(relative <= 1e-4, `per-step losses differ by ${relative} relative`)
    const lastLine = (yield* Effect.promise(() => fs.readFile(path.join(dir, "distill-gpu", "metrics.jsonl"), "utf8"))).trim().split("\n").pop()!
    const pool = (JSON.parse(lastLine) as { gpu_bytes_pool?: number }).gpu_bytes_pool
    yield* expect(underTest !== "webgpu" || (pool ?? 0) > 0, "metrics.jsonl gives no GPU memory")
    return { cpuChild, data, gpu, summary: `30 steps, losses ${gpu[0].toFixed(4)} -> ${gpu[29].toFixed(4)}, worst relative difference to cpu ${relative.toExponential(2)}${pool === undefined ? "" : `, GPU pool ${(pool / 2 ** 20).toFixed(0)} MiB`}` }
  })

const resume = (dir: string, student: string, data: string, uninterrupted: ReadonlyArray<number>) =>
  Effect.gen(function*() {
    const out = path.join(dir, "distill-killed")
    const stop = new Error("stopped at step 15")
    const killed = yield* Effect.exit(distillOn(underTest, { ...distillOptions(student, data, out), onStep: (m) => { if (m.step === 15) throw stop } }))
    yield* expect(Exit.isFailure(killed), "the run was not stopped")
    yield* distillOn(underTest, { ...distillOptions(student, data, out), resume: true })
    const resumed = yield* losses(out)
    const relative = worstRelative(resumed, uninterrupted)
    yield* expect(resumed.length === 30 && relative <= 1e-6, `resumed losses differ by ${relative} relative (${resumed.length} steps)`)
    return `killed at 15, resumed from the checkpoint of step 15: worst relative difference ${relative.toExponential(2)}`
  })

const generation = Effect.gen(function*() {
  const greedy = (backend: BackendName) =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(parent)
      const out = yield* Generate.generate(model, [[1, 17, 300, 42], [1, 5]], { maxNewTokens: 24, temperature: 0, batchSize: 2 })
      return out.map((g) => g.tokens.join(" "))
    }).pipe(onBackend(backend))
  const [cpu, gpu] = [yield* greedy("cpu"), yield* greedy(underTest)]
  yield* expect(JSON.stringify(cpu) === JSON.stringify(gpu), `${underTest} ${JSON.stringify(gpu)} != cpu ${JSON.stringify(cpu)}`)
  return `2 prompts x 24 tokens equal`
})

/** A tied 1-layer model whose one [V, D] matrix is both embedding and LM head; small elsewhere. */
const wideVocabularyConfig = (vocab: number, hidden: number) =>
  Config.decode({
    model_type: "mistral",
    vocab_size: vocab,
    hidden_size: hidden,
    intermediate_size: 256,
    num_hidden_layers: 1,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 64,
    rms_norm_eps: 1e-5,
    sliding_window: null,
    tie_word_embeddings: true,
    rope_parameters: { rope_type: "default", rope_theta: 1e6 }
  }, "wide-vocabulary")

/** The logits of `ids`, read asynchronously (a GPU cannot be read synchronously). */
const logitsOf = (model: Model.Model, ids: ReadonlyArray<ReadonlyArray<number>>) =>
  Effect.promise(async () => {
    const logits = Model.forward(model, ids).logits
    const values = (await logits.data()) as Float32Array
    logits.dispose()
    return values
  })

/** The final hidden states (before the LM head) of `ids`, read asynchronously. */
const hiddenOf = (model: Model.Model, ids: ReadonlyArray<ReadonlyArray<number>>) =>
  Effect.promise(async () => {
    const hidden = Model.forwardHidden(model, ids)
    const values = (await hidden.data()) as Float32Array
    hidden.dispose()
    return values
  })

/** Next-token cross-entropy through a one-hot (tf.gather's gradient is not on every backend), a mean over the tokens. */
const crossEntropy = (ids: ReadonlyArray<ReadonlyArray<number>>, targets: ReadonlyArray<ReadonlyArray<number>>) =>
  (model: Model.Model, _batch?: unknown): Training.Objective => ({
    loss: tf.tidy(() => {
      const logProbs = tf.logSoftmax(Model.forward(model, ids).logits)
      return tf.neg(tf.mean(tf.sum(tf.mul(logProbs, tf.oneHot(tf.tensor2d(targets as Array<Array<number>>, undefined, "int32"), model.config.vocabSize)), -1))) as tf.Scalar
    }),
    tokens: ids.length * ids[0].length,
    metrics: {}
  })

/** The same cross-entropy from logits read back, in float64. */
const crossEntropyOf = (logits: Float32Array, vocab: number, targets: ReadonlyArray<ReadonlyArray<number>>) => {
  const flat = targets.flat()
  const total = flat.reduce((sum, target, i) => {
    const row = logits.subarray(i * vocab, (i + 1) * vocab)
    const max = row.reduce((a, b) => Math.max(a, b), -Infinity)
    const logSum = max + Math.log(row.reduce((a, b) => a + Math.exp(b - max), 0))
    return sum + logSum - row[target]
  }, 0)
  return total / flat.length
}

/**
 * The kernels a vocabulary block uses, one by one, on blocks up to the binding limit (1/8 of it, half,
 * all of it, and blocks of 3 rows and of 1), against exact values: the block read back, rows gathered, and x·Bᵀ for x a one-hot
 * row, a row of ones, and dense x of 6 and 64 rows (at some columns). Entry (r, c) is ((r * 7 + c * 3) % 17 - 8) / 8, exact in float32, so a
 * one-hot product equals its row exactly and a row of ones the row's sum (small integers / 8).
 * Says which operation fails at which size, where the whole-model check only sees wrong logits.
 */
const bindingKernels = Effect.gen(function*() {
  const limit = RowBlocks.bindingLimit()
  const columns = 4096
  const value = (r: number, c: number) => (((r * 7 + c * 3) % 17) - 8) / 8
  const lines: Array<string> = []
  const failures: Array<string> = []
  const sizes = [...(Number.isFinite(limit) ? [8, 2, 1].map((part) => Math.floor(limit / (4 * columns * part))) : [1000]), 3, 1]
  for (const rows of sizes) {
    const values = new Float32Array(rows * columns)
    for (let r = 0; r < rows; r++) for (let c = 0; c < columns; c++) values[r * columns + c] = value(r, c)
    const probes = [0, Math.min(Math.floor(rows / 2) + 1, rows - 1), rows - 1]
    const outcome = yield* Effect.promise(async () => {
      const block = tf.tensor2d(values, [rows, columns])
      const readBack = (await block.data()) as Float32Array // uploads on first use, then reads back
      const gathered = tf.gather(block, tf.tensor1d(probes, "int32"))
      const ones = tf.ones([1, columns])
      // x·Bᵀ: [3, C] one-hot rows pick columns of Bᵀ = rows of B; [1, C] ones sum each row.
      const picked = matMul(tf.oneHot(tf.tensor1d([1, 2, 3], "int32"), columns).toFloat() as tf.Tensor2D, block, false, true)
      const sums = matMul(ones as tf.Tensor2D, block, false, true)
      // Dense x of 6 and 64 rows (a few tokens' hidden states; tfjs picks its kernel by shape), entries
      // small multiples of 1/8 so that every sum is exact in float32: checked at a few columns.
      const denseValue = (i: number, c: number) => (((i * 5 + c * 11) % 13) - 6) / 8
      const denseRows = [6, 64]
      const dense = denseRows.map((m) => tf.tensor2d(Float32Array.from({ length: m * columns }, (_, j) => denseValue(Math.floor(j / columns), j % columns)), [m, columns]))
      const denseProducts = dense.map((x) => matMul(x, block, false, true))
      const [gatheredValues, pickedValues, sumValues, ...denseValues] = await Promise.all([gathered.data(), picked.data(), sums.data(), ...denseProducts.map((t) => t.data())])
      tf.dispose([block, gathered, ones, picked, sums, ...dense, ...denseProducts])
      const checkedColumns = [...new Set([0, 1, Math.floor(rows / 2), rows - 2, rows - 1, ...Array.from({ length: 20 }, (_, j) => Math.floor((j * rows) / 20))])].filter((r) => r >= 0 && r < rows)
      const denseError = denseRows.map((m, which) => {
        let most = 0
        for (let i = 0; i < m; i++) {
          for (const r of checkedColumns) {
            let expected = 0
            for (let c = 0; c < columns; c++) expected += denseValue(i, c) * value(r, c)
            most = Math.max(most, Math.abs(denseValues[which][i * rows + r] - expected))
          }
        }
        return most
      })
      const worst = (check: (i: number) => number, n: number) => {
        let most = 0
        for (let i = 0; i < n; i++) most = Math.max(most, check(i))
        return most
      }
      return {
        readBack: worst((i) => Math.abs(readBack[i] - values[i]), values.length),
        gather: worst((i) => Math.abs(gatheredValues[i] - value(probes[Math.floor(i / columns)], i % columns)), probes.length * columns),
        // picked[j][r] = B[r][j + 1]
        matMulOneHot: worst((i) => Math.abs(pickedValues[i] - value(i % rows, Math.floor(i / rows) + 1)), 3 * rows),
        matMulSums: worst((r) => {
          let sum = 0
          for (let c = 0; c < columns; c++) sum += value(r, c)
          return Math.abs(sumValues[r] - sum)
        }, rows),
        matMulDense6: denseError[0],
        matMulDense64: denseError[1]
      }
    })
    const bytes = (rows * columns * 4) / 2 ** 30
    lines.push(`${rows} rows (${bytes.toFixed(2)} GiB): read back ${outcome.readBack}, gather ${outcome.gather}, x·Bᵀ one-hot ${outcome.matMulOneHot}, x·Bᵀ ones ${outcome.matMulSums}, dense x of 6 rows ${outcome.matMulDense6}, of 64 ${outcome.matMulDense64}`)
    for (const [name, error] of Object.entries(outcome)) if (error > 1e-3) failures.push(`${name} at ${bytes.toFixed(2)} GiB off by ${error}`)
  }
  yield* expect(failures.length === 0, `${failures.join("; ")} (${lines.join("; ")})`)
  return lines.join("; ")
}).pipe(onBackend(underTest))

/**
 * A few tokens through a wide projection, x [6, 4096] @ W [256, 4096]^T with values exact in float32:
 * tfjs' split-K program (forced) against exact sums, and the product as the engine runs it (the
 * guard sends it to the small-output program), which must be exact.
 */
const splitKProducts = Effect.gen(function*() {
  const [m, k, n] = [6, 4096, 256]
  const xValue = (i: number, c: number) => (((i * 5 + c * 11) % 13) - 6) / 8
  const wValue = (r: number, c: number) => (((r * 7 + c * 3) % 17) - 8) / 8
  const x = tf.tensor2d(Float32Array.from({ length: m * k }, (_, j) => xValue(Math.floor(j / k), j % k)), [m, k])
  const w = tf.tensor2d(Float32Array.from({ length: n * k }, (_, j) => wValue(Math.floor(j / k), j % k)), [n, k])
  const expected = Float64Array.from({ length: m * n }, (_, j) => {
    let sum = 0
    for (let c = 0; c < k; c++) sum += xValue(Math.floor(j / n), c) * wValue(j % n, c)
    return sum
  })
  // The flag exists on webgpu only; -1 is tfjs' own choice.
  const onWebGpu = underTest === "webgpu"
  const error = (program: number) =>
    Effect.promise(async () => {
      if (onWebGpu) tf.env().set("WEBGPU_MATMUL_PROGRAM_TYPE", program)
      const product = matMul(x, w, false, true)
      if (onWebGpu) tf.env().set("WEBGPU_MATMUL_PROGRAM_TYPE", -1)
      const values = (await product.data()) as Float32Array
      product.dispose()
      return maxAbsDiff(values, expected)
    })
  const forcedSplitK = yield* error(1)
  const guarded = yield* error(-1)
  tf.dispose([x, w])
  yield* expect(guarded === 0, `the engine's product is off by ${guarded} (split-K forced: ${forcedSplitK})`)
  return `split-K forced: off by ${forcedSplitK}; as the engine runs it: exact`
}).pipe(onBackend(underTest))

/**
 * A vocabulary matrix larger than one storage binding, on the backend under test: made (seeded as
 * transformers initialises), saved and loaded back in blocks with the same logits, within 1e-4 of
 * the CPU's logits from the saved checkpoint (one tensor there), one training step, and logits past
 * the binding refused before any work.
 */
const wideVocabulary = (dir: string) =>
  Effect.gen(function*() {
    const folder = path.join(dir, "wide-vocabulary")
    const limit = yield* Effect.sync(RowBlocks.bindingLimit).pipe(onBackend(underTest))
    const limited = Number.isFinite(limit)
    const hidden = limited ? 4096 : 256
    // 131072 x 4096 x 4 bytes is 2 GiB, just past an H200's 2 GiB - 4; more rows where a device binds more.
    const vocab = limited ? Math.max(131072, Math.floor(limit / (4 * hidden)) + 1) : 4099
    const config = yield* wideVocabularyConfig(vocab, hidden)
    // Rows at the ends of blocks (of 1000 rows when forced; two of 65536 on an H200).
    const firstEnd = limited ? yield* Effect.sync(() => RowBlocks.ranges(vocab, hidden)[0][1]).pipe(onBackend(underTest)) : 1000
    const ids = [[0, firstEnd - 1, vocab - 1], [firstEnd, vocab - 2, 5]]
    const targets = ids.map((row) => row.map((id) => (id * 7 + 3) % vocab))
    const learningRate = 1e-3
    const gpu = yield* Effect.gen(function*() {
      yield* Effect.acquireRelease(Effect.sync(() => RowBlocks.forceRows(limited ? undefined : 1000)), () => Effect.sync(() => RowBlocks.forceRows(undefined)))
      const made = yield* Training.initialise(config, 0)
      const blocks = made.weights.embed.length
      yield* expect(blocks > 1, `the [${vocab}, ${hidden}] matrix is ${blocks} block`)
      const logits = yield* logitsOf(made, ids)
      yield* Pretrained.save(folder, made, { dtype: "F32" })
      Model.dispose(made) // early, to make room; disposing again with the scope is harmless
      const loaded = yield* Pretrained.load(folder)
      const roundTrip = maxAbsDiff(yield* logitsOf(loaded, ids), logits)
      // Bit-exact on a CPU; tfjs-webgpu runs small ops on the CPU while their inputs still live there
      // (WEBGPU_CPU_FORWARD), which a freshly loaded model's do, so rounding may differ slightly.
      const roundTripTolerance = underTest === "webgpu" ? 1e-4 : 0
      yield* expect(roundTrip <= roundTripTolerance, `logits after save and load differ by ${roundTrip}`)
      const tooMany = limited ? Math.floor(limit / (4 * vocab)) + 1 : 0
      const refused = limited ? yield* Effect.try({ try: () => Model.forward(loaded, [new Array(tooMany).fill(0)]), catch: (error) => error as Error }).pipe(Effect.flip) : undefined
      yield* expect(!limited || refused instanceof LogitsTooLarge, `${tooMany} tokens' logits were not refused: ${String(refused)}`)
      const finalHidden = yield* hiddenOf(loaded, ids)
      const run = yield* Training.trainable(loaded)
      const adam = yield* Optimizer.make(run.variables, Optimizer.defaultConfig)
      const step = yield* Training.step(run, adam, [undefined], crossEntropy(ids, targets), { learningRate, maxGradNorm: 1 })
      const moved = maxAbsDiff(yield* logitsOf(run.model, ids), logits)
      return { blocks, finalHidden, blockRows: made.weights.embed.map((block) => block.shape[0]), logits, roundTrip, step, moved, refused: refused?.message }
    }).pipe(onBackend(underTest))
    const [cpu, cpuHidden] = yield* Effect.gen(function*() {
      const loaded = yield* Pretrained.load(folder)
      return [yield* logitsOf(loaded, ids), yield* hiddenOf(loaded, ids)] as const
    }).pipe(onBackend("cpu"))
    const diff = maxAbsDiff(gpu.logits, cpu)
    // Where they differ: by token, and by the vocabulary block a logit comes from.
    const whereDiffers = () => {
      let start = 0
      const half = gpu.blockRows.map((rows) => [start, (start += rows)] as const)
      return ids.flat().map((id, token) => {
        const row = (from: Float32Array) => from.subarray(token * vocab, (token + 1) * vocab)
        const byBlock = half.map(([start, end]) => maxAbsDiff(row(gpu.logits).subarray(start, end), row(cpu).subarray(start, end)).toExponential(1))
        return `token ${id}: ${byBlock.join(" / ")}`
      }).join("; ")
    }
    // On a mismatch, the same checkpoint on the GPU in blocks of 16384 rows (0.25 GiB): whether the size of a block matters.
    const smallBlocks = diff <= 1e-4 || !limited ? undefined : yield* Effect.gen(function*() {
      yield* Effect.acquireRelease(Effect.sync(() => RowBlocks.forceRows(16384)), () => Effect.sync(() => RowBlocks.forceRows(undefined)))
      return maxAbsDiff(yield* logitsOf(yield* Pretrained.load(folder), ids), cpu)
    }).pipe(onBackend(underTest))
    yield* expect(diff <= 1e-4, `logits differ from the cpu's by ${diff} (by token and block: ${diff <= 1e-4 ? "" : whereDiffers()}; in blocks of 16384 rows: ${smallBlocks}; final hidden states differ by ${maxAbsDiff(gpu.finalHidden, cpuHidden)})`)
    const loss = crossEntropyOf(cpu, vocab, targets)
    yield* expect(Math.abs(gpu.step.loss - loss) <= 1e-4, `the step's loss ${gpu.step.loss}, the cpu logits' ${loss}`)
    yield* expect(Number.isFinite(gpu.step.gradNorm) && gpu.step.gradNorm > 0 && gpu.moved > 0, `the step did not train: ${JSON.stringify(gpu.step)}`)
    return `[${vocab}, ${hidden}] (${(vocab * hidden * 4 / 2 ** 30).toFixed(2)} GiB fp32, binding limit ${limit}) in ${gpu.blocks} blocks: ` +
      `save and load within ${gpu.roundTrip.toExponential(1)}, logits within ${diff.toExponential(2)} of cpu, a step with loss ${gpu.step.loss.toFixed(4)} (cpu ${loss.toFixed(4)}), ` +
      `gradient norm ${gpu.step.gradNorm.toExponential(2)}${gpu.refused === undefined ? "" : `; ${gpu.refused}`}`
  })

/**
 * Products on the tensor cores (`--precision mixed`) against the same products in fp32 on the same
 * GPU: shapes of whole tiles and odd ones, every transpose, batches and a shared operand. Each entry
 * within f16 rounding of its terms (2e-3 of sum_k |a_ik b_kj|); the large ones not bit-equal to
 * fp32, which says the tensor cores did them; and the gradients of a product within 5e-3 of the
 * largest fp32 gradient entry.
 */
const tensorCoreProducts = Effect.gen(function*() {
  yield* expect(TensorCoreMatMul.usable(), "the tensor-core kernel is not usable on this device")
  // [batch of a, batch of b, m, k, n, transposeA, transposeB]
  const cases: Array<[number, number, number, number, number, boolean, boolean]> = [
    [1, 1, 64, 64, 64, false, false],
    [1, 1, 1000, 333, 517, false, true],
    [1, 1, 129, 1031, 257, true, false],
    [1, 1, 77, 4100, 1999, true, true],
    [8, 8, 100, 64, 100, false, true],
    [3, 1, 200, 96, 300, false, false],
    [1, 1, 17, 16, 16, false, false]
  ]
  const lines: Array<string> = []
  for (const [batchA, batchB, m, k, n, transposeA, transposeB] of cases) {
    const outcome = yield* Effect.promise(async () => {
      const shapeOf = (batch: number, rows: number, columns: number) => (batch === 1 && batchA === batchB ? [rows, columns] : [batch, rows, columns])
      const a = tf.randomNormal(shapeOf(batchA, transposeA ? k : m, transposeA ? m : k), 0, 1, "float32", 1)
      const b = tf.randomNormal(shapeOf(batchB, transposeB ? n : k, transposeB ? k : n), 0, 1, "float32", 2)
      const weights = tf.randomNormal([Math.max(batchA, batchB), m, n], 0, 1, "float32", 3)
      const run = (precision: TensorCoreMatMul.Precision) =>
        Effect.runPromise(Effect.promise(async () => {
          const product = matMul(a, b, transposeA, transposeB)
          // tfjs' gradient of a product does not sum a shared operand's over the batch: none asked of it.
          const grads = batchA === batchB
            ? tf.grads((x: tf.Tensor, y: tf.Tensor) => tf.sum(tf.mul(matMul(x, y, transposeA, transposeB), weights.reshape(product.shape))))([a, b])
            : []
          const values = await Promise.all([product, ...grads].map((t) => t.data() as Promise<Float32Array>))
          tf.dispose([product, ...grads])
          return values
        }).pipe(TensorCoreMatMul.withPrecision(precision)))
      const [exact, mixed] = [await run("fp32"), await run("mixed")]
      const bound = matMul(tf.abs(a), tf.abs(b), transposeA, transposeB)
      const bounds = (await bound.data()) as Float32Array
      tf.dispose([a, b, weights, bound])
      let productRatio = 0
      let equal = true
      for (let i = 0; i < exact[0].length; i++) {
        productRatio = Math.max(productRatio, Math.abs(mixed[0][i] - exact[0][i]) / bounds[i])
        equal &&= mixed[0][i] === exact[0][i]
      }
      const gradientError = exact.slice(1).map((_, index) => {
        const g = index + 1
        let worst = 0
        let largest = 0
        for (let i = 0; i < exact[g].length; i++) {
          worst = Math.max(worst, Math.abs(mixed[g][i] - exact[g][i]))
          largest = Math.max(largest, Math.abs(exact[g][i]))
        }
        return worst / largest
      })
      return { productRatio, equal, gradientError }
    })
    const name = `${batchA}x${batchB} [${m}, ${k}] x [${k}, ${n}]${transposeA ? " Aᵀ" : ""}${transposeB ? " Bᵀ" : ""}`
    lines.push(`${name}: ${outcome.productRatio.toExponential(1)} of |a||b|, gradients ${outcome.gradientError.map((e) => e.toExponential(1)).join("/")}`)
    yield* expect(outcome.productRatio <= 2e-3, `${name}: an entry off by ${outcome.productRatio} of sum |a||b|`)
    yield* expect(!outcome.equal || m * k * n < 1e5, `${name}: mixed equals fp32 bit for bit, so the tensor cores did not run`)
    yield* expect(Math.max(0, ...outcome.gradientError) <= 5e-3, `${name}: gradients off by ${outcome.gradientError.join(", ")} of the largest`)
  }
  return lines.join("; ")
}).pipe(onBackend(underTest))

/**
 * Three AdamW updates (decayed matrix, undecayed vector, odd sizes) on the GPU, one fused dispatch a
 * parameter, against the same updates op by op on the cpu backend: within 1e-6 of the largest value.
 */
const fusedAdamW = Effect.gen(function*() {
  const shapes: Record<string, Array<number>> = { matrix: [37, 129], vector: [1031] }
  const updated = (backend: BackendName) =>
    Effect.gen(function*() {
      // Seeds from 1: tfjs takes a seed of 0 for none and draws a random one.
      const params = new Map(Object.entries(shapes).map(([name, shape], i) => [name, tf.variable(tf.randomUniform(shape, -1, 1, "float32", i + 1))]))
      const adam = yield* Optimizer.make(params, { ...Optimizer.defaultConfig, weightDecay: 0.1 })
      for (let step = 0; step < 3; step++) {
        const grads = new Map([...params].map(([name, param], i) => [name, tf.randomNormal(param.shape, 0, 1, "float32", 10 * step + i + 1)]))
        Optimizer.update(adam, grads, 1e-2 * (step + 1))
        tf.dispose([...grads.values()])
      }
      const values = yield* Effect.promise(() => Promise.all([...params.values(), ...adam.expAvg.values(), ...adam.expAvgSq.values()].map((t) => t.data() as Promise<Float32Array>)))
      tf.dispose([...params.values()])
      return values
    }).pipe(onBackend(backend))
  const [gpu, cpu] = [yield* updated(underTest), yield* updated("cpu")]
  const errors = gpu.map((values, i) => maxAbsDiff(values, cpu[i]) / Math.max(...cpu[i].map(Math.abs)))
  yield* expect(Math.max(...errors) <= 1e-6, `fused AdamW differs from the op-by-op update by ${errors.join(", ")} of the largest value`)
  return `parameters, first and second moments within ${Math.max(...errors).toExponential(1)} of the cpu's`
})

/**
 * Loss scaling in mixed precision: a step whose scaled gradients overflow (the scale forced to 2^120)
 * leaves parameters and moments bit for bit, halves the scale, counts the skip and takes back the
 * step count; the next step (scale 2^16) trains.
 */
const lossScaling = Effect.gen(function*() {
  const model = yield* Pretrained.load(parent)
  const run = yield* Training.trainable(model)
  const adam = yield* Optimizer.make(run.variables, Optimizer.defaultConfig)
  // 2 x 12 tokens: products of 24 rows, past the 16 below which products stay on tfjs' fp32 kernel.
  const ids = [[1, 17, 300, 42, 7, 9, 3, 8, 21, 34, 55, 89], [1, 5, 11, 13, 2, 3, 4, 6, 10, 12, 14, 16]]
  const objective = crossEntropy(ids, ids.map((row) => row.map((id) => (id + 1) % model.config.vocabSize)))
  const snapshot = () => Effect.promise(() => Promise.all([...run.variables.values(), ...adam.expAvg.values()].map((t) => t.data() as Promise<Float32Array>)))
  const before = yield* snapshot()
  adam.scaler.scale = 2 ** 120
  const overflowed = yield* Training.step(run, adam, [undefined], objective, { learningRate: 1e-3, maxGradNorm: 1 }).pipe(TensorCoreMatMul.withPrecision("mixed"))
  const after = yield* snapshot()
  const unchanged = before.every((values, i) => values.every((x, j) => Object.is(x, after[i][j])))
  yield* expect(overflowed.skipped && unchanged, `the overflowed step was not skipped cleanly: skipped ${overflowed.skipped}, unchanged ${unchanged}`)
  yield* expect(adam.scaler.scale === 2 ** 119 && adam.scaler.skipped === 1 && adam.step === 0, `scaler ${JSON.stringify(adam.scaler)}, step ${adam.step}`)
  adam.scaler.scale = 2 ** 16
  const trained = yield* Training.step(run, adam, [undefined], objective, { learningRate: 1e-3, maxGradNorm: 1 }).pipe(TensorCoreMatMul.withPrecision("mixed"))
  const moved = maxAbsDiff((yield* snapshot())[0], before[0])
  yield* expect(!trained.skipped && Number.isFinite(trained.gradNorm) && moved > 0 && adam.step === 1, `the next step did not train: ${JSON.stringify(trained)}`)
  return `overflow at 2^120 skipped (scale now 2^119), then a step at 2^16 with gradient norm ${trained.gradNorm.toExponential(2)}`
}).pipe(onBackend(underTest))

/**
 * The training check's 30 steps again with products in mixed precision: losses within 2% of fp32's
 * at every step, and not equal to them (the tensor cores ran).
 */
const mixedDistillation = (dir: string, trained: { cpuChild: string; data: string; gpu: ReadonlyArray<number> }) =>
  Effect.gen(function*() {
    const out = path.join(dir, "distill-mixed")
    yield* distill(distillOptions(trained.cpuChild, trained.data, out)).pipe(
      TensorCoreMatMul.withPrecision("mixed"),
      Effect.scoped,
      Effect.provide(Layer.provideMerge(Teacher.inProcess(parent, { topK: 32 }), TensorBackend.layer(underTest)))
    )
    const mixed = yield* losses(out)
    const relative = worstRelative(mixed, trained.gpu)
    yield* expect(relative <= 0.02, `mixed losses differ from fp32's by ${relative} relative`)
    yield* expect(relative > 0, "mixed losses equal fp32's exactly: the tensor cores did not run")
    return `30 steps, losses ${mixed[0].toFixed(4)} -> ${mixed[29].toFixed(4)} (fp32 ${trained.gpu[29].toFixed(4)}), worst relative difference ${relative.toExponential(2)}`
  })

/** Whether this machine has a GPU adapter, and if not why. */
const adapter = TensorBackend.layer(underTest).pipe(Layer.build, Effect.scoped, Effect.as(undefined), Effect.catch((error) => Effect.succeed(error.message)))

const program = Effect.gen(function*() {
  const counts = { passed: 0, failed: 0, skipped: 0 }
  const missing = yield* adapter
  const dir = yield* Effect.promise(() => fs.mkdtemp(path.join(os.tmpdir(), "cascade-gpu-")))
  let trained: { cpuChild: string; data: string; gpu: ReadonlyArray<number> } | undefined
  const checks: Array<[string, () => Effect.Effect<string, unknown>]> = [
    ["fixture parity", () => fixtureParity],
    ["vision fixture parity (Mistral 3's encoder, projector and spliced image tokens)", () => visionParity],
    ["calibration, pruning and 30 distillation steps equal the CPU's", () => Effect.map(training(dir), (t) => ((trained = t), t.summary))],
    ["a killed run resumes to the same losses", () => (trained ? resume(dir, trained.cpuChild, trained.data, trained.gpu) : Effect.die(new CheckFailed("needs the training check")))],
    ["greedy generation equals the CPU's", () => generation],
    ["products and their gradients on the tensor cores (mixed precision)", () => tensorCoreProducts],
    ["AdamW fused into one dispatch a parameter equals the op-by-op update", () => fusedAdamW],
    ["an overflowing loss-scaled step is skipped on the GPU and the scale halves", () => lossScaling],
    ["30 distillation steps in mixed precision stay within 2% of fp32", () => (trained ? mixedDistillation(dir, trained) : Effect.die(new CheckFailed("needs the training check")))],
    ["gather, matMul and read-back on blocks up to one binding (vocabulary kernels)", () => bindingKernels],
    ["a few tokens through a 4096-wide projection (tfjs' split-K kernel kept out)", () => splitKProducts],
    ["a vocabulary matrix larger than one binding loads, runs, trains and saves", () => wideVocabulary(dir)]
  ]
  for (const [name, check] of checks.filter(([name]) => name.includes(args.only))) {
    if (missing !== undefined) {
      counts.skipped++
      yield* Console.log(`- ${name}: skipped (${missing})`)
      continue
    }
    const started = performance.now()
    const exit = yield* Effect.exit(check())
    const seconds = ((performance.now() - started) / 1000).toFixed(1)
    if (Exit.isSuccess(exit)) {
      counts.passed++
      yield* Console.log(`✓ ${name} (${seconds} s): ${exit.value}`)
    } else {
      counts.failed++
      yield* Console.log(`× ${name} (${seconds} s): ${Cause.pretty(exit.cause).split("\n").slice(0, 6).join("\n  ")}`)
    }
  }
  yield* Effect.promise(() => fs.rm(dir, { recursive: true, force: true }))
  yield* Console.log(`${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped`)
  if (counts.failed > 0) process.exitCode = 1
})

NodeRuntime.runMain(program)
