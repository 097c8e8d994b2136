/**
 * Images in, against transformers' Pixtral image processor (PIL backend, transformers 5.17;
 * test/fixtures/vision/processor, made by scripts/make-vision-fixtures.py): for each fixture image
 * (RGB, greyscale, RGBA) and configuration, the processed size, the resized 8-bit values before
 * rescaling (Pillow's bicubic resampler, bit for bit) and the normalised pixel values; the token grid
 * by the processor's rule; and the one-line errors for files that are not images we can read.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as fs from "node:fs"
import * as fsp from "node:fs/promises"
import * as path from "node:path"
import pngjs from "pngjs"
import * as Images from "../src/data/Images.ts"
import * as Safetensors from "../src/io/Safetensors.ts"
import { localFixture, maxAbsDiff, tempDir } from "./support.ts"

interface FixtureConfig {
  readonly patch_size: number
  readonly spatial_merge_size: number
  readonly longest_edge: number
}

interface ProcessorConfig {
  readonly images: Readonly<Record<string, { readonly file: string }>>
  readonly configs: Readonly<Record<string, FixtureConfig>>
}

interface Grids {
  readonly images: Readonly<Record<string, { readonly processed: { readonly pil: [number, number] }; readonly grid_by_rule: ReadonlyArray<string> }>>
}

const dir = localFixture("vision/processor")
const readJson = <A>(file: string): A => JSON.parse(fs.readFileSync(path.join(dir, file), "utf8"))
const fixture = readJson<ProcessorConfig>("processor-config.json")

const configOf = (c: FixtureConfig): Images.PixtralImageConfig => ({
  ...Images.pixtralDefaults,
  patchSize: c.patch_size,
  spatialMergeSize: c.spatial_merge_size,
  longestEdge: c.longest_edge
})

/** [H, W, 3] samples as the processor's channels-first [3, H, W]. */
const channelsFirst = (image: Images.Pixels) => {
  const plane = image.height * image.width
  return Float32Array.from({ length: 3 * plane }, (_, i) => image.data[(i % plane) * 3 + Math.floor(i / plane)])
}

const ids: Images.ImageTokenIds = { image: 10, imageBreak: 12, imageEnd: 13 }
const names: Readonly<Record<number, string>> = { 10: "[IMG]", 12: "[IMG_BREAK]", 13: "[IMG_END]" }

/** A token grid as the fixture writes it: one string per row of tokens, each ending in [IMG_BREAK] or [IMG_END]. */
const gridRows = (grid: ReadonlyArray<number>, cols: number) =>
  Array.from({ length: grid.length / (cols + 1) }, (_, r) => grid.slice(r * (cols + 1), (r + 1) * (cols + 1)).map((id) => names[id]).join(""))

const imageError = (effect: Effect.Effect<unknown, Images.ImageError>) =>
  effect.pipe(Effect.flip, Effect.map((error) => {
    assert.strictEqual(error._tag, "ImageError")
    assert.notInclude(error.message, "\n")
    return error.message
  }))

