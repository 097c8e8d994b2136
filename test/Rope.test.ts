import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { readFileSync } from "node:fs"
import * as Config from "../src/model/Config.ts"
import * as Rope from "../src/model/Rope.ts"
import { localFixture } from "./support.ts"

interface Probe {
  readonly attention_scaling: number
  readonly config_rope_parameters: Record<string, unknown>
  readonly head_dim: number
  readonly inv_freq: ReadonlyArray<number>
  readonly max_position_embeddings?: number
}

const probes = JSON.parse(readFileSync(localFixture("rope-probe.json"), "utf8")) as Record<string, Probe | unknown>

const configOf = (probe: Probe, modelType = "ministral3") =>
  Config.decode({
    model_type: modelType,
    vocab_size: 8,
    hidden_size: probe.head_dim * 2,
    intermediate_size: 8,
    num_hidden_layers: 1,
    num_attention_heads: 2,
    head_dim: probe.head_dim,
    max_position_embeddings: probe.max_position_embeddings ?? 262144,
    rope_parameters: probe.config_rope_parameters
  }, "probe")

describe("Rope", () => {
  for (const [name, value] of Object.entries(probes)) {
    if (name.startsWith("_")) continue
    const probe = value as Probe
    it.effect(`${name}: inverse frequencies and attention factor equal transformers' (float32)`, () =>
      Effect.gen(function*() {
        const rope = Rope.make(yield* configOf(probe))
        assert.strictEqual(rope.invFreq.length, probe.inv_freq.length)
        for (let i = 0; i < probe.inv_freq.length; i++) {
          assert.isAtMost(Math.abs(rope.invFreq[i] - probe.inv_freq[i]) / probe.inv_freq[i], 2.4e-7, `inv_freq[${i}]`)
        }
        assert.isAtMost(Math.abs(rope.attentionFactor - probe.attention_scaling), 1e-12)
      }))
  }

  it.effect("Ministral 3's query scale grows with floor(pos / original max)", () =>
    Effect.gen(function*() {
      const config = yield* configOf(probes["ministral3-real-3b-8b-14b"] as Probe)
      const scales = Rope.queryScales(config, 16383, 3)
      assert.deepStrictEqual(Array.from(scales), [1, Math.fround(1 + 0.1 * Math.log(2)), Math.fround(1 + 0.1 * Math.log(2))])
    }))
})

describe("Config", () => {
  const base = { vocab_size: 8, hidden_size: 64, intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 4 }
  it.effect("applies transformers' class defaults per architecture", () =>
    Effect.gen(function*() {
      const mistral = yield* Config.decode({ ...base, model_type: "mistral" }, "c")
      assert.strictEqual(mistral.headDim, 16)
      assert.strictEqual(mistral.slidingWindow, 4096)
      assert.strictEqual(mistral.numKvHeads, 4)
      const ministral = yield* Config.decode({ ...base, model_type: "ministral3" }, "c")
      assert.strictEqual(ministral.headDim, 128)
      assert.strictEqual(ministral.slidingWindow, null)
      assert.strictEqual(ministral.rope.type, "yarn")
      assert.strictEqual(ministral.rope.llama4ScalingBeta, 0.1)
      const error = yield* Effect.flip(Config.decode({ ...base, model_type: "ministral3", head_dim: null }, "c"))
      assert.include(error.message, "head_dim")
    }))

  it.effect("reads the legacy rope_theta + rope_scaling layout like rope_parameters", () =>
    Effect.gen(function*() {
      const yarn = { type: "yarn", factor: 4, original_max_position_embeddings: 16, llama_4_scaling_beta: 0.1 }
      const legacy = yield* Config.decode({ ...base, model_type: "ministral3", rope_theta: 1e6, rope_scaling: yarn }, "c")
      const current = yield* Config.decode({ ...base, model_type: "ministral3", rope_parameters: { ...yarn, rope_theta: 1e6 } }, "c")
      assert.deepStrictEqual(legacy.rope, current.rope)
    }))

  it.effect("rejects what it cannot run, naming the file", () =>
    Effect.gen(function*() {
      for (const [config, expect] of [
        [{ ...base, model_type: "llama" }, "model_type"],
        [{ ...base, model_type: "mistral", hidden_act: "gelu" }, "hidden_act"],
        [{ ...base, model_type: "mistral", rope_parameters: { rope_type: "longrope" } }, "longrope"],
        [{ ...base, model_type: "mistral", vocab_size: -1 }, "vocab_size"]
      ] as const) {
        const error = yield* Effect.flip(Config.decode(config, "dir/config.json"))
        assert.include(error.message, "dir/config.json")
        assert.include(error.message, expect)
      }
    }))
})
