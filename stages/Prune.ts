/**
 * The prune stage: checks a request against the parent and its calibration statistics, prunes
 * (src/prune/Pruning.ts), and writes the child as an ordinary Hugging Face checkpoint with
 * `prune-report.json` beside it. Everything is checked before anything is written, and the folder
 * appears whole or not at all (written aside, then renamed into place). The report records the
 * inputs (the parent's weights, the statistics, the targets and options), so that a pipeline
 * keeps a child only while they are the same.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Calibration from "../src/prune/Calibration.ts"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Config from "../src/model/Config.ts"
import { CheckpointError, PruneError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import * as Model from "../src/model/Model.ts"
import * as Vision from "../src/model/Vision.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Pruning from "../src/prune/Pruning.ts"
import type { FloatDtype } from "../src/io/Safetensors.ts"
import * as TensorCoreMatMul from "../src/gpu/TensorCoreMatMul.ts"
import * as Calibrate from "./Calibrate.ts"

/** Checks targets against the parent and the statistics against the parent. */
export const validate = (
  parent: Config.ModelConfig,
  stats: Calibration.Statistics,
  calibration: Calibrate.Manifest,
  targets: Pruning.Targets
): Effect.Effect<void, PruneError> =>
  Effect.gen(function*() {
    const fail = (reason: string) => Effect.fail(new PruneError({ reason }))
    if (calibration.configHash !== Config.hash(parent)) {
      return yield* fail(
        `the statistics were made for another model (${calibration.model}, config hash ${calibration.configHash.slice(0, 12)}), not this one (config hash ${Config.hash(parent).slice(0, 12)}): calibrate this model first`
      )
    }
    const axes = [
      ["--layers", targets.layers, parent.numLayers, "layers"],
      ["--hidden", targets.hidden, parent.hiddenSize, "hidden size"],
      ["--ffn", targets.ffn, parent.intermediateSize, "FFN width"]
    ] as const
    for (const [flag, target, size, what] of axes) {
      if (target === undefined) continue
      if (!Number.isInteger(target) || target <= 0) return yield* fail(`${flag} must be a positive integer, got ${target}`)
      if (target > size) return yield* fail(`${flag} ${target} is larger than the parent's ${what} (${size})`)
    }
    if (targets.tieFrom !== undefined && !targets.tieEmbeddings) {
      return yield* fail(`--tie-from ${targets.tieFrom} chooses how a tied child's matrix is formed: add --tie-embeddings`)
    }
    if (targets.hidden !== undefined && targets.hidden < parent.hiddenSize && stats.tokens < targets.hidden) {
      return yield* fail(
        `too few calibration tokens (${stats.tokens}) for a rank-${targets.hidden} rotation: calibrate on at least ${targets.hidden} tokens`
      )
    }
  })

const shapeOf = (config: Config.ModelConfig) => ({
  layers: config.numLayers,
  hidden: config.hiddenSize,
  ffn: config.intermediateSize,
  tiedEmbeddings: config.tieWordEmbeddings,
  parameters: Config.parameterCount(config)
})

/** How each rule forms a tied child's matrix, for the report (Pruning.TieFrom says why). */
const tieRuleText: Record<Pruning.TieFrom, string> = {
  fit: "the shared matrix is the rotated input embedding, turned by the eigenvectors of the symmetric S minimising ||E Q S - H diag(w_final) Q|| (an exact change of basis), and the final norm weight is S's eigenvalues: inputs exact, outputs off by that fit's residual",
  embed: "the shared matrix is the rotated input embedding E Q and the final norm weight its column-wise least-squares fit to the parent's lm_head H diag(w_final) Q: inputs exact, outputs approximate",
  head: "the shared matrix is the parent's lm_head with its final norm folded in, H diag(w_final) Q, and also serves as input embedding: outputs exact, inputs approximate",
  mean: "the shared matrix is the mean of the rotated input embedding E Q and the parent's folded lm_head H diag(w_final) Q, the final norm weight its column-wise least-squares fit to the latter: both approximate"
}

