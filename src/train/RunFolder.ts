/**
 * The folder of a resumable training run: `metrics.jsonl` (a line per step), and `checkpoint/`
 * holding the weights, the optimizer's moments and the run's state, written aside and swapped in so
 * that a crash leaves the old checkpoint or the new one, never half of one.
 *
 * Every training stage (distillation, SFT, PWRM, GRPO, ODPO) keeps its run this way; each decides
 * what its state holds and how its weights are written.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { CheckpointError } from "../Errors.ts"
import * as Files from "../io/Files.ts"
import * as GpuMemory from "../GpuMemory.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import * as Optimizer from "./Optimizer.ts"
import * as Safetensors from "../io/Safetensors.ts"

/** How a run uses its folder: what every training stage's options hold. */
export interface Options {
  /** Steps between checkpoints. */
  readonly saveEvery: number
  /** Continue a run OUT holds; without it, a run found in OUT is an error rather than silently continued. */
  readonly resume?: boolean | undefined
  /**
   * Replace a run of other options found in OUT, finished or not, instead of refusing it: for
   * pipelines, whose steps must redo what changed before them.
   */
  readonly replace?: boolean | undefined
}

export const checkpointDir = (out: string) => path.join(out, "checkpoint")
export const metricsFile = (out: string) => path.join(out, "metrics.jsonl")

const io = (file: string, what: string) => (cause: unknown) => new CheckpointError({ file, reason: `${what} (${String(cause)})` })

/**
 * The optimizer's moments as F32 tensors `exp_avg.NAME` / `exp_avg_sq.NAME`, its step in the
 * metadata; each read from the backend as it is written, so no copy of all of them is held.
 */
const writeMoments = (file: string, adam: Optimizer.AdamW) => {
  const entry = (prefix: string, name: string, moment: tf.Variable) => ({
    name: `${prefix}.${name}`,
    dtype: "F32" as const,
    shape: [moment.size],
    data: Effect.promise(() => moment.data() as Promise<Float32Array>)
  })
  return Safetensors.write(file, [...adam.expAvg.keys()].flatMap((name) => [
    entry("exp_avg", name, adam.expAvg.get(name)!),
    entry("exp_avg_sq", name, adam.expAvgSq.get(name)!)
  ]), {
    format: "cascade-adamw",
    step: String(adam.step),
    loss_scale: String(adam.scaler.scale),
    loss_scale_good_steps: String(adam.scaler.goodSteps),
    skipped_steps: String(adam.scaler.skipped)
  })
}

const readMoments = Effect.fn("RunFolder.readMoments")(function*(file: string) {
  const moments = yield* Safetensors.open(file)
  const expAvg = new Map<string, Float32Array>()
  const expAvgSq = new Map<string, Float32Array>()
  for (const name of moments.names) {
    const values = yield* moments.readFloat32(name)
    if (name.startsWith("exp_avg_sq.")) expAvgSq.set(name.slice("exp_avg_sq.".length), values)
    else expAvg.set(name.slice("exp_avg.".length), values)
  }
  const { step, loss_scale, loss_scale_good_steps, skipped_steps } = moments.metadata
  // Checkpoints from before loss scaling have no scaler: a fresh one.
  const scaler = loss_scale === undefined ? undefined : { scale: Number(loss_scale), goodSteps: Number(loss_scale_good_steps), skipped: Number(skipped_steps) }
  return { step: Number(step), expAvg, expAvgSq, scaler } satisfies Optimizer.State
})

