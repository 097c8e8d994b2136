/**
 * Post-training (RECIPE.md sections 3-4): two pipelines composed from the stages, both from one
 * starting model (the cascade's long-context base):
 *
 * - instruct: SFT with logit distillation from a teacher (stages/Sft.ts), then online DPO
 *   (stages/Odpo.ts) with the pairwise reward model's probabilities as labels;
 * - reasoning: SFT on chain-of-thought traces, GRPO on verifiable rewards (stages/Grpo.ts), GRPO on
 *   rubrics checked by an LLM judge, then online DPO;
 * - visual, for a Mistral 3 model whose config has it: SFT on chats about pictures, then GRPO on
 *   questions about pictures with verifiable answers (the recipe's visual reasoning in RL). The
 *   image side stays frozen; the text model learns.
 *
 * First the PWRM is trained (stages/PwrmTrain.ts) and, when the config says so, the judge fine-tuned
 * from a checkpoint on yes/no verdicts. The judge is served in this process over the OpenAI chat API
 * (src/serve/Server.ts) on a free loopback port, as a remote judge would be, under a name made from its
 * weights, so that verdicts cached by one judge are never replayed for another.
 *
 * The run folder holds `pwrm/`, `judge-model/` (a fine-tuned judge), a folder per step
 * (`<branch>/<i>-<step>`), `judge/` (the judge's verdicts), `evals/` (each model's measurement) and
 * the report. Each step is skipped when its output is complete and resumed when it was cut short
 * (the stages see to both; each names the model it starts from by its weights, so a step whose
 * start was retrained runs again), so rerunning a killed run continues it; a measurement is cached
 * unless the evaluation options, the model or the judge changed.
 *
 * Each model is measured for the report on held-out chat tasks, greedily, the answer read after its
 * thinking: arithmetic and recall accuracy, and the mean judged score of held-out rubric prompts.
 * Each step's model also gets its PWRM win rate against the model before it: on held-out prompts
 * (those of the evaluation prompt files that no online-DPO prompt file holds), the mean symmetrised
 * P(after beats before) over pairs of responses sampled with the same seeds, a response caught in a
 * loop losing outright as in online DPO. The judge gets its accuracy on held-out questions with known
 * verdicts. The report goes to `post-train-report.md` (and .json) and, as its `post-training`
 * section, into another report when the config names one (the cascade's report.md).
 */
import { Console, Context, Effect, Layer, Schema } from "effect"
import { HttpServer } from "effect/http"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Preference from "../layers/Preference.ts"
import * as RewardSources from "../layers/Rewards.ts"
import { Rewards } from "../src/rewards/Reward.ts"
import * as TeacherSources from "../layers/Teacher.ts"
import { CheckpointError, ConfigError, DataError } from "../src/Errors.ts"
import * as Files from "../src/io/Files.ts"
import * as Generate from "../src/model/Generate.ts"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Pretrained from "../src/io/Pretrained.ts"
import * as Plot from "../src/report/Plot.ts"
import * as Report from "../src/report/Report.ts"
import * as Server from "../src/serve/Server.ts"
import * as Tasks from "../src/data/Tasks.ts"
import * as ImageSide from "../src/data/ImageSide.ts"
import type { ImageError } from "../src/data/Images.ts"
import { continuations } from "./Evaluate.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { defaultLoop, grpo, GrpoPrompt, readPrompts, type Sampled } from "./Grpo.ts"
import { label, odpo } from "./Odpo.ts"
import { train as trainPwrm } from "./PwrmTrain.ts"
import { sft } from "./Sft.ts"

const SftStep = Schema.Struct({
  /** Chat JSONL. */
  data: Schema.String,
  steps: Schema.Int,
  batch: Schema.Int,
  seq: Schema.Int,
  lr: Schema.Number,
  /** w in `(1 - w) CE + w KL` from the teacher; 0 learns from the data alone. */
  distillWeight: Schema.Number,
  /** Teacher candidates per position; the full vocabulary when left out. */
  topK: Schema.optional(Schema.Int)
})

/** What GRPO and online DPO steps share: they learn from the policy's own samples. */
const Online = {
  /** Prompt JSONL. */
  prompts: Schema.String,
  steps: Schema.Int,
  /** Prompts per step. */
  batch: Schema.Int,
  maxNewTokens: Schema.Int,
  temperature: Schema.optional(Schema.Number),
  lr: Schema.Number,
  /** Rows per forward pass (groups for GRPO, pairs for online DPO). */
  microBatch: Schema.optional(Schema.Int)
}

