/**
 * The cascade (RECIPE.md section 2): down a list of sizes, each generation is calibrated on and
 * pruned from the previous generation's short-context model, distilled at short context, then at
 * long context; the teacher is the root parent unless told otherwise. Each model is measured
 * (parameters, shape, held-out NLL, recall and arithmetic accuracy) for the retention report.
 *
 * The run folder holds every step's output and `manifest.json` with the lineage. Each step is
 * skipped when its output is complete and made of the same inputs (the model it starts from by its
 * weights, the data, the options), resumed when it was cut short, and done again when its inputs
 * changed, so rerunning a killed run continues it and a retrained generation redoes every step
 * after it; `redo` starts over. A measurement is cached until the model's weights change.
 */
import { Console, Effect, Schema, Stream } from "effect"
import { createHash } from "node:crypto"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as TeacherSources from "../layers/Teacher.ts"
import { TensorBackend } from "../layers/TensorBackend.ts"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Config from "../src/model/Config.ts"
import * as Dataset from "../src/data/Dataset.ts"
import { CheckpointError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import * as Report from "../src/report/Report.ts"
import * as Plot from "../src/report/Plot.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import type * as Model from "../src/model/Model.ts"
import * as Vision from "../src/model/Vision.ts"
import * as Pruning from "../src/prune/Pruning.ts"
import * as Tasks from "../src/data/Tasks.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { calibrate } from "./Calibrate.ts"
import { distill, type StepMetrics } from "./Distill.ts"
import { continuations, evaluate } from "./Evaluate.ts"
import * as ImageSide from "../src/data/ImageSide.ts"
import { prune } from "./Prune.ts"
import { defaultBatch as defaultProjectorBatch, trainProjector } from "./ProjectorTrain.ts"
import * as TeacherCacheFormat from "../src/io/TeacherCacheFormat.ts"

const Phase = Schema.Struct({
  seq: Schema.Int,
  steps: Schema.Int,
  batch: Schema.Int,
  accumulate: Schema.optional(Schema.Int),
  lr: Schema.Number,
  minLr: Schema.optional(Schema.Number),
  warmup: Schema.optional(Schema.Int),
  /** Teacher candidates per position; the full vocabulary when left out. */
  topK: Schema.optional(Schema.Int),
  /** Weight of the next-token loss added to the KL (0 in the recipe; the ablation sets it). */
  ceWeight: Schema.optional(Schema.Number),
  /** Each document of a packed row on its own (`Dataset.documentMaskByDefault` when left out). */
  documentMask: Schema.optional(Schema.Boolean)
})

export const CascadeConfig = Schema.Struct({
  /** The run folder. */
  run: Schema.String,
  /** The root parent's checkpoint folder. */
  parent: Schema.String,
  data: Schema.Struct({
    train: Schema.String,
    calib: Schema.String,
    heldout: Schema.String,
    recall: Schema.optional(Schema.String),
    arith: Schema.optional(Schema.String),
    /** Image-text lines (`{"text", "images"}`) spread through the distillation data, which the projector step also trains on. */
    images: Schema.optional(Schema.String),
    /** Questions about pictures (`{"prompt", "answer", "images"}`), scored by exact match: visual accuracy. */
    visual: Schema.optional(Schema.String)
  }),
  sizes: Schema.Array(Schema.Struct({
    name: Schema.String,
    layers: Schema.optional(Schema.Int),
    hidden: Schema.optional(Schema.Int),
    ffn: Schema.optional(Schema.Int),
    tieEmbeddings: Schema.optional(Schema.Boolean),
    /** How the tied matrix is formed when tieEmbeddings ties it (Pruning.TieFrom). */
    tieFrom: Schema.optional(Schema.Literals(Pruning.tieRules))
  })),
  /** "root" (the recipe), "previous" (each generation's parent), or a checkpoint folder. */
  teacher: Schema.optional(Schema.String),
  /** Pick what to keep at random with this seed instead of by calibration scores (the baseline). */
  randomPruning: Schema.optional(Schema.Int),
  short: Phase,
  /**
   * The long-context phase: `seq` is the longer context, `factor` the YaRN factor, `scalingBeta`
   * Ministral 3's query scaling past `seq / factor` (0.1 when left out, 0 turns it off).
   */
  long: Schema.optional(Schema.Struct({ ...Phase.fields, factor: Schema.Number, scalingBeta: Schema.optional(Schema.Finite) })),
  /**
   * The projector-only step (RECIPE.md: a new projector per size): after pruning, each child of a
   * Mistral 3 parent trains its projector alone on `data.images` against the teacher, then distils;
   * `batch` lines a step (ProjectorTrain.defaultBatch when left out).
   */
  projector: Schema.optional(Schema.Struct({ steps: Schema.Int, lr: Schema.Number, batch: Schema.optional(Schema.Int), lines: Schema.optional(Schema.Int) })),
  evaluation: Schema.optional(Schema.Struct({
    recallLimit: Schema.optional(Schema.Int),
    arithLimit: Schema.optional(Schema.Int),
    visualLimit: Schema.optional(Schema.Int)
  })),
  seed: Schema.optional(Schema.Int),
  /** Dtype of the pruned and distilled models (`--dtype`); the parent's by default. */
  dtype: Schema.optional(Pretrained.DtypeName)
})
export type CascadeConfig = typeof CascadeConfig.Type

export const decodeConfig = Schema.decodeUnknownEffect(CascadeConfig)

/** What the report shows of one model. */
export interface Measurement {
  readonly model: string
  readonly dir: string
  readonly parameters: number
  readonly layers: number
  readonly hidden: number
  readonly ffn: number
  readonly nll: number
  readonly recall: number | undefined
  readonly arith: number | undefined
  readonly visual: number | undefined
}

export interface CascadeEvents {
  readonly onStep?: (label: string, metrics: StepMetrics, total: number) => void
}

const exists = (file: string) => Effect.promise(() => fs.access(file).then(() => true, () => false))
const io = (file: string, what: string) => (cause: unknown) => new CheckpointError({ file, reason: `${what} (${String(cause)})` })

/**
 * `files`' sequences tokenized once into `dir` as `{"input_ids"}` lines (with their `"images"`, as
 * absolute paths), the later files' lines spread evenly through the first's, so no run tokenizes
 * the corpus twice; the copy is named by the data and the tokenizer (`tokenizerDir`'s) it was made
 * of, so that changed data is never read from a stale copy.
 */
const tokenizedCopy = Effect.fn("Cascade.tokenizedCopy")(function*(
  files: ReadonlyArray<string>,
  dir: string,
  vocabSize: number,
  tokenizer: Tokenizer.Tokenizer | undefined,
  tokenizerDir: string
) {
  const made = `${(yield* Effect.forEach(files, Files.sha256)).join(" ")} ${(yield* TeacherCacheFormat.tokenizerHash(tokenizerDir)) ?? "none"}`
  const out = path.join(dir, `${path.basename(files[0]).replace(/\.jsonl$/, "")}-${createHash("sha256").update(made).digest("hex").slice(0, 16)}.ids.jsonl`)
  if (yield* exists(out)) return out
  const [first, ...rest] = yield* Effect.forEach(files, (file) =>
    Dataset.sequences(file, { vocabSize, tokenizer }).pipe(
      Stream.map(({ ids, imageFiles }) => JSON.stringify(imageFiles === undefined ? { input_ids: ids } : { input_ids: ids, images: imageFiles })),
      Stream.runCollect
    ))
  yield* Files.writeText(out, spreadThrough(first, rest.flat()).join("\n") + "\n")
  return out
})

/** `others` spread evenly through `lines`: the j-th of m before line floor((j + 1) n / (m + 1)) of n. */
const spreadThrough = <A>(lines: ReadonlyArray<A>, others: ReadonlyArray<A>): Array<A> => {
  const out: Array<A> = []
  let j = 0
  for (let i = 0; i <= lines.length; i++) {
    for (; j < others.length && Math.floor(((j + 1) * lines.length) / (others.length + 1)) === i; j++) out.push(others[j])
    if (i < lines.length) out.push(lines[i])
  }
  return out
}

/**
 * Greedy exact-match accuracy of `model` (loaded from `dir`) on a task file; undefined without the
 * file or a tokenizer, or for questions about pictures when the model has no image side.
 */
const taskAccuracy = Effect.fn("Cascade.taskAccuracy")(function*(
  model: Model.Model,
  dir: string,
  tokenizer: Tokenizer.Tokenizer | undefined,
  file: string | undefined,
  limit: number | undefined
) {
  if (file === undefined || tokenizer === undefined) return undefined
  const tasks = yield* Tasks.read(file, { limit })
  const images = tasks.some((task) => (task.images?.length ?? 0) > 0) ? yield* ImageSide.of(dir, tokenizer) : undefined
  if (images === undefined && tasks.some((task) => (task.images?.length ?? 0) > 0)) return undefined
  const greedy = continuations(model, tokenizer, images, {
    maxNewTokens: 8,
    temperature: 0,
    stopTokenIds: tokenizer.eosId === undefined ? [] : [tokenizer.eosId],
    stopStrings: ["\n"],
    decode: (ids) => tokenizer.decode(ids)
  }, file)
  return (yield* Tasks.score(tasks, greedy, { batchSize: 50 })).accuracy
})

/**
 * Held-out NLL and exact-match accuracies of a checkpoint, cached in the run folder's `evals/` under
 * the identity of what made them: the model's weights, the evaluation data and limits.
 */
export const measure = Effect.fn("Cascade.measure")(function*(
  name: string,
  dir: string,
  config: Pick<CascadeConfig, "run" | "data" | "evaluation">
) {
  const cache = path.join(config.run, "evals", `${name.replace(/[^A-Za-z0-9._-]+/g, "_")}.json`)
  const hashOf = (file: string | undefined) => (file === undefined ? Effect.succeed(null) : Files.sha256(file))
  const identity = JSON.stringify({
    model: yield* Checkpoint.fingerprint(dir),
    heldout: yield* hashOf(config.data.heldout),
    recall: yield* hashOf(config.data.recall),
    arith: yield* hashOf(config.data.arith),
    visual: yield* hashOf(config.data.visual),
    evaluation: config.evaluation
  })
  const cached = (yield* Files.readJsonIfPresent(cache)) as { identity?: string; measurement?: Measurement } | undefined
  if (cached?.identity === identity && cached.measurement !== undefined) return cached.measurement
  const measurement = yield* Effect.gen(function*() {
    const model = yield* Pretrained.load(dir)
    const tokenizer = yield* Tokenizer.loadIfPresent(dir)
    const heldout = yield* evaluate(model, Dataset.sequences(config.data.heldout, { vocabSize: model.config.vocabSize, tokenizer }))
    const accuracy = (file: string | undefined, limit: number | undefined) => taskAccuracy(model, dir, tokenizer, file, limit)
    return {
      model: name,
      dir,
      parameters: Config.parameterCount(model.config),
      layers: model.config.numLayers,
      hidden: model.config.hiddenSize,
      ffn: model.config.intermediateSize,
      nll: heldout.nll,
      recall: yield* accuracy(config.data.recall, config.evaluation?.recallLimit),
      arith: yield* accuracy(config.data.arith, config.evaluation?.arithLimit),
      visual: yield* accuracy(config.data.visual, config.evaluation?.visualLimit)
    } satisfies Measurement
  }).pipe(Effect.scoped)
  yield* Effect.tryPromise({ try: () => fs.mkdir(path.dirname(cache), { recursive: true }), catch: io(cache, "cannot create folder") })
  yield* Files.writeJson(cache, { identity, measurement })
  return measurement
})

interface Generation {
  readonly name: string
  readonly parent: string
  readonly teacher: string
  readonly stats: string
  readonly pruned: string
  /** The pruned child with its own projector (the projector-only step), where the run has one. */
  readonly projected: string | undefined
  readonly short: string
  readonly long: string | undefined
}

const phaseOptions = (phase: typeof Phase.Type, config: CascadeConfig) => ({
  seq: phase.seq,
  steps: phase.steps,
  seed: config.seed ?? 0,
  batch: phase.batch,
  accumulate: phase.accumulate ?? 1,
  learningRate: phase.lr,
  minLearningRate: phase.minLr ?? phase.lr / 10,
  warmupSteps: phase.warmup ?? Math.floor(phase.steps / 10),
  weightDecay: 0.01,
  maxGradNorm: 1,
  loss: { temperature: 1, crossEntropyWeight: phase.ceWeight ?? 0, restBucket: false, maxOutsideMass: 1e-3 },
  documentMask: phase.documentMask,
  saveEvery: Math.max(1, Math.floor(phase.steps / 4)),
  resume: true,
  dtype: config.dtype && Pretrained.dtypeNames[config.dtype],
  replace: true
})

/** Runs (or resumes) the whole cascade and writes the report; returns the measurements. */
export const run = Effect.fn("Cascade.run")(function*(config: CascadeConfig, events: CascadeEvents = {}) {
  const runDir = config.run
  yield* Effect.tryPromise({ try: () => fs.mkdir(path.join(runDir, "data"), { recursive: true }), catch: io(runDir, "cannot create") })
  const root = config.parent
  const rootModel = yield* Effect.scoped(Effect.map(Pretrained.load(root), (m) => m.config))
  const tokenizer = yield* Tokenizer.loadIfPresent(root)
  const train = yield* tokenizedCopy([config.data.train, ...(config.data.images === undefined ? [] : [config.data.images])], path.join(runDir, "data"), rootModel.vocabSize, tokenizer, root)

  // A Mistral 3 parent's children each train a projector of their own, where the run says how.
  const sees = yield* Effect.scoped(Vision.isPresent(root))
  const projectorStep = sees && config.projector !== undefined && config.data.images !== undefined
  const generations: Array<Generation> = []
  let current = root
  for (const [i, size] of config.sizes.entries()) {
    const base = path.join(runDir, `${i + 1}-${size.name}`)
    const teacher = config.teacher === undefined || config.teacher === "root" ? root : config.teacher === "previous" ? current : config.teacher
    const generation: Generation = {
      name: size.name,
      parent: current,
      teacher,
      stats: path.join(base, "stats"),
      pruned: path.join(base, "pruned"),
      projected: projectorStep ? path.join(base, "projected") : undefined,
      short: path.join(base, "short"),
      long: config.long ? path.join(base, "long") : undefined
    }
    generations.push(generation)
    const label = `[${i + 1}/${config.sizes.length} ${size.name}]`
    yield* Files.writeJson(path.join(runDir, "manifest.json"), manifest(config, generations))

    const parentTokenizer = yield* Tokenizer.loadIfPresent(current)
    yield* Console.log(`${label} calibrate ${current}`)
    yield* Effect.scoped(Effect.gen(function*() {
      yield* calibrate(yield* Pretrained.load(current), {
        modelDir: current,
        data: config.data.calib,
        out: generation.stats,
        seq: config.short.seq,
        tokenizer: parentTokenizer,
        replace: true
      })
    }))
    yield* Console.log(`${label} prune to ${JSON.stringify({ layers: size.layers, hidden: size.hidden, ffn: size.ffn })}`)
    yield* prune({
      modelDir: current,
      statsDir: generation.stats,
      out: generation.pruned,
      targets: size,
      selection: config.randomPruning === undefined ? { kind: "scores" } : { kind: "random", seed: config.randomPruning + i },
      dtype: config.dtype && Pretrained.dtypeNames[config.dtype],
      reuse: true
    }).pipe(Effect.scoped)
    const phase = (name: string, student: string, out: string, options: typeof Phase.Type, yarn?: Config.LongContext) =>
      Effect.gen(function*() {
        yield* Console.log(`${label} distill ${name}: ${options.steps} steps at ${options.seq} tokens, teacher ${teacher}`)
        yield* distill({
          ...phaseOptions(options, config),
          studentDir: student,
          data: train,
          out,
          yarn,
          onStep: (metrics) => events.onStep?.(`${label} ${name}`, metrics, options.steps)
        }).pipe(Effect.scoped, Effect.provide(TeacherSources.inProcess(teacher, { topK: options.topK })))
      })
    if (generation.projected !== undefined) {
      yield* Console.log(`${label} projector step: ${config.projector!.steps} steps on ${config.data.images}, teacher ${teacher}`)
      yield* projectorOf(generation.pruned, generation.projected, teacher, config)
    }
    yield* phase("short", generation.projected ?? generation.pruned, generation.short, config.short)
    if (config.long && generation.long) {
      yield* phase("long", generation.short, generation.long, config.long, {
        factor: config.long.factor,
        originalMax: Math.round(config.long.seq / config.long.factor),
        scalingBeta: config.long.scalingBeta
      })
    }
    current = generation.short
  }

  yield* Console.log("measuring held-out NLL, recall and arithmetic")
  const rows: Array<Measurement> = [yield* measure("parent", root, config)]
  for (const [i, g] of generations.entries()) {
    rows.push(yield* measure(`${i + 1}-${g.name} short`, g.short, config))
    if (g.long) rows.push(yield* measure(`${i + 1}-${g.name} long`, g.long, config))
  }
  yield* writeReport(runDir, rows, generations)
  return rows
})

/** What the projector step did for a child: its KL to the teacher and its visual accuracy, before and after. */
export interface ProjectorEffect {
  readonly klBefore: number
  readonly klAfter: number
  readonly visualBefore: number | undefined
  readonly visualAfter: number | undefined
}

/**
 * The projector-only step from `pruned` into `out`, with its effect in `out/projector.json`; done
 * again only when the child, the teacher, the data or the options changed.
 */
const projectorOf = Effect.fn("Cascade.projectorOf")(function*(pruned: string, out: string, teacher: string, config: CascadeConfig) {
  const { steps, lr, lines } = config.projector!
  // Resolved, so that a result from before batching (one line a step) is not taken for the default's.
  const batch = config.projector!.batch ?? defaultProjectorBatch
  const data = config.data.images!
  const marker = path.join(out, "projector.json")
  const identity = JSON.stringify({
    student: yield* Checkpoint.fingerprint(pruned),
    teacher: yield* Checkpoint.fingerprint(teacher),
    data: yield* Files.sha256(data),
    visual: config.data.visual === undefined ? null : yield* Files.sha256(config.data.visual),
    visualLimit: config.evaluation?.visualLimit,
    steps,
    lr,
    batch,
    lines
  })
  const done = (yield* Files.readJsonIfPresent(marker)) as { identity?: string; effect?: ProjectorEffect } | undefined
  if (done?.identity === identity && done.effect !== undefined) return done.effect
  const result = yield* trainProjector({ studentDir: pruned, teacherDir: teacher, data, out, steps, learningRate: lr, batch, lines }).pipe(Effect.scoped)
  const visualOf = (dir: string) =>
    Effect.scoped(Effect.gen(function*() {
      return yield* taskAccuracy(yield* Pretrained.load(dir), dir, yield* Tokenizer.loadIfPresent(dir), config.data.visual, config.evaluation?.visualLimit)
    }))
  const effect: ProjectorEffect = { klBefore: result.klBefore, klAfter: result.klAfter, visualBefore: yield* visualOf(pruned), visualAfter: yield* visualOf(out) }
  yield* Files.writeJson(marker, { identity, effect })
  return effect
})

const manifest = (config: CascadeConfig, generations: ReadonlyArray<Generation>) => ({
  format: "cascade-run/1",
  config,
  root: config.parent,
  generations: generations.map((g, i) => ({ index: i + 1, ...g }))
})

const percent = (x: number | undefined) => (x === undefined ? "-" : `${(100 * x).toFixed(1)}%`)

/** The retention table as Markdown; visual accuracy where a model was asked about pictures. */
export const table = (rows: ReadonlyArray<Measurement>): string => {
  const parent = rows[0]
  const visual = rows.some((row) => row.visual !== undefined)
  const lines = [
    `| model | parameters | layers / hidden / FFN | held-out NLL | recall | arithmetic |${visual ? " visual |" : ""} recall retained | arithmetic retained |${visual ? " visual retained |" : ""}`,
    `|---|---:|---|---:|---:|---:|${visual ? "---:|" : ""}---:|---:|${visual ? "---:|" : ""}`
  ]
  for (const row of rows) {
    const retained = (x: number | undefined, of: number | undefined) => (x === undefined || !of ? "-" : percent(x / of))
    lines.push(
      `| ${row.model} | ${(row.parameters / 1e6).toFixed(3)}M | ${row.layers} / ${row.hidden} / ${row.ffn} | ${row.nll.toFixed(4)} | ${percent(row.recall)} | ${percent(row.arith)} |${visual ? ` ${percent(row.visual)} |` : ""} ${retained(row.recall, parent.recall)} | ${retained(row.arith, parent.arith)} |${visual ? ` ${retained(row.visual, parent.visual)} |` : ""}`
    )
  }
  return lines.join("\n")
}

/** Where the run's last part ran: the backend, its device and features, and on a GPU the buffer pool's peak. */
const device = Effect.map(TensorBackend, (backend) => {
  const pool = backend.gpuMemory()?.allocatedBytes
  const features = backend.features.length > 0 ? `, features ${backend.features.join(", ")}` : ""
  return `Ran on ${backend.name}: ${backend.device}${features}${pool === undefined ? "" : `; peak GPU memory (tfjs's buffer pool) ${(pool / 2 ** 30).toFixed(2)} GiB`}.`
})

/** report.md, report.json and the plots: loss curves per stage, retention against size. */
const writeReport = Effect.fn("Cascade.writeReport")(function*(runDir: string, rows: ReadonlyArray<Measurement>, generations: ReadonlyArray<Generation>) {
  const curves: Array<Plot.Series> = []
  for (const [i, g] of generations.entries()) {
    for (const [phase, dir] of [["short", g.short], ["long", g.long]] as const) {
      if (dir === undefined) continue
      const text = yield* Effect.promise(() => fs.readFile(path.join(dir, "metrics.jsonl"), "utf8").catch(() => ""))
      const points = text.split("\n").filter(Boolean).map((line) => JSON.parse(line) as StepMetrics).map((m) => [m.step, m.kl] as const)
      curves.push({ name: `${i + 1}-${g.name} ${phase}`, points })
    }
  }
  const short = rows.filter((row) => !row.model.endsWith(" long"))
  const bySize = (pick: (row: Measurement) => number | undefined) =>
    short.flatMap((row) => (pick(row) === undefined ? [] : [[row.parameters, pick(row)!] as const])).sort((a, b) => a[0] - b[0])
  const plots = {
    "loss-curves.svg": Plot.svg({ title: "Distillation KL per step", x: "step", y: "KL(teacher || student), nats/token", series: curves }),
    "retention-accuracy.svg": Plot.svg({
      title: "Accuracy against size",
      x: "parameters",
      y: "exact-match accuracy",
      logX: true,
      series: [
        { name: "recall", points: bySize((r) => r.recall) },
        { name: "arithmetic", points: bySize((r) => r.arith) },
        ...(short.some((r) => r.visual !== undefined) ? [{ name: "visual", points: bySize((r) => r.visual) }] : [])
      ]
    }),
    "retention-nll.svg": Plot.svg({ title: "Held-out NLL against size", x: "parameters", y: "nats/token", logX: true, series: [{ name: "held-out NLL", points: bySize((r) => r.nll) }] })
  }
  for (const [name, content] of Object.entries(plots)) yield* Files.writeText(path.join(runDir, name), content)
  const projectors = yield* Effect.forEach(generations, (g, i) =>
    g.projected === undefined
      ? Effect.succeed([])
      : Effect.map(Files.readJsonIfPresent(path.join(g.projected, "projector.json")), (done) => {
        const effect = (done as { effect?: ProjectorEffect } | undefined)?.effect
        return effect === undefined ? [] : [`| ${i + 1}-${g.name} | ${effect.klBefore.toFixed(4)} | ${effect.klAfter.toFixed(4)} | ${percent(effect.visualBefore)} | ${percent(effect.visualAfter)} |`]
      }))
  const projectorTable = projectors.flat().length === 0 ? "" : [
    "\n## The projector step (each child's own projector, before distillation)\n",
    "| child | KL to the teacher before | after | visual accuracy before | after |",
    "|---|---:|---:|---:|---:|",
    ...projectors.flat()
  ].join("\n") + "\n"
  const markdown = `# Cascade report\n\n${table(rows)}\n${projectorTable}\nPlots: ${Object.keys(plots).join(", ")}\n\n${yield* device}\n`
  yield* Report.writeSection(path.join(runDir, "report.md"), "cascade", markdown)
  yield* Files.writeJson(path.join(runDir, "report.json"), { rows, generations })
})
