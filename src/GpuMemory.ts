/**
 * What tfjs's GPU backend holds: the bytes its tensors use and the bytes its buffer pool has
 * allocated (which it keeps: the peak so far). Undefined on CPU backends, which do not count them.
 */
import * as tf from "@tensorflow/tfjs"

export interface GpuMemory {
  readonly inUseBytes: number
  readonly allocatedBytes: number
}

export const read = (): GpuMemory | undefined => {
  const memory = tf.memory() as tf.MemoryInfo & { numBytesInGPU?: number; numBytesAllocatedInGPU?: number }
  return memory.numBytesInGPU === undefined ? undefined : { inUseBytes: memory.numBytesInGPU, allocatedBytes: memory.numBytesAllocatedInGPU ?? memory.numBytesInGPU }
}