const GrpoStep = Schema.Struct({
  ...Online,
  /** Samples per prompt. */
  group: Schema.Int,
  /** Policy updates per rollout batch. */
  updates: Schema.optional(Schema.Int),
  epsLow: Schema.optional(Schema.Number),
  epsHigh: Schema.optional(Schema.Number),
  klCoef: Schema.optional(Schema.Number),
  std: Schema.optional(Schema.Literals(["group", "batch", "none"]))
})

const OdpoStep = Schema.Struct({ ...Online, beta: Schema.Number })

export const PostTrainConfig = Schema.Struct({
  /** The run folder. */
  run: Schema.String,
  /** The model both branches start from. */
  start: Schema.String,
  /** The checkpoint SFT distils from. */
  teacher: Schema.String,
  /** The rubric judge: a checkpoint served in process, or an external one at `urls`. */
  judge: Schema.Struct({
    /** The judge; with `sft`, the checkpoint it is fine-tuned from; with `urls`, the name its servers serve it under. */
    model: Schema.String,
    /** OpenAI-compatible servers (vLLM, `cascade serve`) of an external judge, without `/v1`: asked instead of serving `model`; no `sft`. */
    urls: Schema.optional(Schema.Array(Schema.String)),
    /** Fine-tunes `model` into the judge first, on chats of judge questions answered "yes" or "no". */
    sft: Schema.optional(SftStep),
    /** Held-out `{"prompt", "response", "item", "verdict", "kind"?}` questions: the judge's accuracy, in the report. */
    heldout: Schema.optional(Schema.String),
    /** Further tries of an item the judge answered neither yes nor no (layers/Rewards.ts; default 3). */
    retries: Schema.optional(Schema.Int),
    maxTokens: Schema.optional(Schema.Int)
  }),
  pwrm: Schema.Struct({
    backbone: Schema.String,
    data: Schema.String,
    heldout: Schema.String,
    steps: Schema.Int,
    batch: Schema.Int,
    seq: Schema.Int,
    lr: Schema.Number
  }),
  instruct: Schema.Struct({ sft: SftStep, odpo: OdpoStep }),
  reasoning: Schema.Struct({ sft: SftStep, grpoVerifiers: GrpoStep, grpoRubrics: GrpoStep, odpo: OdpoStep }),
  /** The visual branch: chats whose user turns hold pictures, then GRPO on prompts with pictures (`"images"`). */
  visual: Schema.optional(Schema.Struct({ sft: SftStep, grpo: GrpoStep })),
  evaluation: Schema.Struct({
    /** Held-out `{"prompt", "answer"}` chat tasks. */
    arith: Schema.String,
    recall: Schema.String,
    arithLimit: Schema.optional(Schema.Int),
    recallLimit: Schema.optional(Schema.Int),
    /** Held-out `{"prompt", "task"}` rubric prompts, scored by the judge. */
    rubric: Schema.optional(Schema.String),
    rubricLimit: Schema.optional(Schema.Int),
    /** Room for a description after its thinking (default `maxNewTokens`). */
    rubricMaxNewTokens: Schema.optional(Schema.Int),
    /** Held-out `{"prompt", "answer", "images"}` chat questions about pictures: visual accuracy. */
    visual: Schema.optional(Schema.String),
    visualLimit: Schema.optional(Schema.Int),
    /** Room for the thinking and the answer. */
    maxNewTokens: Schema.Int,
    win: Schema.Struct({
      /** `{"prompt"}` files; their first `limit` prompts each that are held out count. */
      prompts: Schema.Array(Schema.String),
      limit: Schema.Int,
      /** Responses per prompt and model (1 with temperature 0: the greedy one). */
      samples: Schema.Int,
      temperature: Schema.Number,
      maxNewTokens: Schema.Int
    })
  }),
  /** A Markdown report (the cascade's report.md) that gets a post-training section (src/report/Report.ts). */
  report: Schema.optional(Schema.String),
  seed: Schema.optional(Schema.Int),
  /** Dtype of the models the SFT and online steps write (`--dtype`); each starting model's by default. */
  dtype: Schema.optional(Pretrained.DtypeName)
})
export type PostTrainConfig = typeof PostTrainConfig.Type

export const decodeConfig = Schema.decodeUnknownEffect(PostTrainConfig)

// ---------------------------------------------------------------------------------------------
// The pipelines

export const branches = ["instruct", "reasoning", "visual"] as const
export type Branch = (typeof branches)[number]

export type Step =
  | { readonly stage: "sft"; readonly name: string; readonly options: typeof SftStep.Type }
  /** `judge`: the rewards include rubrics, which the served judge checks. */
  | { readonly stage: "grpo"; readonly name: string; readonly options: typeof GrpoStep.Type; readonly judge: boolean }
  | { readonly stage: "odpo"; readonly name: string; readonly options: typeof OdpoStep.Type }

