/**
 * The offline teacher cache: a teacher's top-k over a packed data set, computed once and read by
 * every distillation run of a cascade (`offlineCache` in layers/Teacher.ts). The teacher is always
 * the root and the students share its tokenizer and data, so one cache serves every generation.
 * The folder's format (shards and manifest) is src/io/TeacherCacheFormat.ts.
 *
 * A shard is written (atomically) when its last row is done, then the manifest, so a killed run
 * resumes after its last complete shard. Batches never straddle shards, so a resumed run computes
 * exactly the batches an uninterrupted one does and writes the same bytes.
 */
import { Effect, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Config from "../src/model/Config.ts"
import * as Dataset from "../src/data/Dataset.ts"
import { CheckpointError, DataError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import { format, type Manifest, manifestName, readManifest, type Shard, tokenizerHash, writeShard } from "../src/io/TeacherCacheFormat.ts"
import { type Batch, Teacher, TeacherError } from "../src/train/Teacher.ts"
import type { Tokenizer } from "../src/io/Tokenizer.ts"

/** Shards of about this many bytes on disk, so that a reader holds a few in memory at little cost. */
const SHARD_BYTES = 64 * 1024 * 1024

export interface WriteOptions {
  /** The teacher's checkpoint folder, named in the manifest; the `Teacher` service must run it with top-k `topK`. */
  readonly teacherDir: string
  readonly data: string
  readonly out: string
  readonly seq: number
  readonly topK: number
  /** Packed rows to cache at most; all of the data when left out. */
  readonly samples?: number | undefined
  readonly batchSize?: number | undefined
  /** Rows per shard; by default as many as fill about 64 MiB. */
  readonly rowsPerShard?: number | undefined
  /** For `{"text"}` lines: the teacher's tokenizer. */
  readonly tokenizer?: Tokenizer | undefined
  readonly onProgress?: (progress: { readonly rows: number; readonly total: number | undefined }) => void
}

/** The rows of one shard so far. */
interface ShardBuffer extends Shard {
  readonly index: number
  filled: number
}

/** Runs the `Teacher` over the packed data and writes its top-k to `out`, resuming what a killed run left. */
export const writeCache = Effect.fn("TeacherCache.writeCache")(function*(options: WriteOptions) {
  const teacher = yield* Teacher
  const { out, seq, topK: k } = options
  const batchSize = options.batchSize ?? 4
  const rowsPerShard = options.rowsPerShard ?? Math.max(1, Math.floor(SHARD_BYTES / (seq * k * 6)))
  const configFile = path.join(options.teacherDir, "config.json")
  const config = yield* Config.decode(yield* Files.readJsonIfPresent(configFile), configFile)
  const identity = {
    format,
    teacher: { path: path.resolve(options.teacherDir), configHash: Config.hash(config), vocab: config.vocabSize },
    tokenizerHash: yield* tokenizerHash(options.teacherDir),
    data: { path: path.resolve(options.data), hash: yield* Files.sha256(options.data) },
    seq,
    topK: k,
    samples: options.samples ?? null,
    rowsPerShard
  }
  yield* Effect.tryPromise({
    try: () => fs.mkdir(out, { recursive: true }),
    catch: (cause) => new CheckpointError({ file: out, reason: `cannot create folder (${String(cause)})` })
  })

  const previous = yield* readManifest(out)
  let shards = 0
  if (previous !== undefined) {
    const differ = [
      previous.teacher.configHash === identity.teacher.configHash ? [] : ["teacher"],
      previous.tokenizerHash === identity.tokenizerHash ? [] : ["tokenizer"],
      previous.data.hash === identity.data.hash ? [] : ["data"],
      previous.seq === seq ? [] : ["--seq"],
      previous.topK === k ? [] : ["--top-k"],
      previous.samples === identity.samples ? [] : ["--samples"],
      previous.rowsPerShard === rowsPerShard ? [] : ["rows per shard"]
    ].flat()
    if (differ.length > 0) {
      return yield* new CheckpointError({
        file: path.join(out, manifestName),
        reason: `holds a teacher cache with another ${differ.join(", ")}; choose another --out or remove it`
      })
    }
    if (previous.complete) return previous
    shards = previous.shards
    yield* removeTempFiles(out)
  }

  let rows = shards * rowsPerShard
  const save = (complete: boolean) =>
    Effect.gen(function*() {
      const manifest: Manifest = { ...identity, rows, shards, complete }
      yield* Files.writeJson(path.join(out, manifestName), manifest)
      return manifest
    })
  const finishShard = (shard: ShardBuffer) =>
    Effect.gen(function*() {
      yield* writeShard(out, shard.index, shard, { rows: shard.filled, seq, k })
      shards++
      rows += shard.filled
    })

  const start = rows
  let current: ShardBuffer | undefined
  yield* Dataset.sequences(options.data, { vocabSize: config.vocabSize, tokenizer: options.tokenizer }).pipe(
    // Rows are keyed by their index among text rows; an image's grid would move them, and its pixels are not cached.
    Stream.mapEffect((sequence) =>
      (sequence.imageFiles?.length ?? 0) > 0
        ? Effect.fail(new DataError({ file: options.data, line: sequence.line, reason: "has images, which a teacher cache does not hold: distil from the teacher in process" }))
        : Effect.succeed(sequence)
    ),
    Dataset.pack(seq),
    Stream.drop(start),
    options.samples === undefined ? (s) => s : Stream.take(Math.max(0, options.samples - start)),
    Stream.grouped(rowsPerShard),
    Stream.zipWithIndex,
    Stream.flatMap(([shardRows, i]) => Stream.fromIterable(batchesOf(shardRows, start + i * rowsPerShard, batchSize))),
    teacher.annotate,
    Stream.runForEach(({ batch, teacher: output }) =>
      Effect.gen(function*() {
        if (output._tag !== "TopK" || output.k !== k) {
          return yield* new TeacherError({
            source: teacher.describe,
            reason: `gives ${output._tag === "TopK" ? `its top-${output.k}` : "full log-probs"}, the cache wants its top-${k}`
          })
        }
        const index = Math.floor(batch.indices[0] / rowsPerShard)
        current ??= {
          index,
          ids: new Int32Array(rowsPerShard * seq * k),
          logProbs: new Float32Array(rowsPerShard * seq * k),
          lengths: new Int32Array(rowsPerShard),
          filled: 0
        }
        current.ids.set(output.ids, current.filled * seq * k)
        current.logProbs.set(output.logProbs, current.filled * seq * k)
        batch.rows.forEach((row, r) => (current!.lengths[current!.filled + r] = row.length))
        current.filled += batch.rows.length
        options.onProgress?.({ rows: rows + current.filled, total: options.samples })
        if (current.filled === rowsPerShard) {
          yield* finishShard(current)
          current = undefined
          yield* save(false)
        }
      })
    )
  )
  if (current !== undefined) yield* finishShard(current)
  if (rows === 0) return yield* new DataError({ file: options.data, reason: "holds no tokens to cache" })
  return yield* save(true)
})

/** A shard's rows in batches of `size`, never crossing into the next shard. */
const batchesOf = (rows: ReadonlyArray<Dataset.PackedRow>, first: number, size: number): Array<Batch> => {
  const batches: Array<Batch> = []
  for (let at = 0; at < rows.length; at += size) {
    const slice = rows.slice(at, at + size)
    batches.push({ rows: slice, indices: slice.map((_, r) => first + at + r) })
  }
  return batches
}

/** Temp files a killed write left behind (a clean failure removes its own). */
const removeTempFiles = (dir: string) =>
  Effect.tryPromise({
    try: async () => {
      for (const name of await fs.readdir(dir)) {
        if (/^\.(shard-\d+\.safetensors|manifest\.json)\..+\.tmp$/.test(name)) await fs.rm(path.join(dir, name), { force: true })
      }
    },
    catch: (cause) => new CheckpointError({ file: dir, reason: `cannot remove temp files (${String(cause)})` })
  })
