/**
 * A Hugging Face checkpoint folder: config.json plus the weights, either one `model.safetensors` or
 * shards listed by `model.safetensors.index.json`. Files are named and laid out as transformers'
 * `save_pretrained` does, so `from_pretrained` loads what `save` writes.
 */
import { createHash } from "node:crypto"
import * as fs from "node:fs/promises"
import * as nodePath from "node:path"
import { Effect, type Scope } from "effect"
import { CheckpointError, ConfigError } from "../Errors.ts"
import { sha256, writeJson } from "./Files.ts"
import * as Safetensors from "./Safetensors.ts"

const configName = "config.json"
const singleName = "model.safetensors"
const indexName = "model.safetensors.index.json"

/** Shard names as transformers gives them: model-00001-of-00003.safetensors. */
const shardName = (index: number, count: number) =>
  `model-${String(index + 1).padStart(5, "0")}-of-${String(count).padStart(5, "0")}.safetensors`
const isWeightsFile = (name: string) => name === singleName || name === indexName || /^model-\d{5}-of-\d{5}\.safetensors$/.test(name)

/** transformers' default `max_shard_size` ("5GB"). */
const defaultMaxShardBytes = 5_000_000_000

export interface Checkpoint {
  readonly dir: string
  readonly configPath: string
  /** config.json as parsed JSON; its fields are validated by whoever reads them. */
  readonly rawConfig: unknown
  /** Every tensor name, across all shards. */
  readonly names: ReadonlyArray<string>
  /** The path of the file that holds the tensor. */
  readonly fileOf: (name: string) => Effect.Effect<string, CheckpointError>
  readonly info: (name: string) => Effect.Effect<Safetensors.TensorInfo, CheckpointError>
  readonly readFloat32: (name: string) => Effect.Effect<Float32Array, CheckpointError>
}

const elementCount = (shape: ReadonlyArray<number>) => shape.reduce((a, b) => a * b, 1)

const describe = (cause: unknown): string => (cause instanceof Error ? cause.message : String(cause))

const exists = (path: string) => Effect.promise(() => fs.access(path).then(() => true, () => false))

const readConfig = Effect.fnUntraced(function*(configPath: string) {
  const text = yield* Effect.tryPromise({
    try: () => fs.readFile(configPath, "utf8"),
    catch: (cause) => new ConfigError({ file: configPath, reason: `cannot read: ${describe(cause)}` })
  })
  return yield* Effect.try({
    try: (): unknown => JSON.parse(text),
    catch: (cause) => new ConfigError({ file: configPath, reason: `invalid JSON: ${describe(cause)}` })
  })
})

/** The index's weight_map: tensor name -> shard file name. */
const readWeightMap = Effect.fnUntraced(function*(indexPath: string) {
  const fail = (reason: string) => new CheckpointError({ file: indexPath, reason })
  const text = yield* Effect.tryPromise({
    try: () => fs.readFile(indexPath, "utf8"),
    catch: (cause) => fail(`cannot read: ${describe(cause)}`)
  })
  const index = yield* Effect.try({ try: (): unknown => JSON.parse(text), catch: (cause) => fail(`invalid JSON: ${describe(cause)}`) })
  const weightMap = typeof index === "object" && index !== null ? (index as { weight_map?: unknown }).weight_map : undefined
  if (typeof weightMap !== "object" || weightMap === null || Array.isArray(weightMap)) {
    return yield* fail("has no weight_map object")
  }
  for (const [name, file] of Object.entries(weightMap)) {
    if (typeof file !== "string" || file === "") {
      return yield* new CheckpointError({ file: indexPath, tensor: name, reason: "weight_map entry is not a file name" })
    }
  }
  return weightMap as Record<string, string>
})

/**
 * Opens a checkpoint folder. Like transformers, a single model.safetensors wins over an index. Every
 * shard is opened and every tensor in the index checked to be in its shard, so that a broken folder
 * fails here rather than halfway through a run. Files stay open until the scope closes.
 */
