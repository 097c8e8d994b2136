/**
 * Losses over logits. Means are taken over the positions a mask selects, in float32 tensors; sums
 * that outlive a batch are accumulated by callers in float64.
 *
 * Distillation is forward KL, `KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))` per token,
 * averaged over the tokens a [B][T] mask keeps. The teacher comes as full log-probabilities or as
 * its top-k, and is first turned into a `Target` (`teacherTarget`, outside the gradient tape, since
 * nothing flows back into the teacher); `distillation` then compares the student's logits with it.
 *
 * Choices, since the recipe publishes none:
 * - Temperature T softens both sides, `softmax(logits / T)`, and the KL is multiplied by T^2
 *   (Hinton et al.): its gradient w.r.t. the logits is `T (softmax(z/T) - p_t)` per token, so a
 *   learning rate and a cross-entropy weight tuned at T = 1 keep their meaning at another T. The
 *   `kl` metric is the plain KL between the softened distributions, without T^2.
 * - Top-k: the teacher's k probabilities are renormalised over the k ids and compared with the
 *   student's full softmax, a true KL over the vocabulary that also pushes the student's mass off
 *   the other ids. With `restBucket`, the teacher's remaining mass `1 - sum(top-k)` is kept as one
 *   more category and matched against the student's mass on the other ids: a (k+1)-way KL. The
 *   teacher's tail logits are unknown, so at T != 1 the k+1 categories are softened as they stand
 *   (the rest bucket as one category); at T = 1 this is exact.
 * - Vocabularies that differ by padding rows are aligned on their common prefix: with full
 *   log-probs both sides are renormalised over the first min(Vt, Vs) ids; with top-k, ids at or
 *   above the student's vocabulary are dropped and the rest renormalised. The teacher's probability
 *   dropped so (per kept token) must stay at or below `maxOutsideMass`, else `teacherTarget` fails
 *   with `TeacherVocabularyError`: padding rows carry negligible mass, so more means that the two
 *   vocabularies do not match.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import { matMul } from "../model/MatMul.ts"
import * as Model from "../model/Model.ts"
import * as RowBlocks from "../model/RowBlocks.ts"
import type { Objective } from "./Training.ts"

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

/** The teacher at every position: full log-probabilities, or the ids and log-probabilities of its top-k. */
export type Teacher =
  | { readonly _tag: "Full"; readonly logProbs: tf.Tensor3D } // [B, T, Vt]
  | { readonly _tag: "TopK"; readonly ids: tf.Tensor3D; readonly logProbs: tf.Tensor3D } // [B, T, k] int32, float32

export interface Options {
  /** Softens teacher and student alike; the KL is scaled by T^2. */
  readonly temperature: number
  /** w in `loss = T^2 KL + w CE`, CE the next-token cross-entropy at T = 1. */
  readonly crossEntropyWeight: number
  /** Top-k only: match the teacher's mass outside its top-k as a (k+1)-th category. */
  readonly restBucket: boolean
  /** Teacher probability per token that may fall outside the student's vocabulary and be dropped. */
  readonly maxOutsideMass: number
}

export const defaultOptions: Options = { temperature: 1, crossEntropyWeight: 0, restBucket: false, maxOutsideMass: 1e-3 }

/** A teacher that puts more than negligible probability on ids the student's vocabulary lacks. */
export class TeacherVocabularyError extends Schema.TaggedError<TeacherVocabularyError>()("TeacherVocabularyError", {
  studentVocab: Schema.Number,
  mass: Schema.Number,
  maxMass: Schema.Number
}) {
  override get message() {
    return `the teacher puts ${this.mass.toPrecision(3)} of a token's probability on ids outside the student's ` +
      `vocabulary (${this.studentVocab}); at most ${this.maxMass} may be dropped. Do the tokenizers match?`
  }
}

/** The teacher as the loss consumes it, over N = B*T positions and the V ids compared, at temperature T. */
export type Target = {
  /** [N, V] teacher probabilities, zero off its top-k. */
  readonly probs: tf.Tensor2D
  /** [N] `sum q log q` over the teacher's categories: the constant part of the KL. */
  readonly negEntropy: tf.Tensor1D
  /** With a rest bucket: [N, V] 1 on the top-k ids, 0 elsewhere, and [N] the teacher's rest probability. */
  readonly rest: { readonly inTopK: tf.Tensor2D; readonly probs: tf.Tensor1D } | undefined
}

