/**
 * Images in, for Mistral 3's image side (`src/model/Vision.ts`): PNG and JPEG files decoded to RGB,
 * preprocessed as transformers' Pixtral image processor (PIL backend) does, and the token grid each
 * image takes in a prompt as `PixtralProcessor` lays it out.
 *
 * The model was trained on what that processor makes, so its output is the contract, pixel for
 * pixel: modes become RGB as PIL's `convert("RGB")` does (alpha dropped, not composited; 16-bit
 * grey clipped at 255, other 16-bit samples keep their high byte), the image is resized so that it
 * fits the longest-edge limit, each side rounded up to a multiple of patch x merge, with Pillow's
 * 8-bit fixed-point bicubic resampler reproduced bit for bit, then rescaled by 1/255 (in double,
 * stored as float32) and normalised per channel in float32, channels first.
 *
 * Decoding is done by maintained pure-JS libraries (pngjs, jpeg-js), which bundle with esbuild. PNG
 * pixels are exactly PIL's; a JPEG's may differ from libjpeg's by a few levels (another IDCT and
 * chroma upsampling).
 */
import { Effect, Schema } from "effect"
import jpeg from "jpeg-js"
import { readFile } from "node:fs/promises"
import * as path from "node:path"
import pngjs from "pngjs"

/** An image file that cannot be used: unreadable, corrupt, or in a format we do not read. */
export class ImageError extends Schema.TaggedError<ImageError>()("ImageError", {
  file: Schema.String,
  reason: Schema.String
}) {
  override get message() {
    return `${this.file}: ${this.reason}`
  }
}

/** 8-bit RGB pixels, row-major [height, width, 3]. */
export interface Pixels {
  readonly height: number
  readonly width: number
  readonly data: Uint8Array
}

/** What the Pixtral image processor and processor are configured with (`preprocessor_config.json`, the model's config). */
export interface PixtralImageConfig {
  /** The vision encoder's patch size in pixels. */
  readonly patchSize: number
  /** The projector's merge size: an image side is a multiple of patchSize x spatialMergeSize. */
  readonly spatialMergeSize: number
  /** The longest side an image may keep; larger images are scaled down to fit. */
  readonly longestEdge: number
  readonly rescaleFactor: number
  readonly imageMean: readonly [number, number, number]
  readonly imageStd: readonly [number, number, number]
}

/** transformers' defaults for the Pixtral image processor (CLIP's mean and std, 1/255, 1024 pixels, patch 16). */
export const pixtralDefaults: PixtralImageConfig = {
  patchSize: 16,
  spatialMergeSize: 1,
  longestEdge: 1024,
  rescaleFactor: 1 / 255,
  imageMean: [0.48145466, 0.4578275, 0.40821073],
  imageStd: [0.26862954, 0.26130258, 0.27577711]
}

/** An image ready for the vision encoder: [3, height, width] float32 values and the size they have. */
export interface ProcessedImage {
  readonly height: number
  readonly width: number
  readonly pixelValues: Float32Array
}

// ---------------------------------------------------------------------------------------------
// decoding
// ---------------------------------------------------------------------------------------------

const pngSignature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]
const startsWith = (bytes: Uint8Array, prefix: ReadonlyArray<number>) =>
  bytes.length >= prefix.length && prefix.every((byte, i) => bytes[i] === byte)
const describe = (cause: unknown) => (cause instanceof Error ? cause.message : String(cause)).split("\n")[0]

/** pngjs says a file that ends too soon has "read requests waiting on finished stream"; we say truncated. */
const corruption = (cause: unknown) => {
  const said = describe(cause)
  return /read requests wait/.test(said) ? "truncated (the file ends before the image does)" : said
}

/** PNG colour types without an alpha sample (0: grey, 2: RGB), which a tRNS colour key may make transparent. */
const opaqueColorType = (colorType: number) => colorType === 0 || colorType === 2

/**
 * One PNG sample as PIL's RGB image has it: 1-, 2- and 4-bit grey scaled to 0..255 (PIL's unpackers
 * multiply by 255, 85 and 17), 16-bit grey clipped at 255 (PIL reads it as mode I;16 or I, by version,
 * whose RGB conversion clips), other 16-bit samples their high byte (PIL's ;16B raw modes).
 */
const pngSampleTo8Bit = (depth: number, colorType: number) => {
  if (depth === 16) return colorType === 0 ? (v: number) => Math.min(v, 255) : (v: number) => v >> 8
  if (depth < 8 && colorType !== 3) {
    const scale = 255 / (2 ** depth - 1)
    return (v: number) => v * scale
  }
  return (v: number) => v
}

