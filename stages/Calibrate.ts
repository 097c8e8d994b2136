/**
 * Calibration: streams a data set, packed into rows of `seq` tokens, through the parent and
 * accumulates the statistics pruning ranks by (src/prune/Calibration.ts).
 *
 * The output folder holds `statistics.safetensors` and `manifest.json` naming the model (its config
 * hash and the fingerprint of its weights), the data (its hash) and the token count. Partial
 * statistics are saved every few batches, so a killed run resumes where it stopped; a finished one
 * is reused as it is. Statistics of another model, data or length are refused, naming what differs,
 * unless `replace` (a pipeline whose earlier step changed) computes them again.
 */
import { Effect, Schema, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Calibration from "../src/prune/Calibration.ts"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Config from "../src/model/Config.ts"
import * as Dataset from "../src/data/Dataset.ts"
import { CheckpointError, DataError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import type * as Model from "../src/model/Model.ts"
import type { Tokenizer } from "../src/io/Tokenizer.ts"
import * as TensorCoreMatMul from "../src/gpu/TensorCoreMatMul.ts"

export const Manifest = Schema.Struct({
  format: Schema.Literal("cascade-calibration/1"),
  model: Schema.String,
  configHash: Schema.String,
  /** `Checkpoint.fingerprint` of the model folder; absent in manifests written before it was recorded. */
  weights: Schema.optional(Schema.String),
  data: Schema.String,
  dataHash: Schema.String,
  seq: Schema.Int,
  samples: Schema.NullOr(Schema.Int),
  rows: Schema.Int,
  tokens: Schema.Int,
  complete: Schema.Boolean
})
export type Manifest = typeof Manifest.Type

export const statisticsFile = (dir: string) => path.join(dir, "statistics.safetensors")
export const manifestFile = (dir: string) => path.join(dir, "manifest.json")

export interface CalibrateOptions {
  readonly modelDir: string
  readonly data: string
  readonly out: string
  readonly seq: number
  /** Packed rows to use at most; all of the data when left out. */
  readonly samples?: number | undefined
  readonly batchSize?: number
  readonly tokenizer?: Tokenizer | undefined
  /** Save partial statistics every this many batches. */
  readonly saveEvery?: number
  /** Compute the statistics again when OUT holds those of another model, data or length, instead of refusing. */
  readonly replace?: boolean | undefined
  readonly onProgress?: (progress: { readonly rows: number; readonly tokens: number; readonly total: number | undefined }) => void
}

const decodeManifest = Schema.decodeUnknownEffect(Manifest)

/** The manifest in `dir`, if there is one. */
export const readManifest = Effect.fn("Calibrate.readManifest")(function*(dir: string) {
  const json = yield* Files.readJsonIfPresent(manifestFile(dir))
  if (json === undefined) return undefined
  return yield* decodeManifest(json).pipe(
    Effect.mapError((error) => new CheckpointError({ file: manifestFile(dir), reason: `is not a calibration manifest (${error.message})` }))
  )
})

/** Accumulates calibration statistics in fp32 whatever the training precision: they decide what pruning keeps. */
export const calibrate = Effect.fn("Calibrate.calibrate")(function*(model: Model.Model, options: CalibrateOptions) {
  const { out, seq } = options
  const samples = options.samples ?? null
  const batchSize = options.batchSize ?? 4
  const saveEvery = options.saveEvery ?? 8
  const identity = {
    format: "cascade-calibration/1" as const,
    model: path.resolve(options.modelDir),
    configHash: Config.hash(model.config),
    weights: yield* Checkpoint.fingerprint(options.modelDir),
    data: path.resolve(options.data),
    dataHash: yield* Files.sha256(options.data),
    seq,
    samples
  }
  yield* Effect.tryPromise({
    try: () => fs.mkdir(out, { recursive: true }),
    catch: (cause) => new CheckpointError({ file: out, reason: `cannot create folder (${String(cause)})` })
  })

  // Resume from what an earlier run of the same calibration saved.
  const previous = yield* readManifest(out)
  let stats = Calibration.empty(model.config)
  let rows = 0
  const differences = previous === undefined ? [] : [
    previous.configHash === identity.configHash ? [] : [`the model's config (${previous.model}, now ${identity.model})`],
    previous.configHash !== identity.configHash || previous.weights === identity.weights ? [] : [
      `the model's weights (${previous.weights === undefined ? "not recorded" : previous.weights.slice(0, 12)}, now ${identity.weights.slice(0, 12)})`
    ],
    previous.dataHash === identity.dataHash ? [] : [`the data (${previous.data}, now ${identity.data})`],
    previous.seq === seq ? [] : [`--seq (${previous.seq}, now ${seq})`],
    previous.samples === samples ? [] : [`--samples (${previous.samples ?? "all"}, now ${samples ?? "all"})`]
  ].flat()
  if (differences.length > 0 && !options.replace) {
    return yield* new CheckpointError({
      file: manifestFile(out),
      reason: `holds statistics of other inputs: ${differences.join("; ")}; choose another --out or remove it`
    })
  }
  if (previous !== undefined && differences.length === 0) {
    stats = yield* Calibration.read(statisticsFile(out))
    rows = previous.rows
    if (previous.complete) return { stats, manifest: previous }
  } else if (previous !== undefined) {
    // Until new statistics are saved, the folder must not pass for the old ones.
    yield* Files.remove(manifestFile(out))
  }

  const save = (complete: boolean) =>
    Effect.gen(function*() {
      yield* Calibration.write(statisticsFile(out), stats)
      const manifest: Manifest = { ...identity, rows, tokens: stats.tokens, complete }
      yield* Files.writeJson(manifestFile(out), manifest)
      return manifest
    })

  let batches = 0
  yield* Dataset.sequences(options.data, { vocabSize: model.config.vocabSize, tokenizer: options.tokenizer }).pipe(
    Dataset.pack(seq),
    Stream.drop(rows),
    samples === null ? (s) => s : Stream.take(Math.max(0, samples - rows)),
    Stream.grouped(batchSize),
    Stream.runForEach((batch) =>
      Effect.gen(function*() {
        stats = Calibration.merge(stats, yield* Calibration.observe(model, batch.map((row) => row.ids), Dataset.rowMask(batch)))
        rows += batch.length
        batches++
        options.onProgress?.({ rows, tokens: stats.tokens, total: samples ?? undefined })
        if (batches % saveEvery === 0) yield* save(false)
      })
    )
  )
  if (stats.tokens === 0) {
    return yield* new DataError({ file: options.data, reason: "holds no tokens to calibrate on" })
  }
  return { stats, manifest: yield* save(true) }
}, TensorCoreMatMul.withPrecision("fp32"))
