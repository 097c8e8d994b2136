/**
 * The losses of post-training on the policy's own samples (RECIPE.md sections 3-4): GRPO's
 * group-relative advantages and clipped objective, and online DPO's soft-label loss.
 *
 * Both score responses by the log-probabilities of their tokens under the model, read off one
 * forward pass of prompt + response (`responseLogProbs`), differentiable on every backend.
 *
 * GRPO, as Magistral's recipe (DAPO's choices) has it:
 * - advantage of sample i of a group: `A_i = r_i - mean(r)`, divided by the group's std, by the std
 *   of all advantages of the batch, or by nothing; a group whose rewards are all equal has no
 *   advantage and is dropped (it carries no signal and would only dilute the batch);
 * - per response token: `-min(rho A, clip(rho, 1 - epsLow, 1 + epsHigh) A)` with
 *   `rho = pi(token) / pi_old(token)`, `epsHigh > epsLow` letting unlikely tokens grow ("clip-higher");
 * - optional KL to a reference model with Schulman's k3 estimator,
 *   `k3 = exp(ref - logp) - (ref - logp) - 1` per token (>= 0, unbiased for KL(pi || ref));
 * - each group's terms are summed and divided by the group's generated tokens, then groups are
 *   averaged: long and short responses of a group weigh per token, and every prompt weighs the same.
 *
 * Online DPO with soft labels: `p = P(A beats B)` from the pairwise reward model, and
 * `D = (log pi(A) - log ref(A)) - (log pi(B) - log ref(B))` over the responses' tokens. The loss is
 * `l_p(beta D) = -[p log sigmoid(beta D) + (1 - p) log sigmoid(-beta D)]`, which at p = 1 is DPO's.
 *
 * Our beta-rescaling: we minimise
 *
 *     L_beta(D) = (l_p(beta D) - log 2) / beta
 *
 * a positive rescaling and a shift of l_p, so its minimiser `D* = logit(p) / beta` is DPO's. What it
 * changes is the scale: `dL/dD = sigmoid(beta D) - p`, against `beta (sigmoid(beta D) - p)` for l_p.
 * So for every beta,
 * - `|dL/dD| < 1` and `L_beta(0) = 0`, hence `|L_beta(D)| <= |D|`: loss and gradient stay bounded;
 * - at the reference (D = 0, where training starts) the pull is `1/2 - p` whatever beta;
 * - L_beta has finite limits at both ends, `(1/2 - p) D` as beta -> 0 (a linear, policy-gradient-like
 *   objective with advantage `p - 1/2`) and `p relu(-D) + (1 - p) relu(D)` as beta -> infinity (a
 *   pinball loss), where l_p's gradient vanishes at one end and explodes at the other.
 * beta keeps the one role it should have: how far from the reference the policy may move (the target
 * margin logit(p) / beta), not how hard the loss pulls. A learning rate, a gradient clip and loss
 * curves therefore carry over between betas. (Adam absorbs a constant factor on the gradient; the
 * rescaling still matters for clipping, Adam's epsilon and mixing with other losses.)
 *
 * Both objectives report the weight `Training.step` averages micro-batches by as `tokens`: the
 * number of groups (GRPO) or pairs (ODPO), since each loss is a mean over those.
 */
import * as tf from "@tensorflow/tfjs"
import * as Model from "../model/Model.ts"
import type { Objective } from "./Training.ts"

/** A response sampled for a prompt, as token ids (the response at least one token). */
export interface Completion {
  readonly prompt: ReadonlyArray<number>
  readonly response: ReadonlyArray<number>
  /** A Mistral 3 model's projected features of the prompt's images, one row per image token of the prompt. */
  readonly images?: { readonly features: tf.Tensor2D; readonly tokenId: number }
}

/**
 * `tf.gather` of a 1-D tensor whose gradient is a scatter-add: tfjs' own gradient of gather needs
 * UnsortedSegmentSum, which the wasm backend lacks, while ScatterNd every backend has.
 */
const gather = (x: tf.Tensor1D, index: Int32Array): tf.Tensor1D =>
  tf.customGrad((source) => ({
    value: tf.gather(source as tf.Tensor1D, tf.tensor1d(index, "int32")),
    // Built from the JS array: a tensor made outside would be gone when the backward pass runs.
    gradFunc: (dy) => tf.scatterND(tf.tensor2d(index, [index.length, 1], "int32"), dy, x.shape)
  }))(x) as tf.Tensor1D

/**
 * The log-probability of each response token given what precedes it: [N, R], R the longest
 * response, exactly 0 past each response's end (so a row's sum is its response's log-probability).
 * One forward pass of prompt + response, rows right-padded: every token sits at its own position.
 * Differentiable w.r.t. the model's weights; the tensor is the caller's.
 */
