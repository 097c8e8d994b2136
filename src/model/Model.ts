/**
 * The decoder-only transformer of Mistral and Ministral 3, written as plain TensorFlow.js functions:
 * pre-norm RMSNorm, grouped-query attention with RoPE (plain or YaRN) and Ministral 3's
 * position-based query scaling, SwiGLU MLP, final norm and the LM head.
 *
 * All compute is float32 whatever the stored dtype. Linear weights keep Hugging Face's
 * `[out_features, in_features]` layout, so `x @ W^T` everywhere.
 *
 * Notation: B batch, T new tokens, P tokens already in the KV cache, S = P + T keys, D hidden,
 * H query heads, K key/value heads, G = H / K, E head_dim, F FFN width, V vocabulary.
 */
import * as tf from "@tensorflow/tfjs"
import type { ModelConfig } from "./Config.ts"
import * as Rope from "./Rope.ts"
import { matMul } from "./MatMul.ts"
import * as RowBlocks from "./RowBlocks.ts"
import { LogitsTooLarge } from "../Errors.ts"

export interface LayerWeights {
  readonly inputNorm: tf.Tensor1D // [D]
  readonly q: tf.Tensor2D // [H*E, D]
  readonly k: tf.Tensor2D // [K*E, D]
  readonly v: tf.Tensor2D // [K*E, D]
  readonly o: tf.Tensor2D // [D, H*E]
  readonly postNorm: tf.Tensor1D // [D]
  readonly gate: tf.Tensor2D // [F, D]
  readonly up: tf.Tensor2D // [F, D]
  readonly down: tf.Tensor2D // [D, F]
}

/**
 * The vocabulary matrices are row blocks (see RowBlocks): one block unless the matrix exceeds one
 * storage binding of the backend, as an 8B parent's does on a GPU.
 */
export interface Weights {
  readonly embed: RowBlocks.RowBlocks // [V, D]
  readonly layers: ReadonlyArray<LayerWeights>
  readonly norm: tf.Tensor1D // [D]
  /** [V, D]; undefined when the embeddings are tied. */
  readonly lmHead: RowBlocks.RowBlocks | undefined
}

export interface Model {
  readonly config: ModelConfig
  readonly weights: Weights
  readonly rope: Rope.Rope
}

/** Keys and values of the positions already seen, per layer, and which of them are padding. */
export interface KVCache {
  readonly layers: ReadonlyArray<{ readonly k: tf.Tensor4D; readonly v: tf.Tensor4D }> // [B, K, P, E]
  /** [B, P]: 1 for a real token, 0 for padding. */
  readonly keyMask: ReadonlyArray<Uint8Array>
  readonly length: number
}

/**
 * What one decoder layer saw, for statistics (calibration). The tensors live only during the call:
 * derive tensors from them inside it (keep what must outlive the call).
 */
export interface LayerTrace {
  readonly index: number
  readonly input: tf.Tensor3D // [B, T, D] residual stream entering the layer (input of input_layernorm)
  readonly middle: tf.Tensor3D // [B, T, D] after attention (input of post_attention_layernorm)
  readonly ffn: tf.Tensor3D // [B, T, F] FFN activations silu(gate x) * up x
  readonly output: tf.Tensor3D // [B, T, D] residual stream leaving the layer
}

export interface ForwardOptions {
  /** [B][T] 1 for tokens, 0 for padding; all ones when left out. */
  readonly attentionMask?: ReadonlyArray<ArrayLike<number>>
  /**
   * Document masking of packed rows: [B] the positions where a document starts in each row (0 is
   * always one). A token attends only to tokens of its own document, and RoPE positions restart at
   * 0 at each start, so each document gets exactly the logits it gets alone. Not with a cache.
   */
  readonly documentStarts?: ReadonlyArray<ReadonlyArray<number>>
  /**
   * [B][T] each token's position for RoPE and Ministral 3's query scale, as transformers'
   * `position_ids`; offset..offset+T-1 for every row when left out. Attention stays causal by index.
   */
  readonly positionIds?: ReadonlyArray<ArrayLike<number>>
  /** Positions already processed; their keys and values are consumed (disposed) by this call. */
  readonly cache?: KVCache
  /** Also return the residual stream entering each layer and the final normed output. */
  readonly hiddenStates?: boolean
  /** Return a new cache holding this call's keys and values too. */
  readonly useCache?: boolean
  /** Called with each layer's internals as the pass goes. */
  readonly trace?: (layer: LayerTrace) => void
  /** Logits of the last position only ([B, 1, V]): what a prompt's prefill needs to go on decoding. */
  readonly lastLogitsOnly?: boolean
  /**
   * Rows [N, D] that replace, in order, the embeddings of the N positions whose id is `tokenId`:
   * a Mistral 3 model's projected image features at its image tokens (Vision.imageFeatures).
   */
  readonly imageFeatures?: { readonly features: tf.Tensor2D; readonly tokenId: number }
}

