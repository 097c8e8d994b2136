/**
 * Evaluation: the mean negative log-likelihood of next tokens and the perplexity, over a stream of
 * token sequences. The mean runs over every position after the first of each sequence.
 */
import { Effect, Stream } from "effect"
import type { Sequence } from "../src/data/Dataset.ts"
import * as Loss from "../src/train/Loss.ts"
import * as Model from "../src/model/Model.ts"
import * as Reference from "../src/io/Reference.ts"

export interface Perplexity {
  /** Number of predicted tokens. */
  readonly tokens: number
  /** Mean negative log-likelihood, nats per token. */
  readonly nll: number
  readonly ppl: number
}

/** Summed NLL and token count of one padded batch, in float64. */
const batchNll = Effect.fnUntraced(function*(model: Model.Model, batch: ReadonlyArray<Sequence>) {
  const width = Math.max(...batch.map((sequence) => sequence.ids.length))
  const ids = batch.map(({ ids }) => Array.from({ length: width }, (_, i) => ids[i] ?? 0))
  const mask = batch.map(({ ids }) => Array.from({ length: width }, (_, i) => (i < ids.length ? 1 : 0)))
  const { logits } = Model.forward(model, ids.map((row) => row.slice(0, -1)), {
    attentionMask: mask.map((row) => row.slice(0, -1))
  })
  const logProbs = Loss.tokenLogProbs(logits, ids.map((row) => row.slice(1)))
  logits.dispose()
  const values = yield* Reference.read(logProbs)
  let nll = 0
  let tokens = 0
  batch.forEach(({ ids: sequence }, row) => {
    for (let i = 0; i < sequence.length - 1; i++) nll -= values[row * (width - 1) + i]
    tokens += Math.max(0, sequence.length - 1)
  })
  return { nll, tokens }
})

export const evaluate = <E, R>(
  model: Model.Model,
  sequences: Stream.Stream<Sequence, E, R>,
  options: { readonly batchSize?: number } = {}
): Effect.Effect<Perplexity, E, R> =>
  sequences.pipe(
    Stream.filter((sequence) => sequence.ids.length > 1),
    Stream.grouped(options.batchSize ?? 8),
    Stream.runFoldEffect(
      () => ({ nll: 0, tokens: 0 }),
      (total, batch) =>
        Effect.map(batchNll(model, batch), (part) => ({ nll: total.nll + part.nll, tokens: total.tokens + part.tokens }))
    ),
    Effect.map(({ nll, tokens }) => {
      const mean = tokens === 0 ? Number.NaN : nll / tokens
      return { tokens, nll: mean, ppl: Math.exp(mean) }
    }),
    Effect.withSpan("Evaluate.evaluate")
  )
