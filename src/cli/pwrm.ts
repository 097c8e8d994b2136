/** `cascade pwrm train`: a pairwise reward model from preference pairs, its temperature fitted on held-out pairs. */
import { Console, Effect, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { train } from "../../stages/PwrmTrain.ts"
import * as Progress from "./Progress.ts"
import { dataSetRunFlags, peakLearningRate, trainingOptions, warmup, warmupSteps } from "./TrainingFlags.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import { cascade } from "./root.ts"

const pairsFile = `JSONL file of {"prompt", "a", "b", "preferred": "a" | "b"} lines`

const trainCommand = Command.make(
  "train",
  {
    model: Flag.String("model").pipe(Flag.withDescription("Backbone checkpoint folder, with its tokenizer")),
    data: Flag.String("data").pipe(Flag.withDescription(`Training pairs: ${pairsFile}`)),
    heldout: Flag.String("heldout").pipe(Flag.withDescription(`Held-out pairs, for the temperature and the metrics: ${pairsFile}`)),
    out: Flag.String("out").pipe(Flag.withDescription("Folder for metrics.jsonl, checkpoints and the PWRM")),
    steps: Flag.Int("steps").pipe(Flag.withDescription("Optimizer steps")),
    lr: peakLearningRate(5e-4),
    batch: Flag.Int("batch").pipe(Flag.withDescription("Pairs per step, each trained on in both orders"), Flag.withDefault(8)),
    seq: Flag.Int("seq").pipe(Flag.withDescription("Most tokens of a rendered pair (longer pairs are truncated)"), Flag.withDefault(256)),
    warmup,
    ...dataSetRunFlags
  },
  Effect.fn("cli.pwrm.train")(function*(flags) {
    const { backend } = yield* cascade
    const progress = Progress.bar("training PWRM", flags.steps)
    const card = yield* train({
      ...trainingOptions(flags),
      baseDir: flags.model,
      data: flags.data,
      heldout: flags.heldout,
      out: flags.out,
      steps: flags.steps,
      batch: flags.batch,
      seq: flags.seq,
      warmupSteps: warmupSteps(flags),
      onStep: (m) => progress.update(m.step, `loss ${m.loss.toFixed(4)} acc ${m.accuracy.toFixed(3)} ${m.pairs_per_s.toFixed(1)} pairs/s`)
    }).pipe(
      Effect.ensuring(Effect.sync(progress.finish)),
      Effect.scoped,
      TensorCoreMatMul.withPrecision(Option.getOrUndefined(flags.precision)),
      Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend)))
    )
    const { accuracy, before, after, crossFitted } = card.heldoutMetrics
    const f = (x: number) => x.toFixed(4)
    yield* Console.log([
      `PWRM -> ${flags.out}`,
      `held-out pairs ${card.data.heldout.pairs}: accuracy ${f(accuracy)}`,
      `  temperature 1: NLL ${f(before.nll)} ECE ${f(before.ece)}`,
      `  temperature ${f(after.temperature)}: NLL ${f(after.nll)} ECE ${f(after.ece)} (each half fitted on the other: NLL ${f(crossFitted.nll)} ECE ${f(crossFitted.ece)})`
    ].join("\n"))
  })
).pipe(Command.withDescription("Train a pairwise reward model: P(A beats B), order-symmetrised, its temperature fitted on held-out pairs"))

export const pwrmCommand = Command.make("pwrm").pipe(
  Command.withSubcommands([trainCommand]),
  Command.withDescription("Pairwise reward models (the soft labels of online DPO)")
)
