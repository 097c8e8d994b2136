/**
 * Structured pruning on three axes (RECIPE.md section 2), producing a model of the same architecture:
 *
 * - layers: keep the N layers with the highest `||h_out|| / ||h_in||`, in their original order;
 * - FFN: keep the F neurons of each layer with the highest mean `|silu(gate x) * up x|`
 *   (rows of gate and up, columns of down);
 * - hidden: one rotation Q [D, H] for the whole network, the top-H eigenvectors of the second moment
 *   of the RMSNorm inputs. Each RMSNorm weight is first folded into the linears that read its output
 *   (the final norm into lm_head), then readers are rotated `W diag(w) Q`, writers `Q^T W`, the
 *   embeddings `E Q`. The norms keep a constant weight sqrt(D / H): with ||Q^T x|| ~ ||x||, that
 *   rescales `x' / rms_H(x')` to `x / rms_D(x)`. With H = D, Q is orthogonal and nothing changes.
 *
 * A tied model's lm_head `E diag(w_final) Q` is not its embedding `E Q`: untying it is exact, keeping
 * it tied replaces diag(w_final) by its best diagonal approximation in the rotated basis.
 */
import * as tf from "@tensorflow/tfjs"
import type { ModelConfig } from "../model/Config.ts"
import * as Calibration from "./Calibration.ts"
import { symmetricEigen } from "./Eigen.ts"
import * as Model from "../model/Model.ts"
import * as Random from "../Random.ts"
import { matMul } from "../model/MatMul.ts"

export interface Targets {
  /** Layers to keep; all when undefined. */
  readonly layers?: number | undefined
  /** Hidden width; unchanged (no rotation) when undefined. */
  readonly hidden?: number | undefined
  /** FFN neurons per layer; all when undefined. */
  readonly ffn?: number | undefined
  /** Make the child's lm_head its input embedding; by default a tied parent stays tied unless the width is rotated. */
  readonly tieEmbeddings?: boolean | undefined
}

/** How to choose what to keep: by the calibration scores, or at random (the baseline they must beat). */
export type Selection = { readonly kind: "scores" } | { readonly kind: "random"; readonly seed: number }

export interface Plan {
  readonly keptLayers: ReadonlyArray<number>
  readonly layerScores: ReadonlyArray<number>
  /** Per kept layer, the kept FFN neurons in their original order. */
  readonly keptNeurons: ReadonlyArray<ReadonlyArray<number>>
  /** Share of each kept layer's total FFN importance that the kept neurons hold. */
  readonly ffnRetained: ReadonlyArray<number>
  /** [D, H] row-major, orthonormal columns; undefined when the width is kept. */
  readonly rotation: Float64Array | undefined
  /** Share of the second moment's trace in the kept directions (1 without rotation). */
  readonly explainedVariance: number
  readonly config: ModelConfig
}

/** Indices of the `k` largest scores, in ascending index order. */
const topK = (scores: ReadonlyArray<number>, k: number): Array<number> =>
  scores.map((score, i) => ({ score, i })).sort((a, b) => b.score - a.score || a.i - b.i).slice(0, k).map(({ i }) => i)
    .sort((a, b) => a - b)

/** `k` of `n` indices chosen by `next`, ascending. */
const randomK = (n: number, k: number, next: () => number): Array<number> => topK(Array.from({ length: n }, next), k)

/** The child's config: the parent's with the new sizes. */
const childConfig = (parent: ModelConfig, layers: number, hidden: number, ffn: number, tied: boolean): ModelConfig => ({
  ...parent,
  numLayers: layers,
  hiddenSize: hidden,
  intermediateSize: ffn,
  tieWordEmbeddings: tied
})

