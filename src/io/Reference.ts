/**
 * Reference files made with transformers (`reference.safetensors`): input ids, an optional
 * attention mask, logits and hidden states; and the comparison of a model against one.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import * as Model from "../model/Model.ts"
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
