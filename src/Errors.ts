/**
 * Typed errors shared by the engine. Each names what a user must look at: the file,
 * the tensor or the line, so that the CLI can print one clear line.
 */
import { Schema } from "effect"

/** A checkpoint file that cannot be read as it claims: bad header, offsets, dtype, missing tensor. */
export class CheckpointError extends Schema.TaggedError<CheckpointError>()("CheckpointError", {
  file: Schema.String,
  tensor: Schema.optional(Schema.String),
  reason: Schema.String
}) {
  override get message() {
    return `${this.file}${this.tensor === undefined ? "" : ` (tensor ${this.tensor})`}: ${this.reason}`
  }
}

/** A config.json that is missing a field, has a wrong type, or disagrees with the weights. */
export class ConfigError extends Schema.TaggedError<ConfigError>()("ConfigError", {
  file: Schema.String,
  reason: Schema.String
}) {
  override get message() {
    return `${this.file}: ${this.reason}`
  }
}

/** A data file (JSONL) with a line that cannot be used. Lines count from 1. */
export class DataError extends Schema.TaggedError<DataError>()("DataError", {
  file: Schema.String,
  line: Schema.optional(Schema.Number),
  reason: Schema.String
}) {
  override get message() {
    return `${this.file}${this.line === undefined ? "" : `:${this.line}`}: ${this.reason}`
  }
}

/** A tokenizer.json or tokenizer_config.json that cannot be loaded or used. */
export class TokenizerError extends Schema.TaggedError<TokenizerError>()("TokenizerError", {
  file: Schema.String,
  reason: Schema.String
}) {
  override get message() {
    return `${this.file}: ${this.reason}`
  }
}

/** A tensor backend that cannot be started here, with what to install to get it. */
export class BackendUnavailable extends Schema.TaggedError<BackendUnavailable>()("BackendUnavailable", {
  backend: Schema.String,
  reason: Schema.String,
  remedy: Schema.String
}) {
  override get message() {
    return `backend ${this.backend} is unavailable: ${this.reason}. ${this.remedy}`
  }
}

/** A pruning request that cannot be met: targets out of range, statistics of another model, too little data. */
export class PruneError extends Schema.TaggedError<PruneError>()("PruneError", {
  reason: Schema.String
}) {
  override get message() {
    return this.reason
  }
}

/**
 * Logits [B, T, V] larger than one storage binding of the backend (a GPU buffer a shader may bind):
 * the model's weights are split to fit, a forward pass's logits are not.
 */
export class LogitsTooLarge extends Schema.TaggedError<LogitsTooLarge>()("LogitsTooLarge", {
  rows: Schema.Number,
  tokens: Schema.Number,
  vocab: Schema.Number,
  limit: Schema.Number
}) {
  override get message() {
    const bytes = this.rows * this.tokens * this.vocab * 4
    return `logits of ${this.rows} x ${this.tokens} tokens x ${this.vocab} vocabulary are ${bytes} bytes, past the backend's largest storage binding of ${this.limit} bytes: use a smaller micro-batch (at most ${Math.floor(this.limit / (4 * this.vocab))} tokens)`
  }
}