/** A branch's steps in order; each trains the model the one before it wrote. None for a branch the config leaves out. */
export const pipeline = (config: PostTrainConfig, branch: Branch): ReadonlyArray<Step> =>
  branch === "instruct"
    ? [
      { stage: "sft", name: "sft-distill", options: config.instruct.sft },
      { stage: "odpo", name: "odpo", options: config.instruct.odpo }
    ]
    : branch === "visual"
    ? config.visual === undefined ? [] : [
      { stage: "sft", name: "sft-visual", options: config.visual.sft },
      { stage: "grpo", name: "grpo-visual", options: config.visual.grpo, judge: false }
    ]
    : [
      { stage: "sft", name: "sft-cot", options: config.reasoning.sft },
      { stage: "grpo", name: "grpo-verifiers", options: config.reasoning.grpoVerifiers, judge: false },
      { stage: "grpo", name: "grpo-rubrics", options: config.reasoning.grpoRubrics, judge: true },
      { stage: "odpo", name: "odpo", options: config.reasoning.odpo }
    ]

/** A step's output folder. */
export const stepDir = (config: PostTrainConfig, branch: Branch, index: number, step: Step) =>
  path.join(config.run, branch, `${index + 1}-${step.name}`)

export interface PostTrainEvents {
  /** After each training step of a stage: its label, the step, the stage's steps and a one-line summary. */
  readonly onStep?: (label: string, step: number, total: number, summary: string) => void
}

const io = (file: string, what: string) => (cause: unknown) => new CheckpointError({ file, reason: `${what} (${String(cause)})` })
const fixed = (x: number | null | undefined, digits = 3) => (x === null || x === undefined || Number.isNaN(x) ? "-" : x.toFixed(digits))

/** The judge as the rewards see it: the checkpoint to serve, named by what it is. */
interface Judge {
  readonly dir: string
  /** The served model's name, from its config and weights (cached verdicts belong to these weights); an external judge's as given. */
  readonly name: string
}

/**
 * Rewards: verifiers, and for rubrics the external judge, or else the judge checkpoint served on a
 * free loopback port for as long as the layer lives (its request log off: it would bury the
 * pipeline's own), its verdicts kept in the run folder.
 */
const judgeRewards = (config: PostTrainConfig, judge: Judge) =>
  Layer.unwrap(Effect.gen(function*() {
    const options = { model: judge.name, cacheDir: path.join(config.run, "judge"), retries: config.judge.retries, maxTokens: config.judge.maxTokens }
    if (config.judge.urls !== undefined) return RewardSources.layer({ judge: { ...options, urls: config.judge.urls } })
    const served = { model: yield* Pretrained.load(judge.dir), tokenizer: yield* Tokenizer.load(judge.dir), name: judge.name }
    const services = yield* Layer.build(Server.layer(served, { host: "127.0.0.1", port: 0, logRequests: false }))
    const url = HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)
    return RewardSources.layer({ judge: { ...options, urls: [url] } })
  }))

/** SFT from `modelDir` into `out`, distilling from the teacher when the step says so. */
const runSft = (config: PostTrainConfig, o: typeof SftStep.Type, modelDir: string, out: string, report: (done: number, total: number, summary: string) => void) =>
  sft({
    modelDir,
    data: o.data,
    out,
    seq: o.seq,
    steps: o.steps,
    seed: config.seed ?? 0,
    batch: o.batch,
    accumulate: 1,
    learningRate: o.lr,
    minLearningRate: o.lr / 10,
    warmupSteps: Math.floor(o.steps / 10),
    weightDecay: 0.01,
    maxGradNorm: 1,
    distillWeight: o.distillWeight,
    dtype: config.dtype && Pretrained.dtypeNames[config.dtype],
    saveEvery: Math.max(1, Math.floor(o.steps / 4)),
    resume: true,
    replace: true,
    onStep: (m) => report(m.step, o.steps, `loss ${fixed(m.loss, 4)} ce ${fixed(m.ce, 4)} kl ${fixed(m.kl, 4)}`)
  }).pipe(
    Effect.scoped,
    Effect.provide(o.distillWeight > 0 ? TeacherSources.inProcess(config.teacher, { topK: o.topK }) : Layer.empty)
  )

