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
 * A tied child's one matrix cannot be both the rotated embedding `E Q` and the exact lm_head
 * `H diag(w_final) Q` (H = E for a tied parent): untying is exact, tying is a choice (`TieFrom`).
 *
 * The vocabulary matrices are row blocks (see RowBlocks): rows are independent for `E Q` and
 * `H diag(w) Q`, so each block turns on its own, and the tie fit's sums over rows (Gram matrices,
 * column fits, norms) are sums over the blocks.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import type { ModelConfig } from "../model/Config.ts"
import * as Calibration from "./Calibration.ts"
import { symmetricEigen } from "./Eigen.ts"
import * as Model from "../model/Model.ts"
import * as Random from "../Random.ts"
import { matMul } from "../model/MatMul.ts"
import * as RowBlocks from "../model/RowBlocks.ts"

export interface Targets {
  /** Layers to keep; all when undefined. */
  readonly layers?: number | undefined
  /** Hidden width; unchanged (no rotation) when undefined. */
  readonly hidden?: number | undefined
  /** FFN neurons per layer; all when undefined. */
  readonly ffn?: number | undefined
  /** Make the child's lm_head its input embedding; by default a tied parent stays tied unless the width is rotated. */
  readonly tieEmbeddings?: boolean | undefined
  /** How a tied child's matrix is formed when tying approximates; `defaultTieFrom` when undefined. */
  readonly tieFrom?: TieFrom | undefined
}

/**
 * How a tied child's shared matrix T and final norm weight n are formed, in the child's basis, from
 * A = E Q (the rotated input embedding) and G = H diag(w_final) Q (the untied child's exact lm_head).
 * The child's logits are T diag(n / s) x' (s = sqrt(D/H), see the norms above), its inputs rows of T.
 * - embed: T = A (inputs exact); n / s fitted to G column by column by least squares;
 * - head: T = G, n = s (outputs exact);
 * - mean: T = (A + G) / 2; n / s fitted as for embed;
 * - fit: S, the symmetric matrix minimising ||A S - G||_F, is R diag(m) R^T; the child's basis turns
 *   by R (a rotation, exact with folded norms: Q becomes Q R), T = A R, n / s = m. Inputs are exact
 *   and outputs are whenever G = A S for a symmetric S: a tied parent's G is A Q^T diag(w) Q, so a
 *   tied parent stays exact through a full-rank rotation, whatever its final norm.
 */
export const tieRules = ["fit", "embed", "head", "mean"] as const
export type TieFrom = typeof tieRules[number]

/**
 * Chosen by held-out NLL before distillation on the embedded parent (untied; data/calib.jsonl,
 * data/heldout.jsonl), nats per token, untied child / fit / embed / head / mean:
 * full-rank rotation 0.680 / 4.19 / 6.77 / 14.56 / 9.97; 5 layers, hidden 112, FFN 320:
 * 1.468 / 4.80 / 6.85 / 14.27 / 9.63 (the rule before --tie-from, embed with diag(Q^T diag(w) Q)
 * as norm and the parent's lm_head dropped: 9.26 and 9.06). Its embedding and lm_head are nearly
 * unrelated (<E Q, G> / ||E Q||^2 = -0.04), so every tied child needs distillation to recover.
 */
export const defaultTieFrom: TieFrom = "fit"

/** How to choose what to keep: by the calibration scores, or at random (the baseline they must beat). */
export type Selection = { readonly kind: "scores" } | { readonly kind: "random"; readonly seed: number }

export interface Plan {
  readonly keptLayers: ReadonlyArray<number>
  readonly layerScores: ReadonlyArray<number>
  /** Per kept layer, the kept FFN neurons in their original order. */
  readonly keptNeurons: ReadonlyArray<ReadonlyArray<number>>
  /** Share of each kept layer's total FFN importance that the kept neurons hold. */
  readonly ffnRetained: ReadonlyArray<number>
  /** How a tied child's matrix is formed; undefined when the child is untied or tied as its unrotated parent is. */
  readonly tieFrom: TieFrom | undefined
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
  const tieApproximates = tied && (h !== undefined || !parent.tieWordEmbeddings)
  return {
    tieFrom: tieApproximates ? targets.tieFrom ?? defaultTieFrom : undefined,
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

/** Row-major product of n x n matrices, `a^T b` when `transposeA`. */
const product = (a: Float64Array, b: Float64Array, n: number, transposeA = false) => {
  const out = new Float64Array(n * n)
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < n; k++) {
      const x = transposeA ? a[k * n + i] : a[i * n + k]
      if (x !== 0) for (let j = 0; j < n; j++) out[i * n + j] += x * b[k * n + j]
    }
  }
  return out
}

