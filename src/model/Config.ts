/**
 * The model configuration: `config.json` of a `MistralForCausalLM` (`model_type: "mistral"`) or a
 * `Ministral3ForCausalLM` (`model_type: "ministral3"`), decoded and normalised into one shape. A
 * `Mistral3ForConditionalGeneration` (`model_type: "mistral3"`, as Ministral 3 is released) decodes
 * to the config of its text model, which it keeps under `text_config`.
 *
 * Both the current `rope_parameters` layout and the legacy top-level `rope_theta` / `rope_scaling`
 * fields are read. The raw JSON is kept so that a checkpoint we write carries every field the
 * user's config had, with only the sizes we changed.
 */
import { Effect, Schema } from "effect"
import { createHash } from "node:crypto"
import { ConfigError } from "../Errors.ts"

/** How rotary position embeddings are computed; the YaRN fields are used only when `type` is "yarn". */
export interface RopeConfig {
  readonly type: "default" | "yarn"
  readonly theta: number
  readonly factor: number
  readonly originalMaxPositionEmbeddings: number | undefined
  readonly betaFast: number
  readonly betaSlow: number
  readonly mscale: number | undefined
  readonly mscaleAllDim: number | undefined
  readonly attentionFactor: number | undefined
  readonly truncate: boolean
  /** Ministral 3's position-based query scaling: `1 + beta * ln(1 + floor(pos / originalMax))` (ministral3 only). */
  readonly llama4ScalingBeta: number | undefined
}

export interface ModelConfig {
  readonly modelType: "mistral" | "ministral3"
  readonly vocabSize: number
  readonly hiddenSize: number
  readonly intermediateSize: number
  readonly numLayers: number
  readonly numHeads: number
  readonly numKvHeads: number
  readonly headDim: number
  readonly rmsNormEps: number
  readonly tieWordEmbeddings: boolean
  readonly maxPositionEmbeddings: number
  readonly slidingWindow: number | null
  readonly rope: RopeConfig
  readonly bosTokenId: number | undefined
  readonly eosTokenId: number | undefined
  readonly padTokenId: number | undefined
  /** The config.json object as read, for writing it back with changed sizes. */
  readonly raw: Readonly<Record<string, unknown>>
}

const PositiveInt = Schema.Int.check(Schema.isGreaterThan(0))
const OptionalNumber = Schema.optional(Schema.NullOr(Schema.Number))
const OptionalTokenId = Schema.optional(Schema.NullOr(Schema.Union([Schema.Int, Schema.Array(Schema.Int)])))

const RopeFields = Schema.Struct({
  rope_type: Schema.optional(Schema.String),
  type: Schema.optional(Schema.String),
  rope_theta: OptionalNumber,
  factor: OptionalNumber,
  original_max_position_embeddings: OptionalNumber,
  beta_fast: OptionalNumber,
  beta_slow: OptionalNumber,
  mscale: OptionalNumber,
  mscale_all_dim: OptionalNumber,
  attention_factor: OptionalNumber,
  truncate: Schema.optional(Schema.Boolean),
  llama_4_scaling_beta: OptionalNumber
})

const RawConfig = Schema.Struct({
  model_type: Schema.Literals(["mistral", "ministral3"]),
  vocab_size: PositiveInt,
  hidden_size: PositiveInt,
  intermediate_size: PositiveInt,
  num_hidden_layers: PositiveInt,
  num_attention_heads: PositiveInt,
  num_key_value_heads: Schema.optional(Schema.NullOr(PositiveInt)),
  head_dim: Schema.optional(Schema.NullOr(PositiveInt)),
  hidden_act: Schema.optional(Schema.Literal("silu")),
  rms_norm_eps: OptionalNumber,
  tie_word_embeddings: Schema.optional(Schema.Boolean),
  max_position_embeddings: Schema.optional(PositiveInt),
  sliding_window: Schema.optional(Schema.NullOr(PositiveInt)),
  rope_parameters: Schema.optional(Schema.NullOr(RopeFields)),
  rope_theta: OptionalNumber,
  rope_scaling: Schema.optional(Schema.NullOr(RopeFields)),
  bos_token_id: OptionalTokenId,
  eos_token_id: OptionalTokenId,
  pad_token_id: OptionalTokenId
})
type RawConfig = typeof RawConfig.Type