describe("Images", () => {
  for (const [name, c] of Object.entries(fixture.configs)) {
    const config = configOf(c)
    const grids = readJson<Grids>(`processor-${name}.json`)
    for (const [image, { file }] of Object.entries(fixture.images)) {
      it.effect(`${name} ${image}: size, resized values and pixel values equal the processor's`, () =>
        Effect.gen(function*() {
          const reference = yield* Safetensors.open(path.join(dir, `processor-${name}-pil.safetensors`))
          const pixels = yield* Images.decode(path.join(dir, file))
          const processed = Images.preprocess(pixels, config)
          assert.deepStrictEqual([processed.height, processed.width], Array.from(yield* reference.readInt32(`image_sizes.${image}`)))
          const resized = Images.resizeBicubic(pixels, processed.height, processed.width)
          assert.strictEqual(maxAbsDiff(channelsFirst(resized), yield* reference.readFloat32(`resized.${image}`)), 0, "resized values")
          assert.strictEqual(maxAbsDiff(processed.pixelValues, yield* reference.readFloat32(`pixel_values.${image}`)), 0, "pixel values")
        }).pipe(Effect.scoped))

      it(`${name} ${image}: token grid equals the processor's`, () => {
        const { processed: { pil: [height, width] }, grid_by_rule } = grids.images[image]
        const grid = Images.tokenGrid(height, width, c.patch_size, c.spatial_merge_size, ids)
        assert.deepStrictEqual(gridRows(grid, width / (c.patch_size * c.spatial_merge_size)), grid_by_rule)
      })
    }
  }

  it.effect("a truncated PNG is a one-line ImageError naming the file", () =>
    Effect.gen(function*() {
      const file = path.join(yield* tempDir, "truncated.png")
      const bytes = yield* Effect.promise(() => fsp.readFile(path.join(dir, fixture.images["shapes-w64-h64"].file)))
      yield* Effect.promise(() => fsp.writeFile(file, bytes.subarray(0, bytes.length >> 1)))
      const message = yield* imageError(Images.decode(file))
      assert.strictEqual(message, `${file}: corrupt PNG: truncated (the file ends before the image does)`)
    }).pipe(Effect.scoped))

  it.effect("a file that is not an image, and one that is missing, are one-line ImageErrors naming the file", () =>
    Effect.gen(function*() {
      const folder = yield* tempDir
      const text = path.join(folder, "notes.png")
      yield* Effect.promise(() => fsp.writeFile(text, "not an image\n"))
      assert.strictEqual(yield* imageError(Images.decode(text)), `${text}: unsupported image format (only PNG and JPEG are read)`)
      const missing = path.join(folder, "missing.jpg")
      assert.match(yield* imageError(Images.decode(missing)), new RegExp(`^${missing}: cannot be read: `))
    }).pipe(Effect.scoped))

  /** A 16-bit PNG of `colorType` (0 grey, 2 RGB) holding `samples`, written by pngjs. */
  const png16 = (colorType: 0 | 2, width: number, samples: ReadonlyArray<number>) => {
    const options = { colorType, inputColorType: colorType, bitDepth: 16, inputHasAlpha: false } as const
    const png = new pngjs.PNG({ ...options, width, height: samples.length / width / (colorType === 0 ? 1 : 3) })
    png.data = Buffer.from(new Uint16Array(samples).buffer)
    return pngjs.PNG.sync.write(png, options)
  }

  it.effect("16-bit PNGs become 8 bits as PIL makes them: grey clipped at 255, colour its high byte", () =>
    Effect.gen(function*() {
      const grey = [0, 1, 254, 255, 256, 4095, 65535, 300]
      const fromGrey = yield* Images.decodeBytes("grey16.png", png16(0, 4, grey))
      assert.deepStrictEqual(Array.from(fromGrey.data), grey.flatMap((v) => Array(3).fill(Math.min(v, 255))))
      const colour = [0, 255, 256, 65535, 32768, 4660]
      const fromColour = yield* Images.decodeBytes("rgb16.png", png16(2, 2, colour))
      assert.deepStrictEqual(Array.from(fromColour.data), colour.map((v) => v >> 8))
    }))

  const Side = Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 40 }))

  it.prop("output sizes are patch multiples within the limit, covering the image when it fits", {
    height: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 3000 })),
    width: Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 3000 })),
    longestEdge: Schema.Int.check(Schema.isBetween({ minimum: 16, maximum: 2048 })),
    step: Schema.Literals([4, 8, 14, 16, 28, 32])
  }, ({ height, width, longestEdge, step }) => {
    const size = Images.outputSize(height, width, longestEdge, step)
    const limit = Math.ceil(longestEdge / step) * step
    for (const side of [size.height, size.width]) {
      assert.strictEqual(side % step, 0)
      assert.isAtLeast(side, step)
      assert.isAtMost(side, limit)
    }
    if (Math.max(height, width) <= longestEdge) {
      assert.deepStrictEqual(size, { height: Math.ceil(height / step) * step, width: Math.ceil(width / step) * step })
    }
  }, { arbitrary: { runs: 300 } })

  it.prop("resizing to the same size is the identity, and a uniform image stays uniform at any size", {
    height: Side,
    width: Side,
    toHeight: Side,
    toWidth: Side,
    seed: Schema.Int.check(Schema.isBetween({ minimum: 0, maximum: 255 }))
  }, ({ height, width, toHeight, toWidth, seed }) => {
    const data = Uint8Array.from({ length: height * width * 3 }, (_, i) => (i * 37 + seed * 101) % 256)
    const image = { height, width, data }
    assert.deepStrictEqual(Images.resizeBicubic(image, height, width).data, data)
    const uniform = { height, width, data: new Uint8Array(height * width * 3).fill(seed) }
    const resized = Images.resizeBicubic(uniform, toHeight, toWidth)
    assert.strictEqual(resized.data.length, toHeight * toWidth * 3)
    assert.isTrue(resized.data.every((v) => v === seed))
  }, { arbitrary: { runs: 200 } })
})
