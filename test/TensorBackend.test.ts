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

  it.effect("webgpu without a GPU adapter is a typed error (runs on the GPU machine otherwise)", () =>
    Effect.gen(function*() {
      const exit = yield* Effect.exit(Effect.provide(Effect.succeed(tf.getBackend()), TensorBackend.layer("webgpu")))
      if (exit._tag === "Success") {
        assert.strictEqual(exit.value, "webgpu")
      } else {
        assert.include(String(exit.cause), "BackendUnavailable")
      }
    }))
})
