/**
 * The tensor-core kernels compile: every WGSL source a product would run, for shapes of whole tiles
 * and odd ones, each transpose, batches and a shared operand, under each tiling, compiled by Dawn's
 * WGSL compiler on its null device (no GPU needed; running them is the GPU suite's part). Also
 * which adapters the kernels take.
 */
import { assert, describe, it } from "@effect/vitest"
import * as TensorCoreMatMul from "../src/gpu/TensorCoreMatMul.ts"

/** A device of Dawn's null backend with f16 and subgroup matrices. */
const nullDevice = async () => {
  const { create, globals } = await import("webgpu")
  Object.assign(globalThis, globals)
  const adapter = await create(["backend=null", "enable-dawn-features=allow_unsafe_apis"]).requestAdapter()
  assert.isNotNull(adapter, "Dawn's null backend gave no adapter")
  return adapter!.requestDevice({ requiredFeatures: ["shader-f16", "subgroups", "chromium-experimental-subgroup-matrix"] as Array<GPUFeatureName> })
}

/** The compiler's errors for `code`, each with its line. */
const errorsOf = async (device: GPUDevice, code: string) => {
  const info = await device.createShaderModule({ code }).getCompilationInfo()
  return info.messages.filter((m) => m.type === "error").map((m) => `${m.lineNum}:${m.linePos} ${m.message}`)
}

const tilings: Array<TensorCoreMatMul.Tiling> = [
  { tm: 4, tn: 4, wx: 1, wy: 1 },
  { tm: 4, tn: 4, wx: 2, wy: 1 },
  { tm: 2, tn: 4, wx: 2, wy: 4, staged: true },
  { tm: 4, tn: 2, wx: 4, wy: 2, staged: true }
]

// [a's shape, b's shape, transposeA, transposeB]
const products: Array<[Array<number>, Array<number>, boolean, boolean]> = [
  [[128, 64], [64, 128], false, false],
  [[1000, 333], [517, 333], false, true],
  [[1031, 129], [1031, 257], true, false],
  [[8, 100, 64], [8, 100, 64], false, true],
  [[3, 200, 96], [96, 300], false, false]
]

describe("TensorCoreMatMul", () => {
  // Plain async: Dawn's callbacks crash the worker when awaited through Effect's scheduler here.
  it("every kernel of every product compiles, under every tiling", async () => {
    const device = await nullDevice()
    let compiled = 0
    for (const tiling of tilings) {
      for (const [a, b, transposeA, transposeB] of products) {
        const sources = TensorCoreMatMul.kernelSources(a, b, transposeA, transposeB, tiling)
        assert.strictEqual(sources.length, 3)
        for (const code of sources) {
          const errors = await errorsOf(device, code)
          assert.deepStrictEqual(errors, [], `${JSON.stringify(tiling)} [${a}] x [${b}]: ${errors.join("; ")}\n${code}`)
          compiled++
        }
      }
    }
    assert.strictEqual(compiled, tilings.length * products.length * 3)
  }, 60_000)

  it("leaves to tfjs the products narrower than a fragment and batches that broadcast partly", () => {
    const tiling = tilings[0]
    assert.deepStrictEqual(TensorCoreMatMul.kernelSources([8, 64], [64, 64], false, false, tiling), [])
    assert.deepStrictEqual(TensorCoreMatMul.kernelSources([2, 1, 64, 64], [1, 3, 64, 64], false, false, tiling), [])
    assert.strictEqual(TensorCoreMatMul.kernelSources([16, 16], [16, 16], false, false, tiling).length, 3)
  })

  it("takes adapters of 32-lane subgroups with 16x16x16 f16 matrices into f32, and no other", () => {
    const config = { componentType: "f16", resultComponentType: "f32", M: 16, N: 16, K: 16 }
    assert.isTrue(TensorCoreMatMul.fits({ subgroupMinSize: 32, subgroupMaxSize: 32, subgroupMatrixConfigs: [config] }))
    assert.isFalse(TensorCoreMatMul.fits({ subgroupMinSize: 4, subgroupMaxSize: 128, subgroupMatrixConfigs: [config] }))
    assert.isFalse(TensorCoreMatMul.fits({ subgroupMinSize: 32, subgroupMaxSize: 32, subgroupMatrixConfigs: [{ ...config, resultComponentType: "f16" }] }))
    assert.isFalse(TensorCoreMatMul.fits({ subgroupMinSize: 32, subgroupMaxSize: 32 }))
  })
})
