/**
 * Matrix products on the tensor cores, through WebGPU's subgroup matrices (Dawn's
 * `chromium-experimental-subgroup-matrix`): f32 tensors in and out, f16 operands, f32 accumulation.
 * This is what `--precision mixed` changes: every product of the model and of its gradients (tfjs'
 * `BatchMatMul` on the webgpu backend, which `tf.matMul` and its gradient run) takes this path,
 * while weights, optimiser moments and every other operation stay f32.
 *
 * One product is three or four dispatches recorded into tfjs' own command encoder, so they run in
 * order with tfjs' kernels and nothing is submitted early:
 *   1. each operand converted to f16, transposed where the product transposes it and zero-padded to
 *      whole tiles, so that the product itself has no transpose and no edge in K;
 *   2. the product: each subgroup holds a TM x TN grid of 16x16 f32 accumulators and walks K in steps
 *      of 16, loading its f16 fragments straight from storage (the caches serve the reuse);
 *   3. results written to the output directly, or through workgroup memory with bounds where a tile
 *      passes the output's edge.
 * Products narrower than a fragment (16) fall back to tfjs' kernel, as does everything under `fp32`.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import { bufferOf, dispatch, hasFeature, linearGroups, linearIndex, output, type ProductShape, productShape, volume, type WebGpuBackend, webGpuBackend, wrapBatchMatMul } from "./Dispatch.ts"

export const Precision = Schema.Literals(["fp32", "mixed"])
export type Precision = typeof Precision.Type

/**
 * The tile of one product kernel: TM x TN fragments of 16x16 per subgroup, WX x WY subgroups per
 * workgroup; `staged`: the workgroup's tiles of A and B go through workgroup memory, K 32 at a time,
 * the next ones loaded into registers while the tensor cores work on these.
 */
export interface Tiling {
  readonly tm: number
  readonly tn: number
  readonly wx: number
  readonly wy: number
  readonly staged?: boolean
}

/** K per staged tile. */
const STAGE_K = 32
/** Halves added to each row of a staged tile, so that rows start in different memory banks. */
const SKEW = 8

/**
 * The tiling products use unless told otherwise, chosen on the H200 with `bench --case matmul`: 2 x 2
 * subgroups of 4 x 4 fragments, staged, did 8192^3 at 151 TFLOP/s and the LM head at 128, where one
 * subgroup loading fragments from storage did 71 and 66, with the same error.
 */
export let defaultTiling: Tiling = { tm: 4, tn: 4, wx: 2, wy: 2, staged: true }

/** Sets the tiling every later product uses: how the bench compares tilings. */
export const useTiling = (tiling: Tiling): void => {
  defaultTiling = tiling
}

let precision: Precision = "fp32"
let installed = false

/** Whether products now run on the tensor cores. */
export const current = (): Precision => precision

/**
 * Runs `effect` with products in `wanted` precision (by default mixed where usable), restoring the
 * previous one after. `mixed` needs the tensor-core kernel installed (a webgpu device with f16 and
 * subgroup matrices); elsewhere the products stay fp32, which is what `mixed` means there.
 */
export const withPrecision = (wanted: Precision | undefined) => <A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
  Effect.acquireUseRelease(
    Effect.sync(() => {
      const previous = precision
      precision = (wanted ?? "mixed") === "mixed" && usable() ? "mixed" : "fp32"
      return previous
    }),
    () => effect,
    (previous) => Effect.sync(() => (precision = previous))
  )

/** Whether the current backend is webgpu on a device with f16 and subgroup matrices, with the kernel installed. */
export const usable = (): boolean => {
  const backend = webGpuBackend()
  return installed && backend !== undefined && hasFeature(backend, "shader-f16") && hasFeature(backend, "chromium-experimental-subgroup-matrix")
}

/** What the adapter says of its subgroups (GPUAdapterInfo in Dawn, with its subgroup-matrix extension). */
export interface AdapterSubgroups {
  readonly subgroupMinSize?: number
  readonly subgroupMaxSize?: number
  readonly subgroupMatrixConfigs?: ReadonlyArray<{ readonly componentType: string; readonly resultComponentType: string; readonly M: number; readonly N: number; readonly K: number }>
}

