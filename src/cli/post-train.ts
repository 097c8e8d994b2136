/** `cascade post-train CONFIG`: the instruct and reasoning pipelines from a JSON config, resumable, ending with the report. */
import { Console, Effect, Option } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import * as PostTrain from "../../stages/PostTrain.ts"
import { ConfigError } from "../Errors.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import { precisionFlag } from "./TrainingFlags.ts"
import * as Progress from "./Progress.ts"
import { cascade } from "./root.ts"

/** Paths in a config are relative to the config file's folder. */
const resolvePaths = (config: PostTrain.PostTrainConfig, file: string): PostTrain.PostTrainConfig => {
  const at = (p: string) => path.resolve(path.dirname(file), p)
  const optional = (p: string | undefined) => (p === undefined ? undefined : at(p))
  const sft = <S extends { readonly data: string }>(step: S): S => ({ ...step, data: at(step.data) })
  const online = <S extends { readonly prompts: string }>(step: S): S => ({ ...step, prompts: at(step.prompts) })
  const { evaluation, judge, pwrm } = config
  return {
    ...config,
    run: at(config.run),
    start: at(config.start),
    teacher: at(config.teacher),
    judge: {
      ...judge,
      model: judge.urls === undefined ? at(judge.model) : judge.model,
      sft: judge.sft === undefined ? undefined : sft(judge.sft),
      heldout: optional(judge.heldout)
    },
    report: optional(config.report),
    pwrm: { ...pwrm, backbone: at(pwrm.backbone), data: at(pwrm.data), heldout: at(pwrm.heldout) },
    instruct: { sft: sft(config.instruct.sft), odpo: online(config.instruct.odpo) },
    reasoning: {
      sft: sft(config.reasoning.sft),
      grpoVerifiers: online(config.reasoning.grpoVerifiers),
      grpoRubrics: online(config.reasoning.grpoRubrics),
      odpo: online(config.reasoning.odpo)
    },
    visual: config.visual === undefined ? undefined : { sft: sft(config.visual.sft), grpo: online(config.visual.grpo) },
    evaluation: {
      ...evaluation,
      arith: at(evaluation.arith),
      recall: at(evaluation.recall),
      rubric: optional(evaluation.rubric),
      visual: optional(evaluation.visual),
      win: { ...evaluation.win, prompts: evaluation.win.prompts.map(at) }
    }
  }
}

export const postTrainCommand = Command.make(
  "post-train",
  {
    config: Argument.String("config").pipe(Argument.withDescription("Post-training config (.json); configs/post-train.json is the embedded default")),
    branch: Flag.Literals("branch", ["instruct", "reasoning", "visual", "all", "both"] as const).pipe(
      Flag.withDescription(
        "instruct (SFT with distillation, online DPO), reasoning (SFT on traces, GRPO on verifiers, GRPO on rubrics, online DPO), " +
          "visual (SFT on chats about pictures, GRPO on questions about pictures; where the config has it), all of them (all, the default), or both text branches (both)"
      ),
      Flag.withDefault("all")
    ),
    redo: Flag.Boolean("redo").pipe(Flag.withDescription("Start over instead of resuming the run folder"), Flag.withDefault(false)),
    precision: precisionFlag
  },
  Effect.fn("cli.postTrain")(function*(flags) {
    const { backend } = yield* cascade
    const raw = yield* Effect.tryPromise({
      try: async (): Promise<unknown> => JSON.parse(await fs.readFile(flags.config, "utf8")),
      catch: (cause) => new ConfigError({ file: flags.config, reason: `cannot be read (${String(cause)})` })
    })
    const decoded = yield* PostTrain.decodeConfig(raw).pipe(
      Effect.mapError((error) => new ConfigError({ file: flags.config, reason: error.message.replace(/\s*\n\s*/g, "; ") }))
    )
    const config = resolvePaths(decoded, flags.config)
    if (flags.redo) yield* Effect.promise(() => fs.rm(config.run, { recursive: true, force: true }))

    const bars = new Map<string, Progress.Progress>()
    const report = yield* PostTrain.run(config, {
      branches: flags.branch === "all" ? PostTrain.branches : flags.branch === "both" ? ["instruct", "reasoning"] : [flags.branch],
      events: {
        onStep: (label, step, total, summary) => {
          if (!bars.has(label)) bars.set(label, Progress.bar(label, total))
          const bar = bars.get(label)!
          bar.update(step, summary)
          if (step === total) bar.finish()
        }
      }
    }).pipe(TensorCoreMatMul.withPrecision(Option.getOrUndefined(flags.precision)), Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend))))
    yield* Console.log(`\n${PostTrain.table(report.rows)}\n\nreport and checkpoints: ${config.run}${config.report === undefined ? "" : `; rows added to ${config.report}`}`)
  })
).pipe(Command.withDescription("Post-train a model: the instruct and reasoning pipelines (SFT, GRPO, online DPO), resumable, with the report"))
