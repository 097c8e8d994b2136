/**
 * Teacher logits for distillation, as one service with interchangeable sources (layers/Teacher.ts):
 * a model in this process, an offline top-k cache, or a remote vLLM-compatible server. Each turns a
 * stream of training batches into the same stream annotated with the teacher's next-token
 * distribution at every position, pulling ahead by a bounded number of batches (backpressure).
 */
import * as tf from "@tensorflow/tfjs"
import { Context, Schema, type Stream } from "effect"
import type { PackedRow } from "../data/Dataset.ts"
import type * as Loss from "./Loss.ts"

/**
 * A training batch: packed rows and their indices in the packed data set (what a cache is keyed by),
 * and whether the student reads the rows document-masked: the teacher must read them so too, or its
 * distributions are for another context.
 */
export interface Batch {
  readonly rows: ReadonlyArray<PackedRow>
  readonly indices: ReadonlyArray<number>
  /** Each document of a row on its own (attention and RoPE positions restart at its start); false when left out. */
  readonly documentMask?: boolean
}

/**
 * The teacher's log-probabilities of the token after each position of each row, row-major [B, T, *]:
 * over the full vocabulary, or its top-k ids (largest first) with their log-probabilities.
 * Padding positions hold zeros and are never read.
 */
export type Output =
  | { readonly _tag: "Full"; readonly vocab: number; readonly logProbs: Float32Array }
  | { readonly _tag: "TopK"; readonly k: number; readonly ids: Int32Array; readonly logProbs: Float32Array }

export interface Annotated {
  readonly batch: Batch
  readonly teacher: Output
}

/** A teacher that could not answer: the source, what was asked, and why. */
export class TeacherError extends Schema.TaggedError<TeacherError>()("TeacherError", {
  source: Schema.String,
  request: Schema.optional(Schema.String),
  reason: Schema.String
}) {
  override get message() {
    return `teacher ${this.source}: ${this.reason}${this.request === undefined ? "" : ` (request: ${this.request})`}`
  }
}

export class Teacher extends Context.Service<Teacher, {
  /** Names the source and what identifies it (teacher config hash, cache folder, URLs). */
  readonly describe: string
  /** The teacher's vocabulary size, when the source knows it. */
  readonly vocab: number | undefined
  readonly annotate: <E, R>(batches: Stream.Stream<Batch, E, R>) => Stream.Stream<Annotated, E | TeacherError, R>
}>()("cascade/Teacher") {}

/** The output as the loss consumes it: tensors of shape [B, T, *], the caller's to dispose. */
export const toLossTeacher = (output: Output, b: number, t: number): Loss.Teacher =>
  output._tag === "Full"
    ? { _tag: "Full", logProbs: tf.tensor3d(output.logProbs, [b, t, output.vocab]) }
    : {
      _tag: "TopK",
      ids: tf.tensor3d(output.ids, [b, t, output.k], "int32"),
      logProbs: tf.tensor3d(output.logProbs, [b, t, output.k])
    }
