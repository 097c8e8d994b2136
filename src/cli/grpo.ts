/** `cascade grpo`: GRPO from verifiable rewards and rubric judges on the policy's own samples. */
import { Console, Effect, Layer, Option } from "effect"
import { Command, Flag } from "effect/cli"
import * as Rewards from "../../layers/Rewards.ts"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { defaultLoop, grpo } from "../../stages/Grpo.ts"
import * as Progress from "./Progress.ts"
import { onPolicyFlags, trainingOptions } from "./TrainingFlags.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import { cascade } from "./root.ts"

export const grpoCommand = Command.make(
  "grpo",
  {
    model: Flag.String("model").pipe(Flag.withDescription("The policy to train (checkpoint folder with its tokenizer), also the reference")),
    prompts: Flag.String("prompts").pipe(Flag.withDescription(`JSONL of {"prompt", "task"} lines, the prompt as the model reads it`)),
    out: Flag.String("out").pipe(Flag.withDescription("Folder for metrics.jsonl, checkpoints and the trained policy")),
    steps: Flag.Int("steps").pipe(Flag.withDescription("Rollout steps")),
    batch: Flag.Int("batch").pipe(Flag.withDescription("Prompts per step"), Flag.withDefault(8)),
    group: Flag.Int("group").pipe(Flag.withDescription("Samples per prompt (G)"), Flag.withDefault(8)),
    maxNewTokens: Flag.Int("max-new-tokens").pipe(Flag.withDescription("Longest response"), Flag.withDefault(128)),
    temperature: Flag.Finite("temperature").pipe(Flag.withDefault(1)),
    epsLow: Flag.Finite("eps-low").pipe(Flag.withDescription("Clip of the ratio below 1"), Flag.withDefault(0.2)),
    epsHigh: Flag.Finite("eps-high").pipe(Flag.withDescription("Clip of the ratio above 1 (clip-higher)"), Flag.withDefault(0.28)),
    klCoef: Flag.Finite("kl-coef").pipe(Flag.withDescription("Weight of the k3 KL to the reference in the loss (0: reported only)"), Flag.withDefault(0)),
    std: Flag.Literals("std", ["group", "batch", "none"] as const).pipe(Flag.withDescription("Divide advantages by the group's std, the batch's, or nothing"), Flag.withDefault("batch")),
    updates: Flag.Int("updates").pipe(Flag.withDescription("Policy updates per rollout batch (K)"), Flag.withDefault(2)),
    microBatch: Flag.Int("micro-batch").pipe(Flag.withDescription("Groups per forward pass"), Flag.withDefault(4)),
    judge: Flag.String("judge").pipe(Flag.withDescription("OpenAI-compatible server(s) judging rubric tasks, comma-separated"), Flag.optional),
    judgeModel: Flag.String("judge-model").pipe(
      Flag.withDescription("The judge's model name: sent with each request, and what names the judge, so that a judge restarted elsewhere resumes the run (default: its URLs)"),
      Flag.optional
    ),
    ...onPolicyFlags
  },
  Effect.fn("cli.grpo")(function*(flags) {
    const { backend } = yield* cascade
    const progress = Progress.bar("grpo", flags.steps)
    const judge = Option.getOrUndefined(flags.judge)
    const state = yield* grpo({
      ...trainingOptions(flags),
      dtype: Option.getOrUndefined(flags.dtype),
      modelDir: flags.model,
      prompts: flags.prompts,
      out: flags.out,
      steps: flags.steps,
      batch: flags.batch,
      group: flags.group,
      maxNewTokens: flags.maxNewTokens,
      temperature: flags.temperature,
      loop: defaultLoop,
      loss: { epsLow: flags.epsLow, epsHigh: flags.epsHigh, klCoef: flags.klCoef },
      std: flags.std,
      updates: flags.updates,
      microBatch: flags.microBatch,
      onStep: (m) => progress.update(m.step, `reward ${m.reward_mean?.toFixed(3) ?? "-"} kept ${m.groups}/${m.groups + m.dropped_groups}`)
    }).pipe(
      Effect.ensuring(Effect.sync(progress.finish)),
      Effect.scoped,
      TensorCoreMatMul.withPrecision(Option.getOrUndefined(flags.precision)),
      Effect.provide(Layer.merge(
        Rewards.layer({ judge: judge === undefined ? undefined : { urls: judge.split(","), model: Option.getOrUndefined(flags.judgeModel) } }),
        TensorBackend.layer(Option.getOrUndefined(backend))
      ))
    )
    yield* Console.log(`grpo: ${state.step} steps -> ${flags.out}`)
  })
).pipe(Command.withDescription("GRPO on the policy's own samples, rewarded by verifiers and rubric judges (metrics.jsonl, checkpoints, --resume)"))
