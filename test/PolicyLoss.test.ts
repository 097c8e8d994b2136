import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as Model from "../src/model/Model.ts"
import * as PolicyLoss from "../src/train/PolicyLoss.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Training from "../src/train/Training.ts"
import { keepMetrics, maxAbsDiff, onBackend, readMetrics, sharedFixture, take } from "./support.ts"

const softplus = (x: number) => Math.max(x, 0) + Math.log1p(Math.exp(-Math.abs(x)))
const sigmoid = (x: number) => 1 / (1 + Math.exp(-x))

describe("PolicyLoss.advantages", () => {
  it("subtracts the group mean and divides by the group's std, the batch's or nothing; all-equal groups are dropped", () => {
    // Group 0: mean 1/2, std 1/2. Groups 1 and 2: all equal (one reward alone counts as such).
    assert.deepStrictEqual(PolicyLoss.advantages([[1, 0, 0, 1], [0.5, 0.5], [1]], "group"), [[1, -1, -1, 1], undefined, undefined])
    assert.deepStrictEqual(PolicyLoss.advantages([[1, 0, 0, 1], [0.5, 0.5]], "none"), [[0.5, -0.5, -0.5, 0.5], undefined])
    // Centred: [3/4, -1/4, -1/4, -1/4] and [-1/2, 1/2]; the std of those six is sqrt(1.25 / 6).
    const batch = PolicyLoss.advantages([[1, 0, 0, 0], [0, 1]], "batch")
    const std = Math.sqrt(1.25 / 6)
    assert.isAtMost(maxAbsDiff(batch.flatMap((group) => group!), [0.75, -0.25, -0.25, -0.25, -0.5, 0.5].map((a) => a / std)), 1e-12)
  })

  const Groups = Schema.Array(
    Schema.Array(Schema.Literals([0, 0.25, 0.5, 1])).check(Schema.isBetweenLength(1, 8))
  ).check(Schema.isBetweenLength(1, 6))

  it.prop("have zero mean in every group kept, and unit std where normalised", {
    groups: Groups,
    normalisation: Schema.Literals(["group", "batch", "none"])
  }, ({ groups, normalisation }) => {
    const result = PolicyLoss.advantages(groups, normalisation)
    const kept = result.flatMap((group) => group ?? [])
    result.forEach((group, g) => {
      assert.strictEqual(group === undefined, groups[g].every((reward) => reward === groups[g][0]))
      if (group === undefined) return
      const mean = group.reduce((a, b) => a + b, 0) / group.length
      assert.isAtMost(Math.abs(mean), 1e-12)
      if (normalisation === "group") assert.approximately(Math.sqrt(group.reduce((a, b) => a + b * b, 0) / group.length), 1, 1e-12)
    })
    if (normalisation === "batch" && kept.length > 0) {
      assert.approximately(Math.sqrt(kept.reduce((a, b) => a + b * b, 0) / kept.length), 1, 1e-12)
    }
  }, { arbitrary: { runs: 200 } })
})

/**
 * The GRPO case worked by hand: old log-probs all -1, ratios as listed, epsLow 0.2, epsHigh 0.28.
 * Group 0 is rows 0 (A = +1, ratios 1.5 and 0.5) and 1 (A = -1, ratio 0.5); group 1 is row 2
 * (A = 2, ratios 1, 1.1, 2). Each group has 3 tokens and there are 2 groups: every token weighs 1/6.
 *   row 0: min(1.5, 1.28) = 1.28 (clipped), min(0.5, 0.8) = 0.5
 *   row 1: min(-0.5, -0.8) = -0.8 (clipped)
 *   row 2: 2, 2.2, min(4, 2.56) = 2.56 (clipped)
 *   loss = -(1.28 + 0.5 - 0.8 + 2 + 2.2 + 2.56) / 6 = -1.29; clipped tokens 3 of 6.
 * A clipped token passes no gradient; the others pass -A rho / 6.
 */
