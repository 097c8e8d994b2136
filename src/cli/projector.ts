/** `cascade projector`: the projector-only step, a Mistral 3 child's projector trained against its teacher on image prompts. */
import { Console, Effect, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { defaultBatch, trainProjector } from "../../stages/ProjectorTrain.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import { precisionFlag } from "./TrainingFlags.ts"
import { cascade } from "./root.ts"

export const projectorCommand = Command.make(
  "projector",
  {
    student: Flag.String("student").pipe(Flag.withDescription("The child: a Mistral 3 checkpoint folder whose projector is trained")),
    teacher: Flag.String("teacher").pipe(Flag.withDescription("The teacher seeing the same images: a Mistral 3 checkpoint folder (the parent)")),
    data: Flag.String("data").pipe(Flag.withDescription(`JSONL lines with images, as cascade eval reads them ({"input_ids": [...], "images": [files]})`)),
    out: Flag.String("out").pipe(Flag.withDescription("Output folder: the child with its new projector")),
    steps: Flag.Int("steps").pipe(Flag.withDescription("Updates, one batch each"), Flag.withDefault(100)),
    lr: Flag.Finite("lr").pipe(Flag.withDescription("Learning rate (AdamW, constant)"), Flag.withDefault(1e-2)),
    batch: Flag.Int("batch").pipe(Flag.withDescription("Lines per step, right-padded to one length"), Flag.withDefault(defaultBatch)),
    lines: Flag.Int("lines").pipe(Flag.withDescription("Train on the first N lines with images (default: all)"), Flag.optional),
    precision: precisionFlag
  },
  Effect.fn("cli.projector")(function*(flags) {
    const { backend } = yield* cascade
    const result = yield* trainProjector({ studentDir: flags.student, teacherDir: flags.teacher, data: flags.data, out: flags.out, steps: flags.steps, learningRate: flags.lr, batch: flags.batch, lines: Option.getOrUndefined(flags.lines) }).pipe(
      Effect.scoped,
      TensorCoreMatMul.withPrecision(Option.getOrUndefined(flags.precision)),
      Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend)))
    )
    yield* Console.log(`projector: ${result.steps} steps, KL to the teacher on image prompts ${result.klBefore.toFixed(4)} -> ${result.klAfter.toFixed(4)} -> ${flags.out}`)
  })
).pipe(Command.withDescription("Projector-only step: train a Mistral 3 child's projector (encoder and text model frozen) to match its teacher on image prompts"))
