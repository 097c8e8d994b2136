import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as Calibration from "../src/prune/Calibration.ts"
import * as Config from "../src/model/Config.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Pruning from "../src/prune/Pruning.ts"
import * as Random from "../src/Random.ts"
import { matMul } from "../src/model/MatMul.ts"
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
const logitsDiff = Effect.fnUntraced(function*(parent: Model.Model, stats: Calibration.Statistics, targets: Pruning.Targets) {
  const child = yield* Pruning.apply(parent, Pruning.plan(parent.config, stats, targets, { kind: "scores" }))
  const diff = maxAbsDiff(logitsOf(child), logitsOf(parent))
  Model.dispose(child)
  return diff
})

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

/** `count` seeded normal values as a tensor of `shape`. */
const normalTensor = (seed: number, shape: Array<number>, std: number) =>
  tf.tensor(Random.normals(Random.uniform(seed), shape.reduce((a, b) => a * b, 1), std), shape)

/** A seeded [D, H] matrix with orthonormal columns. */
const orthonormal = (seed: number, d: number, h: number) => tf.tidy(() => tf.linalg.qr(normalTensor(seed, [d, h], 1))[0])

/** A copy of `model` with some weights replaced and its config edited. */
const reconfigured = (model: Model.Model, config: Config.ModelConfig, edit: (tensors: Map<string, tf.Tensor>) => void) => {
  const copy = edited(model, edit)
  return Model.make(config, copy.weights)
}

const Part = Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 1000 }))

