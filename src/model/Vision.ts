/**
 * The image side of a `Mistral3ForConditionalGeneration` (Ministral 3 as released): the Pixtral
 * vision encoder and the multimodal projector, as transformers computes them.
 *
 * - Encoder: each image's patches by a convolution of stride = kernel = patch size (no bias), one
 *   sequence of every image's patches in row-major order, `ln_pre` (RMSNorm), then pre-norm layers of
 *   attention with 2-D RoPE (a patch at grid row h, column w takes the frequencies of h on half its
 *   pairs and of w on the other half) and a gated MLP. A patch attends to the patches of its own image.
 * - Projector: RMSNorm, the patch merger (each merge x merge square of patches concatenated, then a
 *   linear map back to the encoder's width), `linear_1`, the activation, `linear_2` into the text
 *   model's width. Its rows replace, in order, the embeddings of the image tokens.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import * as Checkpoint from "../io/Checkpoint.ts"
import { CheckpointError, ConfigError } from "../Errors.ts"
import { matMul } from "./MatMul.ts"
import { linear, rmsNorm } from "./Model.ts"

export interface VisionConfig {
  readonly hiddenSize: number
  readonly intermediateSize: number
  readonly layers: number
  readonly heads: number
  readonly patchSize: number
  /** Largest image side in pixels: the RoPE grid is imageSize / patchSize patches a side. */
  readonly imageSize: number
  readonly channels: number
  readonly ropeTheta: number
  readonly hiddenAct: Activation
  /** The projector's. */
  readonly spatialMergeSize: number
  readonly imageTokenId: number
  /** Which encoder hidden state the projector takes: transformers' index into [ln_pre output, layer 1, ...]. */
  readonly featureLayer: number
  readonly projectorBias: boolean
  readonly projectorAct: Activation
  readonly textHiddenSize: number
  readonly textRmsNormEps: number
}

type Activation = "gelu" | "silu" | "gelu_pytorch_tanh"

interface EncoderLayer {
  readonly attentionNorm: tf.Tensor1D
  readonly q: tf.Tensor2D
  readonly k: tf.Tensor2D
  readonly v: tf.Tensor2D
  readonly o: tf.Tensor2D
  readonly ffnNorm: tf.Tensor1D
  readonly gate: tf.Tensor2D
  readonly up: tf.Tensor2D
  readonly down: tf.Tensor2D
}

export interface VisionWeights {
  readonly patchConv: tf.Tensor4D // [D, C, p, p]
  readonly lnPre: tf.Tensor1D
  readonly layers: ReadonlyArray<EncoderLayer>
  readonly projectorNorm: tf.Tensor1D
  readonly merging: tf.Tensor2D // [D, D * merge^2]
  readonly linear1: tf.Tensor2D // [text D, D]
  readonly linear1Bias: tf.Tensor1D | undefined
  readonly linear2: tf.Tensor2D // [text D, text D]
  readonly linear2Bias: tf.Tensor1D | undefined
}

export interface Vision {
  readonly config: VisionConfig
  readonly weights: VisionWeights
  /** The Mistral3 config.json it came from: what a save writes back around the text model's config. */
  readonly raw: Readonly<Record<string, unknown>>
}

/** An image's size in pixels, [height, width], as transformers' `image_sizes`. */
export type ImageSize = readonly [number, number]

const activations: ReadonlyArray<Activation> = ["gelu", "silu", "gelu_pytorch_tanh"]

const record = (value: unknown): Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : {}