const decodeRaw = Schema.decodeUnknownEffect(RawConfig)

/** Decodes a parsed config.json; `file` names it in errors. */
export const decode = Effect.fn("Config.decode")(function*(json: unknown, file: string) {
  if (!isMistral3(json)) return yield* decodeTextModel(json, file)
  const text = yield* textModelJson(json, file)
  return yield* decodeTextModel(text, file).pipe(
    Effect.mapError((error) => new ConfigError({ file, reason: `text_config: ${error.reason}` }))
  )
})

/** Whether config.json is a `Mistral3ForConditionalGeneration`'s: a vision tower around a text model. */
export const isMistral3 = (json: unknown): json is Record<string, unknown> =>
  typeof json === "object" && json !== null && (json as { model_type?: unknown }).model_type === "mistral3"

const causalLmClass: Record<string, string> = { mistral: "MistralForCausalLM", ministral3: "Ministral3ForCausalLM" }

/**
 * A Mistral3ForConditionalGeneration's text model as a config.json of its own, the form a model
 * derived from it is saved in (with its causal LM class, which vLLM needs). The wrapper's storage
 * dtype carries over, and so does its tie_word_embeddings: transformers 5 ties lm_head by that
 * top-level field (class default true) and ignores text_config's. A text_config without model_type
 * is a Mistral, as in transformers.
 */
const textModelJson = (wrapper: Record<string, unknown>, file: string) => {
  const text = wrapper.text_config
  if (typeof text !== "object" || text === null || Array.isArray(text)) {
    return Effect.fail(new ConfigError({ file, reason: `model_type "mistral3" needs a text_config object (the text model's config)` }))
  }
  const dtype = Object.fromEntries(["dtype", "torch_dtype"].filter((key) => key in wrapper).map((key) => [key, wrapper[key]]))
  const modelType = (text as { model_type?: unknown }).model_type ?? "mistral"
  return Effect.succeed({
    ...dtype,
    ...text,
    model_type: modelType,
    architectures: [causalLmClass[String(modelType)]],
    tie_word_embeddings: wrapper.tie_word_embeddings ?? true
  })
}

const decodeTextModel = Effect.fnUntraced(function*(json: unknown, file: string) {
  const raw = yield* decodeRaw(json).pipe(
    Effect.mapError((error) => new ConfigError({ file, reason: oneLine(error.message) }))
  )
  return yield* normalise(raw, json as Record<string, unknown>, file)
})

const oneLine = (text: string) => text.replace(/\s*\n\s*/g, "; ")

const firstId = (id: number | ReadonlyArray<number> | null | undefined) =>
  id === null || id === undefined ? undefined : typeof id === "number" ? id : id[0]