/** Runs (or finds finished) one step from `modelDir` into `out`. */
const runStep = (config: PostTrainConfig, step: Step, modelDir: string, out: string, pwrmDir: string, judge: Judge, label: string, events: PostTrainEvents) => {
  const seed = config.seed ?? 0
  const report = (done: number, total: number, summary: string) => events.onStep?.(label, done, total, summary)
  const online = (o: typeof GrpoStep.Type | typeof OdpoStep.Type) => ({
    modelDir,
    prompts: o.prompts,
    out,
    steps: o.steps,
    seed,
    batch: o.batch,
    maxNewTokens: o.maxNewTokens,
    loop: defaultLoop,
    learningRate: o.lr,
    weightDecay: 0,
    maxGradNorm: 1,
    dtype: config.dtype && Pretrained.dtypeNames[config.dtype],
    saveEvery: Math.max(1, Math.floor(o.steps / 4)),
    resume: true,
    replace: true
  })
  switch (step.stage) {
    case "sft":
      return runSft(config, step.options, modelDir, out, report)
    case "grpo": {
      const o = step.options
      return grpo({
        ...online(o),
        temperature: o.temperature ?? 1,
        group: o.group,
        loss: { epsLow: o.epsLow ?? 0.2, epsHigh: o.epsHigh ?? 0.28, klCoef: o.klCoef ?? 0 },
        std: o.std ?? "batch",
        updates: o.updates ?? 2,
        microBatch: o.microBatch ?? 4,
        onStep: (m) => report(m.step, o.steps, `reward ${fixed(m.reward_mean)} kept ${m.groups}/${m.groups + m.dropped_groups} unscored ${m.unscored}`)
      }).pipe(Effect.scoped, Effect.provide(step.judge ? judgeRewards(config, judge) : RewardSources.layer()))
    }
    case "odpo": {
      const o = step.options
      return odpo({
        ...online(o),
        temperature: o.temperature ?? 0.7,
        beta: o.beta,
        microBatch: o.microBatch ?? 8,
        onStep: (m) => report(m.step, o.steps, `loss ${fixed(m.loss, 4)} margin ${fixed(m.margin)} p ${fixed(m.p_mean)}`)
      }).pipe(Effect.scoped, Effect.provide(Preference.fromPwrm(pwrmDir)))
    }
  }
}

/**
 * Trains the PWRM and the judge, runs (or resumes) the chosen branches (both by default), measures,
 * and writes the report (and its section of `config.report`); returns the report.
 */
export const run = Effect.fn("PostTrain.run")(function*(
  config: PostTrainConfig,
  options: { readonly branches?: ReadonlyArray<Branch>; readonly events?: PostTrainEvents } = {}
) {
  const { branches: chosen = branches, events = {} } = options
  yield* Effect.tryPromise({ try: () => fs.mkdir(config.run, { recursive: true }), catch: io(config.run, "cannot create") })
  const pwrmDir = path.join(config.run, "pwrm")
  yield* Console.log(`PWRM on ${config.pwrm.backbone}: ${config.pwrm.steps} steps`)
  const card = yield* trainPwrm({
    baseDir: config.pwrm.backbone,
    data: config.pwrm.data,
    heldout: config.pwrm.heldout,
    out: pwrmDir,
    steps: config.pwrm.steps,
    batch: config.pwrm.batch,
    seq: config.pwrm.seq,
    seed: config.seed ?? 0,
    learningRate: config.pwrm.lr,
    warmupSteps: Math.floor(config.pwrm.steps / 10),
    weightDecay: 0.01,
    maxGradNorm: 1,
    saveEvery: Math.max(1, Math.floor(config.pwrm.steps / 4)),
    resume: true,
    replace: true,
    onStep: (m) => events.onStep?.("[pwrm]", m.step, config.pwrm.steps, `loss ${fixed(m.loss, 4)} acc ${fixed(m.accuracy)}`)
  }).pipe(Effect.scoped)

  const judgeDir = config.judge.sft === undefined ? config.judge.model : path.join(config.run, "judge-model")
  const judged = chosen.includes("reasoning") || config.evaluation.rubric !== undefined || config.judge.heldout !== undefined
  if (config.judge.urls !== undefined && config.judge.sft !== undefined) {
    return yield* new ConfigError({ file: config.run, reason: "judge: an external judge (urls) cannot be fine-tuned (sft)" })
  }
  const judgeTrained = config.judge.sft !== undefined && judged
  if (config.judge.sft !== undefined && judgeTrained) {
    yield* Console.log(`[judge] fine-tuned from ${config.judge.model}: ${config.judge.sft.steps} steps`)
    const { steps } = config.judge.sft
    yield* runSft(config, config.judge.sft, config.judge.model, judgeDir, (done, _, summary) => events.onStep?.("[judge]", done, steps, summary))
  }
  const judge: Judge = {
    dir: judgeDir,
    name: config.judge.urls !== undefined
      ? config.judge.model
      : judged
      ? `judge-${(yield* Checkpoint.fingerprint(judgeDir)).slice(0, 16)}`
      : "judge (not used)"
  }

  const lineage: Array<Lineage> = []
  for (const branch of chosen) {
    const steps = pipeline(config, branch)
    let current = config.start
    for (const [i, step] of steps.entries()) {
      const out = stepDir(config, branch, i, step)
      const label = `[${branch} ${i + 1}/${steps.length} ${step.name}]`
      yield* Console.log(`${label} from ${current}`)
      yield* runStep(config, step, current, out, pwrmDir, judge, label, events)
      lineage.push({ model: `${branch}/${i + 1}-${step.name}`, branch, stage: step.name, kind: step.stage, dir: out, previous: current })
      current = out
    }
  }

  yield* Console.log("measuring chat arithmetic, recall, rubric scores, PWRM win rates and the judge")
  const { rows, judgeAccuracy } = yield* Effect.all({
    rows: measureAll(config, lineage, judge),
    judgeAccuracy: config.judge.heldout === undefined ? Effect.succeed(undefined) : measureJudge(config.judge.heldout)
  }).pipe(
    Effect.scoped,
    Effect.provide(Layer.merge(
      Preference.fromPwrm(pwrmDir),
      config.evaluation.rubric === undefined && config.judge.heldout === undefined ? RewardSources.layer() : judgeRewards(config, judge)
    ))
  )
  const report: PostTrainReport = {
    start: config.start,
    pwrm: { dir: pwrmDir, heldout: card.heldoutMetrics, temperature: card.temperature },
    judge: { dir: judgeDir, from: config.judge.sft === undefined ? undefined : config.judge.model, heldout: judgeAccuracy },
    rows
  }
  const curves = [
    ...(judgeTrained ? [{ name: "judge", dir: judgeDir, kind: "sft" as const }] : []),
    { name: "pwrm", dir: pwrmDir, kind: "sft" as const },
    ...lineage.map(({ model, dir, kind }) => ({ name: model, dir, kind }))
  ]
  const plots = yield* writePlots(config.run, curves)
  const fromRun = plots.map((plot) => path.relative(config.run, plot))
  yield* Files.writeText(path.join(config.run, "post-train-report.md"), `# Post-training report\n\n${markdownOf(report, fromRun)}`)
  yield* Files.writeJson(path.join(config.run, "post-train-report.json"), report)
  if (config.report !== undefined) {
    const fromReport = plots.map((plot) => path.relative(path.dirname(config.report!), plot))
    yield* Report.writeSection(config.report, "post-training", `## Post-training\n\n${markdownOf(report, fromReport)}`)
  }
  return report
})