/** The vision and projector configuration of a Mistral3 config.json; `file` names it in errors. */
export const decodeConfig = (json: unknown, file: string): Effect.Effect<VisionConfig, ConfigError> => {
  const wrapper = record(json)
  const vision = record(wrapper.vision_config)
  const text = record(wrapper.text_config)
  const fail = (reason: string) => Effect.fail(new ConfigError({ file, reason }))
  const integer = (from: Record<string, unknown>, key: string, fallback?: number) => {
    const value = from[key] ?? fallback
    return typeof value === "number" && Number.isInteger(value) && value > 0 ? value : undefined
  }
  const fields = {
    hiddenSize: integer(vision, "hidden_size"),
    intermediateSize: integer(vision, "intermediate_size"),
    layers: integer(vision, "num_hidden_layers"),
    heads: integer(vision, "num_attention_heads"),
    patchSize: integer(vision, "patch_size"),
    imageSize: integer(vision, "image_size"),
    channels: integer(vision, "num_channels", 3),
    spatialMergeSize: integer(wrapper, "spatial_merge_size", 2),
    textHiddenSize: integer(text, "hidden_size")
  }
  const missing = Object.entries(fields).filter(([, value]) => value === undefined).map(([key]) => key)
  if (wrapper.model_type !== "mistral3") return fail(`model_type is ${JSON.stringify(wrapper.model_type)}, not "mistral3": no vision model`)
  if (missing.length > 0) return fail(`vision_config or the wrapper lacks a positive integer for ${missing.join(", ")}`)
  const f = fields as { [K in keyof typeof fields]: number }
  const headDim = vision.head_dim ?? f.hiddenSize / f.heads
  if (headDim !== f.hiddenSize / f.heads) return fail(`vision_config.head_dim ${headDim} is not hidden_size / num_attention_heads, which Pixtral's attention uses`)
  const rope = record(vision.rope_parameters)
  const ropeTheta = rope.rope_theta ?? vision.rope_theta ?? 10000
  const imageTokenId = wrapper.image_token_index ?? wrapper.image_token_id ?? 10
  const featureLayer = wrapper.vision_feature_layer ?? -1
  const hiddenAct = vision.hidden_act ?? "gelu"
  const projectorAct = wrapper.projector_hidden_act ?? "gelu"
  if (typeof ropeTheta !== "number") return fail("vision_config's rope_theta is not a number")
  if (typeof imageTokenId !== "number") return fail("image_token_index is not a number")
  if (typeof featureLayer !== "number" || !Number.isInteger(featureLayer)) return fail(`vision_feature_layer ${JSON.stringify(featureLayer)}: only one layer is supported`)
  if (!activations.includes(hiddenAct as Activation)) return fail(`vision_config.hidden_act ${JSON.stringify(hiddenAct)} is not one of ${activations.join(", ")}`)
  if (!activations.includes(projectorAct as Activation)) return fail(`projector_hidden_act ${JSON.stringify(projectorAct)} is not one of ${activations.join(", ")}`)
  return Effect.succeed({
    ...f,
    ropeTheta,
    hiddenAct: hiddenAct as Activation,
    imageTokenId,
    featureLayer,
    projectorBias: wrapper.multimodal_projector_bias === true,
    projectorAct: projectorAct as Activation,
    textRmsNormEps: typeof text.rms_norm_eps === "number" ? text.rms_norm_eps : 1e-5
  })
}

/** Where a checkpoint keeps the encoder and the projector: module names, or the names transformers' save_pretrained writes. */
const layouts = [
  { tower: "model.vision_tower.", projector: "model.multi_modal_projector." },
  { tower: "vision_tower.", projector: "multi_modal_projector." }
]

