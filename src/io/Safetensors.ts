/**
 * The Hugging Face safetensors format: an 8-byte little-endian header length, a JSON header giving
 * each tensor's dtype, shape and byte range in the data section, then the raw little-endian data.
 *
 * Reading is lazy: `open` keeps a file descriptor and each tensor is one positional read, so a
 * checkpoint of many gigabytes never sits in memory whole. Writing lays out the header from the
 * shapes alone, then streams one tensor at a time into a temp file that is renamed into place.
 *
 * Typed-array views are used for the data as is, which assumes a little-endian host (x86, ARM).
 */
import { randomUUID } from "node:crypto"
import * as fs from "node:fs/promises"
import * as nodePath from "node:path"
import { Effect, type Scope } from "effect"
import { CheckpointError } from "../Errors.ts"

export type Dtype = "F64" | "F32" | "BF16" | "F16" | "I32" | "I64" | "U8" | "BOOL"
export type FloatDtype = "F32" | "BF16" | "F16"

/** Bytes per element. */
export const itemSize: Readonly<Record<Dtype, number>> = { F64: 8, F32: 4, BF16: 2, F16: 2, I32: 4, I64: 8, U8: 1, BOOL: 1 }

const isDtype = (value: unknown): value is Dtype => typeof value === "string" && Object.hasOwn(itemSize, value)

export interface TensorInfo {
  readonly dtype: Dtype
  readonly shape: ReadonlyArray<number>
}

/** The typed array that holds a tensor's values for each dtype, in memory. */
export type TensorData = Float64Array | Float32Array | Int32Array | BigInt64Array | Uint8Array

export interface SafetensorsFile {
  readonly path: string
  /** Tensor names in the order of their bytes in the file. */
  readonly names: ReadonlyArray<string>
  /** The header's `__metadata__` (string to string), empty when absent. */
  readonly metadata: Readonly<Record<string, string>>
  readonly info: (name: string) => Effect.Effect<TensorInfo, CheckpointError>
  /** The tensor's bytes as stored (little-endian, its own dtype). */
  readonly readBytes: (name: string) => Effect.Effect<Uint8Array, CheckpointError>
  /** A float tensor's values; BF16 and F16 widen to f32 exactly. */
  readonly readFloat32: (name: string) => Effect.Effect<Float32Array, CheckpointError>
  /** An F64 tensor's values (statistics accumulated in double precision). */
  readonly readFloat64: (name: string) => Effect.Effect<Float64Array, CheckpointError>
  /** An integer or bool tensor's values; I64 values must fit in an int32 (token ids do). */
  readonly readInt32: (name: string) => Effect.Effect<Int32Array, CheckpointError>
}

/** The same limit as the reference (Rust) implementation, so a corrupt length cannot make us allocate gigabytes. */
const maxHeaderBytes = 100_000_000

interface Entry extends TensorInfo {
  readonly name: string
  /** Absolute byte range in the file. */
  readonly begin: number
  readonly end: number
}

const describe = (cause: unknown): string => (cause instanceof Error ? cause.message : String(cause))

const attempt = <A>(file: string, what: string, run: () => Promise<A>, tensor?: string) =>
  Effect.tryPromise({
    try: run,
    catch: (cause) => new CheckpointError({ file, tensor, reason: `${what}: ${describe(cause)}` })
  })

const closeQuietly = (handle: fs.FileHandle) => Effect.ignore(Effect.tryPromise(() => handle.close()))

/** Bytes per read or write of a file: Node moves at most 2 GiB - 1 in one, less than an 8B parent's fp32 embedding. */
const maxIoBytes = 2 ** 30

/** Reads exactly `length` bytes at `position` into a fresh buffer (offset 0, so any typed view of it is aligned). */
const readAt = (handle: fs.FileHandle, file: string, position: number, length: number, tensor?: string) =>
  attempt(file, `cannot read ${length} bytes at offset ${position}`, async () => {
    const bytes = new Uint8Array(length)
    for (let done = 0; done < length;) {
      const { bytesRead } = await handle.read(bytes, done, Math.min(length - done, maxIoBytes), position + done)
      if (bytesRead === 0) throw new Error(`file ends at ${position + done} bytes`)
      done += bytesRead
    }
    return bytes
  }, tensor)

const isRecord = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value)