/**
 * The symmetric S minimising ||A S - G||_F, from `gram` = A^T A and `cross` = A^T G (n x n, row-major):
 * the normal equations A^T A S + S A^T A = A^T G + G^T A, solved in the eigenbasis U of A^T A, where
 * they decouple into (k_i + k_j) S~_ij = (U^T (A^T G + G^T A) U)_ij.
 */
export const symmetricFit = (gram: Float64Array, cross: Float64Array, n: number): Float64Array => {
  const { values: k, vectors: u } = symmetricEigen(gram, n)
  const both = cross.map((x, index) => x + cross[(index % n) * n + Math.floor(index / n)])
  const inBasis = product(product(u, both, n, true), u, n)
  const solved = inBasis.map((x, index) => {
    const sum = k[Math.floor(index / n)] + k[index % n]
    return sum > 0 ? x / sum : 0
  })
  // U S~ U^T
  const back = product(u, solved, n)
  const ut = new Float64Array(n * n)
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) ut[i * n + j] = u[j * n + i]
  return product(back, ut, n)
}

/** How far a tied child's matrix is from what each side needs (relative Frobenius errors). */
export interface TieFit {
  readonly rule: TieFrom
  /** ||T - A|| / ||A||: the input embedding against the parent's rotated one. */
  readonly inputError: number
  /** ||T diag(n / s) - G|| / ||G||: the output embedding against the untied child's exact lm_head. */
  readonly outputError: number
}

export interface Pruned {
  readonly model: Model.Model
  /** Present when the child is tied by `plan.tieFrom`. */
  readonly tie: TieFit | undefined
  /** The `residualWriters` given to `build`, turned into the child's hidden space as its own writers are. */
  readonly written: ReadonlyArray<tf.Tensor2D>
}

/** ||approximation - target|| and ||target|| (Frobenius), as one [2] tensor: read later, with the other errors. */
const errorTerms = (approximation: RowBlocks.RowBlocks, target: RowBlocks.RowBlocks) =>
  tf.sqrt(tf.stack([
    RowBlocks.sum(approximation, (block, i) => tf.sum(tf.square(tf.sub(block, target[i])))),
    RowBlocks.sum(target, (block) => tf.sum(tf.square(block)))
  ]))

/** The column scales m minimising ||T diag(m) - G||_F. */
const columnFit = (t: RowBlocks.RowBlocks, g: RowBlocks.RowBlocks) =>
  tf.divNoNan(RowBlocks.sum(t, (block, i) => tf.sum(tf.mul(block, g[i]), 0)), RowBlocks.sum(t, (block) => tf.sum(tf.square(block), 0))) as tf.Tensor1D

/** The rotation's basis [D, H] (the identity without one: the norms then fold the same way, exactly). */
const basisOf = (plan: Plan, d: number, h: number) =>
  (plan.rotation ? tf.tensor2d(Float32Array.from(plan.rotation), [d, h]) : tf.eye(d)) as tf.Tensor2D

/** A and G of the tie rules: the rotated embedding [V, H] and the rotated lm_head with the final norm folded in. */
const tieSides = (parent: Model.Model, basis: tf.Tensor2D): { input: RowBlocks.RowBlocks; output: RowBlocks.RowBlocks } => ({
  input: parent.weights.embed.map((block) => matMul<tf.Rank.R2>(block, basis)),
  output: (parent.weights.lmHead ?? parent.weights.embed).map((block) => matMul<tf.Rank.R2>(tf.mul(block, parent.weights.norm), basis))
})

/**
 * The fit rule's change of basis [H, H] and column scales: the eigenvectors and eigenvalues of the
 * symmetric S minimising ||A S - G||. A^T A and A^T G are read back once, asynchronously (a GPU
 * cannot be read synchronously), and solved in float64 on the CPU.
 */
