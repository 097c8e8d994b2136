/**
 * A matrix held as blocks of consecutive rows, each small enough for one storage binding.
 *
 * On WebGPU no buffer bound to a shader may exceed the device's `maxStorageBufferBindingSize`
 * (2 GiB - 4 on an H200), so an 8B parent's fp32 embedding or LM head (131072 x 4096 x 4 bytes =
 * 2 GiB) cannot be one tensor there. The model holds its vocabulary matrices this way; a matrix
 * that fits is one block, so CPU backends (no limit) see exactly the tensors they always did.
 * Blocks are in row order: together they are the matrix, and nothing outside the model knows.
 */
import * as tf from "@tensorflow/tfjs"

/** The blocks of a [R, C] matrix, in row order, each [r_i, C]. */
export type RowBlocks = ReadonlyArray<tf.Tensor2D>

let forcedRows: number | undefined

/**
 * Forces blocks of `rows` rows whatever the backend, or restores the backend's limit with
 * undefined: how tests on a CPU backend split small matrices as a GPU splits large ones.
 */
export const forceRows = (rows: number | undefined): void => {
  forcedRows = rows
}

/** The largest storage binding of the current backend in bytes: the GPU device's limit, unlimited on CPU backends. */
export const bindingLimit = (): number => {
  const device = (tf.backend() as { device?: { limits: { maxStorageBufferBindingSize: number } } }).device
  return device?.limits.maxStorageBufferBindingSize ?? Infinity
}

/**
 * The row ranges [start, end) of the blocks of a [rows, columns] float32 matrix. Under the binding
 * limit the blocks are as even as they can be (131072 rows over 131071 a binding make two of 65536,
 * not one of 131071 and one of a single row): no block sits at the very edge of a binding, and no
 * product is a one-row special case. Forced sizes are taken as given: full blocks, the last shorter.
 */
export const ranges = (rows: number, columns: number): Array<readonly [number, number]> => {
  const most = Math.max(1, Math.floor(bindingLimit() / (4 * columns)))
  const size = forcedRows ?? Math.ceil(rows / Math.ceil(rows / most))
  const out: Array<readonly [number, number]> = []
  for (let start = 0; start < rows; start += size) out.push([start, Math.min(start + size, rows)])
  return out
}

/** Rows of the whole matrix. */
export const rowCount = (blocks: RowBlocks): number => blocks.reduce((rows, block) => rows + block.shape[0], 0)

/** Where each block starts and ends in the rows of the whole matrix. */
export const rangesOf = (blocks: RowBlocks): Array<readonly [number, number]> => {
  let start = 0
  return blocks.map((block) => [start, (start += block.shape[0])] as const)
}

/** Uploads a [rows, columns] matrix given row-major, block by block: the whole is never one tensor. */
export const upload = (values: Float32Array, rows: number, columns: number): Array<tf.Tensor2D> =>
  ranges(rows, columns).map(([start, end]) => tf.tensor2d(values.subarray(start * columns, end * columns), [end - start, columns]))

/** The matrix's values row-major: the blocks read asynchronously (as a GPU requires) one after the other. */
export const read = async (blocks: RowBlocks): Promise<Float32Array> => {
  if (blocks.length === 1) return (await blocks[0].data()) as Float32Array
  const out = new Float32Array(blocks.reduce((n, block) => n + block.size, 0))
  let offset = 0
  for (const block of blocks) {
    out.set((await block.data()) as Float32Array, offset)
    offset += block.size
  }
  return out
}

/** The sum of `f` over the blocks (e.g. a Gram matrix `sum_i B_i^T B_i`), added in block order. */
export const sum = (blocks: RowBlocks, f: (block: tf.Tensor2D, index: number) => tf.Tensor): tf.Tensor =>
  blocks.map(f).reduce((total, term) => tf.add(total, term))