/** Writes a checkpoint: `writeWeights` fills a folder, then moments and state join it and it is swapped in. */
export const saveCheckpoint = Effect.fn("RunFolder.saveCheckpoint")(function*<E, R>(
  out: string,
  adam: Optimizer.AdamW,
  state: unknown,
  writeWeights: (dir: string) => Effect.Effect<void, E, R>
) {
  const target = checkpointDir(out)
  const staging = `${target}.partial`
  const old = `${target}.old`
  yield* Effect.tryPromise({ try: () => fs.rm(staging, { recursive: true, force: true }), catch: io(staging, "cannot clear") })
  yield* writeWeights(staging)
  yield* writeMoments(path.join(staging, "optimizer.safetensors"), adam)
  yield* Files.writeJson(path.join(staging, "state.json"), state)
  yield* Effect.tryPromise({
    try: async () => {
      await fs.rm(old, { recursive: true, force: true })
      await fs.rename(target, old).catch(() => undefined)
      await fs.rename(staging, target)
      await fs.rm(old, { recursive: true, force: true })
    },
    catch: io(target, "cannot move the checkpoint into place")
  })
})

/** A state file decoded by `schema`, or undefined when there is none. */
export const readState = <S>(file: string, schema: Schema.Decoder<S>) =>
  Files.readJsonIfPresent(file).pipe(
    Effect.flatMap((json) =>
      json === undefined
        ? Effect.succeed(undefined)
        : Schema.decodeUnknownEffect(schema)(json).pipe(Effect.mapError((error) => new CheckpointError({ file, reason: error.message })))
    )
  )

/** The last checkpoint, if any: its state, its folder (the weights) and the optimizer's moments. */
export const loadCheckpoint = Effect.fn("RunFolder.loadCheckpoint")(function*<S>(out: string, schema: Schema.Decoder<S>) {
  // A crash between the two renames of saveCheckpoint leaves only checkpoint.old.
  for (const dir of [checkpointDir(out), `${checkpointDir(out)}.old`]) {
    const state = yield* readState(path.join(dir, "state.json"), schema)
    if (state === undefined) continue
    return { state, dir, moments: yield* readMoments(path.join(dir, "optimizer.safetensors")) }
  }
  return undefined
})

/**
 * The checkpoint a run continues from: none for a fresh run, or the last checkpoint when `resume`
 * is set and it belongs to this very run (`matches`). A checkpoint without `resume`, or of another
 * run (`differs` says what may differ), is refused rather than silently continued or overwritten.
 */
export const resumePoint = Effect.fn("RunFolder.resumePoint")(function*<S>(
  out: string,
  schema: Schema.Decoder<S>,
  options: {
    readonly resume: boolean | undefined
    readonly matches: (state: S) => boolean
    readonly differs: string
    /** A checkpoint of another run is no obstacle: the new run starts over and replaces it. */
    readonly replace?: boolean | undefined
  }
) {
  const checkpoint = yield* loadCheckpoint(out, schema)
  if (checkpoint === undefined) return undefined
  if (options.replace && !options.matches(checkpoint.state)) return undefined
  if (!options.resume) {
    return yield* new CheckpointError({ file: out, reason: "holds a run in progress; pass --resume to continue it, or choose another --out" })
  }
  if (!options.matches(checkpoint.state)) {
    return yield* new CheckpointError({
      file: path.join(checkpoint.dir, "state.json"),
      reason: `belongs to a run with other ${options.differs}; use another --out`
    })
  }
  return checkpoint
})

/**
 * The top-level fields in which two identities written as JSON objects differ, for a message; the
 * stage's `differs` when either is not one.
 */
const differingFields = (previous: string, next: string, differs: string): string => {
  const parse = (text: string): unknown => {
    try {
      return JSON.parse(text)
    } catch {
      return undefined
    }
  }
  const [a, b] = [parse(previous), parse(next)]
  const isObject = (value: unknown): value is Record<string, unknown> => typeof value === "object" && value !== null && !Array.isArray(value)
  if (!isObject(a) || !isObject(b)) return differs
  const fields = [...new Set([...Object.keys(a), ...Object.keys(b)])].filter((key) => JSON.stringify(a[key]) !== JSON.stringify(b[key]))
  return fields.length === 0 ? differs : fields.join(", ")
}

/**
 * Where the run `identity` names stands in OUT, for stages whose final state.json says `complete`:
 * `finished`, that state, when it is this very run's; else `resume`, the checkpoint `resumePoint`
 * gives. A finished run of another identity is refused, naming what differs, unless `replace`: then
 * its state goes first, so that the folder never passes for a finished run until the new one ends.
 */
