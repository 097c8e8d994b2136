import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import * as Loss from "../src/train/Loss.ts"
import * as Model from "../src/model/Model.ts"
import * as Optimizer from "../src/train/Optimizer.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Training from "../src/train/Training.ts"
import { maxAbsDiff, onBackend, sharedFixture, take } from "./support.ts"

const fixture = sharedFixture("tiny-mistral")

/** Token rows from a fixed LCG, so every run sees the same data. */
const tokenRows = (rows: number, length: number, seed: number) => {
  let state = seed
  return Array.from({ length: rows }, () =>
    Array.from({ length }, () => {
      state = (state * 1103515245 + 12345) % 2147483648
      return state % 512
    }))
}

interface MicroBatch {
  readonly ids: Array<Array<number>>
  readonly mask: Array<Array<number>>
  readonly targets: Array<Array<number>>
  readonly target: Loss.Target
}

/**
 * Micro-batches of `rows` sequences of 16 tokens with the teacher's target; the last row of each
 * ends in 5 padding positions.
 */
const microBatches = (teacher: Model.Model, count: number, rows: number, options: Loss.Options, topK?: number) =>
  Effect.forEach(Array.from({ length: count }, (_, i) => i), (i) =>
    Effect.gen(function*() {
      const sequences = tokenRows(rows, 17, 7 + i)
      const ids = sequences.map((row) => row.slice(0, 16))
      const mask = ids.map((row, r) => row.map((_, t) => (r === rows - 1 && t >= 11 ? 0 : 1)))
      const logProbs = tf.tidy(() => tf.logSoftmax(Model.forward(teacher, ids, { attentionMask: mask }).logits) as tf.Tensor3D)
      const full: Loss.Teacher = { _tag: "Full", logProbs }
      const top = topK === undefined ? undefined : tf.topk(logProbs, topK)
      const target = yield* Loss.teacherTarget(
        top === undefined ? full : { _tag: "TopK", ids: top.indices as tf.Tensor3D, logProbs: top.values as tf.Tensor3D },
        teacher.config.vocabSize,
        mask,
        options
      )
      tf.dispose([logProbs, top?.indices, top?.values].filter((t) => t !== undefined))
      return { ids, mask, targets: sequences.map((row) => row.slice(1)), target } satisfies MicroBatch
    }))

const lossOf = (options: Loss.Options) => (model: Model.Model, batch: MicroBatch) =>
  Loss.distillation(Model.forward(model, batch.ids, { attentionMask: batch.mask }).logits, batch.target, batch, options)

/** `steps` steps of distilling the fixture into a copy initialised from `seed`; the results of every step. */
const distil = (options: { seed: number; steps: number; loss: Loss.Options; topK?: number; onStep?: (step: number) => void }) =>
  Effect.gen(function*() {
    const teacher = yield* Pretrained.load(fixture)
    const batches = yield* microBatches(teacher, 2, 2, options.loss, options.topK)
    const student = yield* Training.trainable(yield* Training.initialise(teacher.config, options.seed))
    const adam = yield* Optimizer.make(student.variables, { ...Optimizer.defaultConfig, weightDecay: 0.1 })
    const schedule: Optimizer.Schedule = { peak: 1e-2, min: 1e-3, warmupSteps: 3, totalSteps: options.steps }
    const results: Array<Training.StepResult> = []
    for (let i = 0; i < options.steps; i++) {
      results.push(yield* Training.step(student, adam, batches, lossOf(options.loss), {
        learningRate: Optimizer.learningRate(schedule, i),
        maxGradNorm: 1
      }))
      options.onStep?.(i + 1)
    }
    return results
  })