describe("Calibration statistics", () => {
  it.effect.prop("merge is associative and merging parts equals one pass over the whole", { a: Part, b: Part }, ({ a, b }) =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const first = rows(a, 3, 10, 512)
      const second = rows(b, 2, 10, 512)
      const whole = yield* Calibration.observe(model, [...first.ids, ...second.ids], [...first.mask, ...second.mask])
      const parts = Calibration.merge(yield* Calibration.observe(model, first.ids, first.mask), yield* Calibration.observe(model, second.ids, second.mask))
      assert.strictEqual(parts.tokens, whole.tokens)
      const close = (x: Float64Array, y: Float64Array) => {
        const scale = Math.max(...Array.from(y, Math.abs))
        assert.isAtMost(maxAbsDiff(x, y), 1e-5 * scale)
      }
      close(parts.layerRatioSum, whole.layerRatioSum)
      close(parts.secondMoment, whole.secondMoment)
      close(parts.ffnAbsSum, whole.ffnAbsSum)
      const c = yield* calibrate(model, a + b)
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
      const stats = yield* calibrate(parent)
      const before = tf.memory().numTensors
      assert.isAtMost(yield* logitsDiff(parent, stats, {}), 1e-4)
      assert.isAtMost(yield* logitsDiff(parent, stats, { hidden: 64 }), 1e-4)
      assert.isAtMost(yield* logitsDiff(parent, stats, { hidden: 64, layers: 4, ffn: 192 }), 1e-4)
      assert.strictEqual(tf.memory().numTensors, before)
    }).pipe(onBackend("wasm")))

  it.effect("a tied parent keeps its logits through a full rotation, tied or untied", () =>
    Effect.gen(function*() {
      const parent = yield* Pretrained.load(localFixture("mistral-tied"))
      const stats = yield* calibrate(parent)
      assert.isAtMost(yield* logitsDiff(parent, stats, { hidden: parent.config.hiddenSize, tieEmbeddings: false }), 1e-4)
      assert.isAtMost(yield* logitsDiff(parent, stats, {}), 1e-4)
    }).pipe(onBackend("wasm")))

  it.effect("a tied parent with a varied final norm stays exact through a full rotation into a tied child by the fit rule", () =>
    Effect.gen(function*() {
      const loaded = yield* Pretrained.load(localFixture("mistral-tied"))
      const d = loaded.config.hiddenSize
      // A final norm far from constant: the rule before --tie-from (diag(Q^T diag(w) Q)) is off here.
      const parent = edited(loaded, (tensors) => replace(tensors, "model.norm.weight", tf.add(1, normalTensor(5, [d], 0.5))))
      const stats = yield* calibrate(parent)
      const targets = { hidden: d, tieEmbeddings: true, tieFrom: "fit" } as const
      const { model: child, tie } = yield* Pruning.build(parent, Pruning.plan(parent.config, stats, targets, { kind: "scores" }))
      assert.isTrue(child.config.tieWordEmbeddings)
      assert.isUndefined(child.weights.lmHead)
      assert.isAtMost(maxAbsDiff(logitsOf(child), logitsOf(parent)), 1e-4)
      assert.isAtMost(tie!.outputError, 1e-5)
      Model.dispose(child)
      Model.dispose(parent)
    }).pipe(onBackend("wasm")))

  it.effect("an untied parent whose embedding is its folded lm_head is tied exactly by every rule through a full rotation", () =>
    Effect.gen(function*() {
      const loaded = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const d = loaded.config.hiddenSize
      const parent = edited(loaded, (tensors) => {
        const norm = tf.add(1, normalTensor(6, [d], 0.5))
        replace(tensors, "model.embed_tokens.weight", tf.mul(tensors.get("lm_head.weight")!, norm))
        replace(tensors, "model.norm.weight", norm)
      })
      const stats = yield* calibrate(parent)
      const before = tf.memory().numTensors
      for (const tieFrom of Pruning.tieRules) {
        assert.isAtMost(yield* logitsDiff(parent, stats, { hidden: d, tieEmbeddings: true, tieFrom }), 1e-4, tieFrom)
      }
      assert.strictEqual(tf.memory().numTensors, before)
      Model.dispose(parent)
    }).pipe(onBackend("wasm")))

  it.effect("tying an untied parent: each rule forms the shared matrix from the rotated embedding or the folded lm_head", () =>
    Effect.gen(function*() {
      const parent = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const stats = yield* calibrate(parent)
      const [d, h] = [parent.config.hiddenSize, 40]
      const children = yield* Effect.forEach(Pruning.tieRules, (tieFrom) => {
        const plan = Pruning.plan(parent.config, stats, { hidden: h, tieEmbeddings: true, tieFrom }, { kind: "scores" })
        return Effect.map(Pruning.build(parent, plan), (pruned) => ({ tieFrom, plan, ...pruned }))
      })
      const q = tf.tensor2d(Float32Array.from(children[0].plan.rotation!), [d, h])
      const rowGram = (m: tf.Tensor) => tf.tidy(() => take(matMul(m, m, false, true)))
      const rotated = matMul(parent.weights.embed[0], q)
      const rotatedEmbedding = rotated.dataSync() as Float32Array
      const foldedHead = tf.tidy(() => take(matMul(tf.mul(parent.weights.lmHead![0], parent.weights.norm), q)))
      const byRule = Object.fromEntries(children.map((child) => [child.tieFrom, child]))
      const scale = Math.sqrt(d / h)
      // embed: inputs are the rotated embedding; head: the matrix is the folded lm_head, the final norm sqrt(D/H).
      assert.isAtMost(maxAbsDiff(byRule.embed.model.weights.embed[0].dataSync(), rotatedEmbedding), 1e-5)
      assert.isAtMost(maxAbsDiff(byRule.head.model.weights.embed[0].dataSync(), foldedHead), 1e-5)
      assert.isAtMost(maxAbsDiff(byRule.head.model.weights.norm.dataSync(), new Float32Array(h).fill(scale)), 1e-5)
      assert.isAtMost(
        maxAbsDiff(byRule.mean.model.weights.embed[0].dataSync(), rotatedEmbedding.map((x, i) => (x + foldedHead[i]) / 2)),
        1e-5
      )
      assert.strictEqual(byRule.embed.tie!.inputError, 0)
      assert.isAtMost(byRule.head.tie!.outputError, 1e-6)
      // fit keeps the inputs up to a rotation R within the kept subspace: (E Q R)(E Q R)^T = (E Q)(E Q)^T.
      assert.isAtMost(maxAbsDiff(rowGram(byRule.fit.model.weights.embed[0]), rowGram(rotated)), 1e-4)
      assert.isAtMost(byRule.fit.tie!.inputError, 1e-6)
      // A diagonal is a symmetric matrix: fit's output error is at most embed's, and here strictly less.
      assert.isBelow(byRule.fit.tie!.outputError, byRule.embed.tie!.outputError)
      for (const { model } of children) {
        assert.isTrue(model.config.tieWordEmbeddings)
        assert.isUndefined(model.weights.lmHead)
        Model.dispose(model)
      }
      tf.dispose([q, rotated])
    }).pipe(onBackend("wasm")))

  it.effect("a parent whose residual stream lies in an H-dimensional subspace is reproduced by pruning the width to H", () =>
    Effect.gen(function*() {
      const loaded = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const [d, h] = [loaded.config.hiddenSize, 40]
      const basis = orthonormal(7, d, h)
      const projector = matMul(basis, basis, false, true) // [D, D]
      // The embedding and every writer to the residual stream confined to span(basis); a negligible
      // eps, since a norm's eps acts at H/D of its strength once the width is H.
      const parent = reconfigured(loaded, { ...loaded.config, rmsNormEps: 1e-12 }, (tensors) => {
        replace(tensors, "model.embed_tokens.weight", matMul(tensors.get("model.embed_tokens.weight")!, projector))
        for (let layer = 0; layer < loaded.config.numLayers; layer++) {
          for (const name of [`model.layers.${layer}.self_attn.o_proj.weight`, `model.layers.${layer}.mlp.down_proj.weight`]) {
            replace(tensors, name, matMul(projector, tensors.get(name)!))
          }
        }
      })
      tf.dispose([basis, projector])
      const stats = yield* calibrate(parent)
      assert.isAtMost(yield* logitsDiff(parent, stats, { hidden: h }), 1e-4)
      const plan = Pruning.plan(parent.config, stats, { hidden: h }, { kind: "scores" })
      assert.isAtLeast(plan.explainedVariance, 1 - 1e-6)
      Model.dispose(parent)
    }).pipe(onBackend("wasm")))

  it.effect("removing a layer whose o_proj and down_proj are zero changes nothing", () =>
    Effect.gen(function*() {
      const loaded = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const parent = edited(loaded, (tensors) => {
        for (const name of ["model.layers.2.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"]) {
          replace(tensors, name, tf.zerosLike(tensors.get(name)!))
        }
      })
      const stats = yield* calibrate(parent)
      // A block that adds nothing has ratio exactly 1, the lowest score here: it is the one removed.
      const plan = Pruning.plan(parent.config, stats, { layers: 3 }, { kind: "scores" })
      assert.deepStrictEqual(plan.keptLayers, [0, 1, 3])
      assert.isAtMost(yield* logitsDiff(parent, stats, { layers: 3 }), 1e-5)
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
      const stats = yield* calibrate(parent)
      assert.isAtMost(yield* logitsDiff(parent, stats, { ffn: 192 - dead }), 1e-5)
      Model.dispose(parent)
    }).pipe(onBackend("wasm")))

  it.effect("parameter counts equal the formula", () =>
    Effect.gen(function*() {
      const parent = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const stats = yield* calibrate(parent)
      const targets = { layers: 3, hidden: 48, ffn: 100 }
      const child = yield* Pruning.apply(parent, Pruning.plan(parent.config, stats, targets, { kind: "scores" }))
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