/** Stands for log 0 where -Infinity would give 0 * -Infinity = NaN. */
const LOG_ZERO = -1e30

const flatMask = (mask: ReadonlyArray<ArrayLike<number>>) => Float32Array.from(mask.flatMap((row) => Array.from(row)))

/**
 * Turns the teacher into the target of a student whose vocabulary has `studentVocab` ids, on the
 * positions `mask` ([B][T]) keeps. The target's tensors are released with the scope.
 */
export const teacherTarget = Effect.fn("Loss.teacherTarget")(function*(
  teacher: Teacher,
  studentVocab: number,
  mask: ReadonlyArray<ArrayLike<number>>,
  options: Options
) {
  // A full teacher no wider than the student puts no mass outside it, and needs no read of the GPU.
  const outside = teacher._tag === "Full" && teacher.logProbs.shape[2] <= studentVocab ? 0 : yield* Effect.promise(async () => {
    const largest = tf.tidy(() => {
      const mass = teacher._tag === "Full"
        ? fullOutsideMass(teacher.logProbs, studentVocab)
        : topKOutsideMass(teacher, studentVocab)
      return tf.max(tf.mul(mass, tf.tensor1d(flatMask(mask))))
    })
    try {
      return (await largest.data())[0]
    } finally {
      largest.dispose()
    }
  })
  if (outside > options.maxOutsideMass) {
    return yield* new TeacherVocabularyError({ studentVocab, mass: outside, maxMass: options.maxOutsideMass })
  }
  return yield* Effect.acquireRelease(
    Effect.sync(() =>
      tf.tidy(() =>
        teacher._tag === "Full"
          ? fullTarget(teacher.logProbs, studentVocab, options.temperature)
          : topKTarget(teacher, studentVocab, options)
      )
    ),
    (target) =>
      Effect.sync(() => {
        tf.dispose([target.probs, target.negEntropy])
        if (target.rest) tf.dispose([target.rest.inTopK, target.rest.probs])
      })
  )
})

/** [B, T, Vt] -> [N]: teacher probability on ids at or above `studentVocab`. */
const fullOutsideMass = (logProbs: tf.Tensor3D, studentVocab: number) => {
  const [b, t, vt] = logProbs.shape
  if (vt <= studentVocab) return tf.zeros([b * t])
  return tf.sum(tf.exp(logProbs.reshape([b * t, vt]).slice([0, studentVocab], [b * t, vt - studentVocab])), -1)
}

/** [B, T, k] -> [N]: teacher probability on top-k ids at or above `studentVocab`. */
const topKOutsideMass = (teacher: { ids: tf.Tensor3D; logProbs: tf.Tensor3D }, studentVocab: number) => {
  const [b, t, k] = teacher.ids.shape
  const outside = tf.greaterEqual(teacher.ids.reshape([b * t, k]), studentVocab)
  return tf.sum(tf.mul(tf.exp(teacher.logProbs.reshape([b * t, k])), tf.cast(outside, "float32")), -1)
}

/** `sum q log q` over the last axis from log q, with 0 log 0 = 0. */
const sumQLogQ = (logQ: tf.Tensor) => tf.sum(tf.mul(tf.exp(logQ), tf.maximum(logQ, LOG_ZERO)), -1) as tf.Tensor1D

/** Full teacher: renormalised over the common prefix of the two vocabularies, then softened. */
const fullTarget = (logProbs: tf.Tensor3D, studentVocab: number, temperature: number): Target => {
  const [b, t, vt] = logProbs.shape
  const v = Math.min(vt, studentVocab)
  const prefix = logProbs.reshape([b * t, vt]).slice([0, 0], [b * t, v])
  const logQ = tf.logSoftmax(tf.div(tf.maximum(prefix, LOG_ZERO), temperature)) // [N, V]
  return { probs: tf.exp(logQ) as tf.Tensor2D, negEntropy: sumQLogQ(logQ), rest: undefined }
}