/**
 * Decodes with pngjs at the file's own depth (no rescaling of ours to undo) and converts to RGB as
 * PIL does. pngjs blanks the pixels that match a tRNS colour key (all four samples 0); PIL keeps
 * their colour and RGB drops the key, so those pixels get the key colour back.
 */
const decodePng = (bytes: Uint8Array): Pixels => {
  const png = pngjs.PNG.sync.read(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), { skipRescale: true })
  const { width, height, depth, colorType } = png
  const source = png.data as ArrayLike<number>
  const key = opaqueColorType(colorType) ? (png as { transColor?: ReadonlyArray<number> }).transColor : undefined
  const to8 = pngSampleTo8Bit(depth, colorType)
  const data = new Uint8Array(width * height * 3)
  for (let p = 0; p < width * height; p++) {
    const keyed = key !== undefined && source[p * 4 + 3] === 0
    for (let c = 0; c < 3; c++) {
      const sample = keyed ? key[key.length === 1 ? 0 : c] : source[p * 4 + c]
      data[p * 3 + c] = to8(sample)
    }
  }
  return { width, height, data }
}

/** Decodes with jpeg-js (grey, YCbCr, Adobe CMYK/YCCK) to RGB. */
const decodeJpeg = (bytes: Uint8Array): Pixels => {
  const image = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: false })
  if (image.data.length !== image.width * image.height * 3) {
    throw new Error(`decoded ${image.data.length} bytes for ${image.width}x${image.height} RGB`)
  }
  return { width: image.width, height: image.height, data: image.data }
}

/** Decodes PNG or JPEG bytes (told apart by their signature) to RGB; `file` names them in errors. */
export const decodeBytes = (file: string, bytes: Uint8Array): Effect.Effect<Pixels, ImageError> => {
  const [format, decoder] = startsWith(bytes, pngSignature)
    ? ["PNG", decodePng] as const
    : startsWith(bytes, [0xff, 0xd8, 0xff])
    ? ["JPEG", decodeJpeg] as const
    : [undefined, undefined]
  if (decoder === undefined) {
    return Effect.fail(new ImageError({ file, reason: "unsupported image format (only PNG and JPEG are read)" }))
  }
  return Effect.try({
    try: () => decoder(bytes),
    catch: (cause) => new ImageError({ file, reason: `corrupt ${format}: ${corruption(cause)}` })
  }).pipe(Effect.filterOrFail(
    (pixels) => pixels.width > 0 && pixels.height > 0,
    () => new ImageError({ file, reason: `corrupt ${format}: no pixels` })
  ))
}

/** Reads and decodes a PNG or JPEG file to RGB pixels [height, width, 3]. */
export const decode = (file: string): Effect.Effect<Pixels, ImageError> =>
  Effect.tryPromise({
    try: () => readFile(file),
    catch: (cause) => new ImageError({ file, reason: `cannot be read: ${describe(cause)}` })
  }).pipe(Effect.flatMap((bytes) => decodeBytes(file, bytes)))

// ---------------------------------------------------------------------------------------------
// Pillow's bicubic resampling, 8 bits a sample
// ---------------------------------------------------------------------------------------------

/** Pillow's fixed point: 8 bits of result, 2 of headroom for negative lobes and overshoot. */
const precisionBits = 32 - 8 - 2
const fixedOne = 2 ** precisionBits

/** Keys' cubic with a = -0.5, as Pillow evaluates it (same operations, same order). */
const bicubic = (x: number) => {
  const a = -0.5
  const t = Math.abs(x)
  if (t < 1) return ((a + 2) * t - (a + 3)) * t * t + 1
  if (t < 2) return (((t - 5) * t + 8) * t - 4) * a
  return 0
}

/** For each output position along one axis: the first input index, how many inputs, and their fixed-point weights. */
interface Coefficients {
  readonly first: Int32Array
  readonly count: Int32Array
  /** [outSize, taps] weights, scaled by 2^22 and rounded half away from zero. */
  readonly weights: Int32Array
  readonly taps: number
}

/**
 * Pillow's `precompute_coeffs` then `normalize_coeffs_8bpc`: the filter stretched by the downscale
 * factor (never narrowed), centred on each output pixel's centre, its weights normalised to sum 1.
 */
