import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as nodePath from "node:path"
import { fileURLToPath } from "node:url"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import type { CheckpointError, ConfigError } from "../src/Errors.ts"
import * as Safetensors from "../src/io/Safetensors.ts"
import { tempDir } from "./support.ts"

const fixtureDir = fileURLToPath(new URL("../../shared/fixtures/tiny-mistral", import.meta.url))

const listDir = (dir: string) => Effect.promise(() => fs.readdir(dir).then((names) => names.sort()))
const readJson = (path: string) => Effect.promise(async (): Promise<any> => JSON.parse(await fs.readFile(path, "utf8")))
const writeText = (path: string, text: string) => Effect.promise(() => fs.writeFile(path, text))

/** Quarter-integers up to 64: exact in F32, BF16 and F16 alike, so every dtype must give them back unchanged. */
const exactValues = (count: number, seed: number) =>
  Float32Array.from({ length: count }, (_, j) => (Math.abs(seed * 31 + j * 7919) % 513 - 256) / 4)

const size = (shape: ReadonlyArray<number>) => shape.reduce((a, b) => a * b, 1)

const expectError = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  tag: "CheckpointError" | "ConfigError",
  fields: { file: string; tensor?: string; reason: RegExp }
) =>
  Effect.gen(function*() {
    const actual = (yield* Effect.flip(effect)) as CheckpointError | ConfigError
    assert.strictEqual(actual._tag, tag)
    assert.strictEqual(actual.file, fields.file)
    assert.strictEqual(actual._tag === "CheckpointError" ? actual.tensor : undefined, fields.tensor)
    assert.match(actual.reason, fields.reason)
  })

const Dimension = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 6 }))
const SaveArbitrary = {
  tensors: Schema.Array(Schema.Struct({ shape: Schema.Array(Dimension).check(Schema.isMaxLength(2)), seed: Schema.Int }))
    .check(Schema.isMaxLength(12)),
  dtype: Schema.Literals(["F32", "BF16", "F16"]),
  maxShardBytes: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 120 }))
}

