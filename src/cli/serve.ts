/** `cascade serve`: an OpenAI-compatible HTTP API over a model folder, until interrupted (Ctrl-C). */
import { Console, Context, Effect, Layer, Option, Schema } from "effect"
import { Command, Flag } from "effect/cli"
import { HttpServer } from "effect/http"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import * as Pretrained from "../io/Pretrained.ts"
import * as Server from "../serve/Server.ts"
import * as ImageSide from "../data/ImageSide.ts"
import * as Tokenizer from "../io/Tokenizer.ts"
import { cascade } from "./root.ts"
import { atLeast } from "./TrainingFlags.ts"

/** The address is taken or cannot be bound. */
class ListenError extends Schema.TaggedError<ListenError>()("ListenError", {
  address: Schema.String,
  reason: Schema.String
}) {
  override get message() {
    return `cannot listen on ${this.address}: ${this.reason}`
  }
}

export const serveCommand = Command.make(
  "serve",
  {
    model: Flag.String("model").pipe(Flag.withDescription("Hugging Face checkpoint folder; without a tokenizer.json it serves token-id prompts only")),
    host: Flag.String("host").pipe(Flag.withDescription("Address to listen on (default 127.0.0.1)"), Flag.withDefault("127.0.0.1")),
    port: Flag.Int("port").pipe(Flag.withDescription("Port to listen on (default 8000; 0: any free port)"), Flag.withDefault(8000)),
    maxLogprobs: Flag.Int("max-logprobs").pipe(
      Flag.withDescription("Largest logprobs / prompt_logprobs a request may ask for (vLLM's default 20; the vocabulary size serves full distributions)"),
      Flag.withDefault(20)
    ),
    maxBatch: atLeast("max-batch", 1).pipe(
      Flag.withDescription(`Sequences decoded together at most, samples of every request counted (default ${Server.defaultLimits.maxBatch}); also the largest n`),
      Flag.withDefault(Server.defaultLimits.maxBatch)
    ),
    maxQueue: atLeast("max-queue", 0).pipe(
      Flag.withDescription(`Requests waiting for a place in the batch at most; more get a 429 with Retry-After (default ${Server.defaultLimits.maxQueue})`),
      Flag.withDefault(Server.defaultLimits.maxQueue)
    ),
    requestTimeout: atLeast("request-timeout", 1).pipe(
      Flag.withDescription(`Seconds a request may take, waiting included, before a 408 (default ${Server.defaultLimits.requestTimeout})`),
      Flag.withDefault(Server.defaultLimits.requestTimeout)
    )
  },
  Effect.fn("cli.serve")(function*({ model, host, port, maxLogprobs, maxBatch, maxQueue, requestTimeout }) {
    const { backend } = yield* cascade
    yield* Effect.gen(function*() {
      const tokenizer = yield* Tokenizer.loadIfPresent(model)
      const served = { model: yield* Pretrained.load(model), tokenizer, name: model, maxLogprobs, images: yield* ImageSide.of(model, tokenizer) }
      const services = yield* Layer.build(Server.layer(served, { host, port, maxBatch, maxQueue, requestTimeout })).pipe(
        Effect.mapError(({ cause }) =>
          new ListenError({ address: `${host}:${port}`, reason: cause instanceof Error ? cause.message : String(cause) })
        )
      )
      const address = HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)
      const tokenIdsOnly = served.tokenizer === undefined ? " (no tokenizer.json: token-id prompts only)" : ""
      yield* Console.log(`Serving ${model} at ${address}/v1${tokenIdsOnly}`)
      return yield* Effect.never
    }).pipe(Effect.scoped, Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend))))
  })
).pipe(Command.withDescription("Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"))