export interface ForwardResult {
  readonly logits: tf.Tensor3D // [B, T, V]
  /** transformers' convention: [0] embeddings, [i] input of layer i, [L] after the final norm. */
  readonly hiddenStates: ReadonlyArray<tf.Tensor3D>
  readonly cache: KVCache | undefined
}

/** The layout of a checkpoint for this config: every tensor's name and shape. */
export const tensorShapes = (config: ModelConfig): Array<{ name: string; shape: Array<number> }> => {
  const { hiddenSize: d, headDim: e, numHeads: h, numKvHeads: k, intermediateSize: f, vocabSize: v } = config
  const shapes = [{ name: "model.embed_tokens.weight", shape: [v, d] }]
  for (let i = 0; i < config.numLayers; i++) {
    const p = `model.layers.${i}`
    shapes.push(
      { name: `${p}.input_layernorm.weight`, shape: [d] },
      { name: `${p}.self_attn.q_proj.weight`, shape: [h * e, d] },
      { name: `${p}.self_attn.k_proj.weight`, shape: [k * e, d] },
      { name: `${p}.self_attn.v_proj.weight`, shape: [k * e, d] },
      { name: `${p}.self_attn.o_proj.weight`, shape: [d, h * e] },
      { name: `${p}.post_attention_layernorm.weight`, shape: [d] },
      { name: `${p}.mlp.gate_proj.weight`, shape: [f, d] },
      { name: `${p}.mlp.up_proj.weight`, shape: [f, d] },
      { name: `${p}.mlp.down_proj.weight`, shape: [d, f] }
    )
  }
  shapes.push({ name: "model.norm.weight", shape: [d] })
  if (!config.tieWordEmbeddings) shapes.push({ name: "lm_head.weight", shape: [v, d] })
  return shapes
}

const vocabularyMatrices = new Set(["model.embed_tokens.weight", "lm_head.weight"])

/**
 * The name the model holds a block of checkpoint tensor `name` under: the name itself when the
 * matrix is one block, else `name[start:end]` by its rows (how optimizer states are keyed too).
 */
const blockName = (name: string, [start, end]: readonly [number, number], blocks: number) =>
  blocks === 1 ? name : `${name}[${start}:${end}]`

/** The model's blocks of vocabulary matrix `name`, keyed by `blockName`. */
const namedBlocks = (name: string, blocks: RowBlocks.RowBlocks): Array<[string, tf.Tensor]> => {
  const ranges = RowBlocks.rangesOf(blocks)
  return blocks.map((block, i) => [blockName(name, ranges[i], blocks.length), block])
}

/**
 * The tensors the model holds for checkpoint tensor `name` of `shape`, made from its values
 * (row-major), keyed as `tensorsOfWeights` keys them: a vocabulary matrix as row blocks uploaded
 * one by one, so that one too large for a storage binding never is one tensor; the rest as one tensor.
 */
export const heldTensors = (name: string, shape: ReadonlyArray<number>, values: Float32Array): Array<readonly [string, tf.Tensor]> => {
  if (!vocabularyMatrices.has(name)) return [[name, tf.tensor(values, [...shape], "float32")]]
  return namedBlocks(name, RowBlocks.upload(values, shape[0], shape[1]))
}