/** What each kind of stage plots per step: the training loss, the mean reward, how often online DPO's policy agrees with its labels. */
const curveOf = {
  sft: { file: "post-train-losses.svg", field: "loss", title: "Supervised training loss per step", y: "loss, nats", logY: true },
  grpo: { file: "post-train-rewards.svg", field: "reward_mean", title: "GRPO mean reward per step", y: "mean reward of the samples", logY: false },
  odpo: { file: "post-train-odpo.svg", field: "agreement", title: "Online DPO agreement with the PWRM per step", y: "pairs the policy orders as the PWRM", logY: false }
} as const

/** The training curves, one chart per kind of stage, from each step's metrics.jsonl; returns their paths. */
const writePlots = Effect.fnUntraced(function*(runDir: string, steps: ReadonlyArray<{ readonly name: string; readonly dir: string; readonly kind: keyof typeof curveOf }>) {
  const written: Array<string> = []
  for (const [kind, { file, field, title, y, logY }] of Object.entries(curveOf)) {
    const series: Array<Plot.Series> = []
    for (const step of steps.filter((s) => s.kind === kind)) {
      const text = yield* Effect.tryPromise({ try: () => fs.readFile(path.join(step.dir, "metrics.jsonl"), "utf8"), catch: io(step.dir, "has no readable metrics.jsonl") })
      const file = path.join(step.dir, "metrics.jsonl")
      const points = yield* Effect.forEach(text.split("\n").entries(), ([i, line]) =>
        line.trim() === ""
          ? Effect.succeed([])
          : Effect.try({
            try: () => {
              const metrics = JSON.parse(line) as Record<string, unknown>
              const value = metrics[field]
              return typeof metrics.step === "number" && typeof value === "number" ? [[metrics.step, value] as const] : []
            },
            catch: () => new DataError({ file, line: i + 1, reason: "is not JSON" })
          }))
      series.push({ name: step.name, points: points.flat() })
    }
    if (series.length === 0) continue
    const out = path.join(runDir, file)
    yield* Files.writeText(out, Plot.svg({ title, x: "step", y, series, logY }))
    written.push(out)
  }
  return written
})

/** What the report holds. */
export interface PostTrainReport {
  readonly start: string
  readonly pwrm: { readonly dir: string; readonly heldout: { readonly accuracy: number }; readonly temperature: number }
  readonly judge: { readonly dir: string; readonly from: string | undefined; readonly heldout: JudgeAccuracy | undefined }
  readonly rows: ReadonlyArray<Row>
}

