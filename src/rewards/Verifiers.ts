/**
 * The pure checks of the verifier rewards (layers/Rewards.ts): a numeric final answer, an exact
 * one, a required format, the code of a response, and the share of checks passed. Only the answer after the
 * thinking counts: a number the model wrote while thinking is not its answer.
 */
import * as Tasks from "../data/Tasks.ts"
import { splitThinking } from "../model/Generate.ts"
import type { Score } from "./Reward.ts"

/** Groups of three digits after a comma, or after a (thin, no-break) space: "1,234", "1 234 567". */
const GROUPED = String.raw`\d{1,3}(?:,\d{3})+(?!\d)|\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3})+(?!\d)`

/**
 * A number as written: a sign that is not a hyphen between words or numbers ("3-4"), digits,
 * optionally grouped, decimals, an exponent, and a denominator ("3/4"). Not inside a word ("CO2").
 */
const NUMBER = new RegExp(
  String.raw`(?:(?<![\w)\]}])([-+]))?(?<![\w.])(${GROUPED}|\d+|(?=\.\d))(\.\d+)?(?:[eE]([-+]?\d+))?(?:\s*\/\s*(\d+(?:\.\d+)?))?`,
  "g"
)

/** Writings of numbers that NUMBER does not read, rewritten as ones it does. */
const normalise = (text: string) =>
  text
    .replaceAll("\u2212", "-") // the minus sign
    .replace(/\\[dt]?frac\{\s*([^{}]*?)\s*\}\{\s*([^{}]*?)\s*\}/g, "$1/$2") // LaTeX \frac{3}{4}
    .replaceAll("{,}", ",") // LaTeX "1{,}000"
    .replace(/\\[,!;: ]/g, " ") // LaTeX spaces, as in "1\,000"

export interface Found {
  /** As read, after normalisation ("3/4" for "\frac{3}{4}"). */
  readonly text: string
  readonly value: number
}

const numbersIn = (text: string): Array<Found> =>
  Array.from(normalise(text).matchAll(NUMBER), (match) => {
    const [whole, sign, integer, decimals = "", exponent = "0", denominator] = match
    const magnitude = Number(`${integer.replace(/\D/g, "")}${decimals}e${exponent}`) / (denominator === undefined ? 1 : Number(denominator))
    return { text: whole.trim(), value: sign === "-" ? -magnitude : magnitude }
  }).filter(({ value }) => Number.isFinite(value))

/** The last number in a text ("1,234", "-0.5", "3/4", "\frac{3}{4}", "2e-3"), or undefined. */
export const lastNumber = (text: string): Found | undefined => numbersIn(text).at(-1)

/** The contents of the last `\boxed{...}`, braces balanced, or undefined. */
const lastBoxed = (text: string): string | undefined => {
  const start = text.lastIndexOf("\\boxed{")
  if (start < 0) return undefined
  let depth = 0
  for (let i = start + "\\boxed".length; i < text.length; i++) {
    if (text[i] === "{") depth++
    else if (text[i] === "}" && --depth === 0) return text.slice(start + "\\boxed{".length, i)
  }
  return undefined
}

/** "Answer:", "Final answer:", "the answer is", and "A:" as a label; not the word "answer" in prose. */
const ANSWER_LABELS = [/\banswer\s*(?:is\b|[:=])/gi, /(?<!\w)A:/g]

/**
 * The number a response gives as its final answer, thinking stripped: the first number of the
 * last `\boxed{}`, or else after the last answer label, or else the last number of the answer.
 * A box or label with no number after it is no answer: the number before it was not the answer.
 */
const finalNumber = (response: string): Found | undefined => {
  const { answer } = splitThinking(response)
  const boxed = lastBoxed(answer)
  if (boxed !== undefined) return numbersIn(boxed)[0]
  const labelEnd = Math.max(...ANSWER_LABELS.flatMap((label) => Array.from(answer.matchAll(label), (match) => match.index + match[0].length)))
  if (labelEnd >= 0) return numbersIn(answer.slice(labelEnd))[0]
  return lastNumber(answer)
}

/** Relative (and, near 0, absolute) tolerance: "0.75" is "3/4", "0.333333" is "1/3". */
const TOLERANCE = 1e-6

/** Whether the response's final answer is `expected` as a number. */
export const numeric = (response: string, expected: number): Score => {
  const found = finalNumber(response)
  const passed = found !== undefined && Math.abs(found.value - expected) <= TOLERANCE * Math.max(1, Math.abs(expected))
  const note = found === undefined ? "no number in the final answer" : `answered ${found.text} (${found.value}), expected ${expected}`
  return { reward: passed ? 1 : 0, checks: [{ name: "answer", passed, note }] }
}

/**
 * Whether the response's final answer is `expected` ("red", "yes"), read as the held-out questions
 * are scored (Tasks.extractAnswer): thinking stripped, the text before the first newline or EOS,
 * whitespace collapsed.
 */
export const exact = (response: string, expected: string): Score => {
  const found = Tasks.extractAnswer(splitThinking(response).answer)
  const passed = found === Tasks.normalise(expected)
  return { reward: passed ? 1 : 0, checks: [{ name: "answer", passed, note: `answered ${JSON.stringify(found)}, expected ${JSON.stringify(Tasks.normalise(expected))}` }] }
}

/**
 * Whether the response matches `pattern`. The whole response, thinking included, so that a format
 * can require the thinking's own shape; a pattern about the answer alone can anchor after `[/THINK]`.
 */
export const format = (response: string, pattern: RegExp): Score => {
  const passed = response.search(pattern) >= 0 // unlike test(), ignores a global pattern's lastIndex
  return { reward: passed ? 1 : 0, checks: [{ name: `matches ${pattern}`, passed }] }
}

/** A fenced block: its language tag and its contents. */
const CODE_BLOCK = /```[ \t]*([^\s`]*)[^\n]*\n([\s\S]*?)```/g
const JAVASCRIPT = new Set(["", "js", "javascript", "mjs", "node"])

/**
 * The code of a response, thinking stripped: its last fenced block tagged as JavaScript (or not
 * tagged), else the whole answer.
 */
export const code = (response: string): string => {
  const { answer } = splitThinking(response)
  const blocks = Array.from(answer.matchAll(CODE_BLOCK)).filter(([, language]) => JAVASCRIPT.has(language.toLowerCase()))
  return blocks.at(-1)?.[2] ?? answer
}

/** A score whose reward is the share of decided checks passed; undefined when none was decided. */
export const shareOf = (checks: Score["checks"]): Score => {
  const decided = checks.filter(({ passed }) => passed !== undefined)
  return { reward: decided.length === 0 ? undefined : decided.filter(({ passed }) => passed).length / decided.length, checks }
}

/**
 * A judge's yes or no, thinking stripped: its first word if that is one, else the only one of the
 * two it uses ("The answer is: **No**"); undefined when it uses neither or both.
 */
export const verdict = (answer: string): boolean | undefined => {
  const words: ReadonlyArray<string> = splitThinking(answer).answer.toLowerCase().match(/[a-z]+/g) ?? []
  if (words[0] === "yes" || words[0] === "no") return words[0] === "yes"
  const [yes, no] = [words.includes("yes"), words.includes("no")]
  return yes === no ? undefined : yes
}