/** The blocks of vocabulary matrix `name` in `tensors` (keyed as `tensorsOfWeights` keys them), in row order. */
const blocksIn = (tensors: ReadonlyMap<string, tf.Tensor>, name: string): RowBlocks.RowBlocks => {
  const whole = tensors.get(name)
  if (whole !== undefined) return [whole as tf.Tensor2D]
  const start = (key: string) => Number(key.slice(name.length + 1).split(":")[0])
  const keys = [...tensors.keys()].filter((key) => key.startsWith(`${name}[`)).sort((a, b) => start(a) - start(b))
  if (keys.length === 0) throw new Error(`Model.weightsFromTensors: no tensor ${name}`)
  return keys.map((key) => tensors.get(key) as tf.Tensor2D)
}

/**
 * Checkpoint tensor `name`'s values row-major, read asynchronously from the model's tensors (keyed
 * as `tensorsOfWeights` keys them): a vocabulary matrix's blocks one after the other.
 */
export const storedValues = (tensors: ReadonlyMap<string, tf.Tensor>, name: string): Promise<Float32Array> =>
  vocabularyMatrices.has(name) ? RowBlocks.read(blocksIn(tensors, name)) : tensors.get(name)!.data() as Promise<Float32Array>

/** Builds the weights from tensors keyed as `tensorsOfWeights` keys them (checkpoint names while nothing is split). */
export const weightsFromTensors = (config: ModelConfig, tensors: ReadonlyMap<string, tf.Tensor>): Weights => {
  const get = <R extends tf.Rank>(name: string) => tensors.get(name) as tf.Tensor<R>
  const layers: Array<LayerWeights> = []
  for (let i = 0; i < config.numLayers; i++) {
    const p = `model.layers.${i}`
    layers.push({
      inputNorm: get(`${p}.input_layernorm.weight`),
      q: get(`${p}.self_attn.q_proj.weight`),
      k: get(`${p}.self_attn.k_proj.weight`),
      v: get(`${p}.self_attn.v_proj.weight`),
      o: get(`${p}.self_attn.o_proj.weight`),
      postNorm: get(`${p}.post_attention_layernorm.weight`),
      gate: get(`${p}.mlp.gate_proj.weight`),
      up: get(`${p}.mlp.up_proj.weight`),
      down: get(`${p}.mlp.down_proj.weight`)
    })
  }
  return {
    embed: blocksIn(tensors, "model.embed_tokens.weight"),
    layers,
    norm: get("model.norm.weight"),
    lmHead: config.tieWordEmbeddings ? undefined : blocksIn(tensors, "lm_head.weight")
  }
}

/**
 * The weights keyed by checkpoint name, a vocabulary matrix split into blocks by `name[start:end]`;
 * the inverse of `weightsFromTensors`.
 */
export const tensorsOfWeights = (config: ModelConfig, weights: Weights): Map<string, tf.Tensor> => {
  const tensors = new Map<string, tf.Tensor>(namedBlocks("model.embed_tokens.weight", weights.embed))
  weights.layers.forEach((layer, i) => {
    const p = `model.layers.${i}`
    tensors.set(`${p}.input_layernorm.weight`, layer.inputNorm)
    tensors.set(`${p}.self_attn.q_proj.weight`, layer.q)
    tensors.set(`${p}.self_attn.k_proj.weight`, layer.k)
    tensors.set(`${p}.self_attn.v_proj.weight`, layer.v)
    tensors.set(`${p}.self_attn.o_proj.weight`, layer.o)
    tensors.set(`${p}.post_attention_layernorm.weight`, layer.postNorm)
    tensors.set(`${p}.mlp.gate_proj.weight`, layer.gate)
    tensors.set(`${p}.mlp.up_proj.weight`, layer.up)
    tensors.set(`${p}.mlp.down_proj.weight`, layer.down)
  })
  tensors.set("model.norm.weight", weights.norm)
  if (!config.tieWordEmbeddings && weights.lmHead) for (const [name, block] of namedBlocks("lm_head.weight", weights.lmHead)) tensors.set(name, block)
  return tensors
}

export const make = (config: ModelConfig, weights: Weights): Model => ({ config, weights, rope: Rope.make(config) })

export const dispose = (model: Model): void => tf.dispose([...tensorsOfWeights(model.config, model.weights).values()])

export const disposeCache = (cache: KVCache) => tf.dispose(cache.layers.flatMap((layer) => [layer.k, layer.v]))