/** The report's body: where it started, the PWRM, the judge, the table and the plots (as the report links them). */
const markdownOf = (report: PostTrainReport, plots: ReadonlyArray<string>) => {
  const { judge, pwrm } = report
  const judged = judge.heldout === undefined
    ? ""
    : ` Held-out verdicts: accuracy ${fixed(judge.heldout.accuracy)} on ${judge.heldout.decided} decided of ${judge.heldout.questions} (${
      Object.entries(judge.heldout.byKind).map(([kind, k]) => `${kind} ${fixed(k.accuracy)} of ${k.decided}, `).join("")
    }answered yes ${fixed(judge.heldout.yesShare)}, truly yes ${fixed(judge.heldout.trueYesShare)})${
      judge.heldout.firstFailure === undefined ? "" : `; undecided ${judge.heldout.questions - judge.heldout.decided}, first because: ${judge.heldout.firstFailure}`
    }.`
  return [
    `Start: ${report.start}. PWRM (${pwrm.dir}): held-out pair accuracy ${fixed(pwrm.heldout.accuracy)}, temperature ${fixed(pwrm.temperature)}.`,
    `Rubric judge: ${judge.dir}${judge.from === undefined ? "" : `, fine-tuned from ${judge.from}`}.${judged}`,
    "",
    table(report.rows),
    "",
    `Plots: ${plots.join(", ")}`,
    ""
  ].join("\n")
}

/** How often the judge gives the held-out questions' verdicts, and how often it could not decide. */
export interface JudgeAccuracy {
  readonly questions: number
  readonly decided: number
  /** Of the decided ones; undefined when none was. */
  readonly accuracy: number | undefined
  readonly yesShare: number | undefined
  readonly trueYesShare: number | undefined
  /** Per kind of item, where the questions say. */
  readonly byKind: Record<string, { readonly decided: number; readonly accuracy: number | undefined }>
  /** Why the first undecided question got no verdict. */
  readonly firstFailure: string | undefined
}

/** A held-out judge question: what the judge is asked, the verdict it should give, and the kind of item. */
const JudgeQuestion = Schema.Struct({
  prompt: Schema.String,
  response: Schema.String,
  item: Schema.String,
  verdict: Schema.Boolean,
  kind: Schema.optional(Schema.String)
})
type JudgeQuestion = typeof JudgeQuestion.Type

/** The judge's verdicts (undefined: none, with the reason) against the questions' own. */
export const judgeAccuracy = (
  questions: ReadonlyArray<JudgeQuestion>,
  verdicts: ReadonlyArray<{ readonly passed: boolean | undefined; readonly note?: string | undefined }>
): JudgeAccuracy => {
  const decided = questions.flatMap((q, i) => {
    const said = verdicts[i].passed
    return said === undefined ? [] : [{ truth: q.verdict, said, kind: q.kind }]
  })
  const shareOf = <A>(items: ReadonlyArray<A>, when: (a: A) => boolean) => (items.length === 0 ? undefined : items.filter(when).length / items.length)
  const kinds = [...new Set(decided.flatMap((d) => (d.kind === undefined ? [] : [d.kind])))]
  return {
    questions: questions.length,
    decided: decided.length,
    accuracy: shareOf(decided, (d) => d.said === d.truth),
    yesShare: shareOf(decided, (d) => d.said),
    trueYesShare: shareOf(decided, (d) => d.truth),
    byKind: Object.fromEntries(kinds.map((kind) => {
      const ofKind = decided.filter((d) => d.kind === kind)
      return [kind, { decided: ofKind.length, accuracy: shareOf(ofKind, (d) => d.said === d.truth) }]
    })),
    firstFailure: verdicts.find((v) => v.passed === undefined)?.note
  }
}

/** The judge (through the Rewards service, as GRPO asks it) on held-out questions with known verdicts. */
const measureJudge = Effect.fnUntraced(function*(file: string) {
  const rewards = yield* Rewards
  const questions = yield* readPrompts(file, JudgeQuestion)
  const verdicts = yield* Effect.forEach(
    questions,
    ({ prompt, response, item }) => Effect.map(rewards.score({ prompt, response, task: { kind: "rubric", items: [item] } }), (score) => score.checks[0]),
    { concurrency: 8 }
  )
  return judgeAccuracy(questions, verdicts)
})

// ---------------------------------------------------------------------------------------------
// Measurement

interface Lineage {
  readonly model: string
  readonly branch: Branch
  readonly stage: string
  readonly kind: Step["stage"]
  readonly dir: string
  /** The folder of the model the step started from. */
  readonly previous: string
}

