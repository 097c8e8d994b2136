/**
 * Keeps tfjs-backend-webgpu's split-K product out: on the H200 (Dawn, Vulkan) it gives wrong
 * results. tfjs picks it for a product with few output tiles and a long inner dimension (one batch,
 * K >= 2000), which is every projection of a few tokens through a model 2048 or more wide: a decode
 * step of a 3B+ model, the prompt of a short eval. Those products take tfjs' small-output kernel
 * instead, the one it picks for the same shapes when K is shorter.
 */
import * as tf from "@tensorflow/tfjs"
import { type ProductShape, wrapBatchMatMul } from "./Dispatch.ts"

/** tfjs-backend-webgpu's MatMulProgramType value of its small-output program (webgpu_util.ts). */
const smallOutputSize = 2

/** The part of tfjs' WebGPUBackend its product choice reads. */
interface Backend {
  readonly thresholdToIncreaseWorkgroups: number
}

/**
 * Whether tfjs would run a product of `shape` with its split-K program by its own rule
 * (BatchMatMul_impl.ts); a program chosen through the WEBGPU_MATMUL_PROGRAM_TYPE flag is respected.
 */
const picksSplitK = ({ m, k, n, batchA, batchB }: ProductShape, threshold: number): boolean => {
  if (tf.env().getNumber("WEBGPU_MATMUL_PROGRAM_TYPE") >= 0) return false
  const batch = Math.max(batchA, batchB)
  const tiles = batch * Math.ceil(m / 32) * Math.ceil(n / 32)
  const fewTiles = tiles <= threshold || (m <= 8 && tiles <= threshold * 2)
  return fewTiles && batch * m * n > 128 && batch === 1 && k >= 2000
}

let installed = false

/** Puts the guard in front of tfjs' `BatchMatMul` for webgpu, once. */
export const install = (): void => {
  if (installed) return
  installed = wrapBatchMatMul(({ shape, backend }, wrapped) => {
    if (!picksSplitK(shape, (backend as unknown as Backend).thresholdToIncreaseWorkgroups)) return wrapped()
    const chosen = tf.env().getNumber("WEBGPU_MATMUL_PROGRAM_TYPE")
    tf.env().set("WEBGPU_MATMUL_PROGRAM_TYPE", smallOutputSize)
    try {
      return wrapped()
    } finally {
      tf.env().set("WEBGPU_MATMUL_PROGRAM_TYPE", chosen)
    }
  })
}
