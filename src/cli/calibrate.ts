/** `cascade calibrate`: the statistics pruning ranks by, saved for reuse. */
import { Console, Effect, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { calibrate } from "../../stages/Calibrate.ts"
import * as Pretrained from "../io/Pretrained.ts"
import * as Tokenizer from "../io/Tokenizer.ts"
import * as Progress from "./Progress.ts"
import { cascade } from "./root.ts"

export const calibrateCommand = Command.make(
  "calibrate",
  {
    model: Flag.String("model").pipe(Flag.withDescription("Parent checkpoint folder")),
    data: Flag.String("data").pipe(Flag.withDescription(`JSONL file of {"text"} or {"input_ids"} lines`)),
    out: Flag.String("out").pipe(Flag.withDescription("Folder for statistics.safetensors and manifest.json")),
    seq: Flag.Int("seq").pipe(Flag.withDescription("Packed sequence length"), Flag.withDefault(256)),
    samples: Flag.Int("samples").pipe(Flag.withDescription("Packed rows to use (default: all)"), Flag.optional),
    batch: Flag.Int("batch").pipe(Flag.withDescription("Rows per forward pass"), Flag.withDefault(4))
  },
  Effect.fn("cli.calibrate")(function*({ model, data, out, seq, samples, batch }) {
    const { backend } = yield* cascade
    const progress = Progress.bar("calibrating", Option.getOrUndefined(samples))
    const { manifest } = yield* Effect.gen(function*() {
      const parent = yield* Pretrained.load(model)
      return yield* calibrate(parent, {
        modelDir: model,
        data,
        out,
        seq,
        samples: Option.getOrUndefined(samples),
        batchSize: batch,
        tokenizer: yield* Tokenizer.loadIfPresent(model),
        onProgress: ({ rows, tokens }) => progress.update(rows, `${tokens} tokens`)
      })
    }).pipe(Effect.ensuring(Effect.sync(progress.finish)), Effect.scoped, Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend))))
    yield* Console.log(`calibrated on ${manifest.tokens} tokens (${manifest.rows} rows of ${manifest.seq}) -> ${out}`)
  })
).pipe(Command.withDescription("Accumulate calibration statistics of a parent (layer scores, hidden second moment, FFN importance)"))
