/** `cascade sft`: supervised fine-tuning on chat data, optionally with logit distillation from a teacher. */
import { Console, Effect, Layer, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { sft } from "../../stages/Sft.ts"
import { teacherLayer } from "./distill.ts"
import * as Progress from "./Progress.ts"
import { supervisedFlags, supervisedOptions } from "./TrainingFlags.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import { cascade } from "./root.ts"

export const sftCommand = Command.make(
  "sft",
  {
    model: Flag.String("model").pipe(Flag.withDescription("Checkpoint folder to fine-tune (with a tokenizer and chat template)")),
    data: Flag.String("data").pipe(Flag.withDescription(`Chat JSONL file: {"messages": [{"role", "content"}, ...]} a line`)),
    out: Flag.String("out").pipe(Flag.withDescription("Folder for metrics.jsonl, checkpoints and the fine-tuned model")),
    steps: Flag.Int("steps").pipe(Flag.withDescription("Optimizer steps")),
    seq: Flag.Int("seq").pipe(Flag.withDescription("Row length: conversations are packed whole into rows of this many tokens"), Flag.withDefault(256)),
    teacher: Flag.String("teacher").pipe(Flag.withDescription("Teacher for logit distillation: checkpoint folder or http(s):// URL(s), comma-separated"), Flag.optional),
    distillWeight: Flag.Finite("distill-weight").pipe(
      Flag.withDescription("w in loss = (1 - w) CE + w KL on assistant tokens; 1 replaces CE (default 0.5 with --teacher, else 0)"),
      Flag.optional
    ),
    topK: Flag.Int("top-k").pipe(Flag.withDescription("Teacher candidates per position (default: the full vocabulary in process, 20 remote)"), Flag.optional),
    ...supervisedFlags({ lr: 3e-4, batch: 8 })
  },
  Effect.fn("cli.sft")(function*(flags) {
    const { backend } = yield* cascade
    const source = Option.getOrUndefined(flags.teacher)
    const teacher = source === undefined
      ? Layer.empty
      : yield* teacherLayer(source, { topK: Option.getOrUndefined(flags.topK), data: flags.data, seq: flags.seq, studentDir: flags.model })
    const progress = Progress.bar("sft", flags.steps)
    const state = yield* sft({
      ...supervisedOptions(flags),
      modelDir: flags.model,
      data: flags.data,
      documentMask: flags.documentMask,
      distillWeight: Option.getOrElse(flags.distillWeight, () => (source === undefined ? 0 : 0.5)),
      onStep: (m) =>
        progress.update(m.step, `loss ${m.loss.toFixed(4)} ce ${m.ce.toFixed(4)}${m.kl === undefined ? "" : ` kl ${m.kl.toFixed(4)}`} ${m.tokens_per_s.toFixed(0)} tok/s`)
    }).pipe(
      Effect.ensuring(Effect.sync(progress.finish)),
      Effect.scoped,
      TensorCoreMatMul.withPrecision(Option.getOrUndefined(flags.precision)),
      Effect.provide(Layer.provideMerge(teacher, TensorBackend.layer(Option.getOrUndefined(backend))))
    )
    yield* Console.log(`fine-tuned ${state.step} steps -> ${flags.out}`)
  })
).pipe(Command.withDescription("Supervised fine-tuning on chat data, loss on assistant tokens, optional logit distillation (metrics.jsonl, atomic checkpoints, --resume)"))