/**
 * Whether the kernels fit the adapter: subgroups of exactly 32 lanes (they index lanes so) and
 * 16x16x16 subgroup matrices of f16 into f32 (NVIDIA's, e.g. the H200's).
 */
export const fits = (info: AdapterSubgroups): boolean =>
  info.subgroupMinSize === 32 && info.subgroupMaxSize === 32 &&
  (info.subgroupMatrixConfigs ?? []).some((c) => c.componentType === "f16" && c.resultComponentType === "f32" && c.M === 16 && c.N === 16 && c.K === 16)

/**
 * Puts the tensor-core product in front of tfjs' `BatchMatMul` for webgpu, once, where the adapter
 * fits the kernels: it serves products while the precision is mixed and hands the rest to tfjs' own.
 */
export const install = (info: AdapterSubgroups): void => {
  if (installed || !fits(info)) return
  installed = wrapBatchMatMul(({ a, b, transposeA, transposeB, shape, backend }, wrapped) => {
    const product = precision === "mixed" ? plan(a.shape, b.shape, shape, transposeA, transposeB) : undefined
    return product === undefined ? wrapped() : record(backend, product, a, b)
  })
}

/** A product's shapes, with its output's and the f16 copies' padded sizes. */
interface Plan extends ProductShape {
  readonly outShape: ReadonlyArray<number>
  readonly transposeA: boolean
  readonly transposeB: boolean
  readonly tiling: Tiling
  /** M, N and K rounded up to whole tiles (K to 16). */
  readonly mp: number
  readonly np: number
  readonly kp: number
}

const roundUp = (x: number, to: number) => Math.ceil(x / to) * to

/** How the tensor cores would do `op(a) @ op(b)`, or undefined where tfjs' kernel should (narrow, or batches that broadcast partly). */
const plan = (aShape: ReadonlyArray<number>, bShape: ReadonlyArray<number>, { m, k, n, batchA, batchB }: ProductShape, transposeA: boolean, transposeB: boolean, tiling = defaultTiling): Plan | undefined => {
  // A fragment is 16x16: narrower products (a decode step's few rows) gain nothing from padding to one.
  if (m < 16 || n < 16 || k < 16) return undefined
  // Whole batches only: equal, or one operand shared by every product of the other.
  const outer = tf.broadcast_util.assertAndGetBroadcastShape(aShape.slice(0, -2), bShape.slice(0, -2))
  if (volume(outer) !== Math.max(batchA, batchB) || (batchA !== batchB && Math.min(batchA, batchB) !== 1)) return undefined
  return {
    m, n, k, batchA, batchB, transposeA, transposeB, tiling,
    outShape: [...outer, m, n],
    mp: roundUp(m, 16 * tiling.tm * tiling.wy),
    np: roundUp(n, 16 * tiling.tn * tiling.wx),
    kp: roundUp(k, tiling.staged ? STAGE_K : 16)
  }
}

const header = `enable f16;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);`

/**
 * f32 [batch, rows, columns] (or [batch, columns, rows] read transposed) to f16 [batch, R, C], the
 * padding zero: four consecutive f16 of a row per invocation.
 */
