/**
 * The teacher-cache format: what `cascade teacher-cache` writes (the teacher-cache stage) and the
 * offline teacher source reads (`offlineCache` in layers/Teacher.ts). A folder holds:
 *
 * - `shard-00000.safetensors`, ...: `rowsPerShard` (R) packed rows each, the last maybe fewer:
 *   `ids` I32 [R, T, K] (our safetensors has no U32) and `logprobs` F16 [R, T, K], the teacher's K
 *   most likely next tokens after each position, largest first, zero at padding; and `lengths`
 *   I32 [R], each row's real length. Packed row i is row i % R of shard floor(i / R).
 * - `manifest.json`: what the cache was made from (teacher path and config hash, sha256 of
 *   tokenizer.json, data path and sha256, seq, top-k, samples, R) and how far it got.
 */
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { CheckpointError } from "../Errors.ts"
import * as Files from "./Files.ts"
import * as Safetensors from "./Safetensors.ts"

export const format = "cascade-teacher-cache/1" as const

export const Manifest = Schema.Struct({
  format: Schema.Literal(format),
  teacher: Schema.Struct({ path: Schema.String, configHash: Schema.String, vocab: Schema.Int }),
  /** sha256 of the teacher's tokenizer.json; null when it has none (data given as token ids). */
  tokenizerHash: Schema.NullOr(Schema.String),
  data: Schema.Struct({ path: Schema.String, hash: Schema.String }),
  seq: Schema.Int,
  topK: Schema.Int,
  samples: Schema.NullOr(Schema.Int),
  rowsPerShard: Schema.Int,
  /** Rows in the shards written so far. */
  rows: Schema.Int,
  shards: Schema.Int,
  complete: Schema.Boolean
})
export type Manifest = typeof Manifest.Type

export const manifestName = "manifest.json"
export const shardFile = (dir: string, index: number) => path.join(dir, `shard-${String(index).padStart(5, "0")}.safetensors`)

const decodeManifest = Schema.decodeUnknownEffect(Manifest)

/** The manifest in `dir`, if there is one. */
export const readManifest = Effect.fn("TeacherCacheFormat.readManifest")(function*(dir: string) {
  const file = path.join(dir, manifestName)
  const json = yield* Files.readJsonIfPresent(file)
  if (json === undefined) return undefined
  return yield* decodeManifest(json).pipe(
    Effect.mapError((error) => new CheckpointError({ file, reason: `is not a teacher cache manifest (${error.message})` }))
  )
})

/** sha256 of `dir`/tokenizer.json, null when there is none: what a cache and its readers must agree on. */
export const tokenizerHash = (dir: string): Effect.Effect<string | null, CheckpointError> => {
  const file = path.join(dir, "tokenizer.json")
  return Effect.promise(() => fs.access(file).then(() => true, () => false)).pipe(
    Effect.flatMap((exists) => (exists ? Files.sha256(file) : Effect.succeed(null)))
  )
}

/** One shard's rows: `ids` and `logProbs` [rows, seq, k], `lengths` [rows]. */
export interface Shard {
  readonly ids: Int32Array
  readonly logProbs: Float32Array
  readonly lengths: Int32Array
}

/** Writes the first `rows` rows of `shard` (its arrays may hold more) as shard `index` of `dir`, atomically. */
export const writeShard = (
  dir: string,
  index: number,
  shard: Shard,
  shape: { readonly rows: number; readonly seq: number; readonly k: number }
) => {
  const { rows, seq, k } = shape
  const size = rows * seq * k
  return Safetensors.write(shardFile(dir, index), [
    { name: "ids", dtype: "I32", shape: [rows, seq, k], data: shard.ids.subarray(0, size) },
    { name: "logprobs", dtype: "F16", shape: [rows, seq, k], data: shard.logProbs.subarray(0, size) },
    { name: "lengths", dtype: "I32", shape: [rows], data: shard.lengths.subarray(0, rows) }
  ])
}

/** Shard `index` of the cache in `dir`, checked to hold the rows `manifest` says. */
export const readShard = (dir: string, manifest: Manifest, index: number): Effect.Effect<Shard, CheckpointError> =>
  Effect.scoped(Effect.gen(function*() {
    const { seq, topK: k, rowsPerShard } = manifest
    const file = shardFile(dir, index)
    const opened = yield* Safetensors.open(file)
    const shard = {
      ids: yield* opened.readInt32("ids"),
      logProbs: yield* opened.readFloat32("logprobs"),
      lengths: yield* opened.readInt32("lengths")
    }
    const rows = Math.min(rowsPerShard, manifest.rows - index * rowsPerShard)
    if (shard.lengths.length !== rows || shard.ids.length !== rows * seq * k || shard.logProbs.length !== rows * seq * k) {
      return yield* new CheckpointError({ file, reason: `does not hold ${rows} rows of [${seq}, ${k}] as ${manifestName} says` })
    }
    return shard
  }))