/** What a person needs to judge a pruned model: what was kept, at what cost, what is exact. */
export const report = (
  parent: Model.Model,
  plan: Pruning.Plan,
  tie: Pruning.TieFit | undefined,
  stats: Calibration.Statistics,
  calibration: Calibrate.Manifest,
  selection: Pruning.Selection
) => {
  const child = plan.config
  const rotated = plan.rotation !== undefined
  const exact: Array<string> = []
  const approximate: Array<string> = []
  if (child.numLayers === parent.config.numLayers) exact.push("layers: all kept")
  else approximate.push(`layers: ${parent.config.numLayers - child.numLayers} removed; their contribution to the residual stream is lost`)
  if (child.intermediateSize === parent.config.intermediateSize) exact.push("FFN: all neurons kept")
  else approximate.push(`FFN: ${parent.config.intermediateSize - child.intermediateSize} neurons per layer removed (kept share of importance per layer in ffn.retainedImportance)`)
  if (!rotated) exact.push("hidden: width kept, no rotation")
  else if (child.hiddenSize === parent.config.hiddenSize) {
    exact.push("hidden: full-rank rotation with RMSNorm weights folded into the linears that read them; equal to the parent up to float rounding")
  } else {
    approximate.push(
      `hidden: ${parent.config.hiddenSize} -> ${child.hiddenSize} principal directions keep ${(100 * plan.explainedVariance).toFixed(2)}% of the residual stream's second moment; RMSNorm then measures the kept part only (weights set to sqrt(D/H) = ${Math.sqrt(parent.config.hiddenSize / child.hiddenSize).toFixed(4)}), and its eps acts at H/D of its former strength`
    )
  }
  const tiedBefore = parent.config.tieWordEmbeddings
  if (tie !== undefined) {
    approximate.push(
      `tied embeddings (--tie-from ${tie.rule}): ${tieRuleText[tie.rule]}; relative error of the shared matrix as input embedding ${tie.inputError.toFixed(4)}, as lm_head (with the final norm) ${tie.outputError.toFixed(4)}; measure its cost in held-out NLL against the untied child of the same shape (cascade eval)`
    )
  } else if (!child.tieWordEmbeddings && tiedBefore) {
    exact.push(`embeddings untied: lm_head = E diag(w_final) Q is stored separately, exact, at the cost of ${child.vocabSize * child.hiddenSize} more parameters (pass --tie-embeddings to keep them tied, approximately)`)
  } else {
    exact.push(`embeddings: ${tiedBefore ? "tied" : "untied"} as in the parent`)
  }
  const layerScores = plan.layerScores
  return {
    selection: selection.kind === "scores" ? "calibration scores" : `random (seed ${selection.seed})`,
    parent: shapeOf(parent.config),
    child: shapeOf(child),
    layers: {
      kept: plan.keptLayers.map((index) => ({ index, score: layerScores[index] })),
      removed: layerScores.flatMap((score, index) => (plan.keptLayers.includes(index) ? [] : [{ index, score }]))
    },
    hidden: rotated ? { explainedVariance: plan.explainedVariance } : null,
    tie: tie ?? null,
    ffn: { retainedImportance: plan.ffnRetained },
    calibration: { model: calibration.model, data: calibration.data, tokens: stats.tokens, seq: calibration.seq },
    exact,
    approximate
  }
}

export type Report = ReturnType<typeof report>

export interface PruneOptions {
  readonly modelDir: string
  readonly statsDir: string
  readonly out: string
  readonly targets: Pruning.Targets
  readonly selection?: Pruning.Selection
  /** Stored dtype of the child; the parent's by default. */
  readonly dtype?: FloatDtype
  /** Keep OUT when its report records these very inputs (a pipeline's rerun), instead of pruning again. */
  readonly reuse?: boolean | undefined
}

const reportName = "prune-report.json"

/**
 * What a child is made of: the parent's weights, the statistics, and every other option (targets,
 * selection, dtype, and any option added later) but the folders and `reuse`.
 */