/** A row of the report. */
export interface Row {
  readonly model: string
  readonly branch: Branch | "-"
  readonly stage: string
  readonly dir: string
  /** Held-out chat accuracies. */
  readonly arith: number
  readonly recall: number
  /** Mean rubric score of its held-out rubric prompts (the judge's decided items); undefined without a rubric evaluation. */
  readonly rubric: number | undefined
  /** Held-out accuracy on questions about pictures; undefined without them or a model that sees. */
  readonly visual: number | undefined
  /** Mean P(this model's response beats the previous model's), and its standard error; undefined for the start. */
  readonly winVsPrevious: number | undefined
  readonly winStdError: number | undefined
}

/** What is cached of a model: its accuracies, rubric score and its responses to the win-rate prompts. */
interface Measurement {
  /** The evaluation options, the judge and the model's files: a cache made with others is measured again. */
  readonly identity: string
  readonly arith: number
  readonly recall: number
  readonly rubric: number | undefined
  readonly visual: number | undefined
  readonly responses: ReadonlyArray<Sampled>
}

const measureAll = Effect.fnUntraced(function*(config: PostTrainConfig, lineage: ReadonlyArray<Lineage>, judge: Judge) {
  const prompts = yield* heldOutPrompts(config)
  const names = new Map([[config.start, "start"], ...lineage.map(({ dir, model }) => [dir, model] as const)])
  const measured = new Map<string, Measurement>()
  const measurementOf = (dir: string) =>
    Effect.gen(function*() {
      if (!measured.has(dir)) measured.set(dir, yield* measure(config, names.get(dir)!, dir, prompts, judge))
      return measured.get(dir)!
    })
  const start = yield* measurementOf(config.start)
  const rows: Array<Row> = [
    { model: "start", branch: "-", stage: "-", dir: config.start, arith: start.arith, recall: start.recall, rubric: start.rubric, visual: start.visual, winVsPrevious: undefined, winStdError: undefined }
  ]
  for (const { model, branch, stage, dir, previous } of lineage) {
    const after = yield* measurementOf(dir)
    const before = yield* measurementOf(previous)
    // Pairs share their sampling seeds, so the models' randomness cancels in the comparison.
    const wins = yield* Effect.forEach(after.responses, (response, i) => label(prompts[Math.floor(i / config.evaluation.win.samples)], response, before.responses[i]))
    const winVsPrevious = wins.reduce((a, b) => a + b, 0) / wins.length
    const variance = wins.reduce((sum, p) => sum + (p - winVsPrevious) ** 2, 0) / Math.max(1, wins.length - 1)
    rows.push({ model, branch, stage, dir, arith: after.arith, recall: after.recall, rubric: after.rubric, visual: after.visual, winVsPrevious, winStdError: Math.sqrt(variance / wins.length) })
  }
  return rows
})

/**
 * The win-rate prompts: the first `limit` of each file, less those an online-DPO step trains on.
 * They read what the model reads (chat markup included).
 */
const heldOutPrompts = Effect.fnUntraced(function*(config: PostTrainConfig) {
  const Prompt = Schema.Struct({ prompt: Schema.String })
  const trained = new Set<string>()
  for (const file of [config.instruct.odpo.prompts, config.reasoning.odpo.prompts]) {
    for (const { prompt } of yield* readPrompts(file, Prompt)) trained.add(prompt)
  }
  const prompts = new Set<string>()
  for (const file of config.evaluation.win.prompts) {
    let taken = 0
    for (const { prompt } of yield* readPrompts(file, Prompt)) {
      if (taken === config.evaluation.win.limit) break
      if (trained.has(prompt) || prompts.has(prompt)) continue
      prompts.add(prompt)
      taken++
    }
  }
  return [...prompts]
})

