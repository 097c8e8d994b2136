/** `cascade prune`: a smaller checkpoint of the same architecture from a parent and its statistics. */
import { Console, Effect, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { TensorBackend } from "../../layers/TensorBackend.ts"
import { defaultTieFrom, tieRules } from "../prune/Pruning.ts"
import { prune } from "../../stages/Prune.ts"
import { cascade } from "./root.ts"
import { dtypeFlag } from "./TrainingFlags.ts"

export const pruneCommand = Command.make(
  "prune",
  {
    model: Flag.String("model").pipe(Flag.withDescription("Parent checkpoint folder")),
    stats: Flag.String("stats").pipe(Flag.withDescription("Folder written by cascade calibrate for this parent")),
    out: Flag.String("out").pipe(Flag.withDescription("Folder for the pruned checkpoint and prune-report.json")),
    layers: Flag.Int("layers").pipe(Flag.withDescription("Layers to keep (default: all)"), Flag.optional),
    hidden: Flag.Int("hidden").pipe(Flag.withDescription("Hidden size to keep (default: unchanged)"), Flag.optional),
    ffn: Flag.Int("ffn").pipe(Flag.withDescription("FFN neurons per layer to keep (default: all)"), Flag.optional),
    tieEmbeddings: Flag.Boolean("tie-embeddings").pipe(
      Flag.withDescription("Make lm_head the input embedding (approximate when the width is rotated)"),
      Flag.withDefault(false)
    ),
    tieFrom: Flag.Literals("tie-from", tieRules).pipe(
      Flag.withDescription(`How a tied child's matrix is formed with --tie-embeddings (default ${defaultTieFrom}; see src/prune/Pruning.ts)`),
      Flag.optional
    ),
    randomSeed: Flag.Int("random").pipe(
      Flag.withDescription("Choose what to keep at random with this seed instead of by scores (a baseline)"),
      Flag.optional
    ),
    dtype: dtypeFlag
  },
  Effect.fn("cli.prune")(function*({ model, stats, out, layers, hidden, ffn, tieEmbeddings, tieFrom, randomSeed, dtype }) {
    const { backend } = yield* cascade
    const report = yield* prune({
      modelDir: model,
      statsDir: stats,
      out,
      targets: {
        layers: Option.getOrUndefined(layers),
        hidden: Option.getOrUndefined(hidden),
        ffn: Option.getOrUndefined(ffn),
        tieEmbeddings: tieEmbeddings || undefined,
        tieFrom: Option.getOrUndefined(tieFrom)
      },
      selection: Option.match(randomSeed, { onNone: () => ({ kind: "scores" }), onSome: (seed) => ({ kind: "random", seed }) }),
      dtype: Option.getOrUndefined(dtype)
    }).pipe(Effect.scoped, Effect.provide(TensorBackend.layer(Option.getOrUndefined(backend))))
    const { parent, child } = report
    yield* Console.log(
      `pruned ${parent.parameters} -> ${child.parameters} parameters (layers ${parent.layers}->${child.layers}, hidden ${parent.hidden}->${child.hidden}, ffn ${parent.ffn}->${child.ffn})${report.hidden ? `, explained variance ${report.hidden.explainedVariance.toFixed(4)}` : ""} -> ${out}`
    )
  })
).pipe(Command.withDescription("Prune layers, hidden width (one PCA rotation) and FFN neurons into an ordinary checkpoint"))
