import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Config from "../src/model/Config.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Reference from "../src/io/Reference.ts"
import * as Safetensors from "../src/io/Safetensors.ts"
import { localFixture, maxAbsDiff, onBackend, sharedFixture, take, tempDir } from "./support.ts"

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

/** A Mistral3ForConditionalGeneration as transformers 5.17 saves it: `language_model.model.*`, vision tower beside. */
const mistral3 = localFixture("mistral3-wrapped")

/** Logits and hidden states of the checkpoint in `dir` against transformers' on the mistral3 fixture's text prompt. */
const matchesMistral3Reference = (dir: string) =>
  Effect.gen(function*() {
    const model = yield* Pretrained.load(dir)
    const diff = yield* Reference.compare(model, yield* Reference.open(path.join(mistral3, "reference.safetensors")))
    assert.isAtMost(diff.logits, 1e-4, `logits of ${dir}`)
    assert.strictEqual(diff.hiddenStates.length, 3)
    diff.hiddenStates.forEach((d, i) => assert.isAtMost(d, 1e-4, `hidden_states.${i} of ${dir}`))
    return model
  })

/** The text config of the mistral3 fixture wrapped in a config.json with the given top-level fields. */
const mistral3Config = (fields: Record<string, unknown>) =>
  Effect.promise(() => fs.readFile(path.join(mistral3, "config.json"), "utf8")).pipe(
    Effect.map((text) => ({ model_type: "mistral3", text_config: JSON.parse(text).text_config, ...fields }))
  )

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
      const original = model.weights.embed[0].dataSync()
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

  it.effect("a Mistral3ForConditionalGeneration loads as its text model and matches transformers", () =>
    Effect.gen(function*() {
      const model = yield* matchesMistral3Reference(mistral3)
      assert.strictEqual(model.config.modelType, "ministral3")
      assert.strictEqual(model.config.numLayers, 2)
      assert.isFalse(model.config.tieWordEmbeddings)
    }).pipe(onBackend("wasm")))

  it.effect("a Mistral3ForConditionalGeneration under its module names, without a vision tower, loads the same", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const source = yield* Safetensors.open(path.join(mistral3, "model.safetensors"))
      const tensors = []
      for (const name of source.names.filter((name) => name.startsWith("language_model."))) {
        tensors.push({
          name: name.replace(/^language_model\.model\./, "model.language_model.").replace(/^language_model\.lm_head\./, "lm_head."),
          dtype: "F32" as const,
          shape: (yield* source.info(name)).shape,
          data: source.readFloat32(name)
        })
      }
      yield* Safetensors.write(path.join(dir, "model.safetensors"), tensors)
      yield* Effect.promise(() => fs.copyFile(path.join(mistral3, "config.json"), path.join(dir, "config.json")))
      const names = (yield* Checkpoint.open(dir)).names
      assert.include(names, "model.language_model.embed_tokens.weight")
      assert.include(names, "lm_head.weight")
      assert.isFalse(names.some((name) => name.includes("vision_tower")))
      yield* matchesMistral3Reference(dir)
    }).pipe(onBackend("wasm")))

  it.effect("a Mistral3ForConditionalGeneration saves as a bare Ministral3ForCausalLM with the same logits", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(mistral3)
      const dir = yield* tempDir
      yield* Pretrained.save(dir, model, { dtype: "F32" })
      const config = (yield* Checkpoint.open(dir)).rawConfig as Record<string, unknown>
      assert.strictEqual(config.model_type, "ministral3")
      assert.deepStrictEqual(config.architectures, ["Ministral3ForCausalLM"])
      assert.strictEqual(config.tie_word_embeddings, false)
      assert.strictEqual(config.dtype, "float32")
      assert.notProperty(config, "text_config")
      const again = yield* Pretrained.load(dir)
      assert.strictEqual(maxAbsDiff(take(Model.forward(again, ids).logits), take(Model.forward(model, ids).logits)), 0)
    }).pipe(onBackend("wasm")))

  it.effect("a mistral3 config ties lm_head by its top-level tie_word_embeddings, true when absent, as transformers 5 does", () =>
    Effect.gen(function*() {
      const decode = (fields: Record<string, unknown>) =>
        mistral3Config(fields).pipe(Effect.flatMap((json) => Config.decode(json, "config.json")))
      assert.isTrue((yield* decode({})).tieWordEmbeddings)
      assert.isFalse((yield* decode({ tie_word_embeddings: false })).tieWordEmbeddings)
    }))

  it.effect("a mistral3 config without text_config fails naming config.json", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const { text_config: _text, ...config } = yield* mistral3Config({})
      yield* Effect.promise(() => fs.writeFile(path.join(dir, "config.json"), JSON.stringify(config)))
      yield* Effect.promise(() => fs.copyFile(path.join(mistral3, "model.safetensors"), path.join(dir, "model.safetensors")))
      const error = yield* Effect.flip(Pretrained.load(dir))
      assert.strictEqual(error._tag, "ConfigError")
      assert.include(error.message, path.join(dir, "config.json"))
      assert.include(error.message, "text_config")
    }).pipe(onBackend("wasm")))

  it.effect("a mistral3 text_config that lacks a field fails naming config.json and text_config", () =>
    Effect.gen(function*() {
      const json = yield* mistral3Config({})
      delete (json.text_config as Record<string, unknown>).hidden_size
      const error = yield* Effect.flip(Config.decode(json, "dir/config.json"))
      assert.strictEqual(error.file, "dir/config.json")
      assert.match(error.reason, /^text_config: .*hidden_size/)
    }))
})
