import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as Calibration from "../src/prune/Calibration.ts"
import * as Config from "../src/model/Config.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Pruning from "../src/prune/Pruning.ts"
import * as Random from "../src/Random.ts"
import { localFixture, maxAbsDiff, onBackend, sharedFixture, take } from "./support.ts"

/** Seeded rows of token ids, with the last row padded. */
const rows = (seed: number, count: number, length: number, vocab: number) => {
  const next = Random.uniform(seed)
  const ids = Array.from({ length: count }, () => Array.from({ length }, () => Math.floor(next() * vocab)))
  const mask = ids.map((row, r) => row.map((_, i) => (r === count - 1 && i >= length - 3 ? 0 : 1)))
  return { ids, mask }
}

const calibrate = (model: Model.Model, seed = 1) => {
  const { ids, mask } = rows(seed, 6, 16, model.config.vocabSize)
  return Calibration.observe(model, ids, mask)
}

const logitsOf = (model: Model.Model) => take(Model.forward(model, rows(99, 2, 12, model.config.vocabSize).ids).logits)

/** Prunes, compares the child's logits with the parent's, disposes the child. */
const logitsDiff = (parent: Model.Model, stats: Calibration.Statistics, targets: Pruning.Targets) => {
  const child = Pruning.apply(parent, Pruning.plan(parent.config, stats, targets, { kind: "scores" }))
  const diff = maxAbsDiff(logitsOf(child), logitsOf(parent))
  Model.dispose(child)
  return diff
}

/** A copy of `model` with some weights replaced (the rest cloned). */
const edited = (model: Model.Model, edit: (tensors: Map<string, tf.Tensor>) => void) => {
  const tensors = new Map([...Model.tensorsOfWeights(model.config, model.weights)].map(([name, t]) => [name, t.clone()]))
  edit(tensors)
  return Model.make(model.config, Model.weightsFromTensors(model.config, tensors))
}

const replace = (tensors: Map<string, tf.Tensor>, name: string, value: tf.Tensor) => {
  tensors.get(name)!.dispose()
  tensors.set(name, value)
}

const Part = Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1000 }))

describe("Calibration statistics", () => {
  it.effect.prop("merge is associative and merging parts equals one pass over the whole", { a: Part, b: Part }, ({ a, b }) =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const first = rows(a, 3, 10, 512)
      const second = rows(b, 2, 10, 512)
      const whole = Calibration.observe(model, [...first.ids, ...second.ids], [...first.mask, ...second.mask])
      const parts = Calibration.merge(Calibration.observe(model, first.ids, first.mask), Calibration.observe(model, second.ids, second.mask))
      assert.strictEqual(parts.tokens, whole.tokens)
      const close = (x: Float64Array, y: Float64Array) => {
        const scale = Math.max(...Array.from(y, Math.abs))
        assert.isAtMost(maxAbsDiff(x, y), 1e-5 * scale)
      }
      close(parts.layerRatioSum, whole.layerRatioSum)
      close(parts.secondMoment, whole.secondMoment)
      close(parts.ffnAbsSum, whole.ffnAbsSum)
      const c = calibrate(model, a + b)
      const left = Calibration.merge(Calibration.merge(whole, parts), c)
      const right = Calibration.merge(whole, Calibration.merge(parts, c))
      close(left.secondMoment, right.secondMoment)
      close(left.ffnAbsSum, right.ffnAbsSum)
    }).pipe(onBackend("wasm")), { arbitrary: { runs: 5 } })
})

