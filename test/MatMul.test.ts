import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import { matMul } from "../src/model/MatMul.ts"
import * as Random from "../src/Random.ts"
import { maxAbsDiff, onBackend } from "./support.ts"

const Case = Schema.Struct({
  seed: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 10_000 })),
  batch: Schema.Literals([0, 1, 3]),
  transposeA: Schema.Boolean,
  transposeB: Schema.Boolean
})

/** Product and gradients (w.r.t. both operands, of sum(product * w)) by the given product function. */
const productAndGradients = (product: typeof tf.matMul, a: tf.Tensor, b: tf.Tensor, w: tf.Tensor, ta: boolean, tb: boolean) =>
  tf.tidy(() => {
    const f = (x: tf.Tensor, y: tf.Tensor) => tf.sum(tf.mul(product(x, y, ta, tb), w))
    const [da, db] = tf.grads(f)([a, b])
    return [product(a, b, ta, tb), da, db].map((t) => Array.from(t.dataSync()))
  })

describe("matMul", () => {
  it.effect.prop("equals tf.matMul and its gradients on wasm, transposed and batched", { c: Case }, ({ c }) =>
    Effect.sync(() => {
      const next = Random.uniform(c.seed)
      const [m, k, n] = [5, 7, 3]
      const batch = c.batch === 0 ? [] : [c.batch]
      const tensor = (shape: Array<number>) => tf.tensor(Random.normals(next, shape.reduce((x, y) => x * y, 1), 1), shape)
      const a = tensor([...batch, ...(c.transposeA ? [k, m] : [m, k])])
      const b = tensor([...batch, ...(c.transposeB ? [n, k] : [k, n])])
      const w = tensor([...batch, m, n])
      const ours = productAndGradients(matMul as typeof tf.matMul, a, b, w, c.transposeA, c.transposeB)
      const theirs = productAndGradients(tf.matMul, a, b, w, c.transposeA, c.transposeB)
      ours.forEach((values, i) => assert.isAtMost(maxAbsDiff(values, theirs[i]), 1e-5))
      tf.dispose([a, b, w])
    }).pipe(onBackend("wasm")), { arbitrary: { runs: 30 } })
})