const isIndexList = (value: unknown): value is Array<number> =>
  Array.isArray(value) && value.every((n) => Number.isSafeInteger(n) && n >= 0)

const elementCount = (shape: ReadonlyArray<number>): number => shape.reduce((a, b) => a * b, 1)

const formatShape = (shape: ReadonlyArray<number>) => `[${shape.join(", ")}]`

/**
 * Checks the header as the reference implementation does, so that whatever we accept Python accepts too:
 * known dtypes, byte ranges that match the shapes, and ranges that tile the data section exactly
 * (no overlap, no gap, nothing past the end).
 */
const parseHeader = Effect.fnUntraced(function*(
  file: string,
  headerBytes: Uint8Array,
  dataStart: number,
  dataLength: number
): Effect.fn.Return<{ entries: Array<Entry>; metadata: Record<string, string> }, CheckpointError> {
  const fail = (reason: string, tensor?: string) => new CheckpointError({ file, tensor, reason })
  let json: unknown
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes))
  } catch (cause) {
    return yield* fail(`header is not valid JSON: ${describe(cause)}`)
  }
  if (!isRecord(json)) return yield* fail("header is not a JSON object")

  let metadata: Record<string, string> = {}
  const entries: Array<Entry> = []
  for (const [name, value] of Object.entries(json)) {
    if (name === "__metadata__") {
      if (!isRecord(value) || !Object.values(value).every((v) => typeof v === "string")) {
        return yield* fail("__metadata__ is not an object of strings")
      }
      metadata = value as Record<string, string>
      continue
    }
    if (!isRecord(value)) return yield* fail("header entry is not an object", name)
    const { dtype, shape, data_offsets: offsets } = value
    if (!isDtype(dtype)) {
      return yield* fail(`unsupported dtype ${JSON.stringify(dtype)} (supported: ${Object.keys(itemSize).join(", ")})`, name)
    }
    if (!isIndexList(shape)) return yield* fail("shape is not a list of non-negative integers", name)
    if (!isIndexList(offsets) || offsets.length !== 2 || offsets[0] > offsets[1]) {
      return yield* fail("data_offsets is not [begin, end] with begin <= end", name)
    }
    const [begin, end] = offsets
    const needed = elementCount(shape) * itemSize[dtype]
    if (end - begin !== needed) {
      return yield* fail(`data_offsets [${begin}, ${end}] hold ${end - begin} bytes but ${dtype} ${formatShape(shape)} needs ${needed}`, name)
    }
    if (end > dataLength) {
      return yield* fail(`data_offsets [${begin}, ${end}] run past the end of the data section (${dataLength} bytes)`, name)
    }
    entries.push({ name, dtype, shape, begin: dataStart + begin, end: dataStart + end })
  }

  entries.sort((a, b) => a.begin - b.begin || a.end - b.end)
  let covered = dataStart
  let previous: Entry | undefined
  for (const entry of entries) {
    const range = `[${entry.begin - dataStart}, ${entry.end - dataStart}]`
    if (entry.begin < covered) {
      return yield* fail(`data_offsets ${range} overlap tensor ${previous!.name}`, entry.name)
    }
    if (entry.begin > covered) {
      return yield* fail(`data_offsets ${range} leave ${entry.begin - covered} unused bytes before this tensor`, entry.name)
    }
    covered = entry.end
    previous = entry
  }
  if (covered !== dataStart + dataLength) {
    return yield* fail(`${dataStart + dataLength - covered} bytes after the last tensor belong to no tensor`)
  }
  return { entries, metadata }
})

