/**
 * Online DPO (RECIPE.md sections 3-4): each step takes a batch of prompts in a seeded order, samples
 * two responses to each from the current policy (T = 0.7 by default), asks the `PairwisePreference`
 * service (the PWRM) for the probability that the first beats the second, and makes one policy update
 * with the soft-label DPO loss against the frozen reference, beta-rescaled (src/train/PolicyLoss.ts says how
 * and why).
 *
 * The PWRM sees each response with its thinking stripped (`splitThinking`), as a user would. A
 * response caught in a loop (Generate's loop detection) loses outright without asking the PWRM: the
 * label is 0 or 1, and 1/2 when both loop.
 *
 * Prompts are JSONL lines `{"prompt"}`, as the model reads it. The run folder (metrics.jsonl,
 * checkpoints, --resume, the final model) is the one stages/Grpo.ts's run loop keeps.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as Generate from "../src/model/Generate.ts"
import type * as Model from "../src/model/Model.ts"
import * as PolicyLoss from "../src/train/PolicyLoss.ts"
import { PairwisePreference } from "../src/rewards/Preference.ts"
import { read } from "../src/io/Reference.ts"
import * as Training from "../src/train/Training.ts"
import { chunks, readPrompts, type Run, runOnline, type RunOptions, sample, type Sampled } from "./Grpo.ts"

export interface OdpoOptions extends RunOptions {
  readonly beta: number
  /** Pairs per forward pass of the update (gradient accumulation over the rest). */
  readonly microBatch: number
  readonly onStep?: (metrics: OdpoMetrics) => void
}

export interface OdpoMetrics {
  readonly step: number
  readonly loss: number
  /** Mean D = (log pi(A) - log ref(A)) - (log pi(B) - log ref(B)), before the update. */
  readonly margin: number
  /** How often the policy's implicit reward orders a pair as the labels do (the win rate it is trained toward). */
  readonly agreement: number
  /** Mean label P(A beats B), and mean max(p, 1 - p): how decided the PWRM is. */
  readonly p_mean: number
  readonly p_decided: number
  /** Mean log pi(y) - log ref(y) of the samples, before the update: their KL to the reference (in expectation, at T = 1). */
  readonly kl: number
  readonly grad_norm: number
  readonly lr: number
  readonly response_length: number
  readonly loop_rate: number
  readonly seconds: number
}

/** A prompt line: the prompt as the model reads it, and for a Mistral 3 policy its pictures (files relative to the prompt file; the PWRM judges the text). */
const OdpoPrompt = Schema.Struct({ prompt: Schema.String, images: Schema.optional(Schema.Array(Schema.String)) })

/** A micro-batch of the update: the A and B responses of some pairs, with their labels and reference log-probs. */
interface OdpoMicroBatch {
  readonly a: ReadonlyArray<PolicyLoss.Completion>
  readonly b: ReadonlyArray<PolicyLoss.Completion>
  readonly pairs: ReadonlyArray<PolicyLoss.PreferencePair>
}

/** Runs (or resumes, or finds finished) online DPO; returns the final state. */
export const odpo = Effect.fn("Odpo.odpo")(function*(options: OdpoOptions) {
  const prompts = yield* readPrompts(options.prompts, OdpoPrompt)
  const preference = yield* PairwisePreference
  const identity = { beta: options.beta, microBatch: options.microBatch, preference: preference.describe }
  return yield* runOnline(options, { format: "cascade-odpo/1", identity, prompts, differs: "PWRM" }, odpoStep(options), options.onStep)
})

/**
 * P(A beats B) for a prompt: a response caught in a loop loses outright (two that loop tie);
 * otherwise the PWRM decides, on the responses with their thinking stripped.
 */
export const label = Effect.fnUntraced(function*(prompt: string, a: Sampled, b: Sampled) {
  if (a.loops || b.loops) return a.loops === b.loops ? 0.5 : a.loops ? 0 : 1
  const preference = yield* PairwisePreference
  return yield* preference.probability(prompt, Generate.splitThinking(a.text).answer, Generate.splitThinking(b.text).answer)
})

const odpoStep = (options: OdpoOptions) =>
  Effect.fnUntraced(function*(run: Run, prompts: ReadonlyArray<{ readonly prompt: string }>, step: number, seed: number) {
    const started = performance.now()
    const groups = yield* sample(run, prompts, 2, {
      maxNewTokens: options.maxNewTokens,
      temperature: options.temperature,
      seed,
      loop: options.loop
    })
    const labels = yield* Effect.forEach(groups, ([a, b], g) => label(prompts[g].prompt, a, b), { concurrency: 16 })

    const microBatches: Array<OdpoMicroBatch> = []
    for (const chunk of chunks(groups.map((group, g) => ({ group, p: labels[g] })), options.microBatch)) {
      const a = chunk.map(({ group }) => group[0].completion)
      const b = chunk.map(({ group }) => group[1].completion)
      const ref = yield* sequenceLogProbs(run.reference, [...a, ...b])
      microBatches.push({ a, b, pairs: chunk.map(({ p }, i) => ({ p, refA: ref[i], refB: ref[chunk.length + i] })) })
    }
    const result = yield* Training.step(run.policy, run.adam, microBatches, lossOf(options.beta), {
      learningRate: options.learningRate,
      maxGradNorm: options.maxGradNorm
    })

    const all = groups.flat()
    const mean = (values: ReadonlyArray<number>) => values.reduce((x, y) => x + y, 0) / values.length
    return {
      step: step + 1,
      loss: result.loss,
      margin: result.metrics.margin,
      agreement: result.metrics.agreement,
      p_mean: mean(labels),
      p_decided: mean(labels.map((p) => Math.max(p, 1 - p))),
      kl: result.metrics.kl,
      grad_norm: result.gradNorm,
      lr: result.learningRate,
      response_length: mean(all.map((s) => s.completion.response.length)),
      loop_rate: mean(all.map((s) => (s.loops ? 1 : 0))),
      seconds: (performance.now() - started) / 1000
    } satisfies OdpoMetrics
  })

const lossOf = (beta: number) => (model: Model.Model, batch: OdpoMicroBatch) => {
  const n = batch.pairs.length
  const sums = tf.sum(PolicyLoss.responseLogProbs(model, [...batch.a, ...batch.b]), 1) as tf.Tensor1D
  return PolicyLoss.odpo(sums.slice(0, n), sums.slice(n, n), batch.pairs, beta)
}

/** Each response's log-probability under `model` (no gradient). */
const sequenceLogProbs = (model: Model.Model, completions: ReadonlyArray<PolicyLoss.Completion>) =>
  read(tf.tidy(() => tf.sum(PolicyLoss.responseLogProbs(model, completions), 1)))