/** The tensors of a vision model by their names under `tower` and `projector`, with their shapes. */
const tensorShapes = (config: VisionConfig): Array<{ name: string; shape: Array<number> }> => {
  const { hiddenSize: d, intermediateSize: f, patchSize: p, channels: c, spatialMergeSize: m, textHiddenSize: t } = config
  const layer = (i: number) => [
    [`transformer.layers.${i}.attention_norm.weight`, [d]],
    ...["q", "k", "v", "o"].map((x) => [`transformer.layers.${i}.attention.${x}_proj.weight`, [d, d]]),
    [`transformer.layers.${i}.ffn_norm.weight`, [d]],
    [`transformer.layers.${i}.feed_forward.gate_proj.weight`, [f, d]],
    [`transformer.layers.${i}.feed_forward.up_proj.weight`, [f, d]],
    [`transformer.layers.${i}.feed_forward.down_proj.weight`, [d, f]]
  ] as Array<[string, Array<number>]>
  const tower: Array<[string, Array<number>]> = [
    ["patch_conv.weight", [d, c, p, p]],
    ["ln_pre.weight", [d]],
    ...Array.from({ length: config.layers }, (_, i) => layer(i)).flat()
  ]
  const projector: Array<[string, Array<number>]> = [
    ["norm.weight", [d]],
    ["patch_merger.merging_layer.weight", [d, d * m * m]],
    ["linear_1.weight", [t, d]],
    ...(config.projectorBias ? [["linear_1.bias", [t]] as [string, Array<number>]] : []),
    ["linear_2.weight", [t, t]],
    ...(config.projectorBias ? [["linear_2.bias", [t]] as [string, Array<number>]] : [])
  ]
  return [
    ...tower.map(([name, shape]) => ({ name: `tower:${name}`, shape })),
    ...projector.map(([name, shape]) => ({ name: `projector:${name}`, shape }))
  ]
}

/** Loads the encoder and projector of the Mistral3 checkpoint in `dir`; released with the scope. */
export const load = Effect.fn("Vision.load")(function*(dir: string) {
  return yield* fromCheckpoint(yield* Checkpoint.open(dir))
})

/** Whether a checkpoint has an image side: a Mistral3 config and its encoder's weights. */
const hasImageSide = (checkpoint: Checkpoint.Checkpoint) =>
  record(checkpoint.rawConfig).model_type === "mistral3" && layouts.some(({ tower }) => checkpoint.names.includes(`${tower}patch_conv.weight`))

/** Whether the checkpoint in `dir` has an image side, read from its config and tensor names alone. */
export const isPresent = Effect.fn("Vision.isPresent")(function*(dir: string) {
  return hasImageSide(yield* Checkpoint.open(dir))
})

/** The image side of the checkpoint in `dir` where it has one (a Mistral3 config and its encoder's weights), else undefined. */
export const loadIfPresent = Effect.fn("Vision.loadIfPresent")(function*(dir: string) {
  const checkpoint = yield* Checkpoint.open(dir)
  return hasImageSide(checkpoint) ? yield* fromCheckpoint(checkpoint) : undefined
})

/** A weight's name (`tower:...` or `projector:...`, as tensorShapes gives it) in a checkpoint of `layout`. */
const inLayout = (layout: (typeof layouts)[number]) => (name: string) => name.replace(/^tower:/, layout.tower).replace(/^projector:/, layout.projector)

const fromCheckpoint = Effect.fnUntraced(function*(checkpoint: Checkpoint.Checkpoint) {
  const config = yield* decodeConfig(checkpoint.rawConfig, checkpoint.configPath)
  const stored = inLayout(layouts.find(({ tower }) => checkpoint.names.includes(`${tower}patch_conv.weight`)) ?? layouts[0])
  const tensors = yield* Effect.acquireRelease(
    Effect.sync(() => new Map<string, tf.Tensor>()),
    (held) => Effect.sync(() => tf.dispose([...held.values()]))
  )
  for (const { name, shape } of tensorShapes(config)) {
    const info = yield* checkpoint.info(stored(name))
    if (info.shape.length !== shape.length || info.shape.some((size, i) => size !== shape[i])) {
      return yield* new CheckpointError({
        file: yield* checkpoint.fileOf(stored(name)),
        tensor: stored(name),
        reason: `has shape [${info.shape}] but ${checkpoint.configPath} implies [${shape}]`
      })
    }
    tensors.set(name, tf.tensor(yield* checkpoint.readFloat32(stored(name)), shape, "float32"))
  }
  return { config, weights: weightsFromNamed(config, tensors), raw: record(checkpoint.rawConfig) } satisfies Vision
})