describe("Pruning exactness", () => {
  it.effect("pruning nothing, and a full-rank rotation, reproduce the parent's logits", () =>
    Effect.gen(function*() {
      const parent = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const stats = calibrate(parent)
      const before = tf.memory().numTensors
      assert.isAtMost(logitsDiff(parent, stats, {}), 1e-4)
      assert.isAtMost(logitsDiff(parent, stats, { hidden: 64 }), 1e-4)
      assert.isAtMost(logitsDiff(parent, stats, { hidden: 64, layers: 4, ffn: 192 }), 1e-4)
      assert.strictEqual(tf.memory().numTensors, before)
    }).pipe(onBackend("wasm")))

  it.effect("a tied parent keeps its logits through a full rotation, tied or untied", () =>
    Effect.gen(function*() {
      const parent = yield* Pretrained.load(localFixture("mistral-tied"))
      const stats = calibrate(parent)
      assert.isAtMost(logitsDiff(parent, stats, { hidden: parent.config.hiddenSize, tieEmbeddings: false }), 1e-4)
      assert.isAtMost(logitsDiff(parent, stats, {}), 1e-4)
    }).pipe(onBackend("wasm")))

  it.effect("removing a layer whose o_proj and down_proj are zero changes nothing", () =>
    Effect.gen(function*() {
      const loaded = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const parent = edited(loaded, (tensors) => {
        for (const name of ["model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"]) {
          replace(tensors, name, tf.zerosLike(tensors.get(name)!))
        }
      })
      const stats = calibrate(parent)
      // A block that adds nothing has ratio exactly 1, the lowest score here: it is the one removed.
      const plan = Pruning.plan(parent.config, stats, { layers: 3 }, { kind: "scores" })
      assert.deepStrictEqual(plan.keptLayers, [0, 1, 3])
      assert.isAtMost(logitsDiff(parent, stats, { layers: 3 }), 1e-5)
      Model.dispose(parent)
    }).pipe(onBackend("wasm")))

  it.effect("removing FFN neurons whose down_proj columns are zero changes nothing", () =>
    Effect.gen(function*() {
      const loaded = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const dead = 64
      const parent = edited(loaded, (tensors) => {
        for (let layer = 0; layer < 4; layer++) {
          const name = `model.layers.${layer}.mlp.down_proj.weight`
          const down = tensors.get(name)!
          // Zero the last 64 columns of down and make those neurons' activations tiny, so they rank last.
          const keep = tf.concat([tf.ones([64, 192 - dead]), tf.zeros([64, dead])], 1)
          replace(tensors, name, tf.mul(down, keep))
          const up = `model.layers.${layer}.mlp.up_proj.weight`
          const scale = tf.concat([tf.ones([192 - dead, 1]), tf.fill([dead, 1], 1e-3)], 0)
          replace(tensors, up, tf.mul(tensors.get(up)!, scale))
        }
      })
      const stats = calibrate(parent)
      assert.isAtMost(logitsDiff(parent, stats, { ffn: 192 - dead }), 1e-5)
      Model.dispose(parent)
    }).pipe(onBackend("wasm")))

  it.effect("parameter counts equal the formula", () =>
    Effect.gen(function*() {
      const parent = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const stats = calibrate(parent)
      const targets = { layers: 3, hidden: 48, ffn: 100 }
      const child = Pruning.apply(parent, Pruning.plan(parent.config, stats, targets, { kind: "scores" }))
      const counted = [...Model.tensorsOfWeights(child.config, child.weights).values()].reduce((n, t) => n + t.size, 0)
      // embeddings 2*V*H, per layer 2*H*E*(Hq+Hkv) + 3*H*F + 2*H, final norm H
      const expected = 2 * 512 * 48 + 3 * (2 * 48 * 16 * (4 + 2) + 3 * 48 * 100 + 2 * 48) + 48
      assert.strictEqual(counted, expected)
      assert.strictEqual(Config.parameterCount(child.config), expected)
      // Shapes are the ones a checkpoint of the child's config holds.
      for (const { name, shape } of Model.tensorShapes(child.config)) {
        assert.deepStrictEqual(Model.tensorsOfWeights(child.config, child.weights).get(name)!.shape, shape, name)
      }
      Model.dispose(child)
    }).pipe(onBackend("wasm")))
})