const convertShader = (batch: number, rows: number, columns: number, paddedRows: number, paddedColumns: number, transposed: boolean) => `enable f16;
@group(0) @binding(0) var<storage, read> values: array<f32>;
@group(0) @binding(1) var<storage, read_write> halves: array<vec4<f16>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3u, @builtin(num_workgroups) groups: vec3u) {
  let invocation = ${linearIndex};
  if (invocation >= ${(batch * paddedRows * paddedColumns) / 4}u) { return; }
  let b = invocation / ${(paddedRows * paddedColumns) / 4}u;
  let within = invocation % ${(paddedRows * paddedColumns) / 4}u;
  // Neighbouring invocations read neighbouring source values: along a row, or down a column when transposed.
  ${transposed
    ? `let r = within % ${paddedRows}u;
  let c0 = (within / ${paddedRows}u) * 4u;`
    : `let r = within / ${paddedColumns / 4}u;
  let c0 = (within % ${paddedColumns / 4}u) * 4u;`}
  let quad = (b * ${paddedRows * paddedColumns}u + r * ${paddedColumns}u + c0) / 4u;
  var quadValues = vec4<f16>();
  if (r < ${rows}u) {
    for (var q = 0u; q < 4u; q++) {
      let c = c0 + q;
      if (c < ${columns}u) {
        quadValues[q] = f16(values[b * ${rows * columns}u + ${transposed ? `c * ${rows}u + r` : `r * ${columns}u + c`}]);
      }
    }
  }
  halves[quad] = quadValues;
}`

/** The product of padded f16 copies A [batchA, Mp, Kp] and B [batchB, Kp, Np] into C [batch, M, N] f32. */
const productShader = (p: Plan) => {
  const { tm, tn, wx, wy, staged } = p.tiling
  const fragments = Array.from({ length: tm * tn }, (_, f) => [Math.floor(f / tn), f % tn] as const)
  const accumulators = fragments.map(([i, j]) => `var acc_${i}_${j} = subgroup_matrix_result<f32, 16, 16>();`)
  const multiplies = fragments.map(([i, j]) => `acc_${i}_${j} = subgroupMatrixMultiplyAccumulate(a_${i}, b_${j}, acc_${i}_${j});`)
  const stores = fragments.map(([i, j]) =>
    `subgroupMatrixStore<row_major>(&C, cBase + (row0 + ${i * 16}u) * ${p.n}u + col0 + ${j * 16}u, acc_${i}_${j}, ${p.n}u);`)
  const edgeStores = fragments.map(([i, j]) => `subgroupMatrixStore<row_major>(&edge, sg * 256u, acc_${i}_${j}, 16u);
    workgroupBarrier();
    for (var e = lane; e < 256u; e += 32u) {
      let row = row0 + ${i * 16}u + e / 16u;
      let col = col0 + ${j * 16}u + e % 16u;
      if (row < ${p.m}u && col < ${p.n}u) { C[cBase + row * ${p.n}u + col] = edge[sg * 256u + e]; }
    }
    workgroupBarrier();`)
  const tileRows = 16 * tm * wy
  const tileColumns = 16 * tn * wx
  const threads = 32 * wx * wy
  const aOrigin = `${p.batchA === 1 ? "0u" : `wg.z * ${p.mp * p.kp}u`}`
  const bOrigin = `${p.batchB === 1 ? "0u" : `wg.z * ${p.kp * p.np}u`}`
  const body = staged ? stagedLoop(p, tileRows, tileColumns, threads, aOrigin, bOrigin, multiplies) : `
  let aBase = ${aOrigin} + row0 * ${p.kp}u;
  let bBase = ${bOrigin} + col0;
  for (var k = 0u; k < ${p.kp}u; k += 16u) {
    ${Array.from({ length: tm }, (_, i) =>
      `let a_${i} = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>, row_major>(&A, aBase + ${i * 16 * p.kp}u + k, ${p.kp}u);`).join("\n    ")}
    ${Array.from({ length: tn }, (_, j) =>
      `let b_${j} = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>, row_major>(&B, bBase + k * ${p.np}u + ${j * 16}u, ${p.np}u);`).join("\n    ")}
    ${multiplies.join("\n    ")}
  }`
  return `${header}
@group(0) @binding(0) var<storage, read> A: array<${staged ? "vec4<u32>" : "f16"}>;
@group(0) @binding(1) var<storage, read> B: array<${staged ? "vec4<u32>" : "f16"}>;
@group(0) @binding(2) var<storage, read_write> C: array<f32>;
var<workgroup> edge: array<f32, ${wx * wy * 256}>;
${staged ? `var<workgroup> As: array<f16, ${tileRows * (STAGE_K + SKEW)}>;
var<workgroup> Bs: array<f16, ${STAGE_K * (tileColumns + SKEW)}>;` : ""}
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) li: u32) {
  let sg = li / 32u;
  let lane = li % 32u;
  let row0 = wg.y * ${tileRows}u + (sg / ${wx}u) * ${16 * tm}u;
  let col0 = wg.x * ${tileColumns}u + (sg % ${wx}u) * ${16 * tn}u;
  let cBase = wg.z * ${p.m * p.n}u;
  ${accumulators.join("\n  ")}
  ${body}
  if ((wg.y + 1u) * ${tileRows}u <= ${p.m}u && (wg.x + 1u) * ${tileColumns}u <= ${p.n}u) {
    ${stores.join("\n    ")}
  } else {
    ${edgeStores.join("\n    ")}
  }
}`
}

