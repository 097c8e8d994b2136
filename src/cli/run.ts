/** `cascade run CONFIG`: the whole cascade from a JSON or TypeScript config, resumable, ending with the report. */
import { Console, Effect, Option } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { pathToFileURL } from "node:url"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import * as Cascade from "../../stages/Cascade.ts"
import { ConfigError } from "../Errors.ts"
import * as TensorCoreMatMul from "../gpu/TensorCoreMatMul.ts"
import { precisionFlag } from "./TrainingFlags.ts"
import * as Progress from "./Progress.ts"
import { cascade } from "./root.ts"

/** A config file's object: JSON, or the default export of a .ts/.js module. */
const readConfig = (file: string) =>
  Effect.tryPromise({
    try: async (): Promise<unknown> =>
      /\.[cm]?[jt]s$/.test(file)
        ? (await import(pathToFileURL(path.resolve(file)).href)).default
        : JSON.parse(await fs.readFile(file, "utf8")),
    catch: (cause) => new ConfigError({ file, reason: `cannot be read (${String(cause)})` })
  })

/** Paths in a config are relative to the config file's folder. */
const resolvePaths = (config: Cascade.CascadeConfig, file: string): Cascade.CascadeConfig => {
  const at = (p: string) => path.resolve(path.dirname(file), p)
  const teacher = config.teacher === undefined || config.teacher === "root" || config.teacher === "previous" ? config.teacher : at(config.teacher)
  return {
    ...config,
    run: at(config.run),
    parent: at(config.parent),
    teacher,
    data: Object.fromEntries(Object.entries(config.data).map(([k, v]) => [k, v === undefined ? v : at(v)])) as Cascade.CascadeConfig["data"]
  }
}

export const runCommand = Command.make(
  "run",
  {
    config: Argument.String("config").pipe(Argument.withDescription("Cascade config: a .json file or a .ts module whose default export is the config")),
    run: Flag.String("run").pipe(Flag.withDescription("Run folder (default: the config's, suffixed by the ablation flags)"), Flag.optional),
    redo: Flag.Boolean("redo").pipe(Flag.withDescription("Start over instead of resuming the run folder"), Flag.withDefault(false)),
    precision: precisionFlag,
    ceWeight: Flag.Finite("ce-weight").pipe(Flag.withDescription("Ablation: add the next-token loss with this weight to the KL"), Flag.optional),
    teacher: Flag.String("teacher").pipe(Flag.withDescription("Ablation: root (default), previous, or a checkpoint folder"), Flag.optional),
    randomPruning: Flag.Int("random-pruning").pipe(Flag.withDescription("Ablation: prune at random with this seed instead of by scores"), Flag.optional)
  },
  Effect.fn("cli.run")(function*(flags) {
    const { backend } = yield* cascade
    const raw = yield* readConfig(flags.config)
    const decoded = yield* Cascade.decodeConfig(raw).pipe(
      Effect.mapError((error) => new ConfigError({ file: flags.config, reason: error.message.replace(/\s*\n\s*/g, "; ") }))
    )
    let config = resolvePaths(decoded, flags.config)
    const suffix: Array<string> = []
    Option.map(flags.ceWeight, (w) => {
      config = { ...config, short: { ...config.short, ceWeight: w }, long: config.long && { ...config.long, ceWeight: w } }
      suffix.push(`ce${w}`)
    })
    Option.map(flags.teacher, (t) => {
      config = { ...config, teacher: t === "root" || t === "previous" ? t : path.resolve(t) }
      suffix.push(`teacher-${path.basename(t)}`)
    })
    Option.map(flags.randomPruning, (seed) => {
      config = { ...config, randomPruning: seed }
      suffix.push(`random${seed}`)
    })
    config = { ...config, run: Option.getOrElse(Option.map(flags.run, (r) => path.resolve(r)), () => [config.run, ...suffix].join("-")) }
    if (flags.redo) yield* Effect.promise(() => fs.rm(config.run, { recursive: true, force: true }))

    const bars = new Map<string, Progress.Progress>()
    const rows = yield* Cascade.run(config, {
      onStep: (label, metrics, total) => {
        if (!bars.has(label)) bars.set(label, Progress.bar(label, total))
        const bar = bars.get(label)!
        bar.update(metrics.step, `kl ${metrics.kl.toFixed(4)} ${metrics.tokens_per_s.toFixed(0)} tok/s`)
        if (metrics.step === total) bar.finish()
      }
    }).pipe(TensorCoreMatMul.withPrecision(Option.getOrUndefined(flags.precision)), Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend))))
    yield* Console.log(`\n${Cascade.table(rows)}\n\nreport, plots and checkpoints: ${config.run}`)
  })
).pipe(Command.withDescription("Run a cascade (calibrate, prune, distill short, distill long, down a list of sizes) and print the retention report"))
