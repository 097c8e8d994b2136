/** The root command and the flags every subcommand shares. */
import { Flag, Command } from "effect/cli"
import { BackendName } from "../../layers/TensorBackend.ts"

export const cascade = Command.make("cascade").pipe(
  Command.withSharedFlags({
    backend: Flag.Literals("backend", BackendName.literals).pipe(
      Flag.withDescription("Tensor backend: wasm (default on CPU), cpu, webgpu, tensorflow. Also CASCADE_BACKEND."),
      Flag.optional
    )
  }),
  Command.withDescription("Prune, distill and post-train a family of smaller language models from a parent.")
)