/** Decides what to keep. Targets must already be validated against the parent (the prune stage does). */
export const plan = (parent: ModelConfig, stats: Calibration.Statistics, targets: Targets, selection: Selection): Plan => {
  const next = selection.kind === "random" ? Random.uniform(selection.seed) : undefined
  const d = parent.hiddenSize
  const layerScores = Calibration.layerScores(stats)
  const layers = targets.layers ?? parent.numLayers
  const keptLayers = next ? randomK(parent.numLayers, layers, next) : topK(layerScores, layers)

  const f = targets.ffn ?? parent.intermediateSize
  const keptNeurons = keptLayers.map((layer) =>
    next ? randomK(parent.intermediateSize, f, next) : topK(Calibration.ffnScores(stats, layer), f)
  )
  const ffnRetained = keptLayers.map((layer, i) => {
    const scores = Calibration.ffnScores(stats, layer)
    const total = scores.reduce((a, b) => a + b, 0)
    return total === 0 ? 1 : keptNeurons[i].reduce((a, j) => a + scores[j], 0) / total
  })

  const h = targets.hidden
  let rotation: Float64Array | undefined
  let explainedVariance = 1
  if (h !== undefined) {
    const trace = Array.from({ length: d }, (_, i) => stats.secondMoment[i * d + i]).reduce((a, b) => a + b, 0)
    rotation = new Float64Array(d * h)
    if (next) {
      // The baseline: H coordinate axes picked at random.
      const axes = randomK(d, h, next)
      axes.forEach((axis, column) => (rotation![axis * h + column] = 1))
      explainedVariance = axes.reduce((sum, axis) => sum + stats.secondMoment[axis * d + axis], 0) / trace
    } else {
      const { values, vectors } = symmetricEigen(stats.secondMoment, d)
      for (let row = 0; row < d; row++) for (let col = 0; col < h; col++) rotation[row * h + col] = vectors[row * d + col]
      explainedVariance = values.slice(0, h).reduce((a, b) => a + b, 0) / trace
    }
  }
  // A rotated tied model stays tied only when asked: untying is exact, tying is not.
  const tied = targets.tieEmbeddings ?? (parent.tieWordEmbeddings && h === undefined)
  return {
    keptLayers,
    layerScores,
    keptNeurons,
    ffnRetained,
    rotation,
    explainedVariance,
    config: childConfig(parent, layers, h ?? d, f, tied)
  }
}

/** Rows `rows` of a [R, C] matrix. */
const takeRows = (matrix: tf.Tensor2D, rows: ReadonlyArray<number>) => tf.gather(matrix, tf.tensor1d(rows as Array<number>, "int32"), 0)
const takeColumns = (matrix: tf.Tensor2D, columns: ReadonlyArray<number>) => tf.gather(matrix, tf.tensor1d(columns as Array<number>, "int32"), 1)

/** Runs `build` in a tidy scope that keeps every tensor of the weights it returns. */
const keepAll = (build: () => Model.Weights): Model.Weights =>
  tf.tidy(() => build() as unknown as tf.TensorContainer) as unknown as Model.Weights

/** Builds the pruned model; its tensors are new and belong to the caller. */
export const apply = (parent: Model.Model, plan: Plan): Model.Model => {
  const config = plan.config
  const d = parent.config.hiddenSize
  const h = config.hiddenSize
  const weights: Model.Weights = keepAll(() => {
    const q = plan.rotation ? tf.tensor2d(Float32Array.from(plan.rotation), [d, h]) : undefined // [D, H]
    const normScale = Math.sqrt(d / h)
    const constantNorm = () => tf.fill([h], normScale) as tf.Tensor1D
    // A linear reading a norm's output: [out, D] -> [out, H] as W diag(w) Q.
    const reader = (w: tf.Tensor2D, norm: tf.Tensor1D) => (q ? matMul(tf.mul(w, norm), q) : w.clone()) as tf.Tensor2D
    // A linear writing to the residual stream: [D, in] -> [H, in] as Q^T W.
    const writer = (w: tf.Tensor2D) => (q ? matMul(q, w, true, false) : w.clone()) as tf.Tensor2D

    const layers = plan.keptLayers.map((index, i): Model.LayerWeights => {
      const layer = parent.weights.layers[index]
      const neurons = plan.keptNeurons[i]
      return {
        inputNorm: q ? constantNorm() : layer.inputNorm.clone(),
        q: reader(layer.q, layer.inputNorm),
        k: reader(layer.k, layer.inputNorm),
        v: reader(layer.v, layer.inputNorm),
        o: writer(layer.o),
        postNorm: q ? constantNorm() : layer.postNorm.clone(),
        gate: reader(takeRows(layer.gate, neurons), layer.postNorm),
        up: reader(takeRows(layer.up, neurons), layer.postNorm),
        down: writer(takeColumns(layer.down, neurons))
      }
    })
    const embed = (q ? matMul(parent.weights.embed, q) : parent.weights.embed.clone()) as tf.Tensor2D
    const head = parent.weights.lmHead ?? parent.weights.embed
    let norm: tf.Tensor1D
    let lmHead: tf.Tensor2D | undefined
    if (config.tieWordEmbeddings) {
      // lm_head becomes E Q; diag(w_final) is approximated in the rotated basis by diag(Q^T diag(w) Q).
      lmHead = undefined
      norm = q ? tf.mul(matMul(tf.square(q), parent.weights.norm.reshape([d, 1]), true, false).reshape([h]), normScale) as tf.Tensor1D
        : parent.weights.norm.clone()
    } else {
      lmHead = reader(head, parent.weights.norm)
      norm = q ? constantNorm() : parent.weights.norm.clone()
    }
    return { embed, layers, norm, lmHead }
  })
  return Model.make(config, weights)
}
