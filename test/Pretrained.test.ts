import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Checkpoint from "../src/Checkpoint.ts"
import * as Model from "../src/Model.ts"
import * as Pretrained from "../src/Pretrained.ts"
import { maxAbsDiff, onBackend, sharedFixture, take, tempDir } from "./support.ts"

/** A copy of tiny-mistral whose config.json has been edited. */
const withConfig = (edit: (config: Record<string, unknown>) => void) =>
  Effect.gen(function*() {
    const dir = yield* tempDir
    const source = sharedFixture("tiny-mistral")
    const config = JSON.parse(yield* Effect.promise(() => fs.readFile(path.join(source, "config.json"), "utf8")))
    edit(config)
    yield* Effect.promise(() => fs.writeFile(path.join(dir, "config.json"), JSON.stringify(config)))
    yield* Effect.promise(() => fs.copyFile(path.join(source, "model.safetensors"), path.join(dir, "model.safetensors")))
    return dir
  })

const ids = [[1, 5, 9, 200, 13, 77, 402, 3]]

describe("Pretrained", () => {
  it.effect("save then load reproduces the logits exactly in F32, shards included", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const dir = yield* tempDir
      yield* Pretrained.save(dir, model, { dtype: "F32", maxShardBytes: 300_000 })
      const files = yield* Effect.promise(() => fs.readdir(dir))
      assert.include(files, "model.safetensors.index.json")
      assert.include(files, "model-00001-of-00004.safetensors")
      const again = yield* Pretrained.load(dir)
      assert.strictEqual(maxAbsDiff(take(Model.forward(again, ids).logits), take(Model.forward(model, ids).logits)), 0)
    }).pipe(onBackend("wasm")))

  it.effect("saves BF16 that loads back to the rounded weights, with a config transformers reads", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const dir = yield* tempDir
      yield* Pretrained.save(dir, model, { dtype: "BF16" })
      const checkpoint = yield* Checkpoint.open(dir)
      const info = yield* checkpoint.info("model.layers.0.self_attn.q_proj.weight")
      assert.strictEqual(info.dtype, "BF16")
      const config = checkpoint.rawConfig as Record<string, unknown>
      assert.strictEqual(config.dtype, "bfloat16")
      assert.strictEqual(config.model_type, "mistral")
      assert.deepStrictEqual(config.architectures, ["MistralForCausalLM"])
      const stored = yield* checkpoint.readFloat32("model.embed_tokens.weight")
      const original = model.weights.embed.dataSync()
      // bf16 keeps 8 bits of mantissa: relative error at most 2^-9.
      for (let i = 0; i < stored.length; i++) assert.isAtMost(Math.abs(stored[i] - original[i]), Math.abs(original[i]) / 256)
    }).pipe(onBackend("wasm")))

  it.effect("a config that lies about a size fails naming the tensor and the file", () =>
    Effect.gen(function*() {
      const dir = yield* withConfig((config) => (config.intermediate_size = 128))
      const error = yield* Effect.flip(Pretrained.load(dir))
      assert.strictEqual(error._tag, "CheckpointError")
      assert.include(error.message, "model.layers.0.mlp.gate_proj.weight")
      assert.include(error.message, path.join(dir, "model.safetensors"))
      assert.include(error.message, "[192,64]")
    }).pipe(onBackend("wasm")))

  it.effect("a config missing a field fails naming config.json and the field", () =>
    Effect.gen(function*() {
      const dir = yield* withConfig((config) => delete config.hidden_size)
      const error = yield* Effect.flip(Pretrained.load(dir))
      assert.strictEqual(error._tag, "ConfigError")
      assert.include(error.message, path.join(dir, "config.json"))
      assert.include(error.message, "hidden_size")
    }).pipe(onBackend("wasm")))

  it.effect("heads that do not divide fail as a config error", () =>
    Effect.gen(function*() {
      const dir = yield* withConfig((config) => (config.num_key_value_heads = 3))
      const error = yield* Effect.flip(Pretrained.load(dir))
      assert.strictEqual(error._tag, "ConfigError")
      assert.include(error.message, "num_key_value_heads")
    }).pipe(onBackend("wasm")))
})
