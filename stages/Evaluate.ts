/**
 * Evaluation: the mean negative log-likelihood of next tokens and the perplexity, over a stream of
 * token sequences. The mean runs over every position after the first of each sequence, but image
 * tokens: a Mistral 3 model's images are inputs. And the continuations that exact-match tasks
 * (Tasks.score) are scored on, questions about pictures included.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Stream } from "effect"
import type { Sequence } from "../src/data/Dataset.ts"
import * as Images from "../src/data/Images.ts"
import { type ImageSide, type Prepared, prepare } from "../src/data/ImageSide.ts"
import type { DataError } from "../src/Errors.ts"
import * as Vision from "../src/model/Vision.ts"
import * as Loss from "../src/train/Loss.ts"
import * as Model from "../src/model/Model.ts"
import * as Reference from "../src/io/Reference.ts"
import type { Tokenizer } from "../src/io/Tokenizer.ts"
import * as Tasks from "../src/data/Tasks.ts"
import * as Generate from "../src/model/Generate.ts"

export interface Perplexity {
  /** Number of predicted tokens. */
  readonly tokens: number
  /** Mean negative log-likelihood, nats per token. */
  readonly nll: number
  readonly ppl: number
}

/** Summed NLL and token count of one padded batch, in float64; targets that are image tokens are not counted. */
const batchNll = Effect.fnUntraced(function*(model: Model.Model, batch: ReadonlyArray<Prepared>, side: ImageSide | undefined) {
  const width = Math.max(...batch.map((sequence) => sequence.ids.length))
  const ids = batch.map(({ ids }) => Array.from({ length: width }, (_, i) => ids[i] ?? 0))
  const mask = batch.map(({ ids }) => Array.from({ length: width }, (_, i) => (i < ids.length ? 1 : 0)))
  const images = batch.flatMap((sequence) => sequence.images)
  // The encoder's features are dropped with the tidy; the projected ones are what is spliced in.
  const features = side === undefined || images.length === 0 ? undefined : tf.tidy(() => Vision.featuresOfImages(side.vision, images).projected)
  const { logits } = Model.forward(model, ids.map((row) => row.slice(0, -1)), {
    attentionMask: mask.map((row) => row.slice(0, -1)),
    imageFeatures: features === undefined ? undefined : { features, tokenId: side!.tokens.image }
  })
  features?.dispose()
  const logProbs = Loss.tokenLogProbs(logits, ids.map((row) => row.slice(1)))
  logits.dispose()
  const values = yield* Reference.read(logProbs)
  let nll = 0
  let tokens = 0
  batch.forEach(({ ids: sequence }, row) => {
    for (let i = 0; i < sequence.length - 1; i++) {
      if (side !== undefined && Images.isImageToken(side.tokens, sequence[i + 1])) continue
      nll -= values[row * (width - 1) + i]
      tokens++
    }
  })
  return { nll, tokens }
})

/**
 * Mean NLL over `sequences` of the JSONL `file`; lines with images need `images` (a Mistral 3
 * model's image side), and their image tokens are inputs, not targets.
 */
export const evaluate = <E, R>(
  model: Model.Model,
  sequences: Stream.Stream<Sequence, E, R>,
  options: { readonly batchSize?: number; readonly file?: string; readonly images?: ImageSide | undefined } = {}
): Effect.Effect<Perplexity, E | DataError | Images.ImageError, R> =>
  sequences.pipe(
    Stream.filter((sequence) => sequence.ids.length > 1),
    Stream.mapEffect(prepare(options.file ?? "data", options.images)),
    Stream.grouped(options.batchSize ?? 8),
    Stream.runFoldEffect(
      () => ({ nll: 0, tokens: 0 }),
      (total, batch) =>
        Effect.map(batchNll(model, batch, options.images), (part) => ({ nll: total.nll + part.nll, tokens: total.tokens + part.tokens }))
    ),
    Effect.map(({ nll, tokens }) => {
      const mean = tokens === 0 ? Number.NaN : nll / tokens
      return { tokens, nll: mean, ppl: Math.exp(mean) }
    }),
    Effect.withSpan("Evaluate.evaluate")
  )

/**
 * Continuations of tasks' prompts as `Generate.generate` makes them with `options` (one batch per
 * call), each prompt's image placeholders expanded into their grids and the images' features spliced
 * in (`images`: the model's image side); what `Tasks.score` runs. Errors name `file`, the tasks'.
 */
export const continuations = (
  model: Model.Model,
  tokenizer: Tokenizer,
  images: ImageSide | undefined,
  options: Generate.Options,
  file = "tasks"
): Tasks.Generator<DataError | Images.ImageError, never> =>
(prompts, tasks) =>
  Effect.gen(function*() {
    const prepared = yield* Effect.forEach(prompts, (prompt, i) =>
      prepare(file, images)({ line: tasks[i]?.line ?? 0, ids: tokenizer.encode(prompt), imageFiles: tasks[i]?.images }))
    const pictures = prepared.flatMap((p) => p.images)
    const features = pictures.length === 0 || images === undefined ? undefined : tf.tidy(() => Vision.featuresOfImages(images.vision, pictures).projected)
    return yield* Generate.generate(model, prepared.map((p) => p.ids), {
      ...options,
      batchSize: Math.max(prompts.length, options.batchSize ?? 1),
      imageFeatures: features && { features, tokenId: images!.tokens.image }
    }).pipe(
      Effect.map((generations) => generations.map((g) => g.text ?? "")),
      Effect.ensuring(Effect.sync(() => features?.dispose()))
    )
  })