/**
 * Top-k teacher: the k log-probabilities (and with a rest bucket the rest's), those outside the
 * student's vocabulary dropped, renormalised and softened; then scattered onto the vocabulary.
 */
const topKTarget = (
  teacher: { ids: tf.Tensor3D; logProbs: tf.Tensor3D },
  studentVocab: number,
  options: Options
): Target => {
  const [b, t, k] = teacher.ids.shape
  const n = b * t
  const ids = teacher.ids.reshape([n, k]) as tf.Tensor2D
  const logP = tf.maximum(teacher.logProbs.reshape([n, k]), LOG_ZERO)
  const inside = tf.less(ids, studentVocab)
  const kept = tf.where(inside, logP, tf.fill([n, k], LOG_ZERO)) // [N, k]
  // The rest is 1 minus all k probabilities, dropped ids' included, so that renormalising the kept
  // categories gives the teacher renormalised over the student's vocabulary.
  const restLog = tf.log(tf.relu(tf.sub(1, tf.sum(tf.exp(logP), -1, true)))) // [N, 1], -Infinity when empty
  const categories = options.restBucket ? tf.concat([kept, tf.maximum(restLog, LOG_ZERO)], 1) : kept
  const logQ = tf.logSoftmax(tf.div(categories, options.temperature)) // [N, k(+1)]
  // (row, id) pairs; ids outside the vocabulary point at id 0 and add zero there.
  const rows = tf.tile(tf.range(0, n, 1, "int32").reshape([n, 1]), [1, k])
  const index = tf.stack([rows, tf.where(inside, ids, tf.zerosLike(ids))], -1).reshape([n * k, 2])
  const scatter = (values: tf.Tensor) => tf.scatterND(index, values.reshape([n * k]), [n, studentVocab]) as tf.Tensor2D
  return {
    probs: scatter(tf.exp(logQ.slice([0, 0], [n, k]))),
    negEntropy: sumQLogQ(logQ),
    rest: options.restBucket
      ? {
        inTopK: scatter(tf.cast(inside, "float32")),
        probs: tf.exp(logQ.slice([0, k], [n, 1])).reshape([n]) as tf.Tensor1D
      }
      : undefined
  }
}

/** The loss to minimise and its metrics, means over `tokens`: scalar tensors, the caller's. */
export interface Distillation extends Objective {
  /** `kl`: KL(teacher || student) at the temperature; `ce`: the student's next-token cross-entropy at T = 1; nats per token. */
  readonly metrics: { readonly kl: tf.Scalar; readonly ce: tf.Scalar }
}

/** Per-token weights of a batch: the KL's (mask / tokens) and the cross-entropy's, and the next tokens. */
interface Weighting {
  readonly tokens: number
  readonly klWeights: Float32Array // [N], sums to 1 over the KL's positions
  readonly ceWeights: Float32Array // [N], sums to 1 over the cross-entropy's positions
  readonly nextTokens: Int32Array // [N]
}

const weighting = (batch: DistillationBatch): Weighting => {
  const mask = flatMask(batch.mask)
  const tokens = mask.reduce((sum, keep) => sum + keep, 0)
  const ceMask = batch.crossEntropyMask === undefined ? mask : flatMask(batch.crossEntropyMask)
  const ceTokens = ceMask.reduce((sum, keep) => sum + keep, 0)
  return {
    tokens,
    klWeights: mask.map((keep) => keep / Math.max(tokens, 1)),
    ceWeights: ceMask.map((keep) => keep / Math.max(ceTokens, 1)),
    nextTokens: Int32Array.from(batch.targets.flatMap((row) => Array.from(row)))
  }
}

export interface DistillationBatch {
  readonly mask: ReadonlyArray<ArrayLike<number>>
  readonly targets: ReadonlyArray<ArrayLike<number>>
  readonly crossEntropyMask?: ReadonlyArray<ArrayLike<number>>
}

