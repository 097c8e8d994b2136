/**
 * Calibration statistics of a parent model, what pruning ranks by (RECIPE.md section 2):
 * - per layer, the sum over tokens of `||h_out|| / ||h_in||` of the residual stream;
 * - the uncentred second moment `sum x x^T` of the inputs of both RMSNorms of every layer;
 * - per layer and FFN neuron, the sum over tokens of `|silu(gate x) * (up x)|`.
 *
 * Sums rather than means, in float64, with the token count: statistics of two parts of a data set
 * merge by addition into those of the whole, so calibration can be split and resumed.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import type { ModelConfig } from "../model/Config.ts"
import { CheckpointError } from "../Errors.ts"
import * as Model from "../model/Model.ts"
import * as Safetensors from "../io/Safetensors.ts"
import { matMul } from "../model/MatMul.ts"

export interface Statistics {
  readonly numLayers: number
  readonly hiddenSize: number
  readonly intermediateSize: number
  /** Non-padding tokens seen. */
  readonly tokens: number
  /** [L] sum over tokens of ||h_out|| / ||h_in||. */
  readonly layerRatioSum: Float64Array
  /** [D, D] sum of x x^T over the inputs of input_layernorm and post_attention_layernorm, all layers. */
  readonly secondMoment: Float64Array
  /** [L, F] sum over tokens of |silu(gate x) * (up x)|. */
  readonly ffnAbsSum: Float64Array
}

export const empty = (config: ModelConfig): Statistics => ({
  numLayers: config.numLayers,
  hiddenSize: config.hiddenSize,
  intermediateSize: config.intermediateSize,
  tokens: 0,
  layerRatioSum: new Float64Array(config.numLayers),
  secondMoment: new Float64Array(config.hiddenSize * config.hiddenSize),
  ffnAbsSum: new Float64Array(config.numLayers * config.intermediateSize)
})

const sum = (a: Float64Array, b: Float64Array) => a.map((x, i) => x + b[i])

/** The statistics of two disjoint parts, as one pass over both would give. */
export const merge = (a: Statistics, b: Statistics): Statistics => {
  if (a.numLayers !== b.numLayers || a.hiddenSize !== b.hiddenSize || a.intermediateSize !== b.intermediateSize) {
    throw new Error("cannot merge statistics of models of different shapes")
  }
  return {
    ...a,
    tokens: a.tokens + b.tokens,
    layerRatioSum: sum(a.layerRatioSum, b.layerRatioSum),
    secondMoment: sum(a.secondMoment, b.secondMoment),
    ffnAbsSum: sum(a.ffnAbsSum, b.ffnAbsSum)
  }
}

/** Mean `||h_out|| / ||h_in||` per layer. */
export const layerScores = (stats: Statistics): Array<number> => Array.from(stats.layerRatioSum, (x) => x / stats.tokens)

/** Mean |activation| of each FFN neuron of layer `layer`. */
export const ffnScores = (stats: Statistics, layer: number): Array<number> =>
  Array.from(stats.ffnAbsSum.subarray(layer * stats.intermediateSize, (layer + 1) * stats.intermediateSize), (x) => x / stats.tokens)

/**
 * Statistics of one batch: rows of token ids with their mask (1 token, 0 padding). The batch's sums
 * are made on the backend (the second moments of every layer added up there, in float32) and read
 * in one transfer after the pass; batches are added up in float64.
 */
export const observe = Effect.fn("Calibration.observe")(function*(
  model: Model.Model,
  ids: ReadonlyArray<ReadonlyArray<number>>,
  mask: ReadonlyArray<ReadonlyArray<number>>
) {
  const stats = empty(model.config)
  const { hiddenSize: d, intermediateSize: f, numLayers } = model.config
  const ratioSums: Array<tf.Tensor> = [] // [1] per layer
  const ffnSums: Array<tf.Tensor> = [] // [F] per layer
  let moment: tf.Tensor = tf.zeros([d * d]) // [D * D], both RMSNorm inputs of every layer
  const weights = tf.tensor2d(mask.flat(), [mask.length * mask[0].length, 1]) // [N, 1]
  const { logits } = Model.forward(model, ids, {
    attentionMask: mask,
    trace: (layer) => {
      const [ratioSum, ffnSum, nextMoment] = tf.tidy(() => {
        const input = layer.input.reshape([-1, d]) // [N, D]
        const middle = layer.middle.reshape([-1, d])
        const output = layer.output.reshape([-1, d])
        const ratio = tf.divNoNan(tf.norm(output, "euclidean", 1, true), tf.norm(input, "euclidean", 1, true)) // [N, 1]
        const moments = [input, middle].map((x) => matMul(tf.mul(x, weights), x, true, false).reshape([-1]))
        return [
          tf.sum(tf.mul(ratio, weights)).reshape([1]),
          tf.sum(tf.mul(tf.abs(layer.ffn.reshape([-1, f])), weights), 0),
          tf.addN([moment, ...moments])
        ].map((t) => tf.keep(t))
      })
      moment.dispose()
      moment = nextMoment
      ratioSums[layer.index] = ratioSum
      ffnSums[layer.index] = ffnSum
    }
  })
  const all = tf.concat([...ratioSums, ...ffnSums, moment])
  tf.dispose([logits, weights, moment, ...ratioSums, ...ffnSums])
  const values = yield* Effect.promise(() => all.data()).pipe(Effect.ensuring(Effect.sync(() => all.dispose())))
  stats.layerRatioSum.set(values.subarray(0, numLayers))
  stats.ffnAbsSum.set(values.subarray(numLayers, numLayers * (1 + f)))
  stats.secondMoment.set(values.subarray(numLayers * (1 + f)))
  return { ...stats, tokens: mask.flat().reduce((a, b) => a + b, 0) }
})

/** Statistics as safetensors (F64) tensors, plus the scalar fields for a manifest. */
export const write = (path: string, stats: Statistics) =>
  Safetensors.write(path, [
    { name: "layer_ratio_sum", dtype: "F64", shape: [stats.numLayers], data: stats.layerRatioSum },
    { name: "second_moment", dtype: "F64", shape: [stats.hiddenSize, stats.hiddenSize], data: stats.secondMoment },
    { name: "ffn_abs_sum", dtype: "F64", shape: [stats.numLayers, stats.intermediateSize], data: stats.ffnAbsSum }
  ], { format: "cascade-calibration", tokens: String(stats.tokens) })

export const read = Effect.fn("Calibration.read")(function*(path: string) {
  const file = yield* Safetensors.open(path)
  const shape = (yield* file.info("ffn_abs_sum")).shape
  const tokens = Number(file.metadata.tokens)
  if (!Number.isInteger(tokens) || tokens < 0) {
    return yield* new CheckpointError({ file: path, reason: "metadata has no token count" })
  }
  const stats: Statistics = {
    numLayers: shape[0],
    intermediateSize: shape[1],
    hiddenSize: (yield* file.info("second_moment")).shape[0],
    tokens,
    layerRatioSum: yield* file.readFloat64("layer_ratio_sum"),
    secondMoment: yield* file.readFloat64("second_moment"),
    ffnAbsSum: yield* file.readFloat64("ffn_abs_sum")
  }
  return stats
})