/** The weights from tensors named as tensorShapes names them; the inverse of namedWeights. */
const weightsFromNamed = (config: VisionConfig, tensors: ReadonlyMap<string, tf.Tensor>): VisionWeights => {
  const get = <T extends tf.Tensor>(name: string) => tensors.get(name) as T
  return {
    patchConv: get("tower:patch_conv.weight"),
    lnPre: get("tower:ln_pre.weight"),
    layers: Array.from({ length: config.layers }, (_, i) => {
      const at = <T extends tf.Tensor>(name: string) => get<T>(`tower:transformer.layers.${i}.${name}`)
      return {
        attentionNorm: at("attention_norm.weight"),
        q: at("attention.q_proj.weight"),
        k: at("attention.k_proj.weight"),
        v: at("attention.v_proj.weight"),
        o: at("attention.o_proj.weight"),
        ffnNorm: at("ffn_norm.weight"),
        gate: at("feed_forward.gate_proj.weight"),
        up: at("feed_forward.up_proj.weight"),
        down: at("feed_forward.down_proj.weight")
      }
    }),
    projectorNorm: get("projector:norm.weight"),
    merging: get("projector:patch_merger.merging_layer.weight"),
    linear1: get("projector:linear_1.weight"),
    linear1Bias: get("projector:linear_1.bias"),
    linear2: get("projector:linear_2.weight"),
    linear2Bias: get("projector:linear_2.bias")
  }
}

/** The weights by the names tensorShapes gives them (the biases only where there are some). */
const namedWeights = (weights: VisionWeights): Map<string, tf.Tensor> => {
  const named: Array<[string, tf.Tensor | undefined]> = [
    ["tower:patch_conv.weight", weights.patchConv],
    ["tower:ln_pre.weight", weights.lnPre],
    ...weights.layers.flatMap((layer, i): Array<[string, tf.Tensor]> => {
      const at = `tower:transformer.layers.${i}.`
      return [
        [`${at}attention_norm.weight`, layer.attentionNorm],
        [`${at}attention.q_proj.weight`, layer.q],
        [`${at}attention.k_proj.weight`, layer.k],
        [`${at}attention.v_proj.weight`, layer.v],
        [`${at}attention.o_proj.weight`, layer.o],
        [`${at}ffn_norm.weight`, layer.ffnNorm],
        [`${at}feed_forward.gate_proj.weight`, layer.gate],
        [`${at}feed_forward.up_proj.weight`, layer.up],
        [`${at}feed_forward.down_proj.weight`, layer.down]
      ]
    }),
    ["projector:norm.weight", weights.projectorNorm],
    ["projector:patch_merger.merging_layer.weight", weights.merging],
    ["projector:linear_1.weight", weights.linear1],
    ["projector:linear_1.bias", weights.linear1Bias],
    ["projector:linear_2.weight", weights.linear2],
    ["projector:linear_2.bias", weights.linear2Bias]
  ]
  return new Map(named.filter((entry): entry is [string, tf.Tensor] => entry[1] !== undefined))
}

/**
 * What the image side writes into the text model's residual stream, as matrices [text D, in]: the
 * projector's last map, and its bias as a column. Pruning turns them as it turns the embeddings.
 * New tensors, the caller's to dispose.
 */
export const residualWriters = (vision: Vision): Array<tf.Tensor2D> => {
  const { linear2, linear2Bias } = vision.weights
  return linear2Bias === undefined ? [linear2.clone()] : [linear2.clone(), linear2Bias.reshape([-1, 1]) as tf.Tensor2D]
}

/**
 * The image side of a child whose text model is `hidden` wide, from `residualWriters` turned into
 * its basis (in that order); released with the scope. The projector's inner width is the text
 * model's in transformers, so a narrower child keeps the `hidden` inner units that carry most (the
 * norm of a unit's row in linear_1 times that of its column in the turned linear_2): exact at full
 * width, a start for the projector training each child then gets. The encoder is shared.
 */