/** Opens a safetensors file and validates its header; the file stays open until the scope closes. */
export const open = Effect.fn("Safetensors.open")(function*(
  path: string
): Effect.fn.Return<SafetensorsFile, CheckpointError, Scope.Scope> {
  const handle = yield* Effect.acquireRelease(attempt(path, "cannot open", () => fs.open(path, "r")), closeQuietly)
  const { size } = yield* attempt(path, "cannot stat", () => handle.stat())
  if (size < 8) {
    return yield* new CheckpointError({ file: path, reason: `file is ${size} bytes, too short for a safetensors header` })
  }
  const headerLength = new DataView((yield* readAt(handle, path, 0, 8)).buffer).getBigUint64(0, true)
  if (headerLength > BigInt(size - 8)) {
    return yield* new CheckpointError({
      file: path,
      reason: `header length ${headerLength} runs past the end of the file (${size} bytes): truncated or not safetensors`
    })
  }
  if (headerLength > maxHeaderBytes) {
    return yield* new CheckpointError({ file: path, reason: `header length ${headerLength} is over ${maxHeaderBytes} bytes` })
  }
  const dataStart = 8 + Number(headerLength)
  const headerBytes = yield* readAt(handle, path, 8, Number(headerLength))
  const { entries, metadata } = yield* parseHeader(path, headerBytes, dataStart, size - dataStart)
  const byName = new Map(entries.map((entry) => [entry.name, entry]))

  const entry = (name: string) => {
    const found = byName.get(name)
    return found === undefined
      ? Effect.fail(new CheckpointError({ file: path, tensor: name, reason: "no such tensor in this file" }))
      : Effect.succeed(found)
  }
  const bytesOf = (found: Entry) => readAt(handle, path, found.begin, found.end - found.begin, found.name)

  const info = Effect.fn("Safetensors.info")(function*(name: string) {
    const { dtype, shape } = yield* entry(name)
    return { dtype, shape } satisfies TensorInfo
  })
  const readBytes = Effect.fn("Safetensors.readBytes")(function*(name: string) {
    return yield* bytesOf(yield* entry(name))
  })
  const readFloat32 = Effect.fn("Safetensors.readFloat32")(function*(name: string) {
    const found = yield* entry(name)
    if (found.dtype !== "F32" && found.dtype !== "BF16" && found.dtype !== "F16") {
      return yield* new CheckpointError({ file: path, tensor: name, reason: `is ${found.dtype}, not a float tensor` })
    }
    return decodeFloats(found.dtype, yield* bytesOf(found))
  })
  const readFloat64 = Effect.fn("Safetensors.readFloat64")(function*(name: string) {
    const found = yield* entry(name)
    if (found.dtype !== "F64") return yield* new CheckpointError({ file: path, tensor: name, reason: `is ${found.dtype}, not F64` })
    return new Float64Array((yield* bytesOf(found)).buffer)
  })
  const readInt32 = Effect.fn("Safetensors.readInt32")(function*(name: string) {
    const found = yield* entry(name)
    const bytes = yield* bytesOf(found)
    switch (found.dtype) {
      case "I32":
        return new Int32Array(bytes.buffer)
      case "U8":
      case "BOOL":
        return Int32Array.from(bytes)
      case "I64": {
        const wide = new BigInt64Array(bytes.buffer)
        const out = new Int32Array(wide.length)
        for (let i = 0; i < wide.length; i++) {
          if (wide[i] < -2147483648n || wide[i] > 2147483647n) {
            return yield* new CheckpointError({ file: path, tensor: name, reason: `value ${wide[i]} at index ${i} does not fit in int32` })
          }
          out[i] = Number(wide[i])
        }
        return out
      }
      default:
        return yield* new CheckpointError({ file: path, tensor: name, reason: `is ${found.dtype}, not an integer tensor` })
    }
  })

  return {
    path,
    names: entries.map((e) => e.name),
    metadata,
    info,
    readBytes,
    readFloat32,
    readFloat64,
    readInt32
  }
})

// ---------------------------------------------------------------------------------------------
// Float conversions. They work on bit patterns, never through JS numbers (which may rewrite NaN bits),
// so that F32 data is copied exactly and BF16/F16 rounding matches PyTorch bit for bit.

/** F16 bit pattern -> f32 bit pattern for all 65536 values; every F16 is exactly representable in f32. */
const f16ToF32Bits = (() => {
  const table = new Uint32Array(65536)
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16
    const exponent = (h >> 10) & 0x1f
    let mantissa = h & 0x3ff
    if (exponent === 0x1f) {
      table[h] = sign | 0x7f800000 | (mantissa << 13) // inf or NaN, payload kept
    } else if (exponent !== 0) {
      table[h] = sign | ((exponent + 112) << 23) | (mantissa << 13) // rebias 15 -> 127
    } else if (mantissa === 0) {
      table[h] = sign // +-0
    } else {
      // Subnormal F16 is a normal f32: shift the leading 1 up to the implicit bit.
      let e = 113
      while ((mantissa & 0x400) === 0) {
        mantissa <<= 1
        e--
      }
      table[h] = sign | (e << 23) | ((mantissa & 0x3ff) << 13)
    }
  }
  return table
})()