export const startingPoint = Effect.fn("RunFolder.startingPoint")(function*<S extends { readonly identity: string; readonly complete: boolean }>(
  out: string,
  schema: Schema.Decoder<S>,
  options: { readonly identity: string; readonly resume: boolean | undefined; readonly differs: string; readonly replace?: boolean | undefined }
) {
  const stateFile = path.join(out, "state.json")
  const finished = yield* readState(stateFile, schema)
  if (finished !== undefined && finished.complete) {
    if (finished.identity === options.identity) return { finished, resume: undefined }
    if (!options.replace) {
      return yield* new CheckpointError({
        file: stateFile,
        reason: `holds a finished run whose ${differingFields(finished.identity, options.identity, options.differs)} differ; use another --out`
      })
    }
    yield* Files.remove(stateFile)
  }
  const resume = yield* resumePoint(out, schema, {
    resume: options.resume,
    replace: options.replace,
    matches: (state) => state.identity === options.identity,
    differs: options.differs
  })
  return { finished: undefined, resume }
})

/**
 * Appends one step's metrics to metrics.jsonl, with on a GPU the bytes its tensors hold after the
 * step and the bytes tfjs's buffer pool has allocated (which it keeps: the peak so far), and in
 * mixed precision the loss scale for the next step and the steps skipped for overflow so far.
 */
const appendMetrics = (out: string, metrics: unknown, adam: Optimizer.AdamW) => {
  const memory = GpuMemory.read()
  const gpu = memory === undefined ? {} : { gpu_bytes_in_use: memory.inUseBytes, gpu_bytes_pool: memory.allocatedBytes }
  const mixed = TensorCoreMatMul.current() === "mixed"
    ? { precision: "mixed", loss_scale: adam.scaler.scale, skipped_steps: adam.scaler.skipped }
    : {}
  const line = JSON.stringify({ ...(metrics as object), ...mixed, ...gpu })
  return Effect.tryPromise({ try: () => fs.appendFile(metricsFile(out), line + "\n"), catch: io(metricsFile(out), "cannot append") })
}

/**
 * What every training run does after its step `step` (from 1): the step's line in metrics.jsonl,
 * the caller's hook, and every `saveEvery` steps a checkpoint of the state then (none after the
 * last step: the run's output stands for it).
 */
export const recordStep = <M, E, R>(
  out: string,
  run: { readonly saveEvery: number; readonly steps: number; readonly onStep?: ((metrics: M) => void) | undefined },
  step: number,
  metrics: M,
  checkpoint: { readonly adam: Optimizer.AdamW; readonly state: () => unknown; readonly writeWeights: (dir: string) => Effect.Effect<void, E, R> }
) =>
  Effect.gen(function*() {
    yield* appendMetrics(out, metrics, checkpoint.adam)
    run.onStep?.(metrics)
    if (step % run.saveEvery === 0 && step < run.steps) yield* saveCheckpoint(out, checkpoint.adam, checkpoint.state(), checkpoint.writeWeights)
  })

/** Keeps the first `steps` lines of metrics.jsonl: the steps after the checkpoint are redone on resume. */
export const truncateMetrics = (out: string, steps: number) => {
  const file = metricsFile(out)
  return Effect.tryPromise({
    try: async () => {
      const text = await fs.readFile(file, "utf8").catch(() => "")
      const kept = text.split("\n").filter((line) => line.trim() !== "").slice(0, steps)
      await fs.writeFile(file, kept.map((line) => line + "\n").join(""))
    },
    catch: io(file, "cannot rewrite")
  })
}

/** Removes the checkpoint once the run's final model is written. */
export const removeCheckpoint = (out: string) =>
  Effect.tryPromise({ try: () => fs.rm(checkpointDir(out), { recursive: true, force: true }), catch: io(out, "cannot clean") })