describe("Checkpoint", () => {
  it.effect("opens the tiny-mistral fixture", () =>
    Effect.gen(function*() {
      const checkpoint = yield* Checkpoint.open(fixtureDir)
      assert.strictEqual(checkpoint.configPath, nodePath.join(fixtureDir, "config.json"))
      assert.strictEqual((checkpoint.rawConfig as { model_type: string }).model_type, "mistral")
      assert.strictEqual(checkpoint.names.length, 39)
      assert.strictEqual(yield* checkpoint.fileOf("lm_head.weight"), nodePath.join(fixtureDir, "model.safetensors"))
      assert.deepStrictEqual(yield* checkpoint.info("model.layers.0.self_attn.k_proj.weight"), { dtype: "F32", shape: [32, 64] })
      const norm = yield* checkpoint.readFloat32("model.norm.weight")
      const direct = yield* (yield* Safetensors.open(nodePath.join(fixtureDir, "model.safetensors"))).readFloat32("model.norm.weight")
      assert.deepStrictEqual(norm, direct)
    }))

  it.effect.prop("save then open gives back every tensor, sharded as transformers shards", SaveArbitrary, ({ tensors, dtype, maxShardBytes }) =>
    Effect.gen(function*() {
      const dir = nodePath.join(yield* tempDir, "out")
      const specs = tensors.map(({ shape, seed }, i) => ({ name: `layers.${i}.weight`, shape, data: exactValues(size(shape), seed) }))
      const config = { model_type: "mistral", hidden_size: 4, nested: { a: [1, null] } }
      yield* Checkpoint.save(dir, { config, tensors: specs, dtype, maxShardBytes })

      const bytes = (shape: ReadonlyArray<number>) => size(shape) * Safetensors.itemSize[dtype]
      const files = yield* listDir(dir)
      const checkpoint = yield* Checkpoint.open(dir)
      assert.deepStrictEqual(checkpoint.rawConfig, config)
      assert.deepStrictEqual([...checkpoint.names].sort(), specs.map((s) => s.name).sort())
      for (const spec of specs) {
        assert.deepStrictEqual(yield* checkpoint.info(spec.name), { dtype, shape: spec.shape })
        assert.deepStrictEqual(yield* checkpoint.readFloat32(spec.name), spec.data)
      }

      if (files.length === 2) {
        assert.deepStrictEqual(files, ["config.json", "model.safetensors"])
        const total = specs.reduce((sum, s) => sum + bytes(s.shape), 0)
        assert.isTrue(specs.length <= 1 || total <= maxShardBytes, "one file only when everything fits")
        return
      }
      const shardFiles = files.filter((f) => f.startsWith("model-"))
      const count = shardFiles.length
      assert.deepStrictEqual(files, [
        "config.json",
        ...shardFiles.map((_, i) => `model-${String(i + 1).padStart(5, "0")}-of-${String(count).padStart(5, "0")}.safetensors`),
        "model.safetensors.index.json"
      ])
      const index = yield* readJson(nodePath.join(dir, "model.safetensors.index.json"))
      assert.deepStrictEqual(index.metadata, {
        total_parameters: specs.reduce((sum, s) => sum + size(s.shape), 0),
        total_size: specs.reduce((sum, s) => sum + bytes(s.shape), 0)
      })
      assert.deepStrictEqual(Object.keys(index.weight_map), specs.map((s) => s.name).sort())

      // Shards keep the given order, and each is filled greedily: it holds more than the limit only when
      // it is a single tensor, and the next shard's first tensor would not have fit in it.
      const shards: Array<Array<{ name: string; shape: ReadonlyArray<number> }>> = []
      for (const file of shardFiles) {
        const shard = yield* Safetensors.open(nodePath.join(dir, file))
        const inOrder = specs.filter((s) => shard.names.includes(s.name))
        shards.push(inOrder)
        for (const s of inOrder) assert.strictEqual(index.weight_map[s.name], file)
        assert.deepStrictEqual(shard.metadata, { format: "pt" })
      }
      assert.deepStrictEqual(shards.flat().map((s) => s.name), specs.map((s) => s.name))
      shards.forEach((shard, i) => {
        const shardBytes = shard.reduce((sum, s) => sum + bytes(s.shape), 0)
        assert.isTrue(shardBytes <= maxShardBytes || shard.length === 1)
        if (i + 1 < shards.length) assert.isTrue(shardBytes + bytes(shards[i + 1][0].shape) > maxShardBytes)
      })
    }), { arbitrary: { runs: 60 } })

  it.effect("computes lazy weights one at a time, and a later save removes the weights files of an earlier one", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      yield* writeText(nodePath.join(dir, "tokenizer.json"), "{}")
      const computed: Array<string> = []
      const tensors = ["a", "b", "c"].map((name) => ({
        name,
        shape: [4],
        data: Effect.sync(() => (computed.push(name), new Float32Array([1, 2, 3, 4])))
      }))
      yield* Checkpoint.save(dir, { config: {}, tensors, dtype: "BF16", maxShardBytes: 8 })
      assert.deepStrictEqual(computed, ["a", "b", "c"])
      assert.deepStrictEqual(yield* listDir(dir), [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json"
      ])
      yield* Checkpoint.save(dir, { config: {}, tensors, dtype: "F32" })
      assert.deepStrictEqual(yield* listDir(dir), ["config.json", "model.safetensors", "tokenizer.json"])
      yield* Checkpoint.save(dir, { config: {}, tensors, dtype: "F16", maxShardBytes: 16 })
      assert.deepStrictEqual(yield* listDir(dir), [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json"
      ])
    }))

  it.effect("fingerprint follows the weights of every shard and the config, not the folder", () =>
    Effect.gen(function*() {
      const tensorsOf = (values: ReadonlyArray<number>) =>
        ["a", "b", "c"].map((name, i) => ({ name, shape: [2], data: Effect.succeed(new Float32Array([values[i], 1])) }))
      const [one, two] = [yield* tempDir, yield* tempDir]
      const sharded = { dtype: "F32", maxShardBytes: 8 } as const
      yield* Checkpoint.save(one, { config: { x: 1 }, tensors: tensorsOf([1, 2, 3]), ...sharded })
      yield* Checkpoint.save(two, { config: { x: 1 }, tensors: tensorsOf([1, 2, 3]), ...sharded })
      const first = yield* Checkpoint.fingerprint(one)
      assert.strictEqual(yield* Checkpoint.fingerprint(two), first, "the same checkpoint in another folder")
      // One value in the last shard: the index is unchanged, the fingerprint is not.
      yield* Checkpoint.save(two, { config: { x: 1 }, tensors: tensorsOf([1, 2, 4]), ...sharded })
      assert.notStrictEqual(yield* Checkpoint.fingerprint(two), first)
      yield* Checkpoint.save(two, { config: { x: 2 }, tensors: tensorsOf([1, 2, 3]), ...sharded })
      assert.notStrictEqual(yield* Checkpoint.fingerprint(two), first)
    }))

  describe("rejects a bad folder, naming the file and tensor", () => {
    const saveTwoShards = (dir: string) =>
      Checkpoint.save(dir, {
        config: { model_type: "mistral" },
        tensors: [
          { name: "a", shape: [2], data: new Float32Array(2) },
          { name: "b", shape: [2], data: new Float32Array(2) }
        ],
        dtype: "F32",
        maxShardBytes: 8
      })

    it.effect("missing or invalid config.json", () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        const configPath = nodePath.join(dir, "config.json")
        yield* expectError(Checkpoint.open(dir), "ConfigError", { file: configPath, reason: /cannot read: ENOENT/ })
        yield* writeText(configPath, "{ not json")
        yield* expectError(Checkpoint.open(dir), "ConfigError", { file: configPath, reason: /invalid JSON/ })
      }))

    it.effect("no weights", () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        yield* writeText(nodePath.join(dir, "config.json"), "{}")
        yield* expectError(Checkpoint.open(dir), "CheckpointError", {
          file: nodePath.join(dir, "model.safetensors"),
          reason: /no model.safetensors or model.safetensors.index.json/
        })
      }))

    it.effect("an index pointing to a missing shard", () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        yield* saveTwoShards(dir)
        const shard = nodePath.join(dir, "model-00002-of-00002.safetensors")
        yield* Effect.promise(() => fs.rm(shard))
        yield* expectError(Checkpoint.open(dir), "CheckpointError", { file: shard, reason: /cannot open: ENOENT/ })
      }))

    it.effect("a tensor listed in the index but not in its shard", () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        yield* saveTwoShards(dir)
        const indexPath = nodePath.join(dir, "model.safetensors.index.json")
        const index = yield* readJson(indexPath)
        index.weight_map.b = "model-00001-of-00002.safetensors"
        yield* writeText(indexPath, JSON.stringify(index))
        yield* expectError(Checkpoint.open(dir), "CheckpointError", {
          file: nodePath.join(dir, "model-00001-of-00002.safetensors"),
          tensor: "b",
          reason: /listed in model.safetensors.index.json but not in this shard/
        })
      }))

    it.effect("an index that is not JSON or has no weight_map", () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        yield* saveTwoShards(dir)
        const indexPath = nodePath.join(dir, "model.safetensors.index.json")
        yield* writeText(indexPath, "{")
        yield* expectError(Checkpoint.open(dir), "CheckpointError", { file: indexPath, reason: /invalid JSON/ })
        yield* writeText(indexPath, JSON.stringify({ metadata: {} }))
        yield* expectError(Checkpoint.open(dir), "CheckpointError", { file: indexPath, reason: /no weight_map/ })
        yield* writeText(indexPath, JSON.stringify({ weight_map: { a: 3 } }))
        yield* expectError(Checkpoint.open(dir), "CheckpointError", { file: indexPath, tensor: "a", reason: /not a file name/ })
      }))

    it.effect("a tensor the checkpoint does not have", () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        yield* saveTwoShards(dir)
        const checkpoint = yield* Checkpoint.open(dir)
        const indexPath = nodePath.join(dir, "model.safetensors.index.json")
        yield* expectError(checkpoint.readFloat32("c"), "CheckpointError", { file: indexPath, tensor: "c", reason: /no such tensor/ })
        yield* expectError(checkpoint.fileOf("c"), "CheckpointError", { file: indexPath, tensor: "c", reason: /no such tensor/ })
      }))
  })
})
