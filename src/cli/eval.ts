/** `cascade eval`: next-token NLL and perplexity of a model over a JSONL file. */
import { Console, Effect, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { evaluate } from "../../stages/Evaluate.ts"
import * as ImageSide from "../data/ImageSide.ts"
import * as Dataset from "../data/Dataset.ts"
import * as Pretrained from "../io/Pretrained.ts"
import * as Tokenizer from "../io/Tokenizer.ts"
import { cascade } from "./root.ts"

export const evalCommand = Command.make(
  "eval",
  {
    model: Flag.String("model").pipe(Flag.withDescription("Hugging Face checkpoint folder")),
    data: Flag.String("data").pipe(
      Flag.withDescription(`JSONL file, one {"input_ids": [...]} or {"text": "..."} per line, with "images": [files] for a Mistral 3 model (one per [IMG] placeholder)`)
    ),
    json: Flag.Boolean("json").pipe(Flag.withDescription("Print one JSON line {tokens, nll, ppl}"), Flag.withDefault(false)),
    batch: Flag.Int("batch").pipe(Flag.withDescription("Sequences per forward pass"), Flag.withDefault(8))
  },
  Effect.fn("cli.eval")(function*({ model, data, json, batch }) {
    const { backend } = yield* cascade
    const result = yield* Effect.gen(function*() {
      const loaded = yield* Pretrained.load(model)
      const tokenizer = yield* Tokenizer.loadIfPresent(model)
      const sequences = Dataset.sequences(data, { vocabSize: loaded.config.vocabSize, tokenizer })
      return yield* evaluate(loaded, sequences, { batchSize: batch, file: data, images: yield* ImageSide.of(model, tokenizer) })
    }).pipe(Effect.scoped, Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend))))
    yield* Console.log(
      json
        ? JSON.stringify(result)
        : `tokens ${result.tokens}\nnll    ${result.nll.toFixed(6)} nats/token\nppl    ${result.ppl.toFixed(4)}`
    )
  })
).pipe(Command.withDescription("Mean next-token negative log-likelihood and perplexity of a model over a dataset"))
