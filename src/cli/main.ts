#!/usr/bin/env node
/**
 * The `cascade` command line. Every failure the engine knows (a bad checkpoint, config, data line
 * or backend) is printed as one line naming what to look at, and the process exits non-zero.
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Console, Effect } from "effect"
import { Command } from "effect/cli"
import { calibrateCommand } from "./calibrate.ts"
import { distillCommand } from "./distill.ts"
import { evalCommand } from "./eval.ts"
import { grpoCommand } from "./grpo.ts"
import { odpoCommand } from "./odpo.ts"
import { postTrainCommand } from "./post-train.ts"
import { projectorCommand } from "./projector.ts"
import { pruneCommand } from "./prune.ts"
import { pwrmCommand } from "./pwrm.ts"
import { cascade } from "./root.ts"
import { runCommand } from "./run.ts"
import { serveCommand } from "./serve.ts"
import { sftCommand } from "./sft.ts"
import { teacherCacheCommand } from "./teacher-cache.ts"

const version = "0.1.0"

const program = cascade.pipe(
  Command.withSubcommands([runCommand, evalCommand, calibrateCommand, pruneCommand, distillCommand, teacherCacheCommand, serveCommand, sftCommand, pwrmCommand, grpoCommand, odpoCommand, postTrainCommand, projectorCommand]),
  // The CLI module prints help; its parse errors, like ours, are printed here as one line.
  Command.run({ version, renderErrors: false }),
  Effect.catch((error) =>
    error._tag === "ShowHelp" || isCliError(error)
      ? Effect.andThen(
        error._tag === "ShowHelp" && error.errors.length > 0 ? Console.error(`cascade: ${error.errors.map((e) => e.message).join("; ")}`) : Effect.void,
        Effect.failSync(() => (process.exitCode = 2))
      )
      : Console.error(`cascade: ${error.message}`).pipe(Effect.andThen(Effect.failSync(() => (process.exitCode = 1))))
  ),
  Effect.provide(NodeServices.layer)
)

function isCliError(error: { readonly _tag: string }): boolean {
  return ["UnrecognizedOption", "DuplicateOption", "MissingOption", "MissingArgument", "InvalidValue", "UnknownSubcommand", "UserError"].includes(error._tag)
}

NodeRuntime.runMain(program, { disableErrorReporting: true })
