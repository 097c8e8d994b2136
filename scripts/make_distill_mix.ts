/**
 * The embedded default's distillation set, `data/distill.jsonl`: a fact-dense slice of
 * `data/train.jsonl` for a cascade that must run in minutes. A few hundred steps cannot pass over the
 * whole corpus, where each land's bio is a small share; this slice holds one bio per land, so that
 * every fact meets the teacher's logits, alternating with as many arithmetic and question/answer
 * documents. Deterministic: the first documents of each kind in file order.
 *
 *   node scripts/make_distill_mix.ts
 */
import * as fs from "node:fs"

const documents = fs.readFileSync("data/train.jsonl", "utf8").split("\n").filter(Boolean).map((line) => JSON.parse(line).text as string)

/** A bio states a land's facts in prose: no question, equation, worked sum or chat turn. */
const isBio = (text: string) => !/Q:|\[INST\]|=|Ones:/.test(text)
/** The land a bio is about: the name its capital sentence ends with or starts with, the most frequent capitalised word. */
const landOf = (text: string) => {
  const counts = new Map<string, number>()
  for (const word of text.match(/\b[A-Z][a-z]+\b/g) ?? []) counts.set(word, (counts.get(word) ?? 0) + 1)
  return [...counts].sort((a, b) => b[1] - a[1])[0]?.[0]
}

const bios = new Map<string, string>()
const others: Array<string> = []
for (const text of documents) {
  if (isBio(text)) {
    const land = landOf(text)
    if (land !== undefined && !bios.has(land)) bios.set(land, text)
  } else {
    others.push(text)
  }
}
const mix: Array<string> = []
const facts = [...bios.values()]
facts.forEach((bio, i) => mix.push(bio, others[i]))
fs.writeFileSync("data/distill.jsonl", mix.map((text) => JSON.stringify({ text })).join("\n") + "\n")
console.log(`data/distill.jsonl: ${facts.length} bios (one per land) and ${facts.length} other documents`)
