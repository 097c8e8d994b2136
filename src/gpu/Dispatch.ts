/**
 * Our own WGSL kernels recorded into tfjs-backend-webgpu's command stream: the same device, the
 * same command encoder and compute pass as tfjs' kernels, so ours run in order with theirs and
 * nothing is submitted early. Inputs and outputs are tfjs tensors (their GPU buffers bound
 * directly); sizes are baked into each kernel's code, so each size is a pipeline of its own.
 *
 * Why not tfjs' own program interface: it binds every input as f32 (tensor cores need f16
 * operands), allows one output (AdamW updates three tensors) and prepends code before any `enable`.
 */
/// <reference types="@webgpu/types" />
import * as tf from "@tensorflow/tfjs"

/** The parts of tfjs-backend-webgpu's `WebGPUBackend` a kernel records into (public fields there). */
export interface WebGpuBackend {
  readonly device: GPUDevice
  commandEncoder: GPUCommandEncoder | null
  computePassEncoder: GPUComputePassEncoder | null
  dispatchCountInPass: number
  readonly commandQueueOwnedIds: WeakSet<object>
  readonly tensorMap: { get(dataId: object): { resource: unknown } }
  ensureCommandEncoderReady(): void
  endComputePassEncoder(): void
  submitQueue(): void
  /** Set while tf.profile / tf.time runs: each program's GPU time is measured with timestamp queries. */
  readonly activeTimers?: Array<{ name: string; query: Promise<number> }> | null
  readonly supportTimestampQuery: boolean
  querySet: GPUQuerySet | null
  readonly querySetCount: number
  getQueryTime(): Promise<number>
  uploadToGPU(dataId: object): void
  makeTensorInfo(shape: ReadonlyArray<number>, dtype: "float32"): tf.TensorInfo
  disposeData(dataId: object): boolean
}

/** The webgpu backend now in use, or undefined on any other. */
export const webGpuBackend = (): WebGpuBackend | undefined =>
  tf.getBackend() === "webgpu" ? (tf.backend() as unknown as WebGpuBackend) : undefined

/** Whether the device has `feature` (e.g. shader-f16, chromium-experimental-subgroup-matrix). */
export const hasFeature = (backend: WebGpuBackend, feature: string): boolean => backend.device.features.has(feature)

/** A compiled kernel and its bind group layout (asked of the pipeline once, not at every dispatch). */
interface Compiled {
  readonly pipeline: GPUComputePipeline
  readonly layout: GPUBindGroupLayout
}

const pipelines = new WeakMap<GPUDevice, Map<string, Compiled>>()

/**
 * The pipeline of kernel `key`, compiled once per device from `code()`: the key names everything the
 * code bakes in, so the code is generated only the first time (a step records hundreds of kernels).
 */
const pipeline = (device: GPUDevice, key: string, code: () => string): Compiled => {
  let cache = pipelines.get(device)
  if (cache === undefined) pipelines.set(device, (cache = new Map()))
  let found = cache.get(key)
  if (found === undefined) {
    const compiled = device.createComputePipeline({ layout: "auto", compute: { module: device.createShaderModule({ code: code() }), entryPoint: "main" } })
    found = { pipeline: compiled, layout: compiled.getBindGroupLayout(0) }
    cache.set(key, found)
  }
  return found
}

/** Workgroups for `invocations` one-dimensional invocations of 256 per group, spread over y past the 65535 limit of x. */
export const linearGroups = (invocations: number): readonly [number, number, number] => {
  const groups = Math.ceil(invocations / 256)
  const x = Math.min(groups, 65535)
  return [x, Math.ceil(groups / x), 1]
}

/** WGSL for the linear index of an invocation under `linearGroups` (needs `id` and `groups` builtins named so). */
export const linearIndex = "id.x + id.y * groups.x * 256u"

/** A kernel: its WGSL (entry point `main`, bindings 0.. in order) and a key naming all the code depends on. */
export interface Kernel {
  readonly key: string
  readonly code: () => string
}

