/**
 * The TensorFlow.js backend as a resource: a Layer that loads, registers and selects one backend,
 * and on release frees its memory (wasm heap, GPU device) while keeping it registrable again.
 *
 * - `wasm` (default on CPU) and `cpu` ship with the project.
 * - `webgpu` runs through Dawn's Node binding (the `webgpu` package); it needs a Vulkan driver.
 * - `tensorflow` is libtensorflow through `@tensorflow/tfjs-node-gpu` or `@tensorflow/tfjs-node`,
 *   optional peer dependencies whose install downloads libtensorflow: absent unless installed.
 */
import * as tf from "@tensorflow/tfjs"
import { Config, Context, Effect, Layer, Schema } from "effect"
import { BackendUnavailable } from "../src/Errors.ts"
import * as SplitKGuard from "../src/gpu/SplitKGuard.ts"
import * as TensorCoreMatMul from "../src/gpu/TensorCoreMatMul.ts"
import * as GpuMemory from "../src/GpuMemory.ts"

export const BackendName = Schema.Literals(["wasm", "cpu", "webgpu", "tensorflow"])
export type BackendName = typeof BackendName.Type

export class TensorBackend extends Context.Service<TensorBackend, {
  /** The backend in use. */
  readonly name: BackendName
  /** What it runs on, for reports: e.g. the GPU adapter's name. */
  readonly device: string
  /** The optional GPU features the device was created with (shader-f16, subgroups, ...); none on CPU. */
  readonly features: ReadonlyArray<string>
  /** GPU memory now: bytes held by live tensors and bytes tfjs's buffer pool holds (its high-water mark). */
  readonly gpuMemory: () => GpuMemory.GpuMemory | undefined
}>()("cascade/layers/TensorBackend") {
  /** Acquires `name`, or the one `CASCADE_BACKEND` names, else wasm. */
  static readonly layer = (name?: BackendName) =>
    Layer.effect(
      TensorBackend,
      Effect.gen(function*() {
        const chosen = name ?? (yield* Config.schema(BackendName, "CASCADE_BACKEND").pipe(
          Config.withDefault("wasm"),
          Effect.mapError(() =>
            new BackendUnavailable({
              backend: process.env.CASCADE_BACKEND ?? "",
              reason: "CASCADE_BACKEND names no backend",
              remedy: `Set it to one of ${BackendName.literals.join(", ")}.`
            })
          )
        ))
        return yield* Effect.acquireRelease(acquire(chosen), release)
      })
    )
}

// tfjs warns on first use of the cpu backend that tfjs-node is faster; the choice is deliberate here.
tf.env().set("PROD", true)

/** The name tfjs registers each backend under. */
const registeredName = (name: BackendName) => (name === "tensorflow" ? "tensorflow" : name)

/** Factories of backends released earlier, so a later acquire can register them again. */
const released = new Map<string, { factory: () => tf.KernelBackend | Promise<tf.KernelBackend>; priority: number }>()

const acquire = Effect.fn("TensorBackend.acquire")(function*(name: BackendName) {
  const { device, features } = yield* load(name)
  const registered = registeredName(name)
  const again = released.get(registered)
  if (again && tf.findBackendFactory(registered) === null) tf.registerBackend(registered, again.factory, again.priority)
  const ok = yield* Effect.tryPromise({
    try: () => tf.setBackend(registered),
    catch: (cause) => new BackendUnavailable({ backend: name, reason: String(cause), remedy: remedies[name] })
  })
  if (!ok) {
    return yield* new BackendUnavailable({ backend: name, reason: "it failed to initialise", remedy: remedies[name] })
  }
  return TensorBackend.of({ name, device, features, gpuMemory: name === "webgpu" ? GpuMemory.read : () => undefined })
})

const release = (backend: TensorBackend["Service"]) =>
  Effect.sync(() => {
    const registered = registeredName(backend.name)
    const factory = tf.findBackendFactory(registered)
    if (factory !== null) released.set(registered, { factory, priority: 1 })
    tf.removeBackend(registered)
  })

const remedies: Record<BackendName, string> = {
  wasm: "Reinstall the project's dependencies (npm ci): @tensorflow/tfjs-backend-wasm is one of them.",
  cpu: "Reinstall the project's dependencies (npm ci): @tensorflow/tfjs-backend-cpu is one of them.",
  webgpu: "WebGPU needs a GPU with a Vulkan driver (Dawn through the `webgpu` package); use --backend wasm on CPU.",
  tensorflow:
    "Install @tensorflow/tfjs-node-gpu (CUDA) or @tensorflow/tfjs-node (CPU); their install downloads libtensorflow, so it needs network access beyond the npm registry."
}

const unavailable = (name: BackendName, reason: string) =>
  new BackendUnavailable({ backend: name, reason, remedy: remedies[name] })

