/**
 * Models in Hugging Face form: load a checkpoint folder into a `Model`, save a `Model` as one that
 * transformers' `from_pretrained` loads as it is.
 *
 * Loading checks every tensor against the shape config.json implies, so a config that lies fails
 * with the tensor and file named instead of producing garbage. Each tensor is read from disk, copied
 * to the backend and dropped from JS memory before the next, so a checkpoint is never held twice. A
 * Mistral3ForConditionalGeneration (Ministral 3 as released) loads as its text model, and saves as one.
 * A vocabulary matrix too large for one storage binding of the backend is uploaded as row blocks and
 * saved as the one tensor it is on disk (see RowBlocks).
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Checkpoint from "./Checkpoint.ts"
import * as Config from "../model/Config.ts"
import { CheckpointError } from "../Errors.ts"
import * as Model from "../model/Model.ts"
import * as Vision from "../model/Vision.ts"
import type { FloatDtype } from "./Safetensors.ts"

const sameShape = (a: ReadonlyArray<number>, b: ReadonlyArray<number>) =>
  a.length === b.length && a.every((size, i) => size === b[i])

/**
 * Where a Mistral3ForConditionalGeneration keeps its text model's tensors: under its module names, or
 * under the names transformers 5's save_pretrained writes (those of 4.x before 4.52). Its vision tower
 * and projector are never read.
 */
const mistral3Layouts = [
  { model: "model.language_model.", lmHead: "lm_head.weight" },
  { model: "language_model.model.", lmHead: "language_model.lm_head.weight" }
]

/** A text model tensor's name (a bare `MistralForCausalLM`'s, which `Model` uses) in a Mistral3 checkpoint of `layout`. */
const inLayout = (layout: (typeof mistral3Layouts)[number]) => (name: string) =>
  name === "lm_head.weight" ? layout.lmHead : name.replace(/^model\./, layout.model)

/** The checkpoint's name for a tensor of a bare `MistralForCausalLM` (the names `Model` uses). */
const storedNames = (checkpoint: Checkpoint.Checkpoint): (name: string) => string => {
  if (!Config.isMistral3(checkpoint.rawConfig)) return (name) => name
  // With neither layout's embeddings present, the module names are the ones a missing-tensor error names.
  return inLayout(mistral3Layouts.find(({ model }) => checkpoint.names.includes(`${model}embed_tokens.weight`)) ?? mistral3Layouts[0])
}

/** Loads a checkpoint folder. The model's tensors are released when the scope closes. */
export const load = Effect.fn("Pretrained.load")(function*(dir: string) {
  const checkpoint = yield* Checkpoint.open(dir)
  const config = yield* Config.decode(checkpoint.rawConfig, checkpoint.configPath)
  const storedName = storedNames(checkpoint)
  const tensors = yield* Effect.acquireRelease(
    Effect.sync(() => new Map<string, tf.Tensor>()),
    (tensors) => Effect.sync(() => tf.dispose([...tensors.values()]))
  )
  for (const { name, shape } of Model.tensorShapes(config)) {
    const stored = storedName(name)
    const info = yield* checkpoint.info(stored)
    if (!sameShape(info.shape, shape)) {
      return yield* new CheckpointError({
        file: yield* checkpoint.fileOf(stored),
        tensor: stored,
        reason: `has shape [${info.shape}] but ${checkpoint.configPath} implies [${shape}]`
      })
    }
    for (const [held, tensor] of Model.heldTensors(name, shape, yield* checkpoint.readFloat32(stored))) tensors.set(held, tensor)
  }
  return Model.make(config, Model.weightsFromTensors(config, tensors))
})

/** The dtypes a checkpoint's weights can be saved in, by transformers' names (config.json's `dtype`, the `--dtype` flag). */
export const dtypeNames = { float32: "F32", bfloat16: "BF16", float16: "F16" } as const satisfies Record<string, FloatDtype>
/** One of those names, as a config gives it. */
export const DtypeName = Schema.Literals(Object.keys(dtypeNames) as ReadonlyArray<keyof typeof dtypeNames>)
export type DtypeName = typeof DtypeName.Type

