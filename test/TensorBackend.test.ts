import { assert, describe, it } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import { TensorBackend } from "../layers/TensorBackend.ts"

const use = (name: "wasm" | "cpu") =>
  Effect.gen(function*() {
    const backend = yield* TensorBackend
    assert.strictEqual(backend.name, name)
    assert.strictEqual(tf.getBackend(), name)
    return tf.tidy(() => tf.matMul(tf.ones([2, 3]), tf.ones([3, 2])).dataSync()[0])
  }).pipe(Effect.provide(TensorBackend.layer(name)))

describe("TensorBackend", () => {
  it.effect("acquires, releases and acquires again each CPU backend", () =>
    Effect.gen(function*() {
      for (const name of ["wasm", "cpu", "wasm", "cpu"] as const) assert.strictEqual(yield* use(name), 3)
      // Released backends are removed from the engine, with their memory.
      assert.notInclude(Object.keys(tf.engine().registry), "wasm")
    }))

  it.effect("an absent tensorflow backend is a typed error saying how to get it", () =>
    Effect.gen(function*() {
      const error = yield* Effect.flip(Effect.provide(Effect.void, TensorBackend.layer("tensorflow")))
      assert.strictEqual(error._tag, "BackendUnavailable")
      assert.include(error.message, "@tensorflow/tfjs-node")
    }))

  it.effect("webgpu: where Dawn finds no GPU adapter (the CPU machines), the typed error saying so; where it finds one, a working backend", () =>
    Effect.gen(function*() {
      // Asked of Dawn directly, not through the layer: whether this machine has an adapter.
      const adapter = yield* Effect.promise(() => import("webgpu").then(({ create }) => create([]).requestAdapter()))
      const exit = yield* Effect.exit(
        Effect.gen(function*() {
          const backend = yield* TensorBackend
          const product = tf.tidy(() => tf.matMul(tf.ones([2, 3]), tf.ones([3, 2])))
          return { backend, tfBackend: tf.getBackend(), values: Array.from(yield* Effect.promise(() => product.data())) }
        }).pipe(Effect.provide(TensorBackend.layer("webgpu")))
      )
      if (adapter === null) {
        assert.strictEqual(exit._tag, "Failure", "no adapter: the layer must fail")
        const error = yield* Effect.flip(exit)
        assert.strictEqual(error._tag, "BackendUnavailable")
        assert.strictEqual(error.backend, "webgpu")
        assert.strictEqual(error.reason, "Dawn found no GPU adapter")
        assert.include(error.remedy, "Vulkan")
      } else {
        assert.strictEqual(exit._tag, "Success", `an adapter: the layer must work (${exit._tag === "Failure" ? String(exit.cause) : ""})`)
        const { backend, tfBackend, values } = yield* exit
        assert.strictEqual(backend.name, "webgpu")
        assert.strictEqual(tfBackend, "webgpu")
        assert.deepStrictEqual(values, [3, 3, 3, 3])
      }
    }))
})
