import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as nodePath from "node:path"
import { fileURLToPath } from "node:url"
import { CheckpointError } from "../src/Errors.ts"
import * as Safetensors from "../src/io/Safetensors.ts"
import { tempDir } from "./support.ts"

const fixture = (name: string) => fileURLToPath(new URL(`../../shared/fixtures/tiny-mistral/${name}`, import.meta.url))

const f32 = (bits: number) => new Float32Array(new Uint32Array([bits]).buffer)[0]
const bitsOf = (values: Float32Array) => Array.from(new Uint32Array(values.buffer, values.byteOffset, values.length))
const bitsOfNumber = (value: number) => new Uint32Array(new Float32Array([value]).buffer)[0]
const floatsFromBits = (bits: ReadonlyArray<number>) => new Float32Array(Uint32Array.from(bits).buffer)
const f16round = (Math as unknown as { f16round(x: number): number }).f16round

/** mulberry32: a small seeded generator of uint32s, so that a failing property replays exactly. */
const generator = (seed: number) => {
  let state = seed >>> 0
  return () => {
    state = (state + 0x6d2b79f5) >>> 0
    let t = state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (t ^ (t >>> 14)) >>> 0
  }
}

/** f32 bit patterns where conversions go wrong: zeros, infs, NaNs with payloads, subnormals, F16/BF16 ties and limits. */
const specialBits = [
  0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00001, 0x7f800001, 0x00000001, 0x807fffff,
  0x33000000, 0x33000001, 0x33800000, 0x33c00000, 0x477fe000, 0x477fefff, 0x477ff000, 0x7f7fffff, 0x7f7f8000,
  0x3f808000, 0x3f818000, 0x38800000, 0x387fc000, 0x387fe000
]

const randomFloatBits = (next: () => number) => {
  switch (next() % 4) {
    case 0:
      return specialBits[next() % specialBits.length]
    case 1:
      return next()
    default: // magnitudes around the F16 range, where most rounding cases live
      return ((next() & 0x80000000) | ((95 + (next() % 66)) << 23) | (next() & 0x7fffff)) >>> 0
  }
}

const randomData = (dtype: Safetensors.Dtype, count: number, seed: number): Safetensors.TensorData => {
  const next = generator(seed)
  switch (dtype) {
    case "F32":
    case "BF16":
    case "F16":
      return floatsFromBits(Array.from({ length: count }, () => randomFloatBits(next)))
    case "F64":
      return Float64Array.from({ length: count }, () => (next() | 0) / (next() || 1))
    case "I32":
      return Int32Array.from({ length: count }, () => next() | 0)
    case "I64": // odd seeds: small values that readInt32 accepts
      return BigInt64Array.from({ length: count }, () =>
        seed % 2 === 1 ? BigInt(next() | 0) : BigInt.asIntN(64, (BigInt(next()) << 32n) | BigInt(next())))
    case "U8":
      return Uint8Array.from({ length: count }, () => next() & 0xff)
    case "BOOL":
      return Uint8Array.from({ length: count }, () => next() & 1)
  }
}

/** BF16 rounding computed independently of the code under test: the nearer of the two candidates, ties to even. */
const expectedBf16Bits = (bits: number) => {
  if ((bits & 0x7fffffff) > 0x7f800000) return 0x7fc00000
  const x = f32(bits)
  if (!Number.isFinite(x)) return bits
  const low = (bits & 0xffff0000) >>> 0
  const high = low + 0x10000
  // The candidate above the largest finite BF16 stands for 2^128, so values past the midpoint overflow to inf.
  const highValue = (high & 0x7fffffff) === 0x7f800000 ? Math.sign(x) * 2 ** 128 : f32(high)
  const below = Math.abs(x - f32(low))
  const above = Math.abs(highValue - x)
  return below < above || (below === above && (low & 0x10000) === 0) ? low : (high >>> 0)
}