/** Records one dispatch of `kernel` on `buffers` into tfjs' open compute pass, submitting as tfjs does every few dispatches. */
export const dispatch = (backend: WebGpuBackend, kernel: Kernel, buffers: ReadonlyArray<GPUBuffer>, groups: readonly [number, number, number]): void => {
  const compiled = pipeline(backend.device, kernel.key, kernel.code)
  const bindGroup = backend.device.createBindGroup({
    layout: compiled.layout,
    entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer } }))
  })
  backend.ensureCommandEncoderReady()
  // Under tf.profile, timed as tfjs times its own programs: a pass of its own between two timestamps.
  const timed = backend.activeTimers != null && backend.supportTimestampQuery
  if (timed) {
    backend.endComputePassEncoder()
    backend.querySet ??= backend.device.createQuerySet({ type: "timestamp", count: backend.querySetCount })
    backend.computePassEncoder = backend.commandEncoder!.beginComputePass({
      timestampWrites: { querySet: backend.querySet, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 }
    })
  }
  backend.computePassEncoder ??= backend.commandEncoder!.beginComputePass({})
  backend.computePassEncoder.setPipeline(compiled.pipeline)
  backend.computePassEncoder.setBindGroup(0, bindGroup)
  backend.computePassEncoder.dispatchWorkgroups(...groups)
  backend.dispatchCountInPass++
  if (timed) {
    backend.endComputePassEncoder()
    backend.activeTimers!.push({ name: kernel.key.split(" ")[0], query: backend.getQueryTime() })
  } else if (backend.dispatchCountInPass >= tf.env().getNumber("WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE")) {
    backend.endComputePassEncoder()
    backend.submitQueue()
  }
}

/** The GPU buffer of a tensor, uploaded if it still lives on the CPU; kept alive until the queue is submitted. */
export const bufferOf = (backend: WebGpuBackend, info: tf.TensorInfo): GPUBuffer => {
  backend.uploadToGPU(info.dataId)
  backend.commandQueueOwnedIds.add(info.dataId)
  return backend.tensorMap.get(info.dataId).resource as GPUBuffer
}

/** A new float32 tensor's storage on the GPU, for a kernel to write: its info and buffer. */
export const output = (backend: WebGpuBackend, shape: ReadonlyArray<number>): { readonly info: tf.TensorInfo; readonly buffer: GPUBuffer } => {
  const info = backend.makeTensorInfo(shape, "float32")
  return { info, buffer: bufferOf(backend, info) }
}

/** A tensor for a kernel's output, as tfjs ops return them (counted in tf.memory, freed by dispose). */
export const tensorOf = (info: tf.TensorInfo): tf.Tensor => tf.engine().makeTensorFromTensorInfo(info)

/** A product `op(a) @ op(b)`'s sizes: logical [M, K] x [K, N], each operand's batch (the product of its leading axes). */
export interface ProductShape {
  readonly m: number
  readonly k: number
  readonly n: number
  readonly batchA: number
  readonly batchB: number
}

/** The number of elements of a shape (of a batch: its leading axes). */
export const volume = (dims: ReadonlyArray<number>): number => dims.reduce((x, y) => x * y, 1)

export const productShape = (aShape: ReadonlyArray<number>, bShape: ReadonlyArray<number>, transposeA: boolean, transposeB: boolean): ProductShape => {
  const [ar, br] = [aShape.length, bShape.length]
  return {
    m: transposeA ? aShape[ar - 1] : aShape[ar - 2],
    k: transposeA ? aShape[ar - 2] : aShape[ar - 1],
    n: transposeB ? bShape[br - 2] : bShape[br - 1],
    batchA: volume(aShape.slice(0, -2)),
    batchB: volume(bShape.slice(0, -2))
  }
}

/** One call of tfjs' `BatchMatMul`: `op(a) @ op(b)` on `backend`, with its sizes. */
export interface Product {
  readonly a: tf.TensorInfo
  readonly b: tf.TensorInfo
  readonly transposeA: boolean
  readonly transposeB: boolean
  readonly shape: ProductShape
  readonly backend: WebGpuBackend
}

/**
 * Puts `serve` in front of the webgpu backend's `BatchMatMul` kernel, whatever is registered there
 * now (tfjs' own, or another wrapper); `serve` gets each product and the kernel it wraps. False
 * where tfjs-backend-webgpu is not loaded.
 */
export const wrapBatchMatMul = (serve: (product: Product, wrapped: () => tf.TensorInfo) => tf.TensorInfo): boolean => {
  const original = tf.getKernel("BatchMatMul", "webgpu")
  if (original === undefined) return false
  tf.unregisterKernel("BatchMatMul", "webgpu")
  tf.registerKernel({
    ...original,
    kernelFunc: (args) => {
      const { a, b } = args.inputs as { a: tf.TensorInfo; b: tf.TensorInfo }
      const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean }
      const wrapped = () => original.kernelFunc(args) as tf.TensorInfo
      const shape = productShape(a.shape, b.shape, transposeA, transposeB)
      return serve({ a, b, transposeA, transposeB, shape, backend: args.backend as unknown as WebGpuBackend }, wrapped)
    }
  })
  return true
}
