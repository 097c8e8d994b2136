/**
 * Pairwise preference: the probability that response A beats response B for a prompt, as a
 * pairwise reward model (PWRM) gives it, order-symmetrised and calibrated. Online DPO consumes it
 * as a soft label; layers/ provide it from a trained PWRM.
 */
import { Context, Schema, type Effect } from "effect"

export class PreferenceError extends Schema.TaggedError<PreferenceError>()("PreferenceError", {
  reason: Schema.String
}) {
  override get message() {
    return `pairwise reward model: ${this.reason}`
  }
}

export class PairwisePreference extends Context.Service<PairwisePreference, {
  /** P(A beats B) in [0, 1], with P(A, B) = 1 - P(B, A). */
  readonly probability: (prompt: string, a: string, b: string) => Effect.Effect<number, PreferenceError>
  /** Which model gives the probabilities: a run labelled by another is another run. */
  readonly describe: string
}>()("cascade/PairwisePreference") {}