/** F16 rounding from the platform's Math.f16round; NaNs become PyTorch's quiet NaN with the sign kept. */
const expectedF16Bits = (bits: number) => {
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits & 0x80000000) | 0x7fc00000) >>> 0
  return bitsOfNumber(f16round(f32(bits)))
}

const Dtype = Schema.Literals(["F64", "F32", "BF16", "F16", "I32", "I64", "U8", "BOOL"])
const Dimension = Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 7 }))
const TensorSetArbitrary = Schema.Array(
  Schema.Struct({
    name: Schema.String,
    dtype: Dtype,
    shape: Schema.Array(Dimension).check(Schema.isMaxLength(3)),
    seed: Schema.Int
  })
).check(Schema.isMaxLength(8))

const count = (shape: ReadonlyArray<number>) => shape.reduce((a, b) => a * b, 1)

/** Builds a file by hand, for headers the writer would never produce. */
const rawFile = (header: unknown, data: Uint8Array, declaredLength?: bigint) => {
  const json = new TextEncoder().encode(typeof header === "string" ? header : JSON.stringify(header))
  const bytes = new Uint8Array(8 + json.length + data.length)
  new DataView(bytes.buffer).setBigUint64(0, declaredLength ?? BigInt(json.length), true)
  bytes.set(json, 8)
  bytes.set(data, 8 + json.length)
  return bytes
}

const expectError = <A, E, R>(effect: Effect.Effect<A, E, R>, file: string, tensor: string | undefined, reason: RegExp) =>
  Effect.gen(function*() {
    const error = yield* Effect.flip(effect)
    assert.instanceOf(error, CheckpointError)
    const { file: actualFile, tensor: actualTensor, reason: actualReason } = error as CheckpointError
    assert.strictEqual(actualFile, file)
    assert.strictEqual(actualTensor, tensor)
    assert.match(actualReason, reason)
  })