/** `x @ W^T` over the last axis: [..., in] -> [..., out]. */
export const linear = (x: tf.Tensor, weight: tf.Tensor2D): tf.Tensor => {
  const shape = x.shape
  const out = matMul(x.reshape([-1, shape[shape.length - 1]]), weight, false, true)
  return out.reshape([...shape.slice(0, -1), weight.shape[0]])
}

/** RMSNorm: `x / sqrt(mean(x^2) + eps) * weight` over the last axis. */
export const rmsNorm = (x: tf.Tensor, weight: tf.Tensor1D, eps: number): tf.Tensor =>
  tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.square(x), -1, true), eps))), weight)

/** The FFN neurons' activations `silu(gate x) * up x`: [..., D] -> [..., F]. */
export const ffnActivation = (x: tf.Tensor, layer: LayerWeights): tf.Tensor => {
  const gate = linear(x, layer.gate)
  return tf.mul(tf.mul(gate, tf.sigmoid(gate)), linear(x, layer.up))
}

/** Rotates pairs (i, i + E/2) by the position's angle: `x cos + rotate_half(x) sin`. x: [B, heads, T, E]. */
const applyRope = (x: tf.Tensor4D, cos: tf.Tensor, sin: tf.Tensor): tf.Tensor4D => {
  const half = x.shape[3] / 2
  const [first, second] = tf.split(x, [half, half], 3)
  const rotated = tf.concat([tf.neg(second), first], 3)
  return tf.add(tf.mul(x, cos), tf.mul(rotated, sin))
}

/** [B, T, heads*E] -> [B, heads, T, E] */
const splitHeads = (x: tf.Tensor, heads: number, headDim: number): tf.Tensor4D => {
  const [b, t] = x.shape
  return tf.transpose(x.reshape([b, t, heads, headDim]), [0, 2, 1, 3])
}

interface AttentionContext {
  /** [T, E] shared by the rows, or [B, 1, T, E] with positions per row. */
  readonly cos: tf.Tensor
  readonly sin: tf.Tensor
  /** [T, 1], or [B, 1, T, 1] with positions per row. */
  readonly queryScales: tf.Tensor
  readonly mask: tf.Tensor4D // [B, 1, T, S] additive: 0 or a large negative number
}

/** Grouped-query attention with RoPE; returns the output and this layer's keys and values including the past. */
const attention = (
  x: tf.Tensor3D,
  layer: LayerWeights,
  config: ModelConfig,
  context: AttentionContext,
  past: { k: tf.Tensor4D; v: tf.Tensor4D } | undefined
) => {
  const [b, t] = x.shape
  const { numHeads: h, numKvHeads: kv, headDim: e } = config
  const g = h / kv
  const q = applyRope(splitHeads(linear(x, layer.q), h, e), context.cos, context.sin).mul(context.queryScales)
  let k = applyRope(splitHeads(linear(x, layer.k), kv, e), context.cos, context.sin)
  let v = splitHeads(linear(x, layer.v), kv, e)
  if (past) {
    k = tf.concat([past.k, k], 2)
    v = tf.concat([past.v, v], 2)
  }
  const s = k.shape[2]
  // The G query heads sharing a key/value head are stacked along the time axis, so no copy of k or v is made.
  const grouped = q.reshape([b, kv, g * t, e]) // [B, K, G*T, E]
  const scores = matMul(grouped, k, false, true).reshape([b, h, t, s]).mul(1 / Math.sqrt(e)).add(context.mask)
  const probabilities = tf.softmax(scores, -1).reshape([b, kv, g * t, s])
  const heads = matMul(probabilities, v).reshape([b, h, t, e]) // [B, H, T, E]
  const merged = tf.transpose(heads, [0, 2, 1, 3]).reshape([b, t, h * e])
  return { output: linear(merged, layer.o), k, v }
}

const MASKED = -1e9

/**
 * The additive attention mask [B, 1, T, S]: a query sees keys at or before its position that are
 * not padding, with a sliding window fewer than `window` positions back, and with document masking
 * (`positions` [B][S], each token's position in its document) only keys of its own document.
 */
