/** `cascade distill`: forward-KL distillation of a student from a teacher checkpoint, cache or server. */
import { Console, Effect, Layer, Option } from "effect"
import { Command, Flag } from "effect/cli"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import * as Teacher from "../../layers/Teacher.ts"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { distill } from "../../stages/Distill.ts"
import * as TeacherCacheFormat from "../io/TeacherCacheFormat.ts"
import * as Tokenizer from "../io/Tokenizer.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import * as Config from "../model/Config.ts"
import * as Progress from "./Progress.ts"
import { supervisedFlags, supervisedOptions } from "./TrainingFlags.ts"
import { cascade } from "./root.ts"

/**
 * The teacher layer SOURCE names: `http(s)://` URLs (comma-separated) of vLLM-compatible servers,
 * a folder written by `cascade teacher-cache`, or a checkpoint folder run in this process.
 */
export const teacherLayer = (
  source: string,
  options: { readonly topK: number | undefined; readonly data: string; readonly seq: number; readonly studentDir: string }
) =>
  Effect.gen(function*() {
    if (/^https?:\/\//.test(source)) {
      return Teacher.remote(source.split(","), { topK: options.topK ?? 20 })
    }
    const isCache = yield* Effect.promise(() => fs.access(path.join(source, TeacherCacheFormat.manifestName)).then(() => true, () => false))
    if (isCache) {
      const tokenizerHash = yield* TeacherCacheFormat.tokenizerHash(options.studentDir)
      return Teacher.offlineCache(source, { data: options.data, seq: options.seq, tokenizerHash })
    }
    return Teacher.inProcess(source, { topK: options.topK })
  })

export const distillCommand = Command.make(
  "distill",
  {
    student: Flag.String("student").pipe(Flag.withDescription("Student checkpoint folder (e.g. a pruned model)")),
    teacher: Flag.String("teacher").pipe(Flag.withDescription("Teacher: checkpoint folder, teacher-cache folder, or http(s):// URL(s), comma-separated")),
    data: Flag.String("data").pipe(Flag.withDescription(`JSONL file of {"text"} or {"input_ids"} lines`)),
    out: Flag.String("out").pipe(Flag.withDescription("Folder for metrics.jsonl, checkpoints and the distilled model")),
    seq: Flag.Int("seq").pipe(Flag.withDescription("Packed sequence length"), Flag.withDefault(256)),
    steps: Flag.Int("steps").pipe(Flag.withDescription("Optimizer steps")),
    topK: Flag.Int("top-k").pipe(Flag.withDescription("Teacher candidates per position (default: the full vocabulary in process, 20 remote)"), Flag.optional),
    temperature: Flag.Finite("temperature").pipe(Flag.withDefault(1)),
    ceWeight: Flag.Finite("ce-weight").pipe(Flag.withDescription("Weight of the next-token cross-entropy added to the KL (ablation)"), Flag.withDefault(0)),
    restBucket: Flag.Boolean("rest-bucket").pipe(Flag.withDescription("Top-k: match the teacher's remaining mass as one more category"), Flag.withDefault(false)),
    yarnFactor: Flag.Finite("yarn-factor").pipe(Flag.withDescription("Long-context phase: switch the student's RoPE to YaRN with this factor"), Flag.optional),
    originalMax: Flag.Int("original-max").pipe(Flag.withDescription("Long-context phase: the context YaRN stretches (default: --seq / factor)"), Flag.optional),
    scalingBeta: Flag.Finite("scaling-beta").pipe(
      Flag.withDescription("Long-context phase: Ministral 3's query scaling 1 + B ln(1 + floor(pos / original max)) (default 0.1, as released; 0 turns it off)"),
      Flag.withDefault(Config.defaultScalingBeta)
    ),
    ...supervisedFlags({ lr: 1e-3, batch: 4 })
  },
  Effect.fn("cli.distill")(function*(flags) {
    const { backend } = yield* cascade
    const topK = Option.getOrUndefined(flags.topK)
    const yarnFactor = Option.getOrUndefined(flags.yarnFactor)
    const progress = Progress.bar("distilling", flags.steps)
    const teacher = yield* teacherLayer(flags.teacher, { topK, data: flags.data, seq: flags.seq, studentDir: flags.student })
    const state = yield* Effect.gen(function*() {
      return yield* distill({
        ...supervisedOptions(flags),
        studentDir: flags.student,
        data: flags.data,
        documentMask: flags.documentMask,
        loss: { temperature: flags.temperature, crossEntropyWeight: flags.ceWeight, restBucket: flags.restBucket, maxOutsideMass: 1e-3 },
        yarn: yarnFactor === undefined
          ? undefined
          : {
            factor: yarnFactor,
            originalMax: Option.getOrElse(flags.originalMax, () => Math.round(flags.seq / yarnFactor)),
            scalingBeta: flags.scalingBeta
          },
        tokenizer: yield* Tokenizer.loadIfPresent(flags.student),
        onStep: (m) => progress.update(m.step, `loss ${m.loss.toFixed(4)} lr ${m.lr.toExponential(2)} ${m.tokens_per_s.toFixed(0)} tok/s`)
      })
    }).pipe(
      Effect.ensuring(Effect.sync(progress.finish)),
      Effect.scoped,
      TensorCoreMatMul.withPrecision(Option.getOrUndefined(flags.precision)),
      Effect.provide(Layer.provideMerge(teacher, TensorBackend.layer(Option.getOrUndefined(backend))))
    )
    yield* Console.log(`distilled ${state.step} steps -> ${flags.out}`)
  })
).pipe(Command.withDescription("Distill a student from a teacher with forward KL (metrics.jsonl, atomic checkpoints, --resume)"))