/**
 * The distillation loss of student logits [B, T, Vs] against a target: the KL over the positions
 * `mask` keeps, the cross-entropy of the next tokens `targets` over those `crossEntropyMask` keeps
 * (`mask` when left out): a position may have a teacher distribution but no next token, as the
 * last token of a packed row has. Both are means over their own positions; `tokens` counts the
 * KL's. Differentiable w.r.t. the logits.
 */
export const distillation = (logits: tf.Tensor3D, target: Target, batch: DistillationBatch, options: Options): Distillation => {
  const [b, t, vs] = logits.shape
  const weights = weighting(batch)
  return tf.tidy(() => {
    const z = logits.reshape([b * t, vs]) as tf.Tensor2D
    const kl = tf.sum(tf.mul(perTokenKL(z, target, options.temperature), weights.klWeights))
    const ce = tf.sum(tf.mul(nextTokenCrossEntropy(z, weights.nextTokens), weights.ceWeights))
    return { loss: combined(kl, ce, options), tokens: weights.tokens, metrics: { kl: kl as tf.Scalar, ce: ce as tf.Scalar } }
  })
}

/** What a training forward pass reads beside the ids: padding, document starts, image features. */
export type ForwardInputs = Pick<Model.ForwardOptions, "attentionMask" | "documentStarts" | "imageFeatures">

/**
 * The distillation loss of `model` on `ids`: `distillation` of its logits, or with `headChunk`
 * `chunkedDistillation` of its final hidden states, the LM head applied that many tokens at a time.
 */
export const ofModel = (
  model: Model.Model,
  ids: ReadonlyArray<ArrayLike<number>>,
  masks: ForwardInputs,
  target: Target,
  batch: DistillationBatch,
  options: Options,
  headChunk: number | undefined
): Distillation =>
  headChunk === undefined
    ? distillation(Model.forward(model, ids, masks).logits, target, batch, options)
    : chunkedDistillation(Model.forwardHidden(model, ids, masks), Model.head(model), target, batch, options, headChunk)

/** The loss from the mean KL and cross-entropy: `T^2 KL + w CE`. */
const combined = (kl: tf.Tensor, ce: tf.Tensor, options: Options) => {
  const scaled = tf.mul(kl, options.temperature * options.temperature)
  return (options.crossEntropyWeight === 0 ? scaled : tf.add(scaled, tf.mul(ce, options.crossEntropyWeight))) as tf.Scalar
}

/** [N, Vs] logits -> [N] KL(teacher || student) at the temperature: `sum q log q - sum q log s`. */
const perTokenKL = (z: tf.Tensor2D, target: Target, temperature: number) => {
  const [n] = z.shape
  const v = target.probs.shape[1]
  const cross = target.rest === undefined
    ? tf.sum(tf.mul(target.probs, tf.logSoftmax(tf.div(z.slice([0, 0], [n, v]), temperature))), -1)
    : restBucketCross(z, target.probs, target.rest, temperature)
  return tf.sub(target.negEntropy, cross) // [N]
}

/** The target's rows [start, start + n). */
const targetRows = (target: Target, start: number, n: number): Target => ({
  probs: target.probs.slice([start, 0], [n, -1]),
  negEntropy: target.negEntropy.slice([start], [n]),
  rest: target.rest && { inTopK: target.rest.inTopK.slice([start, 0], [n, -1]), probs: target.rest.probs.slice([start], [n]) }
})

/**
 * The gradient of `T^2 sum_r w_r KL_r` w.r.t. logits [N, Vs], w the KL weights [N, 1]:
 * `T w (S p - q)` on the compared ids, p the student's softened softmax, q the teacher, S = sum q
 * (1, up to rounding). With a rest bucket, the ids off the top-k share the rest category's
 * `T w (S p_rest - q_rest)` in proportion to their softmax among themselves.
 */
