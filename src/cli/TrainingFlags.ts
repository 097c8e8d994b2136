/** The flags every supervised training command (distill, sft) shares, and the options they become. */
import { Option } from "effect"
import { Flag } from "effect/cli"
import type { SupervisedOptions } from "../Training.ts"

/** Optimisation, data order and checkpoint flags, with the command's own learning-rate and batch defaults. */
export const supervisedFlags = (defaults: { readonly lr: number; readonly batch: number }) => ({
  seed: Flag.Int("seed").pipe(Flag.withDescription("Seed of the data order"), Flag.withDefault(0)),
  lr: Flag.Finite("lr").pipe(Flag.withDescription("Peak learning rate"), Flag.withDefault(defaults.lr)),
  minLr: Flag.Finite("min-lr").pipe(Flag.withDescription("Learning rate at the end of the cosine (default lr/10)"), Flag.optional),
  warmup: Flag.Int("warmup").pipe(Flag.withDescription("Warmup steps (default steps/10)"), Flag.optional),
  batch: Flag.Int("batch").pipe(Flag.withDescription("Rows per micro-batch"), Flag.withDefault(defaults.batch)),
  accumulate: Flag.Int("accumulate").pipe(Flag.withDescription("Micro-batches per step"), Flag.withDefault(1)),
  weightDecay: Flag.Finite("weight-decay").pipe(Flag.withDefault(0.01)),
  maxGradNorm: Flag.Finite("max-grad-norm").pipe(Flag.withDescription("Global gradient norm clip (0: none)"), Flag.withDefault(1)),
  saveEvery: Flag.Int("save-every").pipe(Flag.withDescription("Checkpoint every N steps"), Flag.withDefault(50)),
  resume: Flag.Boolean("resume").pipe(Flag.withDescription("Continue the run in OUT from its last checkpoint"), Flag.withDefault(false))
})

/** The parsed flags as the stage's options. */
export const supervisedOptions = (flags: {
  readonly out: string
  readonly seq: number
  readonly steps: number
  readonly seed: number
  readonly lr: number
  readonly minLr: Option.Option<number>
  readonly warmup: Option.Option<number>
  readonly batch: number
  readonly accumulate: number
  readonly weightDecay: number
  readonly maxGradNorm: number
  readonly saveEvery: number
  readonly resume: boolean
}): SupervisedOptions => ({
  out: flags.out,
  seq: flags.seq,
  steps: flags.steps,
  seed: flags.seed,
  batch: flags.batch,
  accumulate: flags.accumulate,
  learningRate: flags.lr,
  minLearningRate: Option.getOrElse(flags.minLr, () => flags.lr / 10),
  warmupSteps: Option.getOrElse(flags.warmup, () => Math.floor(flags.steps / 10)),
  weightDecay: flags.weightDecay,
  maxGradNorm: flags.maxGradNorm > 0 ? flags.maxGradNorm : undefined,
  saveEvery: flags.saveEvery,
  resume: flags.resume
})
