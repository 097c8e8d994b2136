/**
 * Evaluation: the mean negative log-likelihood of next tokens and the perplexity, over a stream of
 * token sequences. The mean runs over every position after the first of each sequence, but image
 * tokens: a Mistral 3 model's images are inputs.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Stream } from "effect"
import type { Sequence } from "../src/data/Dataset.ts"
import * as Images from "../src/data/Images.ts"
import type { Tokenizer } from "../src/io/Tokenizer.ts"
import { DataError } from "../src/Errors.ts"
import * as Vision from "../src/model/Vision.ts"
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

/** What evaluating a Mistral 3 model on lines with images takes: its image side, its processor's settings, its image tokens. */
export interface ImageSide {
  readonly vision: Vision.Vision
  readonly processor: Images.PixtralImageConfig
  readonly tokens: Images.ImageTokenIds
}

/**
 * The image side of the model in `dir` where it has one: its encoder and projector, its processor's
 * settings (preprocessor_config.json, else defaults), and its image tokens (the tokenizer's, else Mistral's).
 */
export const imageSideOf = Effect.fn("Evaluate.imageSideOf")(function*(dir: string, tokenizer: Tokenizer | undefined) {
  const vision = yield* Vision.loadIfPresent(dir)
  if (vision === undefined) return undefined
  const { patchSize, spatialMergeSize, imageSize, imageTokenId } = vision.config
  const processor = yield* Images.processorConfig(dir, { patchSize, mergeSize: spatialMergeSize, imageSize })
  const tokens: Images.ImageTokenIds = {
    image: imageTokenId,
    imageBreak: tokenizer?.tokenId("[IMG_BREAK]") ?? Images.mistralImageTokens.imageBreak,
    imageEnd: tokenizer?.tokenId("[IMG_END]") ?? Images.mistralImageTokens.imageEnd
  }
  return { vision, processor, tokens } satisfies ImageSide
})

/** A sequence with its images processed and their placeholders expanded into their token grids. */
export interface Prepared {
  readonly ids: ReadonlyArray<number>
  readonly images: ReadonlyArray<Images.ProcessedImage>
}

/** A sequence of the JSONL `file` with its images decoded and preprocessed for `side`, their placeholders expanded. */
export const prepare = (file: string, side: ImageSide | undefined) => (sequence: Sequence): Effect.Effect<Prepared, DataError | Images.ImageError> =>
  Effect.gen(function*() {
    const files = sequence.images ?? []
    if (files.length === 0) return { ids: sequence.ids, images: [] }
    if (side === undefined) return yield* new DataError({ file, line: sequence.line, reason: "has images but the model has no image side (not a Mistral 3 with its vision encoder)" })
    const images = yield* Effect.forEach(files, (image) => Effect.map(Images.decode(image), (pixels) => Images.preprocess(pixels, side.processor)))
    const ids = Images.expandPlaceholders(sequence.ids, images, side.processor, side.tokens)
    if (ids === undefined) {
      const placeholders = sequence.ids.filter((id) => id === side.tokens.image).length
      return yield* new DataError({ file, line: sequence.line, reason: `has ${files.length} images but ${placeholders} image placeholders (id ${side.tokens.image})` })
    }
    return { ids, images }
  })

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