const ratios = [[1.5, 0.5], [0.5], [1, 1.1, 2]]
const rows: Array<PolicyLoss.GrpoRow> = [
  { group: 0, advantage: 1, oldLogProbs: [-1, -1] },
  { group: 0, advantage: -1, oldLogProbs: [-1] },
  { group: 1, advantage: 2, oldLogProbs: [-1, -1, -1] }
]
const current = ratios.map((row) => [...row.map((rho) => -1 + Math.log(rho)), 0, 0].slice(0, 3))
const options: PolicyLoss.GrpoOptions = { epsLow: 0.2, epsHigh: 0.28, klCoef: 0 }

/** The objective's loss, metrics and gradient w.r.t. the log-probs. */
const grpoCase = (logProbs: Array<Array<number>>, grpoRows: ReadonlyArray<PolicyLoss.GrpoRow>, grpoOptions: PolicyLoss.GrpoOptions) =>
  tf.tidy(() => {
    const x = tf.tensor2d(logProbs)
    let result: PolicyLoss.Grpo | undefined
    const { value, grads } = tf.valueAndGrads((lp: tf.Tensor) => {
      result = PolicyLoss.grpo(lp as tf.Tensor2D, grpoRows, grpoOptions)
      keepMetrics(result.metrics)
      return result.loss
    })([x])
    return { loss: value.dataSync()[0], grad: Array.from(grads[0].dataSync()), tokens: result!.tokens, metrics: readMetrics(result!.metrics) }
  })

describe("PolicyLoss.grpo", () => {
  it.effect("equals the clipped objective worked by hand, token-normalised per group", () =>
    Effect.sync(() => {
      const out = grpoCase(current, rows, options)
      assert.approximately(out.loss, -1.29, 1e-6)
      assert.approximately(out.metrics.clip_fraction, 0.5, 1e-6)
      assert.strictEqual(out.tokens, 2)
      assert.isUndefined(out.metrics.kl)
      assert.isAtMost(maxAbsDiff(out.grad, [0, -0.5 / 6, 0, 0, 0, 0, -2 / 6, -2.2 / 6, 0]), 1e-6)
    }).pipe(onBackend("wasm")))

  it.effect("normalises tokens per group, not over the batch: a short group weighs as much as a long one", () =>
    Effect.sync(() => {
      // Group 0 has 2 tokens: row 0 (A = +1, ratio 1.1), row 1 (A = -1, ratio 0.9).
      // Group 1 has 6 tokens: row 2 (A = 1/2, ratios 1, 1, 1.2, 1.2), row 3 (A = -1/2, ratios 1, 1).
      // No ratio leaves [0.8, 1.28]: each token's term is -A rho.
      //   group 0: (-1.1 + 0.9) / 2 = -0.1;  group 1: (-0.5 * 4.4 + 0.5 * 2) / 6 = -0.2
      //   per group: (-0.1 - 0.2) / 2 = -0.15 (batch normalisation would give (-0.2 - 1.2) / 8 = -0.175)
      // Gradient -A rho w, w = 1 / (2 groups * the group's tokens): 1/4 in group 0, 1/12 in group 1.
      const unequal = [[1.1], [0.9], [1, 1, 1.2, 1.2], [1, 1]]
      const unequalRows: Array<PolicyLoss.GrpoRow> = [
        { group: 0, advantage: 1, oldLogProbs: [-1] },
        { group: 0, advantage: -1, oldLogProbs: [-1] },
        { group: 1, advantage: 0.5, oldLogProbs: [-1, -1, -1, -1] },
        { group: 1, advantage: -0.5, oldLogProbs: [-1, -1] }
      ]
      const logProbs = unequal.map((row) => [...row.map((rho) => -1 + Math.log(rho)), 0, 0, 0].slice(0, 4))
      const out = grpoCase(logProbs, unequalRows, options)
      assert.approximately(out.loss, -0.15, 1e-6)
      assert.strictEqual(out.tokens, 2)
      assert.strictEqual(out.metrics.clip_fraction, 0)
      const expected = [
        [-1.1 / 4, 0, 0, 0],
        [0.9 / 4, 0, 0, 0],
        [-0.5 / 12, -0.5 / 12, -0.6 / 12, -0.6 / 12],
        [0.5 / 12, 0.5 / 12, 0, 0]
      ]
      assert.isAtMost(maxAbsDiff(out.grad, expected.flat()), 1e-6)
    }).pipe(onBackend("wasm")))

  it.effect("adds k3 = exp(ref - logp) - (ref - logp) - 1 per token, weighted as the rest", () =>
    Effect.sync(() => {
      // ref = logp + ln 2 on every token: k3 = 2 - ln 2 - 1 everywhere, and the weights sum to 1.
      const withRef = rows.map((row, i) => ({ ...row, refLogProbs: row.oldLogProbs.map((_, t) => current[i][t] + Math.LN2) }))
      const k3 = 1 - Math.LN2
      const reported = grpoCase(current, withRef, options)
      assert.approximately(reported.metrics.kl!, k3, 1e-6)
      assert.approximately(reported.loss, -1.29, 1e-6)
      const penalised = grpoCase(current, withRef, { ...options, klCoef: 0.1 })
      assert.approximately(penalised.loss, -1.29 + 0.1 * k3, 1e-6)
      // d k3 / d logp = 1 - exp(ref - logp) = -1, times klCoef / 6 on every token.
      const expected = [0, -0.5 / 6, 0, 0, 0, 0, -2 / 6, -2.2 / 6, 0].map((g, i) => (i === 2 || i === 4 || i === 5 ? g : g - 0.1 / 6))
      assert.isAtMost(maxAbsDiff(penalised.grad, expected), 1e-6)
    }).pipe(onBackend("wasm")))
})