export const intoHidden = Effect.fn("Vision.intoHidden")(function*(vision: Vision, hidden: number, [linear2, bias]: ReadonlyArray<tf.Tensor2D>) {
  const { weights } = vision
  const width = vision.config.textHiddenSize
  const kept = width === hidden ? undefined : yield* Effect.promise(async () => {
    const scores = tf.tidy(() => tf.mul(tf.norm(weights.linear1, "euclidean", 1), tf.norm(linear2, "euclidean", 0)))
    const values = await scores.data()
    scores.dispose()
    return Int32Array.from(Array.from(values, (score, unit) => [score, unit]).sort((a, b) => b[0] - a[0]).slice(0, hidden).map(([, unit]) => unit).sort((a, b) => a - b))
  })
  const inner = yield* Effect.acquireRelease(
    Effect.sync(() => tf.tidy(() => {
      const units = kept === undefined ? undefined : tf.tensor1d(kept, "int32")
      return {
        linear1: units === undefined ? weights.linear1.clone() : tf.gather(weights.linear1, units),
        linear1Bias: weights.linear1Bias === undefined ? undefined : units === undefined ? weights.linear1Bias.clone() : tf.gather(weights.linear1Bias, units),
        linear2: units === undefined ? linear2.clone() : tf.gather(linear2, units, 1),
        linear2Bias: bias === undefined ? undefined : bias.reshape([hidden])
      }
    }) as { linear1: tf.Tensor2D; linear1Bias: tf.Tensor1D | undefined; linear2: tf.Tensor2D; linear2Bias: tf.Tensor1D | undefined }),
    (made) => Effect.sync(() => tf.dispose(Object.values(made).filter((t) => t !== undefined)))
  )
  return { ...vision, config: { ...vision.config, textHiddenSize: hidden }, weights: { ...weights, ...inner } } satisfies Vision
})

/** The checkpoint names and tensors of the encoder and projector, as transformers' save_pretrained writes them. */
export const namedTensors = (vision: Vision): Array<readonly [string, tf.Tensor]> =>
  [...namedWeights(vision.weights)].map(([name, tensor]) => [inLayout(layouts[1])(name), tensor] as const)

const activate = (x: tf.Tensor, activation: Activation): tf.Tensor => {
  switch (activation) {
    case "gelu": // exact, with erf, as torch's default
      return tf.mul(tf.mul(x, 0.5), tf.add(tf.erf(tf.mul(x, Math.SQRT1_2)), 1))
    case "gelu_pytorch_tanh":
      return tf.mul(tf.mul(x, 0.5), tf.add(tf.tanh(tf.mul(tf.add(x, tf.mul(tf.pow(x, 3), 0.044715)), Math.sqrt(2 / Math.PI))), 1))
    case "silu":
      return tf.mul(x, tf.sigmoid(x))
  }
}

/** Patch rows per side of each image: its pixels over the patch size, rounded down as the convolution does. */
const grid = (size: ImageSize, patch: number) => [Math.floor(size[0] / patch), Math.floor(size[1] / patch)] as const

/** One image's patches [h * w, D]: the convolution of stride = kernel = p as one product. pixels: [C, H, W] padded. */
const patchEmbeddings = (pixels: tf.Tensor3D, size: ImageSize, weight: tf.Tensor4D): tf.Tensor2D => {
  const [d, c, p] = weight.shape
  const [h, w] = grid(size, p)
  const patches = pixels.slice([0, 0, 0], [c, h * p, w * p]).reshape([c, h, p, w, p]).transpose([1, 3, 0, 2, 4]).reshape([h * w, c * p * p])
  return matMul(patches, weight.reshape([d, c * p * p]), false, true) as tf.Tensor2D
}

/**
 * cos and sin [h * w, head dim] of Pixtral's 2-D RoPE for an image of h x w patches, in float32 as
 * transformers computes them: frequency j of theta^(-2j / dim); even j turn with the patch's row,
 * odd j with its column; the half-dim list of angles repeated twice.
 */
