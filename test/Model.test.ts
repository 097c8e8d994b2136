import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as path from "node:path"
import * as Config from "../src/model/Config.ts"
import * as Model from "../src/model/Model.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Reference from "../src/io/Reference.ts"
import { longPhase } from "../scripts/make_long_phase_fixture.ts"
import { localFixture, maxAbsDiff, onBackend, sharedFixture, take } from "./support.ts"

const tolerance = 1e-4

/** Logits and every hidden state of `dir` against a reference file, padded positions left out. */
const matchesReference = (dir: string, referencePath: string) =>
  Effect.gen(function*() {
    const model = yield* Pretrained.load(dir)
    const before = tf.memory().numTensors
    const diff = yield* Reference.compare(model, yield* Reference.open(referencePath))
    assert.isAtMost(diff.logits, tolerance, `logits of ${dir}`)
    diff.hiddenStates.forEach((d, i) => assert.isAtMost(d, tolerance, `hidden_states.${i} of ${dir}`))
    assert.strictEqual(diff.hiddenStates.length, model.config.numLayers + 1)
    assert.strictEqual(tf.memory().numTensors, before, "forward leaves no tensors behind")
  })

/** Variants made with transformers by scripts/make_references.py, kept in the repository: a missing one fails. */
const variants = ["mistral-bf16", "mistral-tied", "mistral-headdim", "mistral-mqa", "ministral3-yarn", "ministral3-yarn-legacy"]

for (const backend of ["wasm", "cpu"] as const) {
  describe(`Model on ${backend}`, () => {
    it.effect("tiny-mistral matches transformers' logits and hidden states", () =>
      matchesReference(sharedFixture("tiny-mistral"), sharedFixture("tiny-mistral/reference.safetensors")).pipe(
        onBackend(backend)
      ))

    it.effect("tiny-mistral with a right-padded batch matches transformers", () =>
      matchesReference(sharedFixture("tiny-mistral"), localFixture("tiny-mistral-padded/reference-padded.safetensors")).pipe(
        onBackend(backend)
      ))

    for (const name of variants) {
      for (const file of ["reference.safetensors", "reference-padded.safetensors"]) {
        it.effect(`${name} (${file}) matches transformers`, () =>
          matchesReference(localFixture(name), localFixture(`${name}/${file}`)).pipe(
            onBackend(backend)
          ))
      }
    }

    it.effect("ministral3-yarn given explicit position ids (8..55) matches transformers, RoPE and query scales at those positions", () =>
      Effect.gen(function*() {
        const shifted = localFixture("ministral3-yarn/reference-shifted-positions.safetensors")
        const reference = yield* Reference.open(shifted)
        assert.deepStrictEqual(reference.positionIds, reference.ids.map((row) => row.map((_, t) => t + 8)))
        yield* matchesReference(localFixture("ministral3-yarn"), shifted)
      }).pipe(onBackend(backend)))
  })
}

/** tiny-mistral after the long-context phase's conversion (scripts/make_long_phase_fixture.ts), references by transformers. */
const longPhaseDir = localFixture("mistral-long-phase")

describe("The long-context phase's model", () => {
  it.effect("mistral-long-phase holds what the long-context phase makes of tiny-mistral", () =>
    Effect.gen(function*() {
      const parent = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const fixture = yield* Pretrained.load(longPhaseDir)
      assert.deepStrictEqual(fixture.config.raw, Pretrained.configJson(Config.longContext(parent.config, longPhase), "F32"))
      const parentTensors = Model.tensorsOfWeights(parent.config, parent.weights)
      for (const [name, tensor] of Model.tensorsOfWeights(fixture.config, fixture.weights)) {
        assert.strictEqual(maxAbsDiff(tensor.dataSync(), parentTensors.get(name)!.dataSync()), 0, name)
      }
    }).pipe(onBackend("wasm")))

  for (const backend of ["wasm", "cpu"] as const) {
    for (const file of ["reference.safetensors", "reference-padded.safetensors"]) {
      it.effect(`mistral-long-phase (${file}) on ${backend} matches transformers past the original window`, () =>
        Effect.gen(function*() {
          const reference = yield* Reference.open(path.join(longPhaseDir, file))
          assert.isAbove(reference.ids[0].length, 2 * longPhase.originalMax, "the reference reaches past the original window")
          yield* matchesReference(longPhaseDir, path.join(longPhaseDir, file))
        }).pipe(onBackend(backend)))
    }
  }
})

/** Random token rows of the fixture's vocabulary. */
const Prompt = Schema.Struct({
  tokens: Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 511 }))).check(
    Schema.isMinLength(2),
    Schema.isMaxLength(20)
  ),
  split: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 19 })),
  steps: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 4 }))
})