const attentionMask = (
  keyMask: ReadonlyArray<Uint8Array>,
  offset: number,
  t: number,
  window: number | null,
  positions: ReadonlyArray<Int32Array> | undefined
) => {
  const b = keyMask.length
  const s = offset + t
  const mask = new Float32Array(b * t * s)
  for (let row = 0; row < b; row++) {
    for (let i = 0; i < t; i++) {
      const position = offset + i
      // The query's document starts here; keys before it belong to earlier documents.
      const first = positions === undefined ? 0 : position - positions[row][position]
      for (let j = 0; j < s; j++) {
        const visible = j >= first && j <= position && keyMask[row][j] === 1 && (window === null || position - j < window)
        mask[(row * t + i) * s + j] = visible ? 0 : MASKED
      }
    }
  }
  return tf.tensor4d(mask, [b, 1, t, s])
}

/** [B][T] each token's position within its document, from each row's document starts. */
const documentPositions = (starts: ReadonlyArray<ReadonlyArray<number>>, t: number) =>
  starts.map((rowStarts) => {
    const isStart = new Uint8Array(t)
    for (const start of rowStarts) if (start < t) isStart[start] = 1
    const positions = new Int32Array(t)
    for (let i = 1; i < t; i++) positions[i] = isStart[i] === 1 ? 0 : positions[i - 1] + 1
    return positions
  })

/** RoPE tables and query scales of positions offset..offset+T-1, the same for every row: [T, E] and [T, 1]. */
const sharedTables = (model: Model, offset: number, t: number) => {
  const tables = Rope.tables(model.rope, offset, t)
  return {
    cos: tf.tensor2d(tables.cos, [t, model.config.headDim]),
    sin: tf.tensor2d(tables.sin, [t, model.config.headDim]),
    queryScales: tf.tensor2d(Rope.queryScales(model.config, offset, t), [t, 1])
  }
}

/**
 * RoPE tables and query scales at each row's own positions ([B][T]), [B, 1, T, E] and [B, 1, T, 1]:
 * rows of the tables for positions 0..max picked per token.
 */
const tablesAt = (model: Model, positions: ReadonlyArray<ArrayLike<number>>, t: number) => {
  const e = model.config.headDim
  let length = 0
  for (const row of positions) for (let i = 0; i < row.length; i++) length = Math.max(length, row[i] + 1)
  const tables = Rope.tables(model.rope, 0, length)
  const scales = Rope.queryScales(model.config, 0, length)
  const b = positions.length
  const cos = new Float32Array(b * t * e)
  const sin = new Float32Array(b * t * e)
  const queryScales = new Float32Array(b * t)
  positions.forEach((rowPositions, row) =>
    Array.from(rowPositions).forEach((position, i) => {
      const at = (row * t + i) * e
      cos.set(tables.cos.subarray(position * e, (position + 1) * e), at)
      sin.set(tables.sin.subarray(position * e, (position + 1) * e), at)
      queryScales[row * t + i] = scales[position]
    })
  )
  return {
    cos: tf.tensor4d(cos, [b, 1, t, e]),
    sin: tf.tensor4d(sin, [b, 1, t, e]),
    queryScales: tf.tensor4d(queryScales, [b, 1, t, 1])
  }
}

/** Which tokens each block of the table serves: their places among the ids and their rows in the block. */
interface Route {
  readonly places: Int32Array
  readonly rows: Int32Array
}

/** Routes flat token ids to the blocks holding their rows; an id outside the table is an error. */
const route = (table: RowBlocks.RowBlocks, flat: Int32Array): Array<Route> => {
  const ranges = RowBlocks.rangesOf(table)
  const vocab = ranges[ranges.length - 1][1]
  const places: Array<Array<number>> = ranges.map(() => [])
  const owner = (id: number) => ranges.findIndex(([start, end]) => id >= start && id < end)
  flat.forEach((id, place) => {
    const block = owner(id)
    if (block < 0) throw new RangeError(`Model.forward: token id ${id} is outside the vocabulary of ${vocab}`)
    places[block].push(place)
  })
  return places.map((list, block) => ({
    places: Int32Array.from(list),
    rows: Int32Array.from(list, (place) => flat[place] - ranges[block][0])
  }))
}

/**
 * Token ids [B][T] -> embeddings [B, T, D], each id's row looked up in its block. A block's gradient
 * is a scatter-add of its tokens' gradients into [r_i, D]: tf.gather's own gradient needs
 * UnsortedSegmentSum, which the wasm backend lacks, while ScatterNd (which sums repeated ids) every
 * backend has.
 */