/** ODPO loss and its gradient w.r.t. the policy's log-probabilities of A and of B. */
const odpoCase = (a: ReadonlyArray<number>, b: ReadonlyArray<number>, pairs: ReadonlyArray<PolicyLoss.PreferencePair>, beta: number) =>
  tf.tidy(() => {
    let result: PolicyLoss.Odpo | undefined
    const { value, grads } = tf.valueAndGrads((x: tf.Tensor, y: tf.Tensor) => {
      result = PolicyLoss.odpo(x as tf.Tensor1D, y as tf.Tensor1D, pairs, beta)
      keepMetrics(result.metrics)
      return result.loss
    })([tf.tensor1d([...a]), tf.tensor1d([...b])])
    return { loss: value.dataSync()[0], gradA: Array.from(grads[0].dataSync()), gradB: Array.from(grads[1].dataSync()), metrics: readMetrics(result!.metrics) }
  })

const Unit = Schema.Finite.check(Schema.isBetween({ minimum: 0, maximum: 1 }))
const LogProb = Schema.Finite.check(Schema.isBetween({ minimum: -30, maximum: 0 }))
/** beta = 10^exponent, over six orders of magnitude. */
const Exponent = Schema.Finite.check(Schema.isBetween({ minimum: -3, maximum: 3 }))
const Pair = Schema.Struct({ a: LogProb, b: LogProb, refA: LogProb, refB: LogProb, p: Unit, exponent: Exponent })