export const open = Effect.fn("Checkpoint.open")(function*(
  dir: string
): Effect.fn.Return<Checkpoint, CheckpointError | ConfigError, Scope.Scope> {
  const configPath = nodePath.join(dir, configName)
  const rawConfig = yield* readConfig(configPath)
  const singlePath = nodePath.join(dir, singleName)
  const indexPath = nodePath.join(dir, indexName)

  let fileByTensor: Map<string, Safetensors.SafetensorsFile>
  let missingFile: string // the file named when a tensor is asked for that the checkpoint lacks
  if (yield* exists(singlePath)) {
    const file = yield* Safetensors.open(singlePath)
    fileByTensor = new Map(file.names.map((name) => [name, file]))
    missingFile = singlePath
  } else if (yield* exists(indexPath)) {
    const weightMap = yield* readWeightMap(indexPath)
    const shards = new Map<string, Safetensors.SafetensorsFile>()
    for (const shard of new Set(Object.values(weightMap))) {
      shards.set(shard, yield* Safetensors.open(nodePath.join(dir, shard)))
    }
    fileByTensor = new Map()
    for (const [name, shard] of Object.entries(weightMap)) {
      const file = shards.get(shard)!
      yield* file.info(name).pipe(
        Effect.mapError(() => new CheckpointError({ file: file.path, tensor: name, reason: `listed in ${indexName} but not in this shard` }))
      )
      fileByTensor.set(name, file)
    }
    missingFile = indexPath
  } else {
    return yield* new CheckpointError({ file: singlePath, reason: `no ${singleName} or ${indexName} in ${dir}` })
  }

  const fileFor = (name: string) => {
    const file = fileByTensor.get(name)
    return file === undefined
      ? Effect.fail(new CheckpointError({ file: missingFile, tensor: name, reason: "no such tensor in this checkpoint" }))
      : Effect.succeed(file)
  }

  return {
    dir,
    configPath,
    rawConfig,
    names: [...fileByTensor.keys()],
    fileOf: (name) => Effect.map(fileFor(name), (file) => file.path),
    info: (name) => Effect.flatMap(fileFor(name), (file) => file.info(name)),
    readFloat32: (name) => Effect.flatMap(fileFor(name), (file) => file.readFloat32(name))
  }
})

/** A weight to save: its values in f32 (or an effect computing them when its turn comes); `save` picks the stored dtype. */
export interface WeightSpec<E = never, R = never> {
  readonly name: string
  readonly shape: ReadonlyArray<number>
  readonly data: Float32Array | Effect.Effect<Float32Array, E, R>
}

export interface SaveOptions<E = never, R = never> {
  /** Written as config.json as is. */
  readonly config: object
  readonly tensors: ReadonlyArray<WeightSpec<E, R>>
  readonly dtype: Safetensors.FloatDtype
  /** Largest shard, in bytes of tensor data; defaults to transformers' 5 GB. */
  readonly maxShardBytes?: number
}

/**
 * Splits tensors into shards in their given order, as huggingface_hub does: a tensor starts a new
 * shard when it would push the current one past the limit; a tensor larger than the limit gets a
 * shard of its own.
 */
const splitIntoShards = <T>(tensors: ReadonlyArray<T>, sizeOf: (tensor: T) => number, maxBytes: number) => {
  const shards: Array<Array<T>> = []
  let current: Array<T> = []
  let currentBytes = 0
  for (const tensor of tensors) {
    const size = sizeOf(tensor)
    if (current.length > 0 && currentBytes + size > maxBytes) {
      shards.push(current)
      current = []
      currentBytes = 0
    }
    current.push(tensor)
    currentBytes += size
  }
  if (current.length > 0 || shards.length === 0) shards.push(current)
  return shards
}


/**
 * Saves a checkpoint folder as transformers' save_pretrained does: model.safetensors, or
 * model-0000i-of-0000N.safetensors shards plus model.safetensors.index.json, then config.json. Each
 * file is written atomically. Weights files of an earlier save that this one did not write are removed
 * afterwards, since a stale model.safetensors would win over a new index when loading. Nothing else is
 * written: the caller's config decides the dtype transformers loads as ("dtype" in config.json).
 */
