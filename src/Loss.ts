/**
 * Losses over logits. Means are taken over the positions a mask selects, in float32 tensors; sums
 * that outlive a batch are accumulated by callers in float64.
 */
import * as tf from "@tensorflow/tfjs"

/**
 * log p(targets) under the logits: [B, T, V] logits and [B][T] targets -> [B, T] log-probabilities.
 */
export const tokenLogProbs = (logits: tf.Tensor3D, targets: ReadonlyArray<ArrayLike<number>>): tf.Tensor2D =>
  tf.tidy(() => {
    const [b, t, v] = logits.shape
    const flat = tf.logSoftmax(logits.reshape([b * t, v])).reshape([b * t * v])
    const index = new Int32Array(b * t)
    for (let row = 0; row < b; row++) {
      for (let i = 0; i < t; i++) index[row * t + i] = (row * t + i) * v + targets[row][i]
    }
    return tf.gather(flat, tf.tensor1d(index, "int32")).reshape([b, t])
  })
