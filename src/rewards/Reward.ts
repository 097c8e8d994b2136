/**
 * Rewards for reinforcement learning (GRPO) as one service with interchangeable sources
 * (layers/Rewards.ts): verifiers that check an answer, run code against tests, or check a format,
 * and an LLM judge that checks a response against each atomic item of a rubric.
 *
 * A source that cannot reach a verdict (a judge that timed out or answered nonsense after its
 * retries) says so: the score has no reward, which callers leave out, never count as a miss.
 */
import { Context, Schema, type Effect } from "effect"

/** What a prompt's response is checked against. */
export type Task =
  /** The final answer, after normalisation, equals `answer` as a number. */
  | { readonly kind: "numeric"; readonly answer: string }
  /** The final answer, its text before a newline with whitespace collapsed, is `answer` ("red", "yes"). */
  | { readonly kind: "exact"; readonly answer: string }
  /** The response matches the regular expression `pattern` (e.g. a required answer format). */
  | { readonly kind: "format"; readonly pattern: string }
  /** The response holds a JavaScript function `entry` that passes `tests` (JS code that throws on failure). */
  | { readonly kind: "code"; readonly entry: string; readonly tests: string }
  /** An LLM judge checks each atomic rubric item; the reward is the share satisfied. */
  | { readonly kind: "rubric"; readonly items: ReadonlyArray<string> }

export interface Sample {
  readonly prompt: string
  /** The policy's response, thinking included: sources strip `[THINK] ... [/THINK]` where they must. */
  readonly response: string
  readonly task: Task
}

export interface Score {
  /** In [0, 1]; undefined when no verdict could be reached. */
  readonly reward: number | undefined
  /** Per check (test, rubric item): passed, failed, or no verdict with the reason. */
  readonly checks: ReadonlyArray<{ readonly name: string; readonly passed: boolean | undefined; readonly note?: string }>
}

export class RewardError extends Schema.TaggedError<RewardError>()("RewardError", {
  source: Schema.String,
  reason: Schema.String
}) {
  override get message() {
    return `reward ${this.source}: ${this.reason}`
  }
}

export class Rewards extends Context.Service<Rewards, {
  readonly score: (sample: Sample) => Effect.Effect<Score, RewardError>
  /** What scores the samples (the verifiers, which judge): a run scored by another is another run. */
  readonly describe: string
}>()("cascade/Rewards") {}