describe("Training.step", () => {
  it.effect("distilling tiny-mistral into a re-initialised copy lowers the KL and leaks nothing", () =>
    Effect.gen(function*() {
      const counts = new Map<number, number>()
      const results = yield* distil({
        seed: 1,
        steps: 20,
        loss: Loss.defaultOptions,
        onStep: (step) => counts.set(step, tf.memory().numTensors)
      })
      const first = results[0].metrics.kl
      const last = results[results.length - 1].metrics.kl
      assert.isBelow(last, 0.7 * first, `KL ${first} -> ${last}`)
      assert.strictEqual(results[0].tokens, 2 * (32 - 5))
      assert.isAbove(results[0].gradNorm, 0)
      assert.strictEqual(counts.get(20), counts.get(2), "tensors after step 20 vs after step 2")
    }).pipe(onBackend("wasm")))

  it.effect("the same seed gives the same losses (top-k teacher with a rest bucket)", () =>
    Effect.gen(function*() {
      const loss = { ...Loss.defaultOptions, restBucket: true, temperature: 2, crossEntropyWeight: 0.1 }
      const run = (seed: number) => distil({ seed, steps: 3, loss, topK: 8 }).pipe(Effect.scoped, Effect.map((rs) => rs.map((r) => r.loss)))
      const a = yield* run(3)
      const b = yield* run(3)
      const c = yield* run(4)
      assert.deepStrictEqual(a, b)
      assert.notDeepEqual(a, c)
      assert.isBelow(a[2], a[0])
    }).pipe(onBackend("wasm")))

  it.effect("micro-batches are weighted by tokens: their step's gradients equal those of one step over the whole batch, tensor by tensor", () =>
    Effect.gen(function*() {
      const teacher = yield* Pretrained.load(fixture)
      const [whole] = yield* microBatches(teacher, 1, 3, Loss.defaultOptions)
      // The same three rows split 2 + 1; the split halves keep 27 and 11 tokens.
      const parts = yield* Effect.forEach([[0, 2], [2, 3]], ([from, to]) =>
        Effect.gen(function*() {
          const logProbs = tf.tidy(() =>
            tf.logSoftmax(Model.forward(teacher, whole.ids.slice(from, to), { attentionMask: whole.mask.slice(from, to) }).logits) as tf.Tensor3D
          )
          const target = yield* Loss.teacherTarget({ _tag: "Full", logProbs }, 512, whole.mask.slice(from, to), Loss.defaultOptions)
          logProbs.dispose()
          return { ids: whole.ids.slice(from, to), mask: whole.mask.slice(from, to), targets: whole.targets.slice(from, to), target }
        }))
      // With beta1 = 0, Adam's first moment after one step is the step's gradient.
      const stepWith = (batches: ReadonlyArray<MicroBatch>) =>
        Effect.gen(function*() {
          const student = yield* Training.trainable(yield* Training.initialise(teacher.config, 1))
          const adam = yield* Optimizer.make(student.variables, { ...Optimizer.defaultConfig, beta1: 0 })
          const result = yield* Training.step(student, adam, batches, lossOf(Loss.defaultOptions), { learningRate: 0, maxGradNorm: undefined })
          return { result, grads: (yield* Optimizer.exportState(adam)).expAvg }
        }).pipe(Effect.scoped)
      const one = yield* stepWith([whole])
      const split = yield* stepWith(parts)
      assert.strictEqual(split.result.tokens, one.result.tokens)
      assert.approximately(split.result.metrics.kl, one.result.metrics.kl, 1e-6)
      assert.approximately(split.result.gradNorm / one.result.gradNorm, 1, 1e-4)
      assert.strictEqual(one.grads.size, Model.tensorShapes(teacher.config).length)
      for (const [name, grad] of one.grads) {
        const scale = Math.max(...grad.map(Math.abs))
        assert.isAbove(scale, 0, name)
        assert.isAtMost(maxAbsDiff(split.grads.get(name)!, grad), 1e-4 * scale, name)
      }
    }).pipe(onBackend("wasm")))
})

describe("Training.clipByGlobalNorm", () => {
  it.effect("scales the global norm down to the maximum and returns the norm before", () =>
    Effect.gen(function*() {
      const grads = new Map<string, tf.Tensor>([["a", tf.tensor1d([3, 0])], ["b", tf.tensor2d([[0, 4]])]])
      const before = tf.memory().numTensors
      assert.approximately(take(Training.clipByGlobalNorm(grads, 1))[0], 5, 1e-6)
      const clipped = [...grads.values()].flatMap((grad) => Array.from(grad.dataSync()))
      assert.isAtMost(maxAbsDiff(clipped, [0.6, 0, 0, 0.8]), 1e-6)
      assert.strictEqual(tf.memory().numTensors, before)
      // Below the maximum nothing changes.
      const unclipped = [...grads.values()].flatMap((grad) => Array.from(grad.dataSync()))
      assert.approximately(take(Training.clipByGlobalNorm(grads, 2))[0], 1, 1e-6)
      // A factor of exactly 1: every value bit-identical.
      assert.deepStrictEqual([...grads.values()].flatMap((grad) => Array.from(grad.dataSync())), unclipped)
      tf.dispose([...grads.values()])
    }).pipe(onBackend("wasm")))
})

describe("the embedding's gradient", () => {
  const ids = [[5, 17, 5, 300], [17, 17, 2, 511]]
  const weights = Array.from({ length: 8 * 64 }, (_, i) => Math.sin(i))

  it.effect("on wasm (scatter-add) equals tf.gather's dense gradient on cpu", () =>
    Effect.gen(function*() {
      // d/dtable of sum(embeddings * W): W's rows scattered onto the ids, repeated ids summed.
      const dense = yield* Effect.gen(function*() {
        const model = yield* Pretrained.load(fixture)
        return tf.tidy(() => {
          const flat = tf.tensor1d(ids.flat(), "int32")
          const w = tf.tensor2d(weights, [8, 64])
          return Array.from(tf.grad((table: tf.Tensor) => tf.sum(tf.mul(tf.gather(table, flat), w)))(model.weights.embed[0]).dataSync())
        })
      }).pipe(onBackend("cpu"))
      const custom = yield* Effect.gen(function*() {
        const model = yield* Pretrained.load(fixture)
        return tf.tidy(() => {
          const w = tf.tensor3d(weights, [2, 4, 64])
          const embeddings = (table: tf.Tensor) =>
            Model.forward({ ...model, weights: { ...model.weights, embed: [table as tf.Tensor2D] } }, ids, { hiddenStates: true }).hiddenStates[0]
          return Array.from(tf.grad((table: tf.Tensor) => tf.sum(tf.mul(embeddings(table), w)))(model.weights.embed[0]).dataSync())
        })
      }).pipe(onBackend("wasm"))
      assert.isAtMost(maxAbsDiff(custom, dense), 1e-6)
      assert.isAbove(Math.max(...dense.map(Math.abs)), 0)
    }))
})