const embed = (table: RowBlocks.RowBlocks, ids: ReadonlyArray<ArrayLike<number>>): tf.Tensor3D => {
  const b = ids.length
  const t = b === 0 ? 0 : ids[0].length
  const d = table[0].shape[1]
  const flat = new Int32Array(b * t)
  ids.forEach((row, i) => flat.set(Array.from(row), i * t))
  const routes = route(table, flat)
  // The blocks' rows come out grouped by block; `order` puts each token's row back at its place.
  const order = new Int32Array(flat.length)
  let next = 0
  for (const { places } of routes) for (const place of places) order[place] = next++
  // Index tensors are rebuilt from JS in the gradient: a tensor made here would be gone when the backward pass runs.
  const indices = (values: Int32Array) => tf.tensor1d(values, "int32")
  // With one block (every matrix within a binding) the rows already come in token order: no reordering.
  const oneBlock = routes.length === 1
  const lookup = tf.customGrad((...blocks) => {
    const rows = routes.map((r, i) => tf.gather(blocks[i] as tf.Tensor2D, indices(r.rows)))
    return {
      value: oneBlock ? rows[0] : tf.gather(tf.concat(rows), indices(order)),
      gradFunc: (dy) =>
        routes.map((r, i) =>
          r.rows.length === 0
            ? tf.zeros(table[i].shape)
            : tf.scatterND(tf.tensor2d(r.rows, [r.rows.length, 1], "int32"), oneBlock ? dy : tf.gather(dy, indices(r.places)), table[i].shape)
        )
    }
  })
  return lookup(...table).reshape([b, t, d])
}

/** Embeddings [B, T, D] with the rows of `features` in place of the embeddings of `tokenId`, in order; differentiable in both. */
const splice = (embeddings: tf.Tensor3D, ids: ReadonlyArray<ArrayLike<number>>, { features, tokenId }: { features: tf.Tensor2D; tokenId: number }) => {
  const [b, t, d] = embeddings.shape
  const source = new Int32Array(b * t)
  const isImage = new Float32Array(b * t)
  let next = 0
  ids.forEach((row, i) => Array.from(row).forEach((id, j) => {
    if (id === tokenId) {
      source[i * t + j] = next++
      isImage[i * t + j] = 1
    }
  }))
  if (next !== features.shape[0]) throw new RangeError(`Model.forward: ${next} image tokens but ${features.shape[0]} image feature rows`)
  if (features.shape[1] !== d) throw new RangeError(`Model.forward: image features of width ${features.shape[1]}, embeddings of ${d}`)
  if (next === 0) return embeddings
  const mask = tf.tensor2d(isImage, [b * t, 1])
  // Rows placed by a product with a one-hot [B*T, N], not a gather: gather's gradient needs a kernel
  // the wasm backend lacks (UnsortedSegmentSum), and the projector is trained through this.
  const places = new Float32Array(b * t * next)
  isImage.forEach((image, position) => {
    if (image === 1) places[position * next + source[position]] = 1
  })
  const placed = matMul(tf.tensor2d(places, [b * t, next]), features)
  return tf.add(tf.mul(embeddings.reshape([b * t, d]), tf.sub(1, mask)), placed).reshape([b, t, d]) as tf.Tensor3D
}

/** The LM head's blocks: lm_head, or the input embedding when tied. */
export const head = (model: Model): RowBlocks.RowBlocks => model.weights.lmHead ?? model.weights.embed

/** The logits [B, T, V]: `x @ M^T` with each block of the LM head, side by side. */
const logitsOf = (normed: tf.Tensor3D, head: RowBlocks.RowBlocks): tf.Tensor3D =>
  tf.concat(head.map((block) => linear(normed, block)), -1) as tf.Tensor3D

/**
 * Logits of `head` are one tensor whatever its blocks: where B*T*V*4 bytes exceed a storage
 * binding (2 GiB on an H200: 4096 tokens of a 131072 vocabulary), say so before any work is done.
 */