const coefficients = (inSize: number, outSize: number): Coefficients => {
  const scale = inSize / outSize
  const filterScale = Math.max(scale, 1)
  const support = 2 * filterScale
  const taps = Math.ceil(support) * 2 + 1
  const first = new Int32Array(outSize)
  const count = new Int32Array(outSize)
  const weights = new Int32Array(outSize * taps)
  const inverse = 1 / filterScale
  const raw = new Float64Array(taps)
  for (let out = 0; out < outSize; out++) {
    const center = (out + 0.5) * scale
    const lo = Math.max(Math.trunc(center - support + 0.5), 0)
    const hi = Math.min(Math.trunc(center + support + 0.5), inSize)
    let sum = 0
    for (let i = 0; i < hi - lo; i++) {
      raw[i] = bicubic((i + lo - center + 0.5) * inverse)
      sum += raw[i]
    }
    for (let i = 0; i < hi - lo; i++) {
      const w = sum === 0 ? raw[i] : raw[i] / sum
      weights[out * taps + i] = Math.trunc(w < 0 ? -0.5 + w * fixedOne : 0.5 + w * fixedOne)
    }
    first[out] = lo
    count[out] = hi - lo
  }
  return { first, count, weights, taps }
}

/** Pillow's `clip8`: the fixed-point sum's integer part, clamped to 0..255. */
const clip8 = (sum: number) => Math.min(Math.max(Math.floor(sum / fixedOne), 0), 255)

/** One weighted sum of `count` samples `stride` apart from `start`, rounded as Pillow rounds. */
const convolve = (data: Uint8Array, start: number, stride: number, k: Coefficients, out: number) => {
  let sum = fixedOne / 2
  const base = out * k.taps
  for (let i = 0; i < k.count[out]; i++) sum += data[start + i * stride] * k.weights[base + i]
  return clip8(sum)
}

/** Resamples rows [rowFrom, rowTo) of `image` to `width` columns. */
const resampleRows = (image: Pixels, width: number, rowFrom: number, rowTo: number): Pixels => {
  const k = coefficients(image.width, width)
  const data = new Uint8Array((rowTo - rowFrom) * width * 3)
  for (let y = rowFrom; y < rowTo; y++) {
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < 3; c++) {
        data[((y - rowFrom) * width + x) * 3 + c] = convolve(image.data, (y * image.width + k.first[x]) * 3 + c, 3, k, x)
      }
    }
  }
  return { height: rowTo - rowFrom, width, data }
}

/** Resamples the columns of `image` to `height` rows, with `k`'s first rows counted from `rowOffset`. */
const resampleColumns = (image: Pixels, height: number, k: Coefficients, rowOffset: number): Pixels => {
  const data = new Uint8Array(height * image.width * 3)
  const stride = image.width * 3
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < image.width; x++) {
      for (let c = 0; c < 3; c++) {
        data[(y * image.width + x) * 3 + c] = convolve(image.data, (k.first[y] - rowOffset) * stride + x * 3 + c, stride, k, y)
      }
    }
  }
  return { height, width: image.width, data }
}

/**
 * Bicubic resize bit-exact with Pillow's `Image.resize(..., BICUBIC)` on an RGB image: horizontal
 * pass over only the rows the vertical pass reads, then the vertical pass; an axis whose size
 * does not change is not resampled, so a same-size resize is the identity.
 */
export const resizeBicubic = (image: Pixels, height: number, width: number): Pixels => {
  const vertical = coefficients(image.height, height)
  const rowFrom = vertical.first[0]
  const rowTo = vertical.first[height - 1] + vertical.count[height - 1]
  const widened = width === image.width ? image : resampleRows(image, width, rowFrom, rowTo)
  const rowOffset = widened === image ? 0 : rowFrom
  return height === image.height ? widened : resampleColumns(widened, height, vertical, rowOffset)
}

// ---------------------------------------------------------------------------------------------
// the Pixtral image processor
// ---------------------------------------------------------------------------------------------

/**
 * The processor's output size: scaled down (floor of each side over the larger ratio) when a side
 * is over `longestEdge`, then each side rounded up to a multiple of `step` (patch x merge). A side
 * that scaling takes below one pixel keeps one step, where transformers fails (PIL refuses an empty side).
 */
export const outputSize = (height: number, width: number, longestEdge: number, step: number) => {
  const ratio = Math.max(height / longestEdge, width / longestEdge)
  const scaled = (side: number) => Math.max(Math.floor(side / ratio), 1)
  const [h, w] = ratio > 1 ? [scaled(height), scaled(width)] : [height, width]
  return { height: Math.ceil(h / step) * step, width: Math.ceil(w / step) * step }
}

/**
 * [3, height, width] float32: each sample times `rescaleFactor` in double, stored as float32, then
 * (x - mean) / std in float32, as numpy computes them in the processor.
 */
const normalize = (image: Pixels, config: PixtralImageConfig): Float32Array => {
  const plane = image.height * image.width
  const out = new Float32Array(3 * plane)
  for (let c = 0; c < 3; c++) {
    const mean = Math.fround(config.imageMean[c])
    const std = Math.fround(config.imageStd[c])
    for (let p = 0; p < plane; p++) {
      const x = Math.fround(image.data[p * 3 + c] * config.rescaleFactor)
      out[c * plane + p] = Math.fround(x - mean) / std
    }
  }
  return out
}