export const responseLogProbs = (model: Model.Model, completions: ReadonlyArray<Completion>): tf.Tensor2D =>
  tf.tidy(() => {
    const n = completions.length
    const width = Math.max(...completions.map((c) => c.prompt.length + c.response.length)) - 1
    const r = Math.max(...completions.map((c) => c.response.length))
    const ids = completions.map((c) => {
      const row = [...c.prompt, ...c.response].slice(0, -1)
      return [...row, ...new Array<number>(width - row.length).fill(0)]
    })
    const attentionMask = completions.map((c) =>
      Array.from({ length: width }, (_, j) => (j < c.prompt.length + c.response.length - 1 ? 1 : 0))
    )
    const seeing = completions.flatMap((c) => (c.images === undefined ? [] : [c.images]))
    const imageFeatures = seeing.length === 0 ? undefined : { features: tf.concat(seeing.map((images) => images.features), 0) as tf.Tensor2D, tokenId: seeing[0].tokenId }
    const logits = Model.forward(model, ids, { attentionMask, imageFeatures }).logits
    const v = logits.shape[2]
    // Response token k of row i is predicted at position prompt.length - 1 + k; past the end, index 0.
    const index = new Int32Array(n * r)
    const mask = new Float32Array(n * r)
    completions.forEach((c, i) =>
      c.response.forEach((token, k) => {
        index[i * r + k] = (i * width + c.prompt.length - 1 + k) * v + token
        mask[i * r + k] = 1
      })
    )
    const logProbs = tf.logSoftmax(logits.reshape([n * width, v])).reshape([n * width * v]) as tf.Tensor1D
    return tf.mul(gather(logProbs, index), tf.tensor1d(mask)).reshape([n, r]) as tf.Tensor2D
  })

export type StdNormalisation = "group" | "batch" | "none"

const mean = (xs: ReadonlyArray<number>) => xs.reduce((a, b) => a + b, 0) / xs.length

/** Population standard deviation. */
const std = (xs: ReadonlyArray<number>) => {
  const m = mean(xs)
  return Math.sqrt(mean(xs.map((x) => (x - m) ** 2)))
}

/**
 * Group-relative advantages of each group's rewards: mean-subtracted per group, then divided by the
 * group's std, the std of all the batch's advantages, or nothing. A group whose rewards are all
 * equal (a single reward included) is dropped: undefined.
 */
export const advantages = (
  groups: ReadonlyArray<ReadonlyArray<number>>,
  normalisation: StdNormalisation
): Array<Array<number> | undefined> => {
  const centred = groups.map((rewards) =>
    rewards.every((reward) => reward === rewards[0]) ? undefined : rewards.map((reward) => reward - mean(rewards))
  )
  // The kept groups' advantages have mean 0 together, so their RMS is the batch's std.
  const kept = centred.flatMap((group) => group ?? [])
  const batchStd = Math.sqrt(mean(kept.map((a) => a * a)))
  return centred.map((group, g) => {
    if (group === undefined) return undefined
    const scale = normalisation === "group" ? std(groups[g]) : normalisation === "batch" ? batchStd : 1
    return group.map((a) => a / scale)
  })
}

/** A sampled response as GRPO's loss sees it, aligned with a row of `responseLogProbs`. */
export interface GrpoRow {
  /** Which group (prompt) of the batch the response belongs to. */
  readonly group: number
  readonly advantage: number
  /** Per response token, under the policy that sampled it (the ratio's denominator). */
  readonly oldLogProbs: ReadonlyArray<number>
  /** Per response token, under the reference model; needed when `klCoef > 0`. */
  readonly refLogProbs?: ReadonlyArray<number> | undefined
}

export interface GrpoOptions {
  readonly epsLow: number
  readonly epsHigh: number
  /** Weight of the k3 KL to the reference; 0 (Magistral) leaves it out of the loss. */
  readonly klCoef: number
}

export interface Grpo extends Objective {
  /**
   * `clip_fraction`: tokens whose clipped term is the smaller, so that they pass no gradient;
   * `kl`: the k3 estimate, when the rows have reference log-probs. Token means within each group,
   * averaged over groups, as the loss.
   */
  readonly metrics: { readonly clip_fraction: tf.Scalar; readonly kl?: tf.Scalar }
}

