/** The flags the training commands (distill, sft, pwrm train, grpo, odpo) share, and the options they become; `--dtype` also serves prune. */
import { Option } from "effect"
import { Flag } from "effect/cli"
import { type DtypeName, dtypeNames } from "../io/Pretrained.ts"
import type { FloatDtype } from "../io/Safetensors.ts"
import { documentMaskByDefault } from "../data/Dataset.ts"
import type { SupervisedOptions } from "../train/Training.ts"
import { Precision } from "../gpu/TensorCoreMatMul.ts"

/**
 * `--dtype` of the commands that write a model (prune, distill, sft, grpo, odpo): what its weights are
 * stored in; by default the dtype of the model they start from. float32 keeps what a bf16 parent
 * cannot hold, such as a full-width rotation of it.
 */
export const dtypeFlag = Flag.ChoiceWithValue("dtype", Object.entries(dtypeNames) as Array<[DtypeName, FloatDtype]>).pipe(
  Flag.withDescription("Dtype of the written model: float32, bfloat16 or float16 (default: the starting model's)"),
  Flag.optional
)

/**
 * `--precision` of the commands that train (and of the pipelines): the products of the model and of
 * its gradients on the GPU's tensor cores in f16 with f32 accumulation, or all in fp32. Unset, mixed
 * where the GPU has f16 subgroup matrices, fp32 elsewhere (every CPU backend).
 */
export const precisionFlag = Flag.Literals("precision", Precision.literals).pipe(
  Flag.withDescription("Products in fp32, or mixed: f16 on the GPU's tensor cores with f32 accumulation (default: mixed where the GPU has them, else fp32)"),
  Flag.optional
)

/** Weight decay, clipping, seed and checkpoint flags, with the defaults and the seed's meaning of the command's kind. */
const runFlags = (kind: { readonly weightDecay: number; readonly seed: string; readonly saveEvery: number }) => ({
  weightDecay: Flag.Finite("weight-decay").pipe(Flag.withDefault(kind.weightDecay)),
  maxGradNorm: Flag.Finite("max-grad-norm").pipe(Flag.withDescription("Global gradient norm clip (0: none)"), Flag.withDefault(1)),
  seed: Flag.Int("seed").pipe(Flag.withDescription(kind.seed), Flag.withDefault(0)),
  saveEvery: Flag.Int("save-every").pipe(Flag.withDescription("Checkpoint every N steps"), Flag.withDefault(kind.saveEvery)),
  resume: Flag.Boolean("resume").pipe(Flag.withDescription("Continue the run in OUT from its last checkpoint"), Flag.withDefault(false)),
  precision: precisionFlag
})

/** The commands that train on their own samples (grpo, odpo): a constant learning rate; the seed also seeds the sampling. */
export const onPolicyFlags = {
  lr: Flag.Finite("lr").pipe(Flag.withDescription("Learning rate (constant)"), Flag.withDefault(1e-5)),
  dtype: dtypeFlag,
  ...runFlags({ weightDecay: 0, seed: "Seed of the prompt order and the sampling", saveEvery: 20 })
}

/** The learning rate of the commands that warm up then follow a cosine (pwrm train, distill, sft). */
export const peakLearningRate = (lr: number) => Flag.Finite("lr").pipe(Flag.withDescription("Peak learning rate"), Flag.withDefault(lr))

export const warmup = Flag.Int("warmup").pipe(Flag.withDescription("Warmup steps (default steps/10)"), Flag.optional)

/** The run flags of the commands that train on a data set (pwrm train, distill, sft). */
export const dataSetRunFlags = runFlags({ weightDecay: 0.01, seed: "Seed of the data order", saveEvery: 50 })

/** Distill and sft: the schedule's flags, gradient accumulation and the run flags, with the command's own learning-rate and batch defaults. */
/** An integer flag that must be at least `least`. */
export const atLeast = (name: string, least: number) =>
  Flag.Int(name).pipe(Flag.filter((value) => value >= least, (value) => `--${name} must be at least ${least}, not ${value}`))

export const supervisedFlags = (defaults: { readonly lr: number; readonly batch: number }) => ({
  lr: peakLearningRate(defaults.lr),
  minLr: Flag.Finite("min-lr").pipe(Flag.withDescription("Learning rate at the end of the cosine (default lr/10)"), Flag.optional),
  warmup,
  batch: Flag.Int("batch").pipe(Flag.withDescription("Rows per micro-batch"), Flag.withDefault(defaults.batch)),
  accumulate: Flag.Int("accumulate").pipe(Flag.withDescription("Micro-batches per step"), Flag.withDefault(1)),
  dtype: dtypeFlag,
  documentMask: Flag.Boolean("document-mask").pipe(
    Flag.withDescription("Each document of a packed row attends only to itself, positions from 0, for model and teacher (--no-document-mask: rows read whole)"),
    Flag.withDefault(documentMaskByDefault)
  ),
  headChunk: atLeast("head-chunk", 1).pipe(
    Flag.withDescription("Apply the LM head and the loss this many tokens at a time, never holding a micro-batch's whole logits (less memory; equal up to rounding)"),
    Flag.optional
  ),
  ...dataSetRunFlags
})

/** The parsed flags every training command has. */
interface TrainingFlagValues {
  readonly lr: number
  readonly weightDecay: number
  readonly maxGradNorm: number
  readonly seed: number
  readonly saveEvery: number
  readonly resume: boolean
}

/** The options every training stage takes from the flags every training command has. */
export const trainingOptions = (flags: TrainingFlagValues) => ({
  seed: flags.seed,
  learningRate: flags.lr,
  weightDecay: flags.weightDecay,
  maxGradNorm: flags.maxGradNorm > 0 ? flags.maxGradNorm : undefined,
  saveEvery: flags.saveEvery,
  resume: flags.resume
})

export const warmupSteps = (flags: { readonly warmup: Option.Option<number>; readonly steps: number }) =>
  Option.getOrElse(flags.warmup, () => Math.floor(flags.steps / 10))

/** The parsed flags of distill and sft as the stage's options. */
export const supervisedOptions = (flags: TrainingFlagValues & {
  readonly out: string
  readonly seq: number
  readonly steps: number
  readonly minLr: Option.Option<number>
  readonly warmup: Option.Option<number>
  readonly batch: number
  readonly accumulate: number
  readonly dtype: Option.Option<FloatDtype>
  readonly headChunk: Option.Option<number>
}): SupervisedOptions & { readonly dtype: FloatDtype | undefined } => ({
  ...trainingOptions(flags),
  out: flags.out,
  seq: flags.seq,
  steps: flags.steps,
  batch: flags.batch,
  accumulate: flags.accumulate,
  minLearningRate: Option.getOrElse(flags.minLr, () => flags.lr / 10),
  warmupSteps: warmupSteps(flags),
  dtype: Option.getOrUndefined(flags.dtype),
  headChunk: Option.getOrUndefined(flags.headChunk)
})
