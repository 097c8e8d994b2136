/**
 * The `PairwisePreference` service (src/rewards/Preference.ts) from a folder `cascade pwrm train` wrote: its
 * backbone and head run in this process, symmetrised and at the temperature fitted when it was trained.
 */
import { Effect, Layer } from "effect"
import * as path from "node:path"
import * as Checkpoint from "../src/io/Checkpoint.ts"
import * as Files from "../src/io/Files.ts"
import { PairwisePreference, PreferenceError } from "../src/rewards/Preference.ts"
import * as Pwrm from "../src/rewards/Pwrm.ts"
import { TensorBackend } from "./TensorBackend.ts"

export const fromPwrm = (dir: string) =>
  Layer.effect(
    PairwisePreference,
    Effect.gen(function*() {
      yield* TensorBackend // the model's tensors live on it
      const pwrm = yield* Pwrm.load(dir)
      const files = yield* Effect.forEach([Pwrm.headFile, Pwrm.cardFile], (file) => Files.sha256(path.join(dir, file)))
      return PairwisePreference.of({
        describe: `pwrm ${[yield* Checkpoint.fingerprint(dir), ...files].join(":")}`,
        probability: (prompt, a, b) =>
          Effect.tryPromise({
            try: async () => (await Pwrm.probabilities(pwrm, [{ prompt, a, b }]))[0],
            catch: (cause) => new PreferenceError({ reason: `${dir}: ${String(cause)}` })
          })
      })
    })
  )