/** GRPO's clipped objective of the policy's `logProbs` [N, R] (from `responseLogProbs`) over `rows`. */
export const grpo = (logProbs: tf.Tensor2D, rows: ReadonlyArray<GrpoRow>, options: GrpoOptions): Grpo => {
  const [n, r] = logProbs.shape
  const withKl = rows.every((row) => row.refLogProbs !== undefined)
  if (options.klCoef > 0 && !withKl) throw new Error("PolicyLoss.grpo: klCoef > 0 needs every row's reference log-probs")
  const groupTokens = new Map<number, number>()
  for (const row of rows) groupTokens.set(row.group, (groupTokens.get(row.group) ?? 0) + row.oldLogProbs.length)
  const groups = groupTokens.size
  // Per token: the weight (1 / (groups * the group's tokens), 0 past a response), old and reference log-probs, advantage.
  const weight = new Float32Array(n * r)
  const old = new Float32Array(n * r)
  const ref = new Float32Array(n * r)
  const advantage = new Float32Array(n * r)
  rows.forEach((row, i) =>
    row.oldLogProbs.forEach((value, t) => {
      weight[i * r + t] = 1 / (groups * groupTokens.get(row.group)!)
      old[i * r + t] = value
      ref[i * r + t] = row.refLogProbs?.[t] ?? 0
      advantage[i * r + t] = row.advantage
    })
  )
  return tf.tidy(() => {
    const w = tf.tensor2d(weight, [n, r])
    const a = tf.tensor2d(advantage, [n, r])
    const ratio = tf.exp(tf.sub(logProbs, tf.tensor2d(old, [n, r])))
    const unclipped = tf.mul(ratio, a)
    const clipped = tf.mul(tf.clipByValue(ratio, 1 - options.epsLow, 1 + options.epsHigh), a)
    let perToken = tf.neg(tf.minimum(unclipped, clipped))
    const clipFraction = tf.sum(tf.mul(w, tf.cast(tf.less(clipped, unclipped), "float32"))) as tf.Scalar
    if (!withKl) return { loss: tf.sum(tf.mul(w, perToken)) as tf.Scalar, tokens: groups, metrics: { clip_fraction: clipFraction } }
    const logRatio = tf.sub(tf.tensor2d(ref, [n, r]), logProbs)
    const k3 = tf.sub(tf.sub(tf.exp(logRatio), logRatio), 1)
    const kl = tf.sum(tf.mul(w, k3)) as tf.Scalar
    if (options.klCoef > 0) perToken = tf.add(perToken, tf.mul(k3, options.klCoef))
    return { loss: tf.sum(tf.mul(w, perToken)) as tf.Scalar, tokens: groups, metrics: { clip_fraction: clipFraction, kl } }
  })
}

/** A pair of responses to one prompt as online DPO's loss sees it. */
export interface PreferencePair {
  /** P(A beats B), the soft label. */
  readonly p: number
  /** log ref(A) and log ref(B): the responses' log-probabilities under the reference model. */
  readonly refA: number
  readonly refB: number
}

export interface Odpo extends Objective {
  /**
   * `margin`: mean D; `agreement`: how often the policy's implicit reward orders a pair as the
   * labels do, `p [D > 0] + (1 - p) [D < 0]` (a tie counting half), averaged over pairs; `kl`: mean
   * `log pi(y) - log ref(y)` over the 2N responses, their KL to the reference when they are the
   * policy's samples (in expectation, at temperature 1).
   */
  readonly metrics: { readonly margin: tf.Scalar; readonly agreement: tf.Scalar; readonly kl: tf.Scalar }
}

/**
 * The beta-rescaled soft-label DPO loss (see the module's docs) of the policy's response
 * log-probabilities `logProbsA`, `logProbsB` [N], averaged over the N pairs.
 */
export const odpo = (logProbsA: tf.Tensor1D, logProbsB: tf.Tensor1D, pairs: ReadonlyArray<PreferencePair>, beta: number): Odpo => {
  if (!(beta > 0)) throw new Error(`PolicyLoss.odpo: beta must be positive, got ${beta}`)
  const n = pairs.length
  return tf.tidy(() => {
    const p = tf.tensor1d(pairs.map((pair) => pair.p))
    const ratioA = tf.sub(logProbsA, tf.tensor1d(pairs.map((pair) => pair.refA)))
    const ratioB = tf.sub(logProbsB, tf.tensor1d(pairs.map((pair) => pair.refB)))
    const d = tf.sub(ratioA, ratioB)
    // -log sigmoid(x) = softplus(-x), stable for any x.
    const x = tf.mul(d, beta)
    const soft = tf.add(tf.mul(p, tf.softplus(tf.neg(x))), tf.mul(tf.sub(1, p), tf.softplus(x)))
    const loss = tf.div(tf.mean(tf.sub(soft, Math.LN2)), beta) as tf.Scalar
    // p [D > 0] + (1 - p) [D < 0] + 1/2 [D = 0]: (1 + sign(D)) / 2 weighs p, (1 - sign(D)) / 2 weighs 1 - p.
    const sign = tf.sign(d)
    const agreement = tf.mean(tf.div(tf.add(tf.mul(p, tf.add(1, sign)), tf.mul(tf.sub(1, p), tf.sub(1, sign))), 2)) as tf.Scalar
    return { loss, tokens: n, metrics: { margin: tf.mean(d) as tf.Scalar, agreement, kl: tf.mean(tf.concat([ratioA, ratioB])) as tf.Scalar } }
  })
}