const ropeTables = (config: VisionConfig, h: number, w: number) => {
  const dim = config.hiddenSize / config.heads
  const f32 = Math.fround
  const frequencies = Array.from({ length: dim / 2 }, (_, j) => f32(1 / f32(config.ropeTheta ** f32(f32(2 * j) / dim))))
  const rows = frequencies.filter((_, j) => j % 2 === 0)
  const columns = frequencies.filter((_, j) => j % 2 === 1)
  const cos = new Float32Array(h * w * dim)
  const sin = new Float32Array(h * w * dim)
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const angles = [...rows.map((f) => f32(r * f)), ...columns.map((f) => f32(c * f))]
      const at = (r * w + c) * dim
      angles.forEach((angle, j) => {
        cos[at + j] = cos[at + j + dim / 2] = Math.cos(angle)
        sin[at + j] = sin[at + j + dim / 2] = Math.sin(angle)
      })
    }
  }
  return { cos: tf.tensor2d(cos, [h * w, dim]), sin: tf.tensor2d(sin, [h * w, dim]) }
}

/** x [heads, N, E] turned by the tables: x cos + rotate_half(x) sin. */
const rotate = (x: tf.Tensor3D, cos: tf.Tensor2D, sin: tf.Tensor2D) => {
  const half = x.shape[2] / 2
  const [first, second] = tf.split(x, [half, half], 2)
  return tf.add(tf.mul(x, cos), tf.mul(tf.concat([tf.neg(second), first], 2), sin)) as tf.Tensor3D
}

/** Full attention among one image's patches x [N, D]. */
const attention = (x: tf.Tensor2D, layer: EncoderLayer, config: VisionConfig, tables: { cos: tf.Tensor2D; sin: tf.Tensor2D }) => {
  const n = x.shape[0]
  const heads = config.heads
  const e = config.hiddenSize / heads
  const split = (t: tf.Tensor) => t.reshape([n, heads, e]).transpose([1, 0, 2]) as tf.Tensor3D // [H, N, E]
  const q = rotate(split(linear(x, layer.q)), tables.cos, tables.sin)
  const k = rotate(split(linear(x, layer.k)), tables.cos, tables.sin)
  const v = split(linear(x, layer.v))
  const scores = tf.mul(matMul(q, k, false, true), 1 / Math.sqrt(e))
  const heads_ = matMul(tf.softmax(scores, -1), v) // [H, N, E]
  return linear(heads_.transpose([1, 0, 2]).reshape([n, heads * e]), layer.o) as tf.Tensor2D
}

/**
 * The encoder's hidden states of each image: [ln_pre output, after layer 1, ..., after the last], each
 * [h * w, D]. Images attend only within themselves, so each runs on its own.
 */
const encode = (vision: Vision, pixels: tf.Tensor3D, size: ImageSize): Array<tf.Tensor2D> => {
  const { config, weights } = vision
  const [h, w] = grid(size, config.patchSize)
  if (h > config.imageSize / config.patchSize || w > config.imageSize / config.patchSize) {
    throw new RangeError(`Vision: an image of ${size[0]}x${size[1]} pixels is past the encoder's ${config.imageSize} pixels a side`)
  }
  const tables = ropeTables(config, h, w)
  let x = rmsNorm(patchEmbeddings(pixels, size, weights.patchConv), weights.lnPre, 1e-5) as tf.Tensor2D
  const states = [x]
  for (const layer of weights.layers) {
    const middle = tf.add(x, attention(rmsNorm(x, layer.attentionNorm, 1e-5) as tf.Tensor2D, layer, config, tables)) as tf.Tensor2D
    const normed = rmsNorm(middle, layer.ffnNorm, 1e-5)
    x = tf.add(middle, linear(tf.mul(activate(linear(normed, layer.gate), config.hiddenAct), linear(normed, layer.up)), layer.down)) as tf.Tensor2D
    states.push(x)
  }
  return states
}

