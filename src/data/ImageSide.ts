/**
 * A Mistral 3 model's image side as data needs it: its encoder and projector, its processor's
 * settings and its image tokens; and data lines with their images decoded, preprocessed and their
 * placeholders expanded into token grids, as every stage that reads images takes them.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Stream } from "effect"
import { DataError } from "../Errors.ts"
import type { Tokenizer } from "../io/Tokenizer.ts"
import * as Vision from "../model/Vision.ts"
import * as Dataset from "./Dataset.ts"
import * as Images from "./Images.ts"

export interface ImageSide {
  readonly vision: Vision.Vision
  readonly processor: Images.PixtralImageConfig
  readonly tokens: Images.ImageTokenIds
}

/**
 * The image side of the model in `dir` where it has one: its encoder and projector, its processor's
 * settings (preprocessor_config.json, else defaults), and its image tokens (the tokenizer's, else Mistral's).
 */
export const of = Effect.fn("ImageSide.of")(function*(dir: string, tokenizer: Tokenizer | undefined) {
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
  readonly line: number
  readonly ids: ReadonlyArray<number>
  readonly images: ReadonlyArray<Images.ProcessedImage>
}

/**
 * A sequence's images decoded and preprocessed for `side`, one per image placeholder: a line whose
 * images and placeholders do not pair up fails naming its `file` and line.
 */
export const imagesOf = (file: string, side: ImageSide | undefined) => (sequence: Dataset.Sequence): Effect.Effect<Array<Images.ProcessedImage>, DataError | Images.ImageError> =>
  Effect.gen(function*() {
    const files = sequence.imageFiles ?? []
    const placeholders = side === undefined ? 0 : sequence.ids.filter((id) => id === side.tokens.image).length
    // A placeholder with no image would take another line's features wherever the two share a batch.
    if (files.length === 0 && placeholders > 0) return yield* new DataError({ file, line: sequence.line, reason: `has ${placeholders} image placeholders (id ${side!.tokens.image}) but no images` })
    if (files.length === 0) return []
    if (side === undefined) return yield* new DataError({ file, line: sequence.line, reason: "has images but the model has no image side (not a Mistral 3 with its vision encoder)" })
    if (files.length !== placeholders) {
      return yield* new DataError({ file, line: sequence.line, reason: `has ${files.length} images but ${placeholders} image placeholders (id ${side.tokens.image})` })
    }
    return yield* Effect.forEach(files, (image) => Effect.map(Images.decode(image), (pixels) => Images.preprocess(pixels, side.processor)))
  })

/** A sequence of the JSONL `file` with its images decoded and preprocessed for `side`, their placeholders expanded. */
export const prepare = (file: string, side: ImageSide | undefined) => (sequence: Dataset.Sequence): Effect.Effect<Prepared, DataError | Images.ImageError> =>
  Effect.map(imagesOf(file, side)(sequence), (images) => ({
    line: sequence.line,
    ids: images.length === 0 ? sequence.ids : Images.expandPlaceholders(sequence.ids, images, side!.processor, side!.tokens)!,
    images
  }))

/**
 * The sequences of a JSONL `file` prepared for packing into rows of `seq` tokens: a line with images
 * must fit one row with its token grids, since `Dataset.pack` never cuts one.
 */
export const packable = (
  file: string,
  options: { readonly vocabSize: number; readonly tokenizer?: Tokenizer | undefined; readonly seq: number },
  side: ImageSide | undefined
): Stream.Stream<Prepared, DataError | Images.ImageError> =>
  Dataset.sequences(file, options).pipe(
    Stream.mapEffect(prepare(file, side)),
    Stream.mapEffect((prepared) =>
      prepared.images.length > 0 && prepared.ids.length > options.seq
        ? Effect.fail(new DataError({ file, line: prepared.line, reason: `is ${prepared.ids.length} tokens with its images' grids, longer than a row of ${options.seq} (--seq): a line with images is never cut` }))
        : Effect.succeed(prepared)
    )
  )

/**
 * The projected features of preprocessed `images`, in order, as `Model.forward`'s `imageFeatures`
 * takes them: computed with the image side frozen (no gradient reaches it), released with the scope.
 */
export const projected = (side: ImageSide, images: ReadonlyArray<Images.ProcessedImage>) =>
  Effect.map(
    Effect.acquireRelease(Effect.sync(() => tf.tidy(() => Vision.featuresOfImages(side.vision, images).projected)), (tensor) => Effect.sync(() => tensor.dispose())),
    (features) => ({ features, tokenId: side.tokens.image })
  )

/** `projected` of the images of packed rows, in order; undefined for rows without images. */
export const rowFeatures = (rows: ReadonlyArray<Dataset.PackedRow>, side: ImageSide | undefined) => {
  const images = rows.flatMap((row) => row.images ?? [])
  return images.length === 0 || side === undefined ? Effect.succeed(undefined) : projected(side, images)
}