/** A model's accuracies and win-rate responses, cached in the run folder's `evals/`. */
const measure = Effect.fnUntraced(function*(config: PostTrainConfig, name: string, dir: string, prompts: ReadonlyArray<string>, judge: Judge) {
  const cache = path.join(config.run, "evals", `${name.replace(/[^A-Za-z0-9._-]+/g, "_")}.json`)
  const { evaluation } = config
  const identity = JSON.stringify({
    evaluation,
    prompts,
    seed: config.seed ?? 0,
    judge: evaluation.rubric === undefined ? undefined : { name: judge.name, retries: config.judge.retries, maxTokens: config.judge.maxTokens },
    model: yield* Checkpoint.fingerprint(dir)
  })
  const cached = (yield* Files.readJsonIfPresent(cache)) as Measurement | undefined
  if (cached?.identity === identity) return cached
  const model = yield* Pretrained.load(dir)
  const tokenizer = yield* Tokenizer.load(dir)

  const stopTokenIds = tokenizer.eosId === undefined ? [] : [tokenizer.eosId]
  const decode = (ids: ReadonlyArray<number>) => tokenizer.decode(ids)
  /** Greedy responses, thinking included. */
  const responses = (texts: ReadonlyArray<string>, maxNewTokens = evaluation.maxNewTokens) =>
    Effect.map(
      Generate.generate(model, texts.map((text) => tokenizer.encode(text)), {
        maxNewTokens,
        temperature: 0,
        stopTokenIds,
        decode,
        loop: defaultLoop,
        batchSize: 50
      }),
      (generations) => generations.map((g) => g.text ?? "")
    )
  /** Greedy answers, each read after the response's thinking. */
  const answers = (texts: Array<string>) => Effect.map(responses(texts), (texts) => texts.map((text) => Generate.splitThinking(text).answer))
  /** The mean reward of the rubric prompts' greedy responses, over those the judge decided. */
  const rubricScore = (file: string, limit: number | undefined) =>
    Effect.gen(function*() {
      const rewards = yield* Rewards
      const tasks = (yield* readPrompts(file, GrpoPrompt)).slice(0, limit)
      const texts = yield* responses(tasks.map((t) => t.prompt), evaluation.rubricMaxNewTokens)
      const scores = yield* Effect.forEach(tasks, ({ prompt, task }, i) => rewards.score({ prompt, response: texts[i], task }), { concurrency: 8 })
      const decided = scores.flatMap((s) => (s.reward === undefined ? [] : [s.reward]))
      return decided.length === 0 ? undefined : decided.reduce((a, b) => a + b, 0) / decided.length
    })
  const accuracy = (file: string, limit: number | undefined) =>
    Effect.flatMap(Tasks.read(file, { limit }), (tasks) => Effect.map(Tasks.score(tasks, answers, { batchSize: 50 }), (score) => score.accuracy))
  /** Greedy answers to questions about pictures, each read after the response's thinking; undefined for a model without eyes. */
  const visualAccuracy = (file: string, limit: number | undefined) =>
    Effect.gen(function*() {
      const images = yield* ImageSide.of(dir, tokenizer)
      if (images === undefined) return undefined
      const greedy = continuations(model, tokenizer, images, { maxNewTokens: evaluation.maxNewTokens, temperature: 0, stopTokenIds, decode, loop: defaultLoop }, file)
      const seen: Tasks.Generator<DataError | ImageError, never> = (prompts, tasks) => Effect.map(greedy(prompts, tasks), (texts) => texts.map((text) => Generate.splitThinking(text).answer))
      return (yield* Tasks.score(yield* Tasks.read(file, { limit }), seen, { batchSize: 50 })).accuracy
    })

  const { win } = evaluation
  const encoded = prompts.map((prompt) => tokenizer.encode(prompt))
  const generations = yield* Generate.generate(model, encoded.flatMap((ids) => new Array<Array<number>>(win.samples).fill(ids)), {
    maxNewTokens: win.maxNewTokens,
    temperature: win.temperature,
    seed: config.seed ?? 0,
    stopTokenIds,
    decode,
    loop: defaultLoop,
    batchSize: 50
  })
  const measurement: Measurement = {
    identity,
    arith: yield* accuracy(evaluation.arith, evaluation.arithLimit),
    recall: yield* accuracy(evaluation.recall, evaluation.recallLimit),
    rubric: evaluation.rubric === undefined ? undefined : yield* rubricScore(evaluation.rubric, evaluation.rubricLimit),
    visual: evaluation.visual === undefined ? undefined : yield* visualAccuracy(evaluation.visual, evaluation.visualLimit),
    responses: generations.map((g, i) => ({
      completion: { prompt: encoded[Math.floor(i / win.samples)], response: g.tokens },
      text: g.text ?? "",
      loops: g.loopPeriod !== undefined,
      finishReason: g.finishReason
    }))
  }
  yield* Effect.tryPromise({ try: () => fs.mkdir(path.dirname(cache), { recursive: true }), catch: io(cache, "cannot create folder") })
  yield* Files.writeJson(cache, measurement)
  return measurement
}, Effect.scoped)

const percent = (x: number) => `${(100 * x).toFixed(1)}%`

/** The report's table as Markdown. */
export const table = (rows: ReadonlyArray<Row>): string =>
  [
    "| model | branch | stage | chat arithmetic | recall | rubric score (judge) | visual | PWRM win rate vs previous |",
    "|---|---|---|---:|---:|---:|---:|---:|",
    ...rows.map((r) =>
      `| ${r.model} | ${r.branch} | ${r.stage} | ${percent(r.arith)} | ${percent(r.recall)} | ${fixed(r.rubric)} | ${r.visual === undefined ? "-" : percent(r.visual)} | ${
        r.winVsPrevious === undefined ? "-" : `${r.winVsPrevious.toFixed(3)} ± ${fixed(r.winStdError)}`
      } |`
    )
  ].join("\n")