describe("Safetensors", () => {
  it.effect.prop("write then read is bit-exact, and rewriting what was read gives the same file", { tensors: TensorSetArbitrary }, ({ tensors }) =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const specs = tensors.map(({ name, dtype, shape, seed }, i) => ({
        name: `${i}.${name}`,
        dtype,
        shape,
        data: randomData(dtype, count(shape), seed)
      }))
      const first = nodePath.join(dir, "first.safetensors")
      yield* Safetensors.write(first, specs)
      const file = yield* Safetensors.open(first)
      assert.deepStrictEqual([...file.names].sort(), specs.map((s) => s.name).sort())
      assert.deepStrictEqual(file.metadata, { format: "pt" })

      const reread: Array<Safetensors.TensorSpec> = []
      for (const spec of specs) {
        assert.deepStrictEqual(yield* file.info(spec.name), { dtype: spec.dtype, shape: spec.shape })
        if (spec.data instanceof Float32Array) {
          const values = yield* file.readFloat32(spec.name)
          const expected = spec.dtype === "F32"
            ? bitsOf(spec.data)
            : bitsOf(spec.data).map(spec.dtype === "BF16" ? expectedBf16Bits : expectedF16Bits)
          assert.deepStrictEqual(bitsOf(values), expected)
          reread.push({ ...spec, data: values })
          continue
        }
        assert.deepStrictEqual(yield* file.readBytes(spec.name), new Uint8Array(spec.data.buffer))
        if (spec.data instanceof BigInt64Array) {
          const fits = spec.data.every((v) => v === BigInt(Number(v) | 0))
          const result = yield* Effect.result(file.readInt32(spec.name))
          assert.strictEqual(result._tag === "Success", fits)
          if (result._tag === "Success") assert.deepStrictEqual(Array.from(result.success), Array.from(spec.data, Number))
        } else if (spec.data instanceof Float64Array) {
          assert.deepStrictEqual(yield* file.readFloat64(spec.name), spec.data)
        } else {
          assert.deepStrictEqual(Array.from(yield* file.readInt32(spec.name)), Array.from(spec.data))
        }
        reread.push(spec)
      }

      const second = nodePath.join(dir, "second.safetensors")
      yield* Safetensors.write(second, reread)
      const [a, b] = yield* Effect.promise(() => Promise.all([fs.readFile(first), fs.readFile(second)]))
      assert.isTrue(a.equals(b))
    }), { arbitrary: { runs: 200 } })

  it.effect("rounds f32 to BF16 to nearest even, as PyTorch does", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const cases: Array<[number, number]> = [
        [1.0, 0x3f80],
        [1.00390625, 0x3f80], // 1 + 2^-8: halfway between 0x3F80 and 0x3F81, ties to even
        [1.01171875, 0x3f82], // 1 + 3 * 2^-8: halfway between 0x3F81 and 0x3F82, ties to even
        [f32(0x3f800001), 0x3f80],
        [f32(0x3f808001), 0x3f81], // just above the tie rounds up
        [-2.5, 0xc020],
        [NaN, 0x7fc0],
        [Infinity, 0x7f80],
        [-Infinity, 0xff80],
        [-0, 0x8000],
        [0, 0x0000],
        [f32(0x7f7fffff), 0x7f80], // the largest f32 rounds past the largest BF16 to inf
        [f32(0x00000001), 0x0000] // the smallest f32 subnormal
      ]
      const path = nodePath.join(dir, "bf16.safetensors")
      yield* Safetensors.write(path, [{ name: "x", dtype: "BF16", shape: [cases.length], data: new Float32Array(cases.map(([x]) => x)) }])
      const file = yield* Safetensors.open(path)
      const stored = new Uint16Array((yield* file.readBytes("x")).buffer)
      assert.deepStrictEqual(Array.from(stored), cases.map(([, bits]) => bits))
      const back = yield* file.readFloat32("x")
      assert.deepStrictEqual(bitsOf(back), cases.map(([, bits]) => (bits << 16) >>> 0))
    }))

  it.effect("rounds f32 to F16 to nearest even, with subnormals and overflow to inf", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const cases: Array<[number, number]> = [
        [1.0, 0x3c00],
        [65504, 0x7bff], // largest F16
        [65519.99, 0x7bff],
        [65520, 0x7c00], // halfway to 2^16: ties to even, which is inf
        [2 ** -14, 0x0400], // smallest normal
        [2 ** -24, 0x0001], // smallest subnormal
        [2 ** -25, 0x0000], // halfway to the smallest subnormal: ties to even, zero
        [1.5 * 2 ** -25, 0x0001],
        [3 * 2 ** -25, 0x0002], // 1.5 subnormal units: ties to even
        [-(2 ** -14 - 2 ** -24), 0x83ff], // largest subnormal
        [1 + 2 ** -11, 0x3c00], // tie at 1: to even
        [1 + 3 * 2 ** -11, 0x3c02],
        [NaN, 0x7e00],
        [-Infinity, 0xfc00],
        [-0, 0x8000],
        [1e-8, 0x0000]
      ]
      const path = nodePath.join(dir, "f16.safetensors")
      yield* Safetensors.write(path, [{ name: "x", dtype: "F16", shape: [cases.length], data: new Float32Array(cases.map(([x]) => x)) }])
      const stored = new Uint16Array((yield* (yield* Safetensors.open(path)).readBytes("x")).buffer)
      assert.deepStrictEqual(Array.from(stored), cases.map(([, bits]) => bits))
    }))

  it.effect("widens every one of the 65536 F16 values to f32 exactly and narrows it back unchanged", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const all = Uint16Array.from({ length: 65536 }, (_, h) => h)
      const path = nodePath.join(dir, "all.safetensors")
      const data = new Uint8Array(all.buffer)
      yield* Effect.promise(() =>
        fs.writeFile(path, rawFile({ x: { dtype: "F16", shape: [65536], data_offsets: [0, data.length] } }, data)))
      const values = yield* (yield* Safetensors.open(path)).readFloat32("x")
      for (let h = 0; h < 65536; h++) {
        const sign = h & 0x8000 ? -1 : 1
        const exponent = (h >> 10) & 0x1f
        const mantissa = h & 0x3ff
        const expected = exponent === 0x1f
          ? (mantissa === 0 ? sign * Infinity : NaN)
          : sign * (exponent === 0 ? mantissa * 2 ** -24 : (1024 + mantissa) * 2 ** (exponent - 25))
        if (!Object.is(values[h], expected)) assert.fail(`F16 0x${h.toString(16)} read as ${values[h]}, expected ${expected}`)
      }
      const again = nodePath.join(dir, "again.safetensors")
      yield* Safetensors.write(again, [{ name: "x", dtype: "F16", shape: [65536], data: values }])
      const stored = new Uint16Array((yield* (yield* Safetensors.open(again)).readBytes("x")).buffer)
      for (let h = 0; h < 65536; h++) {
        const isNaN = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0
        const expected = isNaN ? (h & 0x8000) | 0x7e00 : h
        if (stored[h] !== expected) assert.fail(`F16 0x${h.toString(16)} came back as 0x${stored[h].toString(16)}`)
      }
    }))

  it.effect("writes the header as the Python library does: padded with spaces to 8 bytes, tensors by dtype then name", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const path = nodePath.join(dir, "layout.safetensors")
      yield* Safetensors.write(path, [
        { name: "b", dtype: "BF16", shape: [3], data: new Float32Array(3) },
        { name: "a", dtype: "U8", shape: [1], data: new Uint8Array(1) },
        { name: "i", dtype: "I32", shape: [1], data: new Int32Array(1) },
        { name: "c", dtype: "F32", shape: [], data: new Float32Array(1) },
        { name: "z", dtype: "I64", shape: [1], data: new BigInt64Array(1) },
        { name: "a2", dtype: "BF16", shape: [1, 1], data: new Float32Array(1) }
      ], { format: "pt", note: "hi" })
      const bytes = new Uint8Array(yield* Effect.promise(() => fs.readFile(path)))
      const length = Number(new DataView(bytes.buffer).getBigUint64(0, true))
      assert.strictEqual(length % 8, 0)
      const text = new TextDecoder().decode(bytes.subarray(8, 8 + length))
      assert.match(text, /^\{"__metadata__":\{"format":"pt","note":"hi"\},"z":\{"dtype":"I64","shape":\[1\],"data_offsets":\[0,8\]\},.*\} *$/)
      const offsets = Object.entries(JSON.parse(text)).slice(1).map(([name, entry]) => [name, (entry as any).data_offsets])
      assert.deepStrictEqual(offsets, [["z", [0, 8]], ["c", [8, 12]], ["i", [12, 16]], ["a2", [16, 18]], ["b", [18, 24]], ["a", [24, 25]]])
      assert.strictEqual(bytes.length, 8 + length + 25)
      const file = yield* Safetensors.open(path)
      assert.deepStrictEqual(file.names, ["z", "c", "i", "a2", "b", "a"])
      assert.deepStrictEqual(file.metadata, { format: "pt", note: "hi" })
    }))

  it.effect("rewrites the fixture, which transformers wrote, byte for byte", () =>
    Effect.gen(function*() {
      const model = yield* Safetensors.open(fixture("model.safetensors"))
      const specs: Array<Safetensors.TensorSpec<CheckpointError>> = []
      for (const name of model.names) {
        const { dtype, shape } = yield* model.info(name)
        specs.push({ name, dtype, shape, data: model.readFloat32(name) })
      }
      const path = nodePath.join(yield* tempDir, "model.safetensors")
      yield* Safetensors.write(path, specs)
      const [ours, theirs] = yield* Effect.promise(() => Promise.all([fs.readFile(path), fs.readFile(fixture("model.safetensors"))]))
      assert.isTrue(ours.equals(theirs))
    }))

  it.effect("computes lazy data only when writing it, and leaves nothing behind when a tensor fails", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const computed: Array<string> = []
      const lazy = (name: string, values: Float32Array) => Effect.sync(() => (computed.push(name), values))
      const path = nodePath.join(dir, "lazy.safetensors")
      yield* Safetensors.write(path, [
        { name: "a", dtype: "F32", shape: [2], data: lazy("a", new Float32Array([1, 2])) },
        { name: "b", dtype: "F16", shape: [1], data: lazy("b", new Float32Array([3])) }
      ])
      assert.deepStrictEqual(computed, ["a", "b"])
      assert.deepStrictEqual(Array.from(yield* (yield* Safetensors.open(path)).readFloat32("b")), [3])

      const broken = nodePath.join(dir, "broken.safetensors")
      yield* expectError(
        Safetensors.write(broken, [
          { name: "a", dtype: "F32", shape: [2], data: new Float32Array([1, 2]) },
          { name: "b", dtype: "F32", shape: [2], data: new Float32Array(3) }
        ]),
        broken, "b", /has 3 values but shape \[2\] needs 2/
      )
      yield* expectError(
        Safetensors.write(broken, [{ name: "i", dtype: "I32", shape: [1], data: new Float32Array(1) }]),
        broken, "i", /I32 is written from Int32Array, got Float32Array/
      )
      const failing = yield* Effect.flip(
        Safetensors.write(broken, [{ name: "a", dtype: "F32", shape: [1], data: Effect.fail("no data" as const) }])
      )
      assert.strictEqual(failing, "no data")
      assert.deepStrictEqual(yield* Effect.promise(() => fs.readdir(dir)), ["lazy.safetensors"])
    }))

  it.effect("reads the tiny-mistral fixture and its reference outputs", () =>
    Effect.gen(function*() {
      const model = yield* Safetensors.open(fixture("model.safetensors"))
      assert.strictEqual(model.names.length, 1 + 4 * 9 + 2)
      const shapes: Record<string, Array<number>> = {
        "model.embed_tokens.weight": [512, 64],
        "model.layers.0.self_attn.q_proj.weight": [64, 64],
        "model.layers.0.self_attn.k_proj.weight": [32, 64],
        "model.layers.3.self_attn.v_proj.weight": [32, 64],
        "model.layers.3.self_attn.o_proj.weight": [64, 64],
        "model.layers.1.mlp.gate_proj.weight": [192, 64],
        "model.layers.1.mlp.down_proj.weight": [64, 192],
        "model.layers.2.input_layernorm.weight": [64],
        "model.norm.weight": [64],
        "lm_head.weight": [512, 64]
      }
      for (const [name, shape] of Object.entries(shapes)) {
        assert.deepStrictEqual(yield* model.info(name), { dtype: "F32", shape })
      }
      const embed = yield* model.readFloat32("model.embed_tokens.weight")
      assert.strictEqual(embed.length, 512 * 64)
      assert.isTrue(embed.every(Number.isFinite))

      const reference = yield* Safetensors.open(fixture("reference.safetensors"))
      assert.deepStrictEqual(yield* reference.info("input_ids"), { dtype: "I32", shape: [2, 24] })
      const ids = yield* reference.readInt32("input_ids")
      assert.isTrue(ids.every((id) => id >= 0 && id < 512))
      assert.deepStrictEqual(yield* reference.info("logits"), { dtype: "F32", shape: [2, 24, 512] })
      for (let i = 0; i <= 4; i++) {
        assert.deepStrictEqual(yield* reference.info(`hidden_states.${i}`), { dtype: "F32", shape: [2, 24, 64] })
      }
      yield* expectError(reference.readFloat32("input_ids"), fixture("reference.safetensors"), "input_ids", /not a float tensor/)
      yield* expectError(reference.readInt32("logits"), fixture("reference.safetensors"), "logits", /not an integer tensor/)
    }))

  describe("rejects a bad file, naming it and the tensor", () => {
    const data16 = new Uint8Array(16)
    const cases: Array<[string, Uint8Array, string | undefined, RegExp]> = [
      ["too short for a header", new Uint8Array(5), undefined, /5 bytes, too short/],
      ["header length past the end", rawFile({}, new Uint8Array(0), 1000n), undefined, /header length 1000 runs past the end/],
      ["invalid JSON", rawFile("{\"a\": ", new Uint8Array(0)), undefined, /not valid JSON/],
      ["a header that is not an object", rawFile("[1]", new Uint8Array(0)), undefined, /not a JSON object/],
      ["unknown dtype", rawFile({ w: { dtype: "C64", shape: [2], data_offsets: [0, 16] } }, data16), "w", /unsupported dtype "C64"/],
      ["a bad shape", rawFile({ w: { dtype: "F32", shape: [-1], data_offsets: [0, 16] } }, data16), "w", /shape/],
      ["offsets that disagree with the shape", rawFile({ w: { dtype: "F32", shape: [3], data_offsets: [0, 16] } }, data16), "w", /hold 16 bytes but F32 \[3\] needs 12/],
      ["offsets out of range", rawFile({ w: { dtype: "F32", shape: [8], data_offsets: [0, 32] } }, data16), "w", /run past the end of the data section \(16 bytes\)/],
      ["overlapping offsets", rawFile({
        a: { dtype: "F32", shape: [3], data_offsets: [0, 12] },
        b: { dtype: "F32", shape: [2], data_offsets: [8, 16] }
      }, data16), "b", /\[8, 16\] overlap tensor a/],
      ["a gap between tensors", rawFile({
        a: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
        b: { dtype: "F32", shape: [1], data_offsets: [12, 16] }
      }, data16), "b", /4 unused bytes/],
      ["bytes after the last tensor", rawFile({ a: { dtype: "F32", shape: [2], data_offsets: [0, 8] } }, data16), undefined, /8 bytes after the last tensor/],
      ["bad __metadata__", rawFile({ __metadata__: { format: 1 } }, new Uint8Array(0)), undefined, /__metadata__/]
    ]
    it.effect.each(cases)("%s", ([, bytes, tensor, reason]) =>
      Effect.gen(function*() {
        const path = nodePath.join(yield* tempDir, "bad.safetensors")
        yield* Effect.promise(() => fs.writeFile(path, bytes))
        yield* expectError(Safetensors.open(path), path, tensor, reason)
      }))

    it.effect("truncated file", () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        const path = nodePath.join(dir, "cut.safetensors")
        yield* Safetensors.write(path, [
          { name: "a", dtype: "F32", shape: [4], data: new Float32Array(4) },
          { name: "z", dtype: "F32", shape: [4], data: new Float32Array(4) }
        ])
        const { size } = yield* Effect.promise(() => fs.stat(path))
        yield* Effect.promise(() => fs.truncate(path, size - 3))
        yield* expectError(Safetensors.open(path), path, "z", /\[16, 32\] run past the end of the data section \(29 bytes\)/)
      }))

    it.effect("missing file and missing tensor", () =>
      Effect.gen(function*() {
        const dir = yield* tempDir
        const absent = nodePath.join(dir, "absent.safetensors")
        yield* expectError(Safetensors.open(absent), absent, undefined, /cannot open: ENOENT/)
        const path = nodePath.join(dir, "one.safetensors")
        yield* Safetensors.write(path, [{ name: "a", dtype: "F32", shape: [1], data: new Float32Array(1) }])
        const file = yield* Safetensors.open(path)
        yield* expectError(file.readFloat32("nope"), path, "nope", /no such tensor/)
        yield* expectError(file.info("nope"), path, "nope", /no such tensor/)
      }))
  })
})