/**
 * The staged main loop: the workgroup's A tile [rows, 32] and B tile [32, columns] copied from the
 * f16 copies (read 8 halves at a time) into workgroup memory with skewed rows; the next K tile is
 * read into registers before the tensor cores start on this one, and written after they finish.
 */
const stagedLoop = (p: Plan, tileRows: number, tileColumns: number, threads: number, aOrigin: string, bOrigin: string, multiplies: ReadonlyArray<string>) => {
  const { tm, tn, wx } = p.tiling
  const aStride = STAGE_K + SKEW
  const bStride = tileColumns + SKEW
  // Chunks of 8 halves per tile, and per invocation.
  const aChunks = (tileRows * STAGE_K) / 8
  const bChunks = (STAGE_K * tileColumns) / 8
  const aEach = Math.ceil(aChunks / threads)
  const bEach = Math.ceil(bChunks / threads)
  const loads = (which: "a" | "b", each: number, chunks: number, index: (chunk: string) => string) =>
    Array.from({ length: each }, (_, t) => {
      const chunk = `(li + ${t * threads}u)`
      return chunks % threads === 0 || (t + 1) * threads <= chunks
        ? `${which}Next${t} = ${which === "a" ? "A" : "B"}[${index(chunk)}];`
        : `if (${chunk} < ${chunks}u) { ${which}Next${t} = ${which === "a" ? "A" : "B"}[${index(chunk)}]; }`
    }).join("\n    ")
  // A chunk c of the A tile: row c / 4, halves 8 (c % 4) of the tile's 32; of B: row c / (columns / 8).
  const aIndex = (c: string) => `(aTile + (${c} / 4u) * ${p.kp}u + k + (${c} % 4u) * 8u) / 8u`
  const bIndex = (c: string) => `(bTile + (k + ${c} / ${tileColumns / 8}u) * ${p.np}u + (${c} % ${tileColumns / 8}u) * 8u) / 8u`
  const writes = (which: "a" | "b", each: number, chunks: number, offset: (chunk: string) => string) =>
    Array.from({ length: each }, (_, t) => {
      const chunk = `(li + ${t * threads}u)`
      const body = `let o${which}${t} = ${offset(chunk)};
      for (var h = 0u; h < 4u; h++) {
        let pair = bitcast<vec2<f16>>(${which}Next${t}[h]);
        ${which === "a" ? "As" : "Bs"}[o${which}${t} + 2u * h] = pair.x;
        ${which === "a" ? "As" : "Bs"}[o${which}${t} + 2u * h + 1u] = pair.y;
      }`
      return chunks % threads === 0 || (t + 1) * threads <= chunks ? `{ ${body} }` : `if (${chunk} < ${chunks}u) { ${body} }`
    }).join("\n    ")
  const aOffset = (c: string) => `(${c} / 4u) * ${aStride}u + (${c} % 4u) * 8u`
  const bOffset = (c: string) => `(${c} / ${tileColumns / 8}u) * ${bStride}u + (${c} % ${tileColumns / 8}u) * 8u`
  const fragmentLoads = (kk: number) => [
    ...Array.from({ length: tm }, (_, i) =>
      `let a_${i} = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>, row_major>(&As, (sgRow + ${i * 16}u) * ${aStride}u + ${kk}u, ${aStride}u);`),
    ...Array.from({ length: tn }, (_, j) =>
      `let b_${j} = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>, row_major>(&Bs, ${kk * bStride}u + sgColumn + ${j * 16}u, ${bStride}u);`)
  ]
  return `
  let aTile = ${aOrigin} + wg.y * ${tileRows * p.kp}u;
  let bTile = ${bOrigin} + wg.x * ${tileColumns}u;
  let sgRow = (sg / ${wx}u) * ${16 * tm}u;
  let sgColumn = (sg % ${wx}u) * ${16 * tn}u;
  ${Array.from({ length: aEach }, (_, t) => `var aNext${t} = vec4<u32>();`).join(" ")}
  ${Array.from({ length: bEach }, (_, t) => `var bNext${t} = vec4<u32>();`).join(" ")}
  var k = 0u;
  ${loads("a", aEach, aChunks, aIndex)}
  ${loads("b", bEach, bChunks, bIndex)}
  for (var tile = 0u; tile < ${p.kp / STAGE_K}u; tile++) {
    workgroupBarrier();
    ${writes("a", aEach, aChunks, aOffset)}
    ${writes("b", bEach, bChunks, bOffset)}
    workgroupBarrier();
    k += ${STAGE_K}u;
    if (tile + 1u < ${p.kp / STAGE_K}u) {
      ${loads("a", aEach, aChunks, aIndex)}
      ${loads("b", bEach, bChunks, bIndex)}
    }
    ${[0, 16].map((kk) => `{
      ${fragmentLoads(kk).join("\n      ")}
      ${multiplies.join("\n      ")}
    }`).join("\n    ")}
  }`
}