describe("PolicyLoss.odpo", () => {
  it.effect("equals the beta-rescaled soft-label loss worked by hand", () =>
    Effect.sync(() => {
      // D = (-2.5 + 3) - (-2.2 + 2) = 0.7, beta D = 0.35:
      // l = 0.8 softplus(-0.35) + 0.2 softplus(0.35) = 0.603382; L = (l - ln 2) / 0.5 = -0.179530.
      // dL/dlogpi(A) = sigmoid(0.35) - 0.8 = -0.213382, and the opposite for B.
      const out = odpoCase([-2.5], [-2.2], [{ p: 0.8, refA: -3, refB: -2 }], 0.5)
      assert.approximately(out.loss, -0.17953005, 1e-6)
      assert.approximately(out.gradA[0], -0.21338242, 1e-6)
      assert.approximately(out.gradB[0], 0.21338242, 1e-6)
      assert.approximately(out.metrics.margin, 0.7, 1e-6)
      assert.approximately(out.metrics.agreement, 0.8, 1e-6)
      assert.approximately(out.metrics.kl, (0.5 - 0.2) / 2, 1e-6)
    }).pipe(onBackend("wasm")))

  it.effect.prop("with p = 1 is standard DPO, -log sigmoid(beta D), up to the rescaling: beta L + log 2", { pair: Pair }, ({ pair }) =>
    Effect.sync(() => {
      const beta = 10 ** pair.exponent
      const out = odpoCase([pair.a], [pair.b], [{ p: 1, refA: pair.refA, refB: pair.refB }], beta)
      const d = pair.a - pair.refA - (pair.b - pair.refB)
      const dpo = softplus(-beta * d)
      // The loss is computed in float32: D carries the rounding of its four terms, which beta magnifies.
      const roundingOfBetaD = beta * 4 * 2 ** -23 * Math.max(1, Math.abs(pair.a), Math.abs(pair.refA), Math.abs(pair.b), Math.abs(pair.refB))
      assert.approximately(beta * out.loss + Math.LN2, dpo, 1e-5 * Math.max(1, dpo) + roundingOfBetaD)
      // Standard DPO's gradient w.r.t. log pi(A) is -beta sigmoid(-beta D): ours divided by beta.
      assert.approximately(out.gradA[0], -sigmoid(-beta * d), 1e-5 + roundingOfBetaD / 4)
    }).pipe(onBackend("wasm")), { arbitrary: { runs: 100 } })

  it.effect.prop("swapping A and B with p -> 1 - p leaves the loss and gradients unchanged", { pair: Pair }, ({ pair }) =>
    Effect.sync(() => {
      const beta = 10 ** pair.exponent
      const ab = odpoCase([pair.a], [pair.b], [{ p: pair.p, refA: pair.refA, refB: pair.refB }], beta)
      const ba = odpoCase([pair.b], [pair.a], [{ p: 1 - pair.p, refA: pair.refB, refB: pair.refA }], beta)
      // Both orders round D in float32 differently, by up to a few ulps of its terms, which beta magnifies.
      const roundingOfD = 4 * 2 ** -23 * Math.max(1, Math.abs(pair.a), Math.abs(pair.refA), Math.abs(pair.b), Math.abs(pair.refB))
      assert.approximately(ba.loss, ab.loss, 1e-5 * Math.max(1, Math.abs(ab.loss)) + roundingOfD)
      // Plus the float32 rounding of the gradients themselves: 2e-6 rather than 1e-6 (a shrunk case sat 2e-11 past 1e-6).
      assert.approximately(ba.gradA[0], ab.gradB[0], 2e-6 + beta * roundingOfD / 4)
      assert.approximately(ba.gradB[0], ab.gradA[0], 2e-6 + beta * roundingOfD / 4)
    }).pipe(onBackend("wasm")), { arbitrary: { runs: 100 } })

  it.effect.prop(
    "beta-rescaling: for every beta, |dL/dD| < 1, |L| <= |D|, the pull at D = 0 is 1/2 - p, and DPO's minimiser logit(p)/beta stays",
    { pair: Pair },
    ({ pair }) =>
      Effect.sync(() => {
        const beta = 10 ** pair.exponent
        const labels = [{ p: pair.p, refA: pair.refA, refB: pair.refB }]
        const out = odpoCase([pair.a], [pair.b], labels, beta)
        const d = pair.a - pair.refA - (pair.b - pair.refB)
        // D grows one for one with log pi(A): dL/dD is the gradient w.r.t. A.
        assert.isAtMost(Math.abs(out.gradA[0]), 1 + 1e-6)
        assert.approximately(out.gradA[0], sigmoid(beta * d) - pair.p, 1e-5)
        // float32 rounding of l near log 2 is amplified by 1 / beta.
        assert.isAtMost(Math.abs(out.loss), Math.abs(d) + 1e-7 / beta + 1e-5)
        const atReference = odpoCase([pair.refA], [pair.refB], labels, beta)
        assert.approximately(atReference.gradA[0], 0.5 - pair.p, 1e-6)
        assert.isAtMost(Math.abs(atReference.loss), 1e-7 / beta + 1e-6)
        const p = Math.min(Math.max(pair.p, 0.01), 0.99)
        const optimum = Math.log(p / (1 - p)) / beta
        const atOptimum = odpoCase([pair.refA + optimum], [pair.refB], [{ ...labels[0], p }], beta)
        assert.isAtMost(Math.abs(atOptimum.gradA[0]), 1e-5)
      }).pipe(onBackend("wasm")),
    { arbitrary: { runs: 100 } }
  )

  it.effect("beta-rescaling: finite limits, linear (1/2 - p) D as beta -> 0 and pinball p relu(-D) + (1 - p) relu(D) as beta -> infinity", () =>
    Effect.sync(() => {
      for (const [d, p] of [[3, 0.9], [-2, 0.9], [5, 0.2], [-4, 0.5]]) {
        const pairs = [{ p, refA: 0, refB: 0 }]
        assert.approximately(odpoCase([d], [0], pairs, 1e-4).loss, (0.5 - p) * d, 2e-3)
        assert.approximately(odpoCase([d], [0], pairs, 1e4).loss, p * Math.max(-d, 0) + (1 - p) * Math.max(d, 0), 1e-3)
      }
    }).pipe(onBackend("wasm")))
})

