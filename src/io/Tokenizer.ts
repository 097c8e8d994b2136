/**
 * A Hugging Face tokenizer loaded from a model folder: `tokenizer.json` through
 * `@huggingface/tokenizers`, plus the optional `tokenizer_config.json` (special tokens,
 * BOS/EOS policy, chat template) and `chat_template.jinja`, as transformers reads them.
 */
import { readFile, stat } from "node:fs/promises"
import { dirname, join } from "node:path"
import { Template } from "@huggingface/jinja"
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers"
import { Effect, Schema } from "effect"
import { TokenizerError } from "../Errors.ts"

/** A part of a message's content, as HF chat templates take them: text, or an image the template marks with its placeholder. */
export type ChatContentPart = { readonly type: "text"; readonly text: string } | { readonly type: "image"; readonly image?: string | undefined }

export interface ChatMessage {
  readonly role: string
  readonly content: string | ReadonlyArray<ChatContentPart>
}

export interface Tokenizer {
  /** Number of distinct tokens, added tokens included (transformers' `len(tokenizer)`). */
  readonly vocabSize: number
  readonly bosId: number | undefined
  readonly eosId: number | undefined
  readonly padId: number | undefined
  /** `addSpecialTokens` (default true) adds what the tokenizer adds around a text, e.g. BOS. */
  readonly encode: (text: string, options?: { readonly addSpecialTokens?: boolean }) => Array<number>
  readonly decode: (ids: ReadonlyArray<number>, options?: { readonly skipSpecialTokens?: boolean }) => string
  readonly tokenId: (token: string) => number | undefined
  readonly applyChatTemplate: (
    messages: ReadonlyArray<ChatMessage>,
    options?: { readonly addGenerationPrompt?: boolean }
  ) => Effect.Effect<string, TokenizerError>
}

/** A special token in tokenizer_config.json: a plain string or a serialized AddedToken. */
const SpecialToken = Schema.NullOr(Schema.Union([Schema.String, Schema.Struct({ content: Schema.String })]))

/** The fields of tokenizer_config.json we use; the rest is handed to the library untouched. */
const TokenizerConfig = Schema.Struct({
  chat_template: Schema.optional(Schema.NullOr(Schema.String)),
  bos_token: Schema.optional(SpecialToken),
  eos_token: Schema.optional(SpecialToken),
  pad_token: Schema.optional(SpecialToken),
  add_bos_token: Schema.optional(Schema.Boolean),
  add_eos_token: Schema.optional(Schema.Boolean),
  clean_up_tokenization_spaces: Schema.optional(Schema.Boolean)
})

const describe = (cause: unknown) => (cause instanceof Error ? cause.message : String(cause))

/** Reads a text file, or undefined when it does not exist (the config and template files are optional). */
const readOptionalText = (file: string) =>
  Effect.tryPromise({
    try: () =>
      readFile(file, "utf8").catch((error: NodeJS.ErrnoException) =>
        error.code === "ENOENT" ? undefined : Promise.reject(error)
      ),
    catch: (cause) => new TokenizerError({ file, reason: `cannot be read: ${describe(cause)}` })
  })

const parseJson = (file: string, text: string) =>
  Effect.try({
    try: (): unknown => JSON.parse(text),
    catch: (cause) => new TokenizerError({ file, reason: `is not valid JSON: ${describe(cause)}` })
  })

/** Where the tokenizer files are: `dirOrFile` is a model folder or its tokenizer.json itself. */
const locate = (dirOrFile: string) =>
  Effect.tryPromise({
    try: () => stat(dirOrFile),
    catch: () => new TokenizerError({ file: dirOrFile, reason: "no such file or folder" })
  }).pipe(
    Effect.map((info) => {
      const dir = info.isDirectory() ? dirOrFile : dirname(dirOrFile)
      return { dir, tokenizerFile: info.isDirectory() ? join(dir, "tokenizer.json") : dirOrFile }
    })
  )