const normalise = (raw: RawConfig, json: Record<string, unknown>, file: string) =>
  Effect.gen(function*() {
    const fail = (reason: string) => Effect.fail(new ConfigError({ file, reason }))
    const numKvHeads = raw.num_key_value_heads ?? raw.num_attention_heads
    if (raw.num_attention_heads % numKvHeads !== 0) {
      return yield* fail(
        `num_attention_heads (${raw.num_attention_heads}) is not a multiple of num_key_value_heads (${numKvHeads})`
      )
    }
    // transformers' defaults: Mistral derives head_dim, Ministral 3's class default is 128 and null is invalid.
    if (raw.model_type === "ministral3" && raw.head_dim === null) return yield* fail("head_dim must be an integer, not null")
    const headDim = raw.head_dim ?? (raw.model_type === "ministral3" ? 128 : raw.hidden_size / raw.num_attention_heads)
    if (!Number.isInteger(headDim)) {
      return yield* fail(`head_dim is missing and hidden_size ${raw.hidden_size} is not divisible by num_attention_heads`)
    }
    // transformers' defaults differ by architecture for the fields a config may leave out.
    const defaults = raw.model_type === "mistral"
      ? { rmsNormEps: 1e-6, maxPositions: 131072, theta: 10000, slidingWindow: 4096, padTokenId: undefined }
      : { rmsNormEps: 1e-5, maxPositions: 262144, theta: 1000000, slidingWindow: null, padTokenId: 11 }
    const maxPositionEmbeddings = raw.max_position_embeddings ?? defaults.maxPositions
    const rope = yield* ropeConfig(raw, maxPositionEmbeddings, defaults.theta, file)
    if (headDim % 2 !== 0) return yield* fail(`head_dim ${headDim} must be even for rotary embeddings`)
    return {
      modelType: raw.model_type,
      vocabSize: raw.vocab_size,
      hiddenSize: raw.hidden_size,
      intermediateSize: raw.intermediate_size,
      numLayers: raw.num_hidden_layers,
      numHeads: raw.num_attention_heads,
      numKvHeads,
      headDim,
      rmsNormEps: raw.rms_norm_eps ?? defaults.rmsNormEps,
      tieWordEmbeddings: raw.tie_word_embeddings ?? false,
      maxPositionEmbeddings,
      // A missing key takes the class default; an explicit null means no window.
      slidingWindow: raw.sliding_window === undefined ? defaults.slidingWindow : raw.sliding_window,
      rope,
      bosTokenId: firstId(raw.bos_token_id),
      eosTokenId: firstId(raw.eos_token_id),
      padTokenId: raw.pad_token_id === undefined ? defaults.padTokenId : firstId(raw.pad_token_id),
      raw: json
    } satisfies ModelConfig
  })

/** Ministral 3's class default when a config gives no rope parameters. */
const ministral3Rope: typeof RopeFields.Type = {
  rope_type: "yarn",
  rope_theta: 1e6,
  factor: 16,
  original_max_position_embeddings: 16384,
  beta_fast: 32,
  beta_slow: 1,
  mscale: 1,
  mscale_all_dim: 1,
  llama_4_scaling_beta: 0.1
}

const ropeConfig = (raw: RawConfig, maxPositionEmbeddings: number, defaultTheta: number, file: string) =>
  Effect.gen(function*() {
    // `rope_parameters` is the current layout; `rope_scaling` plus top-level `rope_theta` the legacy one.
    const params = raw.rope_parameters ?? raw.rope_scaling ?? (raw.model_type === "ministral3" ? ministral3Rope : {})
    const type = params.rope_type ?? params.type ?? "default"
    if (type !== "default" && type !== "yarn") {
      return yield* Effect.fail(new ConfigError({ file, reason: `rope type "${type}" is not supported (default, yarn)` }))
    }
    if (type === "yarn" && params.factor === undefined) {
      return yield* Effect.fail(new ConfigError({ file, reason: `yarn rope parameters need a "factor"` }))
    }
    const orNone = (value: number | null | undefined) => value ?? undefined
    // As transformers standardises it: a top-level original_max_position_embeddings wins, then the
    // rope dict's, then max_position_embeddings; a null yarn factor is the ratio of the two lengths.
    const topLevelOriginal = (raw as { original_max_position_embeddings?: unknown }).original_max_position_embeddings
    const originalMax = typeof topLevelOriginal === "number"
      ? topLevelOriginal
      : params.original_max_position_embeddings ?? (type === "yarn" ? maxPositionEmbeddings : undefined)
    return {
      type,
      theta: params.rope_theta ?? raw.rope_theta ?? defaultTheta,
      factor: params.factor ?? (type === "yarn" && originalMax ? maxPositionEmbeddings / originalMax : 1),
      originalMaxPositionEmbeddings: originalMax,
      betaFast: params.beta_fast ?? 32,
      betaSlow: params.beta_slow ?? 1,
      mscale: orNone(params.mscale),
      mscaleAllDim: orNone(params.mscale_all_dim),
      attentionFactor: orNone(params.attention_factor),
      truncate: params.truncate ?? true,
      // Only Ministral3's attention reads it; Mistral's ignores the key.
      llama4ScalingBeta: raw.model_type === "ministral3" ? orNone(params.llama_4_scaling_beta) : undefined
    } satisfies RopeConfig
  })