describe("PolicyLoss.responseLogProbs", () => {
  const completions: Array<PolicyLoss.Completion> = [
    { prompt: [1, 40, 41, 42], response: [50, 51, 2] },
    { prompt: [1, 43], response: [60] },
    { prompt: [1, 44, 45], response: [70, 71, 72, 73, 2] }
  ]

  it.effect("are each response token's log-softmax entry, the row alone, 0 past its end", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const batched = take(PolicyLoss.responseLogProbs(model, completions))
      const r = 5
      completions.forEach(({ prompt, response }, i) => {
        const ids = [...prompt, ...response]
        const logProbs = take(tf.tidy(() => tf.logSoftmax(Model.forward(model, [ids.slice(0, -1)]).logits)))
        const v = model.config.vocabSize
        const alone = response.map((token, k) => logProbs[(prompt.length - 1 + k) * v + token])
        const padded = [...alone, ...new Array<number>(r - alone.length).fill(0)]
        assert.isAtMost(maxAbsDiff(batched.subarray(i * r, (i + 1) * r), padded), 1e-4)
      })
    }).pipe(onBackend("wasm")))

  it.effect("have on wasm the gradient of the one-hot formulation", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const trainable = yield* Training.trainable(model)
      const variables = [...trainable.variables.values()]
      const weights = [0.3, -1, 2]
      const ours = tf.variableGrads(() =>
        tf.sum(tf.mul(tf.sum(PolicyLoss.responseLogProbs(trainable.model, completions), 1), weights)) as tf.Scalar, variables)
      // The same sum as a one-hot product over the full log-softmax, one row at a time.
      const reference = tf.variableGrads(() =>
        tf.addN(completions.map(({ prompt, response }, i) => {
          const ids = [...prompt, ...response]
          const logProbs = tf.logSoftmax(Model.forward(trainable.model, [ids.slice(0, -1)]).logits).reshape([ids.length - 1, -1])
          const targets = [...new Array<number>(prompt.length - 1).fill(-1), ...response]
          const oneHot = tf.oneHot(tf.tensor1d(targets, "int32"), logProbs.shape[1]!)
          return tf.mul(tf.sum(tf.mul(oneHot, logProbs)), weights[i])
        })) as tf.Scalar, variables)
      for (const [name, grad] of Object.entries(ours.grads)) {
        assert.isAtMost(maxAbsDiff(grad.dataSync(), reference.grads[name].dataSync()), 1e-4, name)
      }
      assert.approximately(ours.value.dataSync()[0], reference.value.dataSync()[0], 1e-4)
      tf.dispose([ours.value, reference.value, ...Object.values(ours.grads), ...Object.values(reference.grads)])
    }).pipe(onBackend("wasm")))
})
