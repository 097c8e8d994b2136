/**
 * Matrix products that stay on the wasm backend's fast path.
 *
 * tfjs-backend-wasm multiplies a plain 2-D `a @ b` through XNNPACK (about 20 GFLOP/s on one core
 * here) but any transposed operand, and any batch of more than one, through a loop about ten times
 * slower; and the gradient of a product is made of transposed products. This module transposes
 * operands explicitly (a cheap copy), splits batches into 2-D products, and gives the product a
 * gradient built the same way. Other backends take tfjs' own products unchanged.
 */
import * as tf from "@tensorflow/tfjs"
import type { CustomGradientFunc } from "@tensorflow/tfjs-core/dist/engine.js"

const onWasm = () => tf.getBackend() === "wasm"

/** Swaps the last two axes. */
const swapLast = (x: tf.Tensor): tf.Tensor => {
  const axes = x.shape.map((_, i) => i)
  const n = axes.length
  ;[axes[n - 2], axes[n - 1]] = [axes[n - 1], axes[n - 2]]
  return tf.transpose(x, axes)
}

/** Below this many multiply-adds per product, one batched kernel beats a loop of fast 2-D ones. */
const SPLIT_ABOVE = 1 << 16

/** `a @ b` without transposes, batched over leading axes (equal in a and b), as 2-D products. */
const plainProduct = (a: tf.Tensor, b: tf.Tensor): tf.Tensor => {
  if (a.rank === 2) return tf.matMul(a as tf.Tensor2D, b as tf.Tensor2D)
  const [m, k] = a.shape.slice(-2)
  const n = b.shape[b.rank - 1]
  if (m * k * n < SPLIT_ABOVE) return tf.matMul(a, b)
  const batch = a.shape.slice(0, -2)
  const count = batch.reduce((x, y) => x * y, 1)
  const as = tf.unstack(a.reshape([count, m, k]))
  const bs = tf.unstack(b.reshape([count, k, n]))
  return tf.stack(as.map((ai, i) => tf.matMul(ai as tf.Tensor2D, bs[i] as tf.Tensor2D))).reshape([...batch, m, n])
}

const fastProduct = tf.customGrad(((a: tf.Tensor, b: tf.Tensor, save: tf.GradSaveFunc) => {
  save([a, b])
  return {
    value: plainProduct(a, b),
    // d(a @ b) = dy @ b^T for a, a^T @ dy for b; made of plain products too.
    gradFunc: (dy: tf.Tensor, [savedA, savedB]: Array<tf.Tensor>) => [
      plainProduct(dy, swapLast(savedB)),
      plainProduct(swapLast(savedA), dy)
    ]
  }
}) as unknown as CustomGradientFunc<tf.Tensor>) as (a: tf.Tensor, b: tf.Tensor) => tf.Tensor

/** `op(a) @ op(b)` over the last two axes, like `tf.matMul` (batch axes must match). */
export const matMul = <R extends tf.Rank>(a: tf.Tensor, b: tf.Tensor, transposeA = false, transposeB = false): tf.Tensor<R> => {
  if (!onWasm()) return tf.matMul(a, b, transposeA, transposeB) as tf.Tensor<R>
  return fastProduct(transposeA ? swapLast(a) : a, transposeB ? swapLast(b) : b) as tf.Tensor<R>
}
