/**
 * Reference files made with transformers (`reference.safetensors`): input ids, an optional
 * attention mask, logits and hidden states; and the comparison of a model against one.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import * as Model from "../model/Model.ts"
import * as Vision from "../model/Vision.ts"
import * as Safetensors from "./Safetensors.ts"

export interface Reference {
  readonly ids: Array<Array<number>>
  readonly mask: Array<Array<number>> | undefined
  /** transformers' `position_ids`, where the reference was made with explicit ones. */
  readonly positionIds: Array<Array<number>> | undefined
  readonly tensor: (name: string) => Effect.Effect<Float32Array, unknown>
  readonly has: (name: string) => boolean
}

/** Opens a reference file (scoped): ids, mask and position ids as rows, other tensors as f32 on demand. */
export const open = Effect.fn("Reference.open")(function*(path: string) {
  const file = yield* Safetensors.open(path)
  const rows = Effect.fnUntraced(function*(name: string) {
    const [b, t] = (yield* file.info(name)).shape
    const values = yield* file.readInt32(name)
    return Array.from({ length: b }, (_, i) => Array.from(values.subarray(i * t, (i + 1) * t)))
  })
  const ids = yield* rows("input_ids")
  const mask = file.names.includes("attention_mask") ? yield* rows("attention_mask") : undefined
  const positionIds = file.names.includes("position_ids") ? yield* rows("position_ids") : undefined
  return {
    ids,
    mask,
    positionIds,
    tensor: (name: string) => file.readFloat32(name),
    has: (name: string) => file.names.includes(name)
  } satisfies Reference
})

/** max |a - b| over the positions `keep` selects (all when left out); NaN counts as infinitely far. */
export const maxAbsDiff = (a: ArrayLike<number>, b: ArrayLike<number>, keep?: (i: number) => boolean): number => {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`)
  let worst = 0
  for (let i = 0; i < a.length; i++) {
    if (keep && !keep(i)) continue
    const d = Math.abs(a[i] - b[i])
    if (!(d <= worst)) worst = Number.isNaN(d) ? Infinity : d
  }
  return worst
}

/** Values of a tensor, disposing it (synchronous: CPU backends only). */
export const take = (tensor: tf.Tensor): Float32Array => {
  const values = tensor.dataSync() as Float32Array
  tensor.dispose()
  return values
}

/** Values of a tensor, disposing it; asynchronous, as a GPU backend requires. */
export const read = (tensor: tf.Tensor): Effect.Effect<Float32Array> =>
  Effect.promise(() => tensor.data() as Promise<Float32Array>).pipe(Effect.ensuring(Effect.sync(() => tensor.dispose())))

export interface Comparison {
  readonly logits: number
  /** Per hidden state, in transformers' order. */
  readonly hiddenStates: ReadonlyArray<number>
}

/** The model's largest differences from the reference, leaving out padded positions. */
export const compare = Effect.fn("Reference.compare")(function*(model: Model.Model, reference: Reference) {
  const out = Model.forward(model, reference.ids, {
    attentionMask: reference.mask,
    positionIds: reference.positionIds,
    hiddenStates: true
  })
  const t = reference.ids[0].length
  const real = (width: number) => (i: number) =>
    reference.mask === undefined || reference.mask[Math.floor(i / (t * width))][Math.floor(i / width) % t] === 1
  const logits = maxAbsDiff(yield* read(out.logits), yield* reference.tensor("logits"), real(model.config.vocabSize))
  const hiddenStates: Array<number> = []
  for (const [i, state] of out.hiddenStates.entries()) {
    hiddenStates.push(maxAbsDiff(yield* read(state), yield* reference.tensor(`hidden_states.${i}`), real(model.config.hiddenSize)))
  }
  return { logits, hiddenStates } satisfies Comparison
})

export interface ImageComparison {
  /** Each image's encoder features (the layer the projector takes). */
  readonly encoded: ReadonlyArray<number>
  /** The projected features of all images. */
  readonly projected: number
  /** The embeddings with the features spliced in at the image tokens. */
  readonly embeddings: number
  readonly logits: number
}

/**
 * A Mistral 3 model's image side against a reference of scripts/make-vision-fixtures.py (its
 * `pixel_values` [N, C, H, W] padded, `image_sizes` [N, 2], `vision_features.i`, `image_features`,
 * `hidden_states.0` and `logits`); leaves the tensor count where it was.
 */
export const compareImages = Effect.fn("Reference.compareImages")(function*(model: Model.Model, vision: Vision.Vision, path: string) {
  const reference = yield* open(path)
  const file = yield* Safetensors.open(path)
  const [n, c, h, w] = (yield* file.info("pixel_values")).shape
  const pixels = yield* file.readFloat32("pixel_values")
  const sizes = yield* file.readInt32("image_sizes")
  const images = Array.from({ length: n }, (_, i) => tf.tensor3d(pixels.subarray(i * c * h * w, (i + 1) * c * h * w), [c, h, w]))
  const features = Vision.imageFeatures(vision, images, Array.from({ length: n }, (_, i) => [sizes[2 * i], sizes[2 * i + 1]] as const))
  tf.dispose(images)
  const out = Model.forward(model, reference.ids, { hiddenStates: true, imageFeatures: { features: features.projected, tokenId: vision.config.imageTokenId } })
  tf.dispose(out.hiddenStates.slice(1))
  const encoded: Array<number> = []
  for (const [i, image] of features.encoded.entries()) encoded.push(maxAbsDiff(yield* read(image), yield* reference.tensor(`vision_features.${i}`)))
  return {
    encoded,
    projected: maxAbsDiff(yield* read(features.projected), yield* reference.tensor("image_features")),
    embeddings: maxAbsDiff(yield* read(out.hiddenStates[0]), yield* reference.tensor("hidden_states.0")),
    logits: maxAbsDiff(yield* read(out.logits), yield* reference.tensor("logits"))
  } satisfies ImageComparison
})