export const save = Effect.fn("Checkpoint.save")(function*<E = never, R = never>(
  dir: string,
  options: SaveOptions<E, R>
): Effect.fn.Return<void, CheckpointError | E, R> {
  const { config, tensors, dtype, maxShardBytes = defaultMaxShardBytes } = options
  if (!(maxShardBytes > 0)) {
    return yield* new CheckpointError({ file: dir, reason: `maxShardBytes must be positive, got ${maxShardBytes}` })
  }
  const seen = new Set<string>()
  for (const { name } of tensors) {
    if (seen.has(name)) return yield* new CheckpointError({ file: dir, tensor: name, reason: "is given twice" })
    seen.add(name)
  }
  yield* Effect.tryPromise({
    try: () => fs.mkdir(dir, { recursive: true }),
    catch: (cause) => new CheckpointError({ file: dir, reason: `cannot create folder: ${describe(cause)}` })
  })

  const byteSize = (tensor: WeightSpec<E, R>) => elementCount(tensor.shape) * Safetensors.itemSize[dtype]
  const shards = splitIntoShards(tensors, byteSize, maxShardBytes)
  const written = new Set<string>()
  for (const [i, shard] of shards.entries()) {
    const name = shards.length === 1 ? singleName : shardName(i, shards.length)
    yield* Safetensors.write(nodePath.join(dir, name), shard.map((tensor) => ({ ...tensor, dtype })))
    written.add(name)
  }
  if (shards.length > 1) {
    // Sorted keys, as transformers writes the index.
    const entries = shards.flatMap((shard, i) => shard.map((tensor) => [tensor.name, shardName(i, shards.length)] as const))
    const weightMap = Object.fromEntries(entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
    const metadata = {
      total_parameters: tensors.reduce((sum, tensor) => sum + elementCount(tensor.shape), 0),
      total_size: tensors.reduce((sum, tensor) => sum + byteSize(tensor), 0)
    }
    yield* writeJson(nodePath.join(dir, indexName), { metadata, weight_map: weightMap })
    written.add(indexName)
  }
  yield* writeJson(nodePath.join(dir, configName), config)

  const stale = yield* Effect.tryPromise({
    try: () => fs.readdir(dir),
    catch: (cause) => new CheckpointError({ file: dir, reason: `cannot list folder: ${describe(cause)}` })
  })
  for (const name of stale.filter((name) => isWeightsFile(name) && !written.has(name))) {
    yield* Effect.tryPromise({
      try: () => fs.rm(nodePath.join(dir, name)),
      catch: (cause) => new CheckpointError({ file: nodePath.join(dir, name), reason: `cannot remove stale weights: ${describe(cause)}` })
    })
  }
})

/**
 * What a checkpoint folder holds, as one hash: config.json and every weight file (the shards the
 * index lists, in order). Runs name the models they start from by it, so that a model retrained in
 * place is another start, where a hash of its config alone would not tell.
 */
export const fingerprint = Effect.fn("Checkpoint.fingerprint")(function*(dir: string) {
  const checkpoint = yield* open(dir)
  const files = [...new Set(yield* Effect.forEach(checkpoint.names, checkpoint.fileOf))].sort()
  const hashes = yield* Effect.forEach([checkpoint.configPath, ...files], hashOf)
  return createHash("sha256").update(hashes.join("\n")).digest("hex")
}, Effect.scoped)

/** Hashes of files this process has read, by path, inode, size and modification time: a pipeline names each model several times. */
const fileHashes = new Map<string, string>()

const hashOf = Effect.fnUntraced(function*(file: string) {
  const stat = yield* Effect.tryPromise({
    try: () => fs.stat(file),
    catch: (cause) => new CheckpointError({ file, reason: `cannot be read (${describe(cause)})` })
  })
  // The inode too: files are written aside and renamed, so a rewrite is a new inode even within one clock tick.
  const key = `${file}\0${stat.ino}\0${stat.size}\0${stat.mtimeMs}`
  const known = fileHashes.get(key)
  if (known !== undefined) return known
  const hash = yield* sha256(file)
  fileHashes.set(key, hash)
  return hash
})
