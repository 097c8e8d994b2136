/**
 * Calibration: streams a data set, packed into rows of `seq` tokens, through the parent and
 * accumulates the statistics pruning ranks by (src/prune/Calibration.ts).
 *
 * The output folder holds `statistics.safetensors` and `manifest.json` naming the model (its config
 * hash), the data (its hash) and the token count. Partial statistics are saved every few batches,
 * so a killed run resumes where it stopped; a finished one is reused as it is.
 */
import { Effect, Schema, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Calibration from "../src/prune/Calibration.ts"
import * as Config from "../src/model/Config.ts"
import * as Dataset from "../src/data/Dataset.ts"
import { CheckpointError, DataError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import type * as Model from "../src/model/Model.ts"
import type { Tokenizer } from "../src/io/Tokenizer.ts"

export const Manifest = Schema.Struct({
  format: Schema.Literal("cascade-calibration/1"),
  model: Schema.String,
  configHash: Schema.String,
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

export const calibrate = Effect.fn("Calibrate.calibrate")(function*(model: Model.Model, options: CalibrateOptions) {
  const { out, seq } = options
  const samples = options.samples ?? null
  const batchSize = options.batchSize ?? 4
  const saveEvery = options.saveEvery ?? 8
  const identity = {
    format: "cascade-calibration/1" as const,
    model: path.resolve(options.modelDir),
    configHash: Config.hash(model.config),
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
  if (previous !== undefined) {
    const same = previous.configHash === identity.configHash && previous.dataHash === identity.dataHash &&
      previous.seq === seq && previous.samples === samples
    if (!same) {
      return yield* new CheckpointError({
        file: manifestFile(out),
        reason: "holds statistics of another model, data set, --seq or --samples; choose another --out or remove it"
      })
    }
    stats = yield* Calibration.read(statisticsFile(out))
    rows = previous.rows
    if (previous.complete) return { stats, manifest: previous }
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
        stats = Calibration.merge(stats, Calibration.observe(model, batch.map((row) => row.ids), Dataset.rowMask(batch)))
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
})
