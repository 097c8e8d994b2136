/**
 * Which products the tensor cores take and which adapters the kernels fit. The kernels themselves
 * run in the GPU suite (scripts/gpu-suite.ts), against fp32 products on the same GPU: Dawn's null
 * device here crashes now and then while compiling (a native race), too flaky for this suite.
 */
import { assert, describe, it } from "@effect/vitest"
import * as TensorCoreMatMul from "../src/gpu/TensorCoreMatMul.ts"

const tiling: TensorCoreMatMul.Tiling = { tm: 4, tn: 4, wx: 1, wy: 1 }

describe("TensorCoreMatMul", () => {
  it("leaves to tfjs the products narrower than a fragment and batches that broadcast partly", () => {
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