export const load = Effect.fn("Tokenizer.load")(function*(dirOrFile: string): Effect.fn.Return<Tokenizer, TokenizerError> {
  const { dir, tokenizerFile } = yield* locate(dirOrFile)
  const configFile = join(dir, "tokenizer_config.json")
  const templateFile = join(dir, "chat_template.jinja")

  const tokenizerText = yield* readOptionalText(tokenizerFile)
  if (tokenizerText === undefined) {
    return yield* new TokenizerError({ file: tokenizerFile, reason: "file not found" })
  }
  const tokenizerJson = yield* parseJson(tokenizerFile, tokenizerText)

  const configText = yield* readOptionalText(configFile)
  const rawConfig = configText === undefined ? {} : yield* parseJson(configFile, configText)
  const config = yield* Schema.decodeUnknownEffect(TokenizerConfig)(rawConfig).pipe(
    Effect.mapError((error) => new TokenizerError({ file: configFile, reason: error.message }))
  )

  const hf = yield* Effect.try({
    // The library cleans up spaces before punctuation on decode unless told otherwise, which
    // breaks exact round trips; transformers no longer does by default, so neither do we.
    try: () =>
      new HfTokenizer(tokenizerJson as object, {
        ...(rawConfig as object),
        clean_up_tokenization_spaces: config.clean_up_tokenization_spaces ?? false
      }),
    catch: (cause) => new TokenizerError({ file: tokenizerFile, reason: `cannot build the tokenizer: ${describe(cause)}` })
  })

  // Token names come from tokenizer_config.json; without one, the usual Llama/Mistral names.
  const specialToken = (field: "bos_token" | "eos_token" | "pad_token", wellKnown: string) => {
    const configured = config[field]
    const name = configured === undefined
      ? wellKnown
      : configured === null
      ? undefined
      : typeof configured === "string"
      ? configured
      : configured.content
    const id = name === undefined ? undefined : hf.token_to_id(name)
    if (configured !== undefined && name !== undefined && id === undefined) {
      return Effect.fail(new TokenizerError({ file: configFile, reason: `${field} "${name}" is not in the vocabulary` }))
    }
    return Effect.succeed({ name: id === undefined ? undefined : name, id })
  }
  const bos = yield* specialToken("bos_token", "<s>")
  const eos = yield* specialToken("eos_token", "</s>")
  const pad = yield* specialToken("pad_token", "<pad>")

  // As in transformers' Llama-family tokenizers, add_bos_token/add_eos_token in the config
  // override the post-processor of tokenizer.json; when neither is set, tokenizer.json decides.
  const wrapsOwnSpecialTokens = config.add_bos_token !== undefined || config.add_eos_token !== undefined
  const addedIds = (flag: "add_bos_token" | "add_eos_token", id: number | undefined) =>
    config[flag] !== true
      ? Effect.succeed([])
      : id === undefined
      ? Effect.fail(new TokenizerError({ file: configFile, reason: `${flag} is set but the token is unknown` }))
      : Effect.succeed([id])
  const prefix = yield* addedIds("add_bos_token", bos.id)
  const suffix = yield* addedIds("add_eos_token", eos.id)

  // chat_template.jinja, when present, wins over tokenizer_config.json, as in transformers.
  const templateText = yield* readOptionalText(templateFile)
  const templateSource = templateText !== undefined
    ? { file: templateFile, text: templateText }
    : typeof config.chat_template === "string"
    ? { file: configFile, text: config.chat_template }
    : undefined
  // Parsed once here so that a broken template fails at load, naming its file.
  const chatTemplate = templateSource === undefined ? undefined : {
    file: templateSource.file,
    template: yield* Effect.try({
      try: () => new Template(templateSource.text),
      catch: (cause) =>
        new TokenizerError({ file: templateSource.file, reason: `chat template does not parse: ${describe(cause)}` })
    })
  }

  return {
    vocabSize: hf.get_vocab(true).size,
    bosId: bos.id,
    eosId: eos.id,
    padId: pad.id,
    encode: (text, { addSpecialTokens = true } = {}) => {
      if (!wrapsOwnSpecialTokens) return hf.encode(text, { add_special_tokens: addSpecialTokens }).ids
      const ids = hf.encode(text, { add_special_tokens: false }).ids
      return addSpecialTokens ? [...prefix, ...ids, ...suffix] : ids
    },
    // The library throws on an empty list instead of returning "".
    decode: (ids, { skipSpecialTokens = false } = {}) =>
      ids.length === 0 ? "" : hf.decode([...ids], { skip_special_tokens: skipSpecialTokens }),
    tokenId: (token) => hf.token_to_id(token),
    applyChatTemplate: Effect.fn("Tokenizer.applyChatTemplate")(function*(
      messages: ReadonlyArray<ChatMessage>,
      { addGenerationPrompt = false }: { readonly addGenerationPrompt?: boolean } = {}
    ) {
      if (chatTemplate === undefined) {
        return yield* new TokenizerError({
          file: configFile,
          reason: "the tokenizer has no chat template (no chat_template here nor a chat_template.jinja beside it)"
        })
      }
      // raise_exception is a global of @huggingface/jinja; a template that calls it lands here.
      return yield* Effect.try({
        try: () =>
          chatTemplate.template.render({
            messages,
            bos_token: bos.name,
            eos_token: eos.name,
            pad_token: pad.name,
            add_generation_prompt: addGenerationPrompt
          }),
        catch: (cause) => new TokenizerError({ file: chatTemplate.file, reason: `chat template failed: ${describe(cause)}` })
      })
    })
  }
})

/** The tokenizer of a model folder, or none when the folder has no tokenizer.json. */
export const loadIfPresent = (dir: string): Effect.Effect<Tokenizer | undefined, TokenizerError> =>
  Effect.promise(() => stat(join(dir, "tokenizer.json")).then(() => true, () => false)).pipe(
    Effect.flatMap((present) => (present ? load(dir) : Effect.succeed(undefined)))
  )