/** One image's projected features [(h/m) * (w/m), text D] from its encoder features [h * w, D]. */
const project = (vision: Vision, features: tf.Tensor2D, size: ImageSize): tf.Tensor2D => {
  const { config, weights } = vision
  const m = config.spatialMergeSize
  const d = config.hiddenSize
  const [h, w] = grid(size, config.patchSize)
  const [mh, mw] = [Math.floor(h / m), Math.floor(w / m)]
  const normed = rmsNorm(features, weights.projectorNorm, config.textRmsNormEps)
  // torch's unfold: each m x m square of patches, channels outermost: [d, kh, kw] flattened.
  const merged = normed.reshape([h, w, d]).slice([0, 0, 0], [mh * m, mw * m, d]).reshape([mh, m, mw, m, d]).transpose([0, 2, 4, 1, 3]).reshape([mh * mw, d * m * m])
  const withBias = (x: tf.Tensor, bias: tf.Tensor1D | undefined) => (bias === undefined ? x : tf.add(x, bias))
  const hidden = activate(withBias(linear(linear(merged, weights.merging), weights.linear1), weights.linear1Bias), config.projectorAct)
  return withBias(linear(hidden, weights.linear2), weights.linear2Bias) as tf.Tensor2D
}

export interface ImageFeatures {
  /** Each image's encoder output at `featureLayer`, [h * w, D]. */
  readonly encoded: ReadonlyArray<tf.Tensor2D>
  /** All images' projected features, in order, [sum of (h/m) * (w/m), text D]: what replaces the image tokens' embeddings. */
  readonly projected: tf.Tensor2D
}

/**
 * The features of `images` ([C, H, W] each, padded as the processor pads, sized by `sizes`), as
 * transformers' `get_image_features` gives them; the caller owns the tensors.
 */
export const imageFeatures = (vision: Vision, images: ReadonlyArray<tf.Tensor3D>, sizes: ReadonlyArray<ImageSize>): ImageFeatures =>
  tf.tidy(() => {
    const encoded = images.map((pixels, i) => {
      const states = encode(vision, pixels, sizes[i])
      const index = vision.config.featureLayer < 0 ? states.length + vision.config.featureLayer : vision.config.featureLayer
      if (index < 0 || index >= states.length) throw new RangeError(`Vision: vision_feature_layer ${vision.config.featureLayer} of ${states.length} hidden states`)
      return states[index]
    })
    return { encoded, projected: projectAll(vision, encoded, sizes) }
  })

/** `imageFeatures` of preprocessed images, [C, H, W] values each (Images.preprocess), rather than tensors. */
export const featuresOfImages = (vision: Vision, images: ReadonlyArray<{ readonly pixelValues: Float32Array; readonly height: number; readonly width: number }>): ImageFeatures => {
  const pixels = images.map((image) => tf.tensor3d(image.pixelValues, [vision.config.channels, image.height, image.width]))
  const features = imageFeatures(vision, pixels, images.map((image) => [image.height, image.width] as const))
  tf.dispose(pixels)
  return features
}

/** The projected features of images already encoded (ImageFeatures.encoded), in order: the projector alone, for training it. */
export const projectAll = (vision: Vision, encoded: ReadonlyArray<tf.Tensor2D>, sizes: ReadonlyArray<ImageSize>): tf.Tensor2D =>
  tf.tidy(() => tf.concat(encoded.map((features, i) => project(vision, features, sizes[i])), 0) as tf.Tensor2D)

/** The projector's weights by name (what the projector-only stage trains). */
export const projectorWeights = (vision: Vision): Map<string, tf.Tensor> =>
  new Map([...namedWeights(vision.weights)].filter(([name]) => name.startsWith("projector:")))

/** The image side with other projector weights, by projectorWeights' names (the encoder is kept). */
export const withProjector = (vision: Vision, weights: ReadonlyMap<string, tf.Tensor>): Vision => ({
  ...vision,
  weights: weightsFromNamed(vision.config, new Map([...namedWeights(vision.weights), ...weights]))
})