/** An f16 copy of an operand, as a float32 tensor of half as many elements, freed once the queue is submitted. */
const halfCopy = (backend: WebGpuBackend, source: tf.TensorInfo, batch: number, rows: number, columns: number, paddedRows: number, paddedColumns: number, transposed: boolean) => {
  const quads = (batch * paddedRows * paddedColumns) / 4
  const copy = output(backend, [quads * 2])
  const kernel = {
    key: `f16 copy ${batch} ${rows} ${columns} ${paddedRows} ${paddedColumns} ${transposed}`,
    code: () => convertShader(batch, rows, columns, paddedRows, paddedColumns, transposed)
  }
  dispatch(backend, kernel, [bufferOf(backend, source), copy.buffer], linearGroups(quads))
  return copy
}

const record = (backend: WebGpuBackend, p: Plan, a: tf.TensorInfo, b: tf.TensorInfo): tf.TensorInfo => {
  const out = output(backend, p.outShape)
  const left = halfCopy(backend, a, p.batchA, p.m, p.k, p.mp, p.kp, p.transposeA)
  const right = halfCopy(backend, b, p.batchB, p.k, p.n, p.kp, p.np, p.transposeB)
  const { tm, tn, wx, wy } = p.tiling
  dispatch(backend, { key: `product ${JSON.stringify(p)}`, code: () => productShader(p) }, [left.buffer, right.buffer, out.buffer], [
    p.np / (16 * tn * wx),
    p.mp / (16 * tm * wy),
    Math.max(p.batchA, p.batchB)
  ])
  backend.disposeData(left.info.dataId)
  backend.disposeData(right.info.dataId)
  return out.info
}

/**
 * The WGSL of the kernels one product runs (the two conversions, then the product), or none where
 * tfjs' kernel would do it: what the CPU suite compiles on Dawn's null device.
 */
export const kernelSources = (aShape: ReadonlyArray<number>, bShape: ReadonlyArray<number>, transposeA: boolean, transposeB: boolean, tiling: Tiling): Array<string> => {
  const p = plan(aShape, bShape, productShape(aShape, bShape, transposeA, transposeB), transposeA, transposeB, tiling)
  if (p === undefined) return []
  return [
    convertShader(p.batchA, p.m, p.k, p.mp, p.kp, p.transposeA),
    convertShader(p.batchB, p.k, p.n, p.kp, p.np, p.transposeB),
    productShader(p)
  ]
}