export const checkLogitsFit = (head: RowBlocks.RowBlocks, b: number, t: number): void => {
  const vocab = RowBlocks.rowCount(head)
  const limit = RowBlocks.bindingLimit()
  if (b * t * vocab * 4 > limit) throw new LogitsTooLarge({ rows: b, tokens: t, vocab, limit })
}

/**
 * Runs the model over `ids` ([B][T], rows of equal length) after the positions in `cache`, if any.
 * Returns logits for every new position; tensors returned belong to the caller.
 */
export const forward = (model: Model, ids: ReadonlyArray<ArrayLike<number>>, options: ForwardOptions = {}): ForwardResult => {
  const { logits, hiddenStates, cache } = run(model, ids, options, true)
  return { logits: logits!, hiddenStates, cache }
}

/**
 * The final norm's output [B, T, D] without the LM head, for a loss that applies the head itself a
 * chunk of tokens at a time (Loss.chunkedDistillation), never holding [B, T, V] logits.
 */
export const forwardHidden = (model: Model, ids: ReadonlyArray<ArrayLike<number>>, options: Omit<ForwardOptions, "cache" | "useCache" | "hiddenStates"> = {}): tf.Tensor3D =>
  run(model, ids, options, false).normed!

const run = (model: Model, ids: ReadonlyArray<ArrayLike<number>>, options: ForwardOptions, withLogits: boolean) => {
  const { config, weights } = model
  const t = ids[0].length
  const past = options.cache
  const offset = past?.length ?? 0
  const newMask = ids.map((_, row) => Uint8Array.from(options.attentionMask?.[row] ?? new Array(t).fill(1)))
  const keyMask = newMask.map((mask, row) => past ? concatBytes(past.keyMask[row], mask) : mask)
  if (past && options.documentStarts) throw new Error("Model.forward: document masking is not supported with a cache")
  if (options.documentStarts && options.positionIds) throw new Error("Model.forward: give document starts or position ids, not both")
  const documents = options.documentStarts && documentPositions(options.documentStarts, t)
  const positions = documents ?? options.positionIds
  if (withLogits) checkLogitsFit(head(model), ids.length, options.lastLogitsOnly ? 1 : t)
  const result = tf.tidy(() => {
    const context: AttentionContext = {
      ...(positions === undefined ? sharedTables(model, offset, t) : tablesAt(model, positions, t)),
      mask: attentionMask(keyMask, offset, t, config.slidingWindow, documents)
    }
    let x = options.imageFeatures === undefined ? embed(weights.embed, ids) : splice(embed(weights.embed, ids), ids, options.imageFeatures)
    const hiddenStates: Array<tf.Tensor3D> = []
    const layers: Array<{ k: tf.Tensor4D; v: tf.Tensor4D }> = []
    weights.layers.forEach((layer, i) => {
      if (options.hiddenStates) hiddenStates.push(x)
      const attended = attention(rmsNorm(x, layer.inputNorm, config.rmsNormEps) as tf.Tensor3D, layer, config, context, past?.layers[i])
      const middle = tf.add(x, attended.output) as tf.Tensor3D
      const ffn = ffnActivation(rmsNorm(middle, layer.postNorm, config.rmsNormEps), layer) as tf.Tensor3D
      const output = tf.add(middle, linear(ffn, layer.down)) as tf.Tensor3D
      options.trace?.({ index: i, input: x, middle, ffn, output })
      x = output
      layers.push({ k: attended.k, v: attended.v })
    })
    const normed = rmsNorm(x, weights.norm, config.rmsNormEps) as tf.Tensor3D
    if (options.hiddenStates) hiddenStates.push(normed)
    return {
      logits: withLogits ? logitsOf(options.lastLogitsOnly ? normed.slice([0, t - 1, 0], [-1, 1, -1]) : normed, head(model)) : undefined,
      normed: withLogits ? undefined : normed,
      hiddenStates,
      layers: options.useCache ? layers : []
    }
  })
  if (past) disposeCache(past)
  return {
    logits: result.logits,
    normed: result.normed,
    hiddenStates: result.hiddenStates,
    cache: options.useCache ? { layers: result.layers, keyMask, length: offset + t } : undefined
  }
}

const concatBytes = (a: Uint8Array, b: Uint8Array) => {
  const out = new Uint8Array(a.length + b.length)
  out.set(a)
  out.set(b, a.length)
  return out
}