const klGradient = (z: tf.Tensor2D, target: Target, weights: tf.Tensor, temperature: number): tf.Tensor2D => {
  const [n, vs] = z.shape
  const scale = tf.mul(weights, temperature)
  if (target.rest === undefined) {
    const v = target.probs.shape[1]
    const p = tf.softmax(tf.div(z.slice([0, 0], [n, v]), temperature))
    const onCompared = tf.mul(tf.sub(tf.mul(p, tf.sum(target.probs, -1, true)), target.probs), scale)
    return (v === vs ? onCompared : tf.concat([onCompared, tf.zeros([n, vs - v])], 1)) as tf.Tensor2D
  }
  const { inTopK, probs: restProbs } = target.rest
  const topK = tf.add(tf.div(z, temperature), tf.mul(tf.sub(1, inTopK), LOG_ZERO)) // [N, V]
  const tail = tf.div(tf.logSumExp(tf.add(z, tf.mul(inTopK, LOG_ZERO)), -1, true), temperature) // [N, 1]
  const normaliser = tf.logSumExp(tf.concat([topK, tail], 1), -1, true) // [N, 1]
  const total = tf.add(tf.sum(target.probs, -1, true), restProbs.reshape([n, 1])) // S
  const onTopK = tf.sub(tf.mul(tf.exp(tf.sub(topK, normaliser)), total), target.probs)
  const restShare = tf.sub(tf.mul(tf.exp(tf.sub(tail, normaliser)), total), restProbs.reshape([n, 1])) // [N, 1]
  const offTopK = tf.mul(tf.softmax(tf.add(z, tf.mul(inTopK, LOG_ZERO))), restShare)
  return tf.mul(tf.add(tf.mul(onTopK, inTopK), tf.mul(offTopK, tf.sub(1, inTopK))), scale) as tf.Tensor2D
}

/**
 * The distillation loss of `distillation`, with the LM head applied here a chunk of `chunkRows`
 * tokens at a time: hidden states [B, T, D] (the final norm's output) and the head's row blocks
 * [V_i, D] in. Each chunk's logits [chunk, V] are made, scored and turned into their gradient at
 * once, which flows into the hidden states and the head; no [B*T, V] logits are kept, so the loss
 * fits where they would not (more than one storage binding on a GPU) and holds less memory.
 * Equal to `distillation` of the logits up to float rounding, in value and gradient.
 */
