/** Shared helpers of the test suite: fixture paths, references, comparisons. */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import { fileURLToPath } from "node:url"
import { type BackendName, TensorBackend } from "../layers/TensorBackend.ts"
import * as Safetensors from "../src/Safetensors.ts"

/** The read-only fixtures made with transformers, in ../shared beside the repository. */
export const sharedFixture = (name: string) => fileURLToPath(new URL(`../../shared/fixtures/${name}`, import.meta.url))

/** Fixtures this repository keeps (made by scripts/make_references.py). */
export const localFixture = (name: string) => fileURLToPath(new URL(`./fixtures/${name}`, import.meta.url))

export interface Reference {
  readonly ids: Array<Array<number>>
  readonly mask: Array<Array<number>> | undefined
  readonly tensor: (name: string) => Effect.Effect<Float32Array, unknown>
  readonly has: (name: string) => boolean
}

/** A reference.safetensors: input ids as rows, attention mask if any, other tensors as f32. */
export const reference = Effect.fn("test.reference")(function*(path: string) {
  const file = yield* Safetensors.open(path)
  const rows = Effect.fnUntraced(function*(name: string) {
    const info = yield* file.info(name)
    const [b, t] = info.shape
    const values = yield* file.readInt32(name)
    return Array.from({ length: b }, (_, i) => Array.from(values.subarray(i * t, (i + 1) * t)))
  })
  const ids = yield* rows("input_ids")
  const mask = file.names.includes("attention_mask") ? yield* rows("attention_mask") : undefined
  return {
    ids,
    mask,
    tensor: (name: string) => file.readFloat32(name),
    has: (name: string) => file.names.includes(name)
  } satisfies Reference
})

/** max |a - b| over the positions `keep` selects (all when left out). */
export const maxAbsDiff = (a: ArrayLike<number>, b: ArrayLike<number>, keep?: (i: number) => boolean): number => {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`)
  let worst = 0
  for (let i = 0; i < a.length; i++) {
    if (keep && !keep(i)) continue
    const d = Math.abs(a[i] - b[i])
    if (!(d <= worst)) worst = d // NaN propagates as a failure
  }
  return worst
}

/** Values of a tensor, disposing it. */
export const take = (tensor: tf.Tensor): Float32Array => {
  const values = tensor.dataSync() as Float32Array
  tensor.dispose()
  return values
}

/** Runs a test on a backend; the test's own resources (models) are released before the backend is. */
export const onBackend = (backend: BackendName) => <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  effect.pipe(Effect.scoped, Effect.provide(TensorBackend.layer(backend)))