const fitTurn = Effect.fn("Pruning.fitTurn")(function*(parent: Model.Model, plan: Plan, d: number, h: number) {
  const [gram, cross] = tf.tidy(() => {
    const { input, output } = tieSides(parent, basisOf(plan, d, h))
    return [RowBlocks.sum(input, (a) => matMul(a, a, true, false)), RowBlocks.sum(input, (a, i) => matMul(a, output[i], true, false))]
  })
  const [gramValues, crossValues] = yield* Effect.promise(() => Promise.all([gram.data(), cross.data()])).pipe(
    Effect.ensuring(Effect.sync(() => tf.dispose([gram, cross])))
  )
  return symmetricEigen(symmetricFit(Float64Array.from(gramValues), Float64Array.from(crossValues), h), h)
})

/**
 * Builds the pruned model and says how its tie was formed; its tensors are new and belong to the
 * caller. `residualWriters` are other matrices [D, in] whose outputs enter the residual stream as
 * the embeddings do (a Mistral 3 projector's last linear map, its bias as a column): they come back
 * in `written` as Q^T W, so that what they write lands in the child's basis, exactly at full rank.
 */
export const build = Effect.fn("Pruning.build")(function*(parent: Model.Model, plan: Plan, residualWriters: ReadonlyArray<tf.Tensor2D> = []) {
  const config = plan.config
  const d = parent.config.hiddenSize
  const h = config.hiddenSize
  const rule = plan.tieFrom
  const turn = rule === "fit" ? yield* fitTurn(parent, plan, d, h) : undefined
  const { weights, errors, written } = tf.tidy(() => {
    let q = plan.rotation || rule !== undefined ? basisOf(plan, d, h) : undefined // [D, H]
    let tied: { matrix: RowBlocks.RowBlocks; norm: tf.Tensor1D } | undefined
    let errors: tf.Tensor | undefined
    if (rule !== undefined) {
      let { input, output } = tieSides(parent, q!)
      let matrix: RowBlocks.RowBlocks
      let scales: tf.Tensor1D
      if (turn) {
        const change = tf.tensor2d(Float32Array.from(turn.vectors), [h, h])
        q = matMul(q!, change)
        input = input.map((block) => matMul<tf.Rank.R2>(block, change))
        output = output.map((block) => matMul<tf.Rank.R2>(block, change))
        matrix = input
        scales = tf.tensor1d(Float32Array.from(turn.values))
      } else {
        const mean = () => input.map((block, i) => tf.mul(tf.add(block, output[i]), 0.5) as tf.Tensor2D)
        matrix = rule === "embed" ? input : rule === "head" ? output : mean()
        scales = columnFit(matrix, output)
      }
      errors = tf.concat([errorTerms(matrix, input), errorTerms(matrix.map((block) => tf.mul(block, scales) as tf.Tensor2D), output)])
      tied = { matrix, norm: tf.mul(scales, Math.sqrt(d / h)) as tf.Tensor1D }
    }
    const head = parent.weights.lmHead ?? parent.weights.embed
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
    const weights = ((): Model.Weights => {
      if (tied) return { embed: tied.matrix, layers, norm: tied.norm, lmHead: undefined }
      const embed = parent.weights.embed.map((block) => (q ? matMul(block, q) : block.clone()) as tf.Tensor2D)
      // A tied parent kept tied and unrotated: nothing to fold.
      if (config.tieWordEmbeddings) return { embed, layers, norm: parent.weights.norm.clone(), lmHead: undefined }
      return { embed, layers, norm: q ? constantNorm() : parent.weights.norm.clone(), lmHead: head.map((block) => reader(block, parent.weights.norm)) }
    })()
    return { weights, errors, written: residualWriters.map(writer) } as unknown as tf.TensorContainer
  }) as unknown as { weights: Model.Weights; errors: tf.Tensor | undefined; written: Array<tf.Tensor2D> }
  const model = Model.make(config, weights)
  if (rule === undefined || errors === undefined) return { model, tie: undefined, written } satisfies Pruned
  const terms = yield* Effect.promise(() => errors.data()).pipe(Effect.ensuring(Effect.sync(() => errors.dispose())))
  const tie: TieFit = { rule, inputError: terms[0] / terms[1], outputError: terms[2] / terms[3] }
  return { model, tie, written } satisfies Pruned
})

/** The pruned model alone (see `build`). */
export const apply = (parent: Model.Model, plan: Plan): Effect.Effect<Model.Model> => Effect.map(build(parent, plan), (pruned) => pruned.model)
