/** `cascade teacher-cache`: a teacher's top-k over a data set, computed once for every distillation run. */
import { Console, Effect, Option } from "effect"
import { Command, Flag } from "effect/cli"
import * as Teacher from "../../layers/Teacher.ts"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { writeCache } from "../../stages/TeacherCache.ts"
import * as Tokenizer from "../io/Tokenizer.ts"
import * as Progress from "./Progress.ts"
import { cascade } from "./root.ts"

export const teacherCacheCommand = Command.make(
  "teacher-cache",
  {
    teacher: Flag.String("teacher").pipe(Flag.withDescription("Teacher checkpoint folder")),
    data: Flag.String("data").pipe(Flag.withDescription(`JSONL file of {"text"} or {"input_ids"} lines`)),
    topK: Flag.Int("top-k").pipe(Flag.withDescription("Most likely next tokens kept per position")),
    out: Flag.String("out").pipe(Flag.withDescription("Folder for the shards and manifest.json")),
    seq: Flag.Int("seq").pipe(Flag.withDescription("Packed sequence length (the training's)"), Flag.withDefault(256)),
    samples: Flag.Int("samples").pipe(Flag.withDescription("Packed rows to cache (default: all)"), Flag.optional),
    batch: Flag.Int("batch").pipe(Flag.withDescription("Rows per forward pass"), Flag.withDefault(4))
  },
  Effect.fn("cli.teacherCache")(function*({ teacher, data, topK, out, seq, samples, batch }) {
    const { backend } = yield* cascade
    const progress = Progress.bar("caching", Option.getOrUndefined(samples))
    const manifest = yield* Effect.gen(function*() {
      return yield* writeCache({
        teacherDir: teacher,
        data,
        out,
        seq,
        topK,
        samples: Option.getOrUndefined(samples),
        batchSize: batch,
        tokenizer: yield* Tokenizer.loadIfPresent(teacher),
        onProgress: ({ rows }) => progress.update(rows)
      })
    }).pipe(
      Effect.ensuring(Effect.sync(progress.finish)),
      Effect.provide(Teacher.inProcess(teacher, { topK })),
      Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend)))
    )
    yield* Console.log(`cached the top-${manifest.topK} of ${manifest.rows} rows of ${manifest.seq} in ${manifest.shards} shard${manifest.shards === 1 ? "" : "s"} -> ${out}`)
  })
).pipe(Command.withDescription("Run a teacher over a data set and save its top-k log-probs for distillation (resumable)"))