/** The dtype the checkpoint's config.json says its weights are stored in (transformers' `dtype`, formerly `torch_dtype`). */
export const storedDtype = (config: Config.ModelConfig): FloatDtype => {
  const name = config.raw.dtype ?? config.raw.torch_dtype
  return name === "bfloat16" ? "BF16" : name === "float16" ? "F16" : "F32"
}

/** Sizes and dtype that a saved config.json states, over whatever else the model's own config held. */
export const configJson = (config: Config.ModelConfig, dtype: FloatDtype): Record<string, unknown> => ({
  ...config.raw,
  vocab_size: config.vocabSize,
  hidden_size: config.hiddenSize,
  intermediate_size: config.intermediateSize,
  num_hidden_layers: config.numLayers,
  num_attention_heads: config.numHeads,
  num_key_value_heads: config.numKvHeads,
  head_dim: config.headDim,
  tie_word_embeddings: config.tieWordEmbeddings,
  dtype: { F32: "float32", BF16: "bfloat16", F16: "float16" }[dtype]
})

/** A Mistral3ForConditionalGeneration's config.json around the text model's: the wrapper's fields as loaded, the text config as it is now. */
const mistral3Json = (config: Config.ModelConfig, vision: Vision.Vision, dtype: FloatDtype): Record<string, unknown> => {
  const { architectures: _architectures, dtype: textDtype, torch_dtype: _torchDtype, tie_word_embeddings: tied, ...text } = configJson(config, dtype)
  return { ...vision.raw, architectures: ["Mistral3ForConditionalGeneration"], model_type: "mistral3", dtype: textDtype, tie_word_embeddings: tied, text_config: text }
}

/** The files of a model folder besides its weights and config that a derived model needs as they are. */
const companionFiles = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json", "preprocessor_config.json"]

/**
 * Saves `model` as a checkpoint folder, reading one tensor at a time off the backend; with
 * `companionsFrom`, that folder's tokenizer, chat template and generation defaults are copied along.
 */
export const save = Effect.fn("Pretrained.save")(function*(
  dir: string,
  model: Model.Model,
  options: { readonly dtype: FloatDtype; readonly maxShardBytes?: number; readonly companionsFrom?: string; readonly vision?: Vision.Vision }
) {
  const tensors = Model.tensorsOfWeights(model.config, model.weights)
  const text = Model.tensorShapes(model.config).map(({ name, shape }) => ({
    name,
    shape,
    data: Effect.promise(() => Model.storedValues(tensors, name))
  }))
  const { vision } = options
  if (vision !== undefined && vision.config.textHiddenSize !== model.config.hiddenSize) {
    return yield* new CheckpointError({
      file: path.join(dir, "config.json"),
      reason: `the image side projects into ${vision.config.textHiddenSize} dimensions, the text model has ${model.config.hiddenSize}`
    })
  }
  // With its image side, the Mistral3ForConditionalGeneration it came from, under the names transformers' save_pretrained writes.
  const stored = vision === undefined ? (name: string) => name : inLayout(mistral3Layouts[1])
  yield* Checkpoint.save(dir, {
    config: vision === undefined ? configJson(model.config, options.dtype) : mistral3Json(model.config, vision, options.dtype),
    dtype: options.dtype,
    maxShardBytes: options.maxShardBytes,
    tensors: [
      ...text.map((tensor) => ({ ...tensor, name: stored(tensor.name) })),
      ...(vision === undefined ? [] : Vision.namedTensors(vision).map(([name, tensor]) => ({
        name,
        shape: tensor.shape,
        data: Effect.promise(() => tensor.data() as Promise<Float32Array>)
      })))
    ]
  })
  const from = options.companionsFrom
  if (from === undefined) return
  for (const file of companionFiles) {
    yield* Effect.tryPromise({
      try: () => fs.copyFile(path.join(from, file), path.join(dir, file)).catch((error) => {
        if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error
      }),
      catch: (cause) => new CheckpointError({ file: path.join(from, file), reason: `cannot copy (${String(cause)})` })
    })
  }
})
