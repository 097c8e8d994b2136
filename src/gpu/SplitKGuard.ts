/**
 * Keeps tfjs-backend-webgpu's split-K product out: on the H200 (Dawn, Vulkan) it gives wrong
 * results. tfjs picks it for a product with few output tiles and a long inner dimension (one batch,
 * K >= 2000), which is every projection of a few tokens through a model 2048 or more wide: a decode
 * step of a 3B+ model, the prompt of a short eval. Those products take tfjs' small-output kernel
 * instead, the one it picks for the same shapes when K is shorter.
 */
import * as tf from "@tensorflow/tfjs"
import { wrapBatchMatMul } from "./Dispatch.ts"

/** tfjs-backend-webgpu's MatMulProgramType value of its small-output program (webgpu_util.ts). */
const smallOutputSize = 2

/** The part of tfjs' WebGPUBackend its product choice reads. */
interface Backend {
  readonly thresholdToIncreaseWorkgroups: number
}

/**
 * Whether tfjs would run `op(a) @ op(b)` with its split-K program by its own rule
 * (BatchMatMul_impl.ts); a program chosen through the WEBGPU_MATMUL_PROGRAM_TYPE flag is respected.
 */
export const picksSplitK = (aShape: ReadonlyArray<number>, bShape: ReadonlyArray<number>, transposeA: boolean, transposeB: boolean, threshold: number): boolean => {
  if (tf.env().getNumber("WEBGPU_MATMUL_PROGRAM_TYPE") >= 0) return false
  const [ar, br] = [aShape.length, bShape.length]
  const m = transposeA ? aShape[ar - 1] : aShape[ar - 2]
  const k = transposeA ? aShape[ar - 2] : aShape[ar - 1]
  const n = transposeB ? bShape[br - 2] : bShape[br - 1]
  const batch = Math.max(aShape.slice(0, -2).reduce((x, y) => x * y, 1), bShape.slice(0, -2).reduce((x, y) => x * y, 1))
  const tiles = batch * Math.ceil(m / 32) * Math.ceil(n / 32)
  const fewTiles = tiles <= threshold || (m <= 8 && tiles <= threshold * 2)
  return fewTiles && batch * m * n > 128 && batch === 1 && k >= 2000
}

let installed = false

/** Puts the guard in front of tfjs' `BatchMatMul` for webgpu, once. */
export const install = (): void => {
  if (installed) return
  installed = wrapBatchMatMul(({ a, b, transposeA, transposeB, backend }, wrapped) => {
    const threshold = (backend as unknown as Backend).thresholdToIncreaseWorkgroups
    if (!picksSplitK(a.shape, b.shape, transposeA, transposeB, threshold)) return wrapped()
    const chosen = tf.env().getNumber("WEBGPU_MATMUL_PROGRAM_TYPE")
    tf.env().set("WEBGPU_MATMUL_PROGRAM_TYPE", smallOutputSize)
    try {
      return wrapped()
    } finally {
      tf.env().set("WEBGPU_MATMUL_PROGRAM_TYPE", chosen)
    }
  })
}