/**
 * f32 bits -> F16 bits, rounding to nearest even with overflow to inf, as PyTorch does. A NaN becomes the
 * quiet NaN of c10's scalar conversion (PyTorch's vector kernels give other NaN bits, so none is canonical).
 */
const f32BitsToF16 = (x: number): number => {
  const sign = (x >>> 16) & 0x8000
  const exponent = (x >>> 23) & 0xff
  const mantissa = x & 0x7fffff
  if (exponent === 0xff) return sign | (mantissa === 0 ? 0x7c00 : 0x7e00)
  const e = exponent - 112 // rebias 127 -> 15
  if (e >= 31) return sign | 0x7c00
  if (e <= 0) {
    // F16 subnormal (or zero): shift the full significand down to units of 2^-24, rounding to even.
    if (e < -10) return sign // below half the smallest subnormal
    const significand = mantissa | 0x800000
    const shift = 14 - e
    const half = 1 << (shift - 1)
    return sign | ((significand + half - 1 + ((significand >>> shift) & 1)) >>> shift)
  }
  const truncated = sign | (e << 10) | (mantissa >>> 13)
  const rest = mantissa & 0x1fff
  // A carry out of the mantissa correctly bumps the exponent, up to inf.
  return rest > 0x1000 || (rest === 0x1000 && (truncated & 1) === 1) ? truncated + 1 : truncated
}

/** f32 bits -> BF16 bits, c10's round_to_nearest_even: NaN becomes 0x7FC0, overflow rounds to inf. */
const f32BitsToBf16 = (x: number): number =>
  (x & 0x7fffffff) > 0x7f800000 ? 0x7fc0 : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16

/** Bytes (a fresh, aligned buffer) of a float dtype -> f32 values. */
const decodeFloats = (dtype: FloatDtype, bytes: Uint8Array): Float32Array => {
  if (dtype === "F32") return new Float32Array(bytes.buffer)
  const half = new Uint16Array(bytes.buffer)
  const out = new Uint32Array(half.length)
  if (dtype === "BF16") {
    for (let i = 0; i < half.length; i++) out[i] = half[i] << 16
  } else {
    for (let i = 0; i < half.length; i++) out[i] = f16ToF32Bits[half[i]]
  }
  return new Float32Array(out.buffer)
}

const bytesView = (data: TensorData) => new Uint8Array(data.buffer, data.byteOffset, data.byteLength)

const narrowFloats = (data: Float32Array, convert: (bits: number) => number): Uint8Array => {
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length)
  const out = new Uint16Array(bits.length)
  for (let i = 0; i < bits.length; i++) out[i] = convert(bits[i])
  return new Uint8Array(out.buffer)
}

/** The array type each dtype is written from. */
const arrayTypeFor: Record<Dtype, typeof Float64Array | typeof Float32Array | typeof Int32Array | typeof BigInt64Array | typeof Uint8Array> = {
  F64: Float64Array,
  F32: Float32Array,
  BF16: Float32Array,
  F16: Float32Array,
  I32: Int32Array,
  I64: BigInt64Array,
  U8: Uint8Array,
  BOOL: Uint8Array
}

/** In-memory values -> the bytes stored for `dtype`. */
const encode = (dtype: Dtype, data: TensorData): Uint8Array => {
  switch (dtype) {
    case "BF16":
      return narrowFloats(data as Float32Array, f32BitsToBf16)
    case "F16":
      return narrowFloats(data as Float32Array, f32BitsToF16)
    default:
      return bytesView(data)
  }
}

// ---------------------------------------------------------------------------------------------
// Writing

export interface TensorSpec<E = never, R = never> {
  readonly name: string
  /** The dtype stored in the file; float dtypes take a Float32Array and round it to nearest even. */
  readonly dtype: Dtype
  readonly shape: ReadonlyArray<number>
  /** The values, or an effect computing them when the writer reaches this tensor, so one tensor at a time is in memory. */
  readonly data: TensorData | Effect.Effect<TensorData, E, R>
}

/**
 * Writes `path` atomically: `body` appends bytes to a temp file in the same folder, which is fsynced and
 * renamed over `path`. A reader never sees half a file and a crash leaves the old one; the temp file is
 * removed on failure or interruption.
 */