export const chunkedDistillation = (
  hidden: tf.Tensor3D,
  head: ReadonlyArray<tf.Tensor2D>,
  target: Target,
  batch: DistillationBatch,
  options: Options,
  chunkRows: number
): Distillation => {
  if (!Number.isInteger(chunkRows) || chunkRows < 1) throw new RangeError(`Loss.chunkedDistillation: chunks of ${chunkRows} tokens; give a whole number of 1 or more`)
  const [b, t, d] = hidden.shape
  const n = b * t
  const vocab = RowBlocks.rowCount(head)
  // A chunk's logits are one tensor, held to one storage binding as a forward pass's are.
  Model.checkLogitsFit(head, 1, Math.min(chunkRows, n))
  const weights = weighting(batch)
  // A next token outside the vocabulary has no one-hot row, so no cross-entropy (as in `distillation`): no gradient either.
  const ceWeights = weights.ceWeights.map((weight, i) => (weights.nextTokens[i] >= 0 && weights.nextTokens[i] < vocab ? weight : 0))
  const temperature = options.temperature
  let kl: tf.Scalar | undefined
  let ce: tf.Scalar | undefined
  const fused = tf.customGrad((...args) => {
    const save = args.pop() as tf.GradSaveFunc
    const [flat, ...blocks] = args as Array<tf.Tensor2D>
    const columns = blocks.map((block) => block.shape[0])
    const sums = { kl: tf.keep(tf.scalar(0)), ce: tf.keep(tf.scalar(0)) }
    const hiddenGrads: Array<tf.Tensor> = []
    let headGrads = blocks.map((block) => tf.zerosLike(block) as tf.Tensor)
    for (let start = 0; start < n; start += chunkRows) {
      const rows = Math.min(chunkRows, n - start)
      tf.tidy(() => {
        const h = flat.slice([start, 0], [rows, d])
        const z = tf.concat(blocks.map((block) => matMul(h, block, false, true)), 1) as tf.Tensor2D // [rows, V]
        const chunk = targetRows(target, start, rows)
        const klWeights = tf.tensor2d(weights.klWeights.subarray(start, start + rows), [rows, 1])
        const chunkCeWeights = tf.tensor2d(ceWeights.subarray(start, start + rows), [rows, 1])
        const nextTokens = weights.nextTokens.subarray(start, start + rows)
        const chunkKL = tf.sum(tf.mul(perTokenKL(z, chunk, temperature), klWeights.reshape([rows])))
        const chunkCE = tf.sum(tf.mul(nextTokenCrossEntropy(z, nextTokens), chunkCeWeights.reshape([rows])))
        let grad: tf.Tensor = klGradient(z, chunk, klWeights, temperature)
        if (options.crossEntropyWeight !== 0) {
          // d CE / dz = softmax(z) - onehot(next token), per token
          const ceGrad = tf.sub(tf.softmax(z), tf.oneHot(tf.tensor1d(nextTokens, "int32"), z.shape[1]))
          grad = tf.add(grad, tf.mul(ceGrad, tf.mul(chunkCeWeights, options.crossEntropyWeight)))
        }
        const byBlock = tf.split(grad, columns, 1)
        hiddenGrads.push(tf.keep(byBlock.map((g, i) => matMul(g, blocks[i])).reduce((sum, term) => tf.add(sum, term))))
        const previous = headGrads
        headGrads = byBlock.map((g, i) => tf.keep(tf.add(previous[i], matMul(g, h, true, false))))
        tf.dispose(previous)
        const previousSums = sums.kl
        const previousCE = sums.ce
        sums.kl = tf.keep(tf.add(previousSums, chunkKL))
        sums.ce = tf.keep(tf.add(previousCE, chunkCE))
        tf.dispose([previousSums, previousCE])
      })
    }
    // Kept: the metrics outlive this scope, the caller's to dispose.
    kl = sums.kl as tf.Scalar
    ce = sums.ce as tf.Scalar
    // save keeps copies (and none when no gradient is taken): the kept pieces are freed here.
    save([tf.concat(hiddenGrads, 0), ...headGrads])
    tf.dispose([...hiddenGrads, ...headGrads])
    return {
      value: combined(kl, ce, options),
      gradFunc: (dy: tf.Tensor, saved: Array<tf.Tensor>) => saved.map((grad) => tf.mul(grad, dy))
    }
  })
  const loss = tf.tidy(() => fused(hidden.reshape([n, d]), ...head)) as tf.Scalar
  return { loss, tokens: weights.tokens, metrics: { kl: kl!, ce: ce! } }
}

/**
 * `sum_c q_c log s_c` over the k+1 categories: the student's logits on the top-k ids and the
 * log-sum-exp of its other logits as the rest, softened together. [N, Vs] logits -> [N].
 */
const restBucketCross = (
  z: tf.Tensor2D,
  probs: tf.Tensor2D,
  rest: { readonly inTopK: tf.Tensor2D; readonly probs: tf.Tensor1D },
  temperature: number
) => {
  const inTopK = rest.inTopK
  const offTopK = tf.sub(1, inTopK)
  const topK = tf.add(tf.div(z, temperature), tf.mul(offTopK, LOG_ZERO)) // [N, V], LOG_ZERO off the top-k
  const tail = tf.div(tf.logSumExp(tf.add(z, tf.mul(inTopK, LOG_ZERO)), -1, true), temperature) // [N, 1]
  const normaliser = tf.logSumExp(tf.concat([topK, tail], 1), -1, true) // [N, 1]
  // probs is 0 where topK is LOG_ZERO, so those terms vanish instead of becoming NaN.
  return tf.add(
    tf.sum(tf.mul(probs, tf.sub(topK, normaliser)), -1),
    tf.mul(rest.probs, tf.sub(tail, normaliser).reshape([-1]))
  )
}

/**
 * [N, Vs] logits and [N] next tokens -> [N] cross-entropy. A one-hot product rather than a
 * gather, whose gradient the wasm backend lacks.
 */
const nextTokenCrossEntropy = (z: tf.Tensor2D, nextTokens: Int32Array) =>
  tf.neg(tf.sum(tf.mul(tf.oneHot(tf.tensor1d(nextTokens, "int32"), z.shape[1]), tf.logSoftmax(z)), -1))