/** An image as the Pixtral image processor makes it, called (as PixtralProcessor calls it) with patch x merge. */
export const preprocess = (image: Pixels, config: PixtralImageConfig): ProcessedImage => {
  const size = outputSize(image.height, image.width, config.longestEdge, config.patchSize * config.spatialMergeSize)
  const resized = resizeBicubic(image, size.height, size.width)
  return { ...size, pixelValues: normalize(resized, config) }
}

/** The ids of the three image tokens in the tokenizer's vocabulary. */
export interface ImageTokenIds {
  readonly image: number
  readonly imageBreak: number
  readonly imageEnd: number
}

/**
 * The tokens that stand for one processed image in a prompt, as PixtralProcessor expands its
 * placeholder: a row of [IMG] per merged patch row, each row closed by [IMG_BREAK], the last by [IMG_END].
 */
export const tokenGrid = (height: number, width: number, patchSize: number, mergeSize: number, ids: ImageTokenIds) => {
  const rows = Math.floor(height / (patchSize * mergeSize))
  const cols = Math.floor(width / (patchSize * mergeSize))
  const row = [...Array<number>(cols).fill(ids.image), ids.imageBreak]
  const grid = Array.from({ length: rows }, () => row).flat()
  grid[grid.length - 1] = ids.imageEnd
  return grid
}

/** Whether `id` is one of the image tokens: part of an image's grid, an input and never a target. */
export const isImageToken = (tokens: ImageTokenIds, id: number): boolean => id === tokens.image || id === tokens.imageBreak || id === tokens.imageEnd

/** Mistral's ids of the three image tokens ([IMG] 10, [IMG_BREAK] 12, [IMG_END] 13), where no tokenizer says otherwise. */
export const mistralImageTokens: ImageTokenIds = { image: 10, imageBreak: 12, imageEnd: 13 }

/**
 * The image processor's settings of a model folder: its preprocessor_config.json (as transformers
 * saves it) where there is one, else transformers' defaults with the encoder's patch size and the
 * largest image it takes. `mergeSize` is the projector's.
 */
export const processorConfig = (dir: string, encoder: { readonly patchSize: number; readonly mergeSize: number; readonly imageSize: number }) => {
  const file = path.join(dir, "preprocessor_config.json")
  return Effect.tryPromise({
    try: () => readFile(file, "utf8").then((text) => JSON.parse(text) as Record<string, unknown>, (error: NodeJS.ErrnoException) => (error.code === "ENOENT" ? undefined : Promise.reject(error))),
    catch: (cause) => new ImageError({ file, reason: `cannot be read as JSON: ${describe(cause)}` })
  }).pipe(Effect.map((json): PixtralImageConfig => {
    const patch = (json?.patch_size as { height?: number } | undefined)?.height ?? encoder.patchSize
    const size = json?.size as { longest_edge?: number } | undefined
    return {
      ...pixtralDefaults,
      patchSize: patch,
      spatialMergeSize: encoder.mergeSize,
      longestEdge: size?.longest_edge ?? encoder.imageSize,
      ...(typeof json?.rescale_factor === "number" ? { rescaleFactor: json.rescale_factor } : {}),
      ...(Array.isArray(json?.image_mean) ? { imageMean: json.image_mean as unknown as readonly [number, number, number] } : {}),
      ...(Array.isArray(json?.image_std) ? { imageStd: json.image_std as unknown as readonly [number, number, number] } : {})
    }
  }))
}

/**
 * What each of `ids` becomes when its `tokens.image` placeholders are expanded, one image each in
 * order, as PixtralProcessor does: itself, or its image's grid; undefined when placeholders and
 * images do not pair up.
 */
export const expansion = (ids: ReadonlyArray<number>, images: ReadonlyArray<ProcessedImage>, config: PixtralImageConfig, tokens: ImageTokenIds): Array<Array<number>> | undefined => {
  if (ids.filter((id) => id === tokens.image).length !== images.length) return undefined
  let next = 0
  return ids.map((id) => {
    if (id !== tokens.image) return [id]
    const { height, width } = images[next++]
    return tokenGrid(height, width, config.patchSize, config.spatialMergeSize, tokens)
  })
}

/** Token ids with each image placeholder expanded into its image's grid (`expansion`, flattened). */
export const expandPlaceholders = (ids: ReadonlyArray<number>, images: ReadonlyArray<ProcessedImage>, config: PixtralImageConfig, tokens: ImageTokenIds): Array<number> | undefined =>
  expansion(ids, images, config, tokens)?.flat()