const inputsOf = Effect.fnUntraced(function*(options: PruneOptions, selection: Pruning.Selection) {
  const { modelDir, statsDir, out, reuse, ...settings } = options
  return {
    parent: yield* Checkpoint.fingerprint(modelDir),
    statistics: yield* Files.sha256(Calibrate.statisticsFile(statsDir)),
    ...settings,
    selection
  }
})

const io = (file: string, what: string) => (cause: unknown) => new CheckpointError({ file, reason: `${what} (${String(cause)})` })

/**
 * Loads parent and statistics, prunes and writes OUT. Returns the report with the inputs it records.
 * Rotations and ties are fitted in fp32 whatever the training precision.
 */
export const prune = Effect.fn("Prune.prune")(function*(options: PruneOptions) {
  const selection = options.selection ?? { kind: "scores" }
  const calibration = yield* Calibrate.readManifest(options.statsDir)
  if (calibration === undefined || !calibration.complete) {
    return yield* new PruneError({ reason: `${options.statsDir} holds no finished calibration (run cascade calibrate)` })
  }
  const inputs = yield* inputsOf(options, selection)
  if (options.reuse) {
    const previous = yield* Files.readJsonIfPresent(path.join(options.out, reportName))
    const recorded = typeof previous === "object" && previous !== null ? (previous as { inputs?: unknown }).inputs : undefined
    if (JSON.stringify(recorded) === JSON.stringify(inputs)) return previous as Report & { readonly inputs: typeof inputs }
  }
  const parent = yield* Pretrained.load(options.modelDir)
  const stats = yield* Calibration.read(Calibrate.statisticsFile(options.statsDir))
  yield* validate(parent.config, stats, calibration, options.targets)
  if (calibration.weights !== undefined && calibration.weights !== inputs.parent) {
    return yield* new PruneError({
      reason: `the statistics in ${options.statsDir} were made from other weights (${calibration.weights.slice(0, 12)}) than ${options.modelDir}'s (${inputs.parent.slice(0, 12)}): calibrate this model again`
    })
  }
  const existing = yield* Effect.promise(() => fs.readdir(options.out).catch(() => [] as Array<string>))
  if (existing.length > 0 && !existing.includes(reportName)) {
    return yield* new PruneError({ reason: `${options.out} exists and is not an earlier prune output; choose an empty or new folder` })
  }

  const plan = Pruning.plan(parent.config, stats, options.targets, selection)
  // A Mistral 3 parent's image side goes along: the projector's output turned into the child's basis.
  const vision = yield* Vision.loadIfPresent(options.modelDir)
  const writers = vision === undefined ? [] : Vision.residualWriters(vision)
  const { model: child, tie, written } = yield* Effect.acquireRelease(
    Pruning.build(parent, plan, writers),
    ({ model, written }) => Effect.sync(() => {
      Model.dispose(model)
      tf.dispose([...written, ...writers])
    })
  )
  const childVision = vision === undefined ? undefined : yield* Vision.intoHidden(vision, child.config.hiddenSize, written)
  const result = { ...report(parent, plan, tie, stats, calibration, selection), inputs }

  // Written aside and renamed into place, so OUT is never half a checkpoint.
  const staging = `${path.resolve(options.out)}.partial-${process.pid}`
  yield* Effect.tryPromise({ try: () => fs.rm(staging, { recursive: true, force: true }), catch: io(staging, "cannot clear") })
  yield* Pretrained.save(staging, child, { dtype: options.dtype ?? Pretrained.storedDtype(parent.config), companionsFrom: options.modelDir, vision: childVision })
  yield* Files.writeJson(path.join(staging, reportName), result)
  yield* Effect.tryPromise({
    try: async () => {
      await fs.rm(options.out, { recursive: true, force: true })
      await fs.rename(staging, options.out)
    },
    catch: io(options.out, "cannot move the pruned checkpoint into place")
  })
  return result
}, TensorCoreMatMul.withPrecision("fp32"))