export const writeAtomically = Effect.fnUntraced(function*<E, R>(
  path: string,
  body: (append: (bytes: Uint8Array) => Effect.Effect<void, CheckpointError>) => Effect.Effect<void, E, R>
): Effect.fn.Return<void, CheckpointError | E, R> {
  const temp = nodePath.join(nodePath.dirname(path), `.${nodePath.basename(path)}.${randomUUID()}.tmp`)
  const fill = Effect.gen(function*() {
    const handle = yield* Effect.acquireRelease(attempt(path, "cannot create temp file", () => fs.open(temp, "wx")), closeQuietly)
    let position = 0
    yield* body((bytes) =>
      attempt(path, "cannot write", async () => {
        for (let done = 0; done < bytes.length;) {
          done += (await handle.write(bytes, done, Math.min(bytes.length - done, maxIoBytes), position + done)).bytesWritten
        }
        position += bytes.length
      })
    )
    yield* attempt(path, "cannot fsync", () => handle.sync())
  })
  yield* Effect.scoped(fill).pipe(
    Effect.andThen(attempt(path, "cannot move temp file into place", () => fs.rename(temp, path))),
    Effect.onError(() => Effect.ignore(Effect.tryPromise(() => fs.rm(temp, { force: true }))))
  )
})

const compareNames = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0)

/**
 * The Python library's layout order: by dtype (its enum order, descending), then by name. Following it
 * makes our files byte-identical to the ones it writes, and it keeps every tensor aligned to its item size.
 */
const layoutOrder: ReadonlyArray<Dtype> = ["I64", "F64", "F32", "I32", "BF16", "F16", "U8", "BOOL"]

/**
 * Writes a safetensors file, laid out as the Python library does, the header padded with spaces to a
 * multiple of 8 bytes. `metadata` defaults to {"format": "pt"}, which transformers requires to load the file.
 */
export const write = Effect.fn("Safetensors.write")(function*<E = never, R = never>(
  path: string,
  tensors: ReadonlyArray<TensorSpec<E, R>>,
  metadata: Readonly<Record<string, string>> = { format: "pt" }
): Effect.fn.Return<void, CheckpointError | E, R> {
  const fail = (reason: string, tensor?: string) => new CheckpointError({ file: path, tensor, reason })
  const seen = new Set<string>()
  for (const { name, dtype, shape } of tensors) {
    if (name === "" || name === "__metadata__") return yield* fail("is not a usable tensor name", name)
    if (seen.has(name)) return yield* fail("is given twice", name)
    seen.add(name)
    if (!isDtype(dtype)) return yield* fail(`unsupported dtype ${JSON.stringify(dtype)}`, name)
    if (!isIndexList(shape)) return yield* fail("shape is not a list of non-negative integers", name)
  }

  const layout = [...tensors].sort((a, b) =>
    layoutOrder.indexOf(a.dtype) - layoutOrder.indexOf(b.dtype) || compareNames(a.name, b.name)
  )
  let offset = 0
  const entries = layout.map(({ name, dtype, shape }) => {
    const begin = offset
    offset += elementCount(shape) * itemSize[dtype]
    return [name, { dtype, shape, data_offsets: [begin, offset] }] as const
  })
  // fromEntries, not assignment, so that any name (even "__proto__") becomes a plain key.
  const json = new TextEncoder().encode(JSON.stringify(Object.fromEntries([["__metadata__", metadata], ...entries])))
  const padded = new Uint8Array(8 + Math.ceil(json.length / 8) * 8).fill(0x20)
  new DataView(padded.buffer).setBigUint64(0, BigInt(padded.length - 8), true)
  padded.set(json, 8)

  yield* writeAtomically(path, (append) =>
    Effect.gen(function*() {
      yield* append(padded)
      for (const { name, dtype, shape, data } of layout) {
        const values = Effect.isEffect(data) ? yield* data : data
        const expected = arrayTypeFor[dtype]
        if (!(values instanceof expected)) {
          return yield* fail(`${dtype} is written from ${expected.name}, got ${values.constructor.name}`, name)
        }
        if (values.length !== elementCount(shape)) {
          return yield* fail(`has ${values.length} values but shape ${formatShape(shape)} needs ${elementCount(shape)}`, name)
        }
        yield* append(encode(dtype, values))
      }
    })
  )
})
