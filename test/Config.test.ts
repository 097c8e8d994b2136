import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Config from "../src/model/Config.ts"
import * as Model from "../src/model/Model.ts"
import { maxAbsDiff, onBackend, sharedFixture, take } from "./support.ts"

/** The parts of a decoded config that decide what the model computes (all but the raw JSON). */
const computed = ({ raw: _raw, ...config }: Config.ModelConfig) => config

/** Parent configs over the fields whose class defaults differ between MistralConfig and Ministral3Config. */
const Parent = Schema.Struct({
  model_type: Schema.Literals(["mistral", "ministral3"]),
  head_dim: Schema.optional(Schema.Literals([8, 16, 32])),
  rms_norm_eps: Schema.optional(Schema.Literals([1e-6, 1e-5])),
  sliding_window: Schema.optional(Schema.NullOr(Schema.Literals([4, 4096]))),
  pad_token_id: Schema.optional(Schema.NullOr(Schema.Literals([0, 11]))),
  max_position_embeddings: Schema.optional(Schema.Literals([64, 2048])),
  rope: Schema.Literals(["absent", "default", "legacy", "yarn"]),
  topLevelOriginalMax: Schema.Boolean
})

const Long = Schema.Struct({
  factor: Schema.Literals([2, 4, 16]),
  originalMax: Schema.Literals([8, 12, 16384]),
  scalingBeta: Schema.optional(Schema.Literals([0, 0.1, 0.5]))
})

const parentJson = ({ rope, topLevelOriginalMax, ...fields }: typeof Parent.Type) => ({
  vocab_size: 8,
  hidden_size: 64,
  intermediate_size: 8,
  num_hidden_layers: 1,
  num_attention_heads: 4,
  ...fields,
  ...(rope === "default" ? { rope_parameters: { rope_type: "default", rope_theta: 1e4 } } : {}),
  ...(rope === "legacy" ? { rope_theta: 5e5, rope_scaling: { type: "yarn", factor: 8, original_max_position_embeddings: 32 } } : {}),
  ...(rope === "yarn" ? { rope_parameters: { rope_type: "yarn", rope_theta: 1e6, factor: 2, mscale: 0.7, llama_4_scaling_beta: 0.3 } } : {}),
  ...(topLevelOriginalMax ? { original_max_position_embeddings: 20 } : {})
})

describe("Config.longContext", () => {
  it.effect("turns a Mistral parent into a Ministral 3 with YaRN and llama_4_scaling_beta 0.1", () =>
    Effect.gen(function*() {
      const parent = (yield* Pretrained.load(sharedFixture("tiny-mistral"))).config
      assert.strictEqual(parent.modelType, "mistral")
      const long = Config.longContext(parent, { factor: 4, originalMax: 12 })
      assert.strictEqual(long.modelType, "ministral3")
      assert.deepInclude(long.rope, { type: "yarn", factor: 4, originalMaxPositionEmbeddings: 12, llama4ScalingBeta: 0.1, theta: 1e6 })
      assert.strictEqual(long.maxPositionEmbeddings, 48)
      assert.deepInclude(long.raw, { model_type: "ministral3", architectures: ["Ministral3ForCausalLM"], max_position_embeddings: 48 })
      assert.deepStrictEqual(long.raw.rope_parameters, {
        rope_type: "yarn",
        rope_theta: 1e6,
        factor: 4,
        original_max_position_embeddings: 12,
        beta_fast: 32,
        beta_slow: 1,
        mscale: 1,
        mscale_all_dim: 1,
        llama_4_scaling_beta: 0.1
      })
    }).pipe(onBackend("wasm")))

  it.effect.prop(
    "the config.json it writes reads back (with transformers' Ministral3 defaults) as the model it computes",
    { parent: Parent, long: Long },
    ({ parent, long }) =>
      Effect.gen(function*() {
        const converted = Config.longContext(yield* Config.decode(parentJson(parent), "parent"), long)
        assert.strictEqual(converted.raw.model_type, "ministral3")
        assert.strictEqual(converted.rope.llama4ScalingBeta, long.scalingBeta ?? 0.1)
        const again = yield* Config.decode(JSON.parse(JSON.stringify(converted.raw)), "long/config.json")
        assert.deepStrictEqual(computed(again), computed(converted))
      }),
    { arbitrary: { runs: 200 } }
  )

  it.effect("queries are scaled past the original window and only there", () =>
    Effect.gen(function*() {
      const parent = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const originalMax = 12
      const withBeta = (scalingBeta: number) =>
        Model.make(Config.longContext(parent.config, { factor: 4, originalMax, scalingBeta }), parent.weights)
      let state = 5
      const ids = [Array.from({ length: 40 }, () => (state = (state * 1103515245 + 12345) % 2147483648) % 509 + 3)]
      const v = parent.config.vocabSize
      const scaled = take(Model.forward(withBeta(0.1), ids).logits)
      const unscaled = take(Model.forward(withBeta(0), ids).logits)
      const position = (values: Float32Array, t: number) => values.subarray(t * v, (t + 1) * v)
      for (let t = 0; t < ids[0].length; t++) {
        const diff = maxAbsDiff(position(scaled, t), position(unscaled, t))
        if (t < originalMax) assert.strictEqual(diff, 0, `position ${t} is inside the original window`)
        else assert.isAbove(diff, 1e-3, `position ${t} is past the original window`)
      }
    }).pipe(onBackend("wasm")))

  it.effect("a Mistral config's llama_4_scaling_beta scales nothing, as transformers' Mistral ignores it", () =>
    Effect.gen(function*() {
      const rope_parameters = { rope_type: "yarn", rope_theta: 1e6, factor: 4, original_max_position_embeddings: 12, llama_4_scaling_beta: 0.1 }
      const base = { vocab_size: 8, hidden_size: 64, intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 4, rope_parameters }
      const mistral = yield* Config.decode({ ...base, model_type: "mistral" }, "c")
      const ministral = yield* Config.decode({ ...base, model_type: "ministral3" }, "c")
      assert.strictEqual(mistral.rope.llama4ScalingBeta, undefined)
      assert.strictEqual(ministral.rope.llama4ScalingBeta, 0.1)
    }))
})