/** Ministral 3's `llama_4_scaling_beta` as released. */
export const defaultScalingBeta = 0.1

/** A long-context phase: YaRN stretching `originalMax` positions by `factor`, queries scaled past them. */
export interface LongContext {
  readonly factor: number
  readonly originalMax: number
  /** Ministral 3's query scaling, `1 + beta * ln(1 + floor(pos / originalMax))`; 0.1 when left out, 0 turns it off. */
  readonly scalingBeta?: number | undefined
}

/**
 * The config of a long-context phase, whatever the parent: a Ministral 3 (`Ministral3ForCausalLM`)
 * with YaRN and `llama_4_scaling_beta`, as the released models are. As in Ministral 3,
 * mscale = mscale_all_dim = 1, so YaRN's attention factor is 1 and the position-based query scaling
 * sets the softmax temperature instead. The raw config states every field whose class default
 * differs between MistralConfig and Ministral3Config (head_dim, rms_norm_eps, sliding_window,
 * pad_token_id, max_position_embeddings, rope_parameters), so transformers builds the same model;
 * a sliding window carries over, as Ministral3 applies it as Mistral does.
 */
export const longContext = (config: ModelConfig, long: LongContext): ModelConfig => {
  const beta = long.scalingBeta ?? defaultScalingBeta
  const rope: RopeConfig = {
    ...config.rope,
    type: "yarn",
    factor: long.factor,
    originalMaxPositionEmbeddings: long.originalMax,
    betaFast: 32,
    betaSlow: 1,
    mscale: 1,
    mscaleAllDim: 1,
    attentionFactor: undefined,
    truncate: true,
    llama4ScalingBeta: beta
  }
  const maxPositionEmbeddings = Math.round(long.factor * long.originalMax)
  // A top-level original_max_position_embeddings would override the rope dict's when read back.
  const { rope_scaling: _legacy, rope_theta: _theta, original_max_position_embeddings: _original, ...raw } = config.raw
  return {
    ...config,
    modelType: "ministral3",
    rope,
    maxPositionEmbeddings,
    raw: {
      ...raw,
      model_type: "ministral3",
      architectures: [causalLmClass.ministral3],
      head_dim: config.headDim,
      rms_norm_eps: config.rmsNormEps,
      sliding_window: config.slidingWindow,
      pad_token_id: config.padTokenId ?? null,
      max_position_embeddings: maxPositionEmbeddings,
      rope_parameters: {
        rope_type: "yarn",
        rope_theta: rope.theta,
        factor: long.factor,
        original_max_position_embeddings: long.originalMax,
        beta_fast: 32,
        beta_slow: 1,
        mscale: 1,
        mscale_all_dim: 1,
        llama_4_scaling_beta: beta
      }
    }
  }
}

/** Parameter count of a model of this shape (embeddings counted once when tied). */
export const parameterCount = (config: ModelConfig): number => {
  const d = config.hiddenSize
  const attention = d * config.headDim * (2 * config.numHeads + 2 * config.numKvHeads)
  const mlp = 3 * d * config.intermediateSize
  const layer = attention + mlp + 2 * d
  const embeddings = config.vocabSize * d * (config.tieWordEmbeddings ? 1 : 2)
  return config.numLayers * layer + embeddings + d
}

/** sha256 of config.json's content with keys sorted, naming the model statistics were made for. */
export const hash = (config: ModelConfig): string => createHash("sha256").update(canonicalJson(config.raw)).digest("hex")

const canonicalJson = (value: unknown): string =>
  Array.isArray(value)
    ? `[${value.map(canonicalJson).join(",")}]`
    : value !== null && typeof value === "object"
    ? `{${Object.keys(value).sort().map((key) => `${JSON.stringify(key)}:${canonicalJson((value as Record<string, unknown>)[key])}`).join(",")}}`
    : JSON.stringify(value)