interface Loaded {
  readonly device: string
  readonly features: ReadonlyArray<string>
}

const onCpu = (device: string): Loaded => ({ device, features: [] })

/** Loads the backend's module (which registers it) and says what device it runs on. */
const load = (name: BackendName): Effect.Effect<Loaded, BackendUnavailable> => {
  switch (name) {
    case "cpu":
      return Effect.succeed(onCpu("cpu (JavaScript)"))
    case "wasm":
      return Effect.tryPromise({
        try: () => import("@tensorflow/tfjs-backend-wasm").then(() => onCpu("cpu (WebAssembly)")),
        catch: (cause) => unavailable(name, `@tensorflow/tfjs-backend-wasm failed to load (${String(cause)})`)
      })
    case "webgpu":
      return loadWebGpu
    case "tensorflow":
      return Effect.tryPromise({
        try: () => importFirst(["@tensorflow/tfjs-node-gpu", "@tensorflow/tfjs-node"]).then(onCpu),
        catch: () => unavailable(name, "neither @tensorflow/tfjs-node-gpu nor @tensorflow/tfjs-node is installed")
      })
  }
}

const importFirst = async (modules: ReadonlyArray<string>): Promise<string> => {
  for (const module of modules) {
    try {
      await import(module)
      return module
    } catch {
      // try the next one
    }
  }
  throw new Error("none found")
}

/**
 * Dawn's toggles that expose what the tensor cores need: without them the H200's adapter lists
 * neither `shader-f16` nor `chromium-experimental-subgroup-matrix` (../shared/gpu/KERNELS.md).
 */
const dawnToggles = ["enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia"]

/** Features requested where the adapter has them: f16 arithmetic, subgroups and their matrices, GPU timers. */
const wantedFeatures = ["shader-f16", "subgroups", "chromium-experimental-subgroup-matrix", "timestamp-query"] as const

/** Limits copied from the adapter: the defaults (128 MiB bindings, 256 invocations) are far below an H200's. */
const adapterLimits = [
  "maxStorageBufferBindingSize",
  "maxBufferSize",
  "maxComputeWorkgroupStorageSize",
  "maxComputeInvocationsPerWorkgroup",
  "maxComputeWorkgroupSizeX",
  "maxComputeWorkgroupsPerDimension",
  "maxStorageBuffersPerShaderStage"
] as const

/**
 * Creates the GPU device ourselves (tfjs's own factory asks for no feature and few limits), gives
 * Node the browser globals tfjs-backend-webgpu expects, backed by Dawn, and registers tfjs's
 * `WebGPUBackend` on that device.
 */
const loadWebGpu = Effect.gen(function*() {
  const dawn = yield* Effect.tryPromise({
    try: () => import("webgpu"),
    catch: (cause) => unavailable("webgpu", `the webgpu package (Dawn) failed to load (${String(cause)})`)
  })
  const gpu = dawn.create(dawnToggles)
  const adapter = yield* Effect.tryPromise({
    try: () => gpu.requestAdapter({ powerPreference: "high-performance" }),
    catch: (cause) => unavailable("webgpu", `no adapter (${String(cause)})`)
  })
  if (adapter === null) return yield* unavailable("webgpu", "Dawn found no GPU adapter")
  const features = wantedFeatures.filter((feature) => adapter.features.has(feature))
  const requiredLimits = Object.fromEntries(adapterLimits.map((limit) => [limit, adapter.limits[limit]]))
  const device = yield* Effect.tryPromise({
    try: () => adapter.requestDevice({ requiredFeatures: features as Array<GPUFeatureName>, requiredLimits }),
    catch: (cause) => unavailable("webgpu", `the adapter refused a device (${String(cause)})`)
  })
  Object.assign(globalThis, dawn.globals)
  const global = globalThis as { window?: unknown }
  global.window ??= globalThis
  Object.defineProperty(globalThis, "navigator", { value: { gpu, userAgent: "node" }, configurable: true })
  const webgpu = yield* Effect.tryPromise({
    try: () => import("@tensorflow/tfjs-backend-webgpu"),
    catch: (cause) => unavailable("webgpu", `@tensorflow/tfjs-backend-webgpu failed to load (${String(cause)})`)
  })
  // Importing the module registered tfjs's own factory (when first imported); ours replaces it.
  if (tf.findBackendFactory("webgpu") !== null) tf.removeBackend("webgpu")
  tf.registerBackend("webgpu", () => new webgpu.WebGPUBackend(device, adapter.info), 3)
  SplitKGuard.install()
  TensorCoreMatMul.install(adapter.info as TensorCoreMatMul.AdapterSubgroups)
  const info = adapter.info
  const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "WebGPU"
  return { device: `gpu (${name})`, features } satisfies Loaded
})
