/** `cascade odpo`: online DPO with a pairwise reward model's probabilities as soft labels. */
import { Console, Effect, Layer, Option } from "effect"
import { Command, Flag } from "effect/cli"
import * as Preference from "../../layers/Preference.ts"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { defaultLoop } from "../../stages/Grpo.ts"
import { odpo } from "../../stages/Odpo.ts"
import * as Progress from "./Progress.ts"
import { onPolicyFlags, trainingOptions } from "./TrainingFlags.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import { cascade } from "./root.ts"

export const odpoCommand = Command.make(
  "odpo",
  {
    model: Flag.String("model").pipe(Flag.withDescription("The policy to train (checkpoint folder with its tokenizer), also the reference")),
    prompts: Flag.String("prompts").pipe(Flag.withDescription(`JSONL of {"prompt"} lines, as the model reads them`)),
    pwrm: Flag.String("pwrm").pipe(Flag.withDescription("Pairwise reward model folder (cascade pwrm train)")),
    out: Flag.String("out").pipe(Flag.withDescription("Folder for metrics.jsonl, checkpoints and the trained policy")),
    steps: Flag.Int("steps").pipe(Flag.withDescription("Steps: one update on a fresh pair per prompt")),
    batch: Flag.Int("batch").pipe(Flag.withDescription("Prompts per step"), Flag.withDefault(16)),
    beta: Flag.Finite("beta").pipe(Flag.withDescription("DPO's beta: the target margin is logit(p) / beta"), Flag.withDefault(0.1)),
    maxNewTokens: Flag.Int("max-new-tokens").pipe(Flag.withDescription("Longest response"), Flag.withDefault(128)),
    temperature: Flag.Finite("temperature").pipe(Flag.withDefault(0.7)),
    microBatch: Flag.Int("micro-batch").pipe(Flag.withDescription("Pairs per forward pass"), Flag.withDefault(8)),
    ...onPolicyFlags
  },
  Effect.fn("cli.odpo")(function*(flags) {
    const { backend } = yield* cascade
    const progress = Progress.bar("odpo", flags.steps)
    const state = yield* odpo({
      ...trainingOptions(flags),
      dtype: Option.getOrUndefined(flags.dtype),
      modelDir: flags.model,
      prompts: flags.prompts,
      out: flags.out,
      steps: flags.steps,
      batch: flags.batch,
      maxNewTokens: flags.maxNewTokens,
      temperature: flags.temperature,
      loop: defaultLoop,
      beta: flags.beta,
      microBatch: flags.microBatch,
      onStep: (m) => progress.update(m.step, `loss ${m.loss.toFixed(4)} margin ${m.margin.toFixed(3)} agreement ${m.agreement.toFixed(2)}`)
    }).pipe(
      Effect.ensuring(Effect.sync(progress.finish)),
      Effect.scoped,
      TensorCoreMatMul.withPrecision(Option.getOrUndefined(flags.precision)),
      Effect.provide(Layer.provideMerge(Preference.fromPwrm(flags.pwrm), TensorBackend.layer(Option.getOrUndefined(backend))))
    )
    yield* Console.log(`odpo: ${state.step} steps -> ${flags.out}`)
  })
).pipe(Command.withDescription("Online DPO: pairs of the policy's samples labelled by a pairwise reward model (metrics.jsonl, checkpoints, --resume)"))