describe("KV cache", () => {
  it.effect.prop("decoding with the cache gives the full forward pass's logits", { prompt: Prompt }, ({ prompt }) =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const tokens = prompt.tokens
      const split = Math.min(prompt.split, tokens.length - 1)
      const full = take(Model.forward(model, [tokens]).logits)
      const v = model.config.vocabSize
      // The prefix in one call, then the rest in chunks of `steps` tokens.
      const first = Model.forward(model, [tokens.slice(0, split)], { useCache: true })
      const pieces = [take(first.logits)]
      let cache = first.cache
      for (let start = split; start < tokens.length; start += prompt.steps) {
        const next = Model.forward(model, [tokens.slice(start, start + prompt.steps)], { cache, useCache: true })
        pieces.push(take(next.logits))
        cache = next.cache
      }
      if (cache) Model.disposeCache(cache)
      const incremental = new Float32Array(tokens.length * v)
      let offset = 0
      for (const piece of pieces) {
        incremental.set(piece, offset)
        offset += piece.length
      }
      assert.isAtMost(maxAbsDiff(incremental, full), 1e-4)
    }).pipe(onBackend("wasm")), { timeout: 120_000, arbitrary: { runs: 15 } })
})

/** Up to four documents of fixture tokens and some padding, packed into one row. */
const PackedDocuments = Schema.Struct({
  documents: Schema.Array(
    Schema.Array(Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 511 }))).check(Schema.isMinLength(1), Schema.isMaxLength(9))
  ).check(Schema.isMinLength(1), Schema.isMaxLength(4)),
  padding: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 3 }))
})

describe("document masking", () => {
  // ministral3-yarn has YaRN and position-based query scaling from position 16 on: positions must restart.
  for (const name of ["tiny-mistral", "ministral3-yarn"]) {
    it.effect.prop(`${name}: each document of a packed row gets exactly the logits it gets alone`, { packed: PackedDocuments }, ({ packed }) =>
      Effect.gen(function*() {
        const model = yield* Pretrained.load(name === "tiny-mistral" ? sharedFixture(name) : localFixture(name))
        const v = model.config.vocabSize
        // Two rows: the documents in order and reversed, so that they sit at other offsets.
        const layouts = [packed.documents, [...packed.documents].reverse()]
        const length = packed.documents.reduce((n, ids) => n + ids.length, 0)
        const t = length + packed.padding
        const rows = layouts.map((documents) => [...documents.flat(), ...new Array<number>(packed.padding).fill(0)])
        const starts = layouts.map((documents) => documents.map((_, d) => documents.slice(0, d).reduce((n, ids) => n + ids.length, 0)))
        const attentionMask = rows.map((row) => row.map((_, i) => (i < length ? 1 : 0)))
        const before = tf.memory().numTensors
        const logits = take(Model.forward(model, rows, { attentionMask, documentStarts: starts }).logits)
        assert.strictEqual(tf.memory().numTensors, before, "forward leaves no tensors behind")
        layouts.forEach((documents, r) =>
          documents.forEach((ids, d) => {
            const alone = take(Model.forward(model, [ids]).logits)
            const at = (r * t + starts[r][d]) * v
            assert.isAtMost(maxAbsDiff(logits.subarray(at, at + ids.length * v), alone), 1e-4, `row ${r} document ${d}`)
          })
        )
      }).pipe(onBackend("wasm")), { timeout: 120_000, arbitrary: { runs: 15 } })
  }
})

describe("last-position logits", () => {
  it.effect("lastLogitsOnly gives the last position's logits of the whole pass, and fits where the whole logits would not", () =>
    Effect.gen(function*() {
      const model = yield* Pretrained.load(sharedFixture("tiny-mistral"))
      const ids = [[1, 17, 300, 42, 9], [1, 5, 6, 7, 8]]
      const whole = take(Model.forward(model, ids).logits)
      const last = Model.forward(model, ids, { lastLogitsOnly: true }).logits
      assert.deepStrictEqual(last.shape, [2, 1, model.config.vocabSize])
      const v = model.config.vocabSize
      const wholeLast = Float32Array.from([...whole.subarray(4 * v, 5 * v), ...whole.subarray(9 * v, 10 * v)])
      assert.strictEqual(maxAbsDiff(take(last), wholeLast), 0)
      // A GPU backend's device as the model reads it, binding the logits of 2 x 4 positions but not 2 x 5.
      const backend = tf.backend() as unknown as { device?: unknown }
      backend.device = { limits: { maxStorageBufferBindingSize: 2 * 4 * v * 4 } }
      try {
        assert.throws(() => Model.forward(model, ids), /past the backend's largest storage binding/)
        take(Model.forward(model, ids, { lastLogitsOnly: true }).logits)
      } finally {
        delete backend.device
      }
    }).pipe(Effect.scoped, onBackend("wasm")))
})
