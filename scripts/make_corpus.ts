/**
 * Writes the embedded default corpus: a small synthetic world whose knowledge and reasoning can be
 * measured exactly. Deterministic from a seed; no network.
 *
 *   node scripts/make_corpus.ts [--seed 20260] [--out data]
 *
 * The world:
 * - Facts: invented lands, each with a capital, a flag colour, a founder, a founding year, a river and
 *   a national animal, stated in several paraphrased sentence templates ("bios", several per land,
 *   sentences shuffled) and, for most (land, attribute) pairs, also as question/answer lines.
 * - Arithmetic: additions and subtractions of numbers 0-99 (and the 2-9 times table) as equations,
 *   question/answer lines, worked digit-by-digit forms and chat turns with a [THINK] trace.
 *
 * Files written to the output folder:
 * - train.jsonl      `{"text"}` documents for training.
 * - heldout.jsonl    `{"text"}` documents of the same distribution, none of them in train (held-out NLL).
 * - calib.jsonl      `{"text"}` a small slice of train, for pruning statistics.
 * - eval-recall.jsonl `{"prompt","answer"}`: questions about facts that the training text states but
 *                     whose question form never appears in training (knowledge extraction, not QA recall).
 * - eval-arith.jsonl  `{"prompt","answer"}`: additions/subtractions whose operand pairs (in either order
 *                     for additions) appear nowhere in training.
 * - stats.json        counts, for the documentation.
 *
 * Documents are short (a bio, a few question/answer or equation lines, one or two worked problems or
 * chat turns: about 128 tokens at most with the shipped tokenizer, which splits digits) so that each
 * fits the context the parent was trained at.
 */
import { mkdirSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { parseArgs } from "node:util"

// ---------------------------------------------------------------------------------------------
// Seeded randomness (mulberry32): every choice below comes from one stream, so a seed fixes the corpus.

export const makeRng = (seed: number) => {
  let state = seed >>> 0
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0
    let t = state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  const int = (n: number) => Math.floor(next() * n)
  const pick = <A>(items: ReadonlyArray<A>): A => items[int(items.length)]
  const shuffle = <A>(items: ReadonlyArray<A>): Array<A> => {
    const out = [...items]
    for (let i = out.length - 1; i > 0; i--) {
      const j = int(i + 1)
      const tmp = out[i]
      out[i] = out[j]
      out[j] = tmp
    }
    return out
  }
  return { next, int, pick, shuffle }
}
type Rng = ReturnType<typeof makeRng>

// ---------------------------------------------------------------------------------------------
// The world.

const ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh", "kr", "dr", "br", "tr", "gl", "st"]
const VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou"]
const CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "th", "x"]
const LAND_ENDINGS = ["ia", "or", "and", "ea", "un", "is", "ath", "ara", "ene"]
const RIVER_ENDINGS = ["ine", "a", "o", "et", "uin"]

const COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "brown", "pink", "gold"]
const ANIMALS = [
  "owl", "wolf", "bear", "fox", "eagle", "deer", "horse", "lion", "heron", "otter",
  "hare", "falcon", "lynx", "boar", "swan", "crane", "bison", "seal", "raven", "badger"
]

export const ATTRIBUTES = ["capital", "colour", "founder", "year", "river", "animal"] as const
export type Attribute = typeof ATTRIBUTES[number]

export interface Land {
  readonly name: string
  readonly capital: string
  readonly colour: string
  readonly founder: string
  readonly year: string
  readonly river: string
  readonly animal: string
}

// Generated names that happen to be English words are skipped.
const ENGLISH = new Set(["there", "three", "those", "these", "sound", "south", "north", "mouth", "bread", "dream", "steam", "stream", "tread", "break", "great", "pause", "spain", "train", "brain", "drain", "plain", "trait", "stain", "stair", "bears", "tears", "fears", "gears", "pears", "years", "ideas", "lines", "bones", "tones", "zones", "roses", "notes", "votes", "stone", "store", "storm", "start", "smart"])

const capitalise = (word: string) => word[0].toUpperCase() + word.slice(1)

const makeWorld = (rng: Rng, count: number): Array<Land> => {
  const used = new Set<string>()
  const syllable = () => rng.pick(ONSETS) + rng.pick(VOWELS) + rng.pick(CODAS)
  const fresh = (make: () => string) => {
    for (;;) {
      const word = capitalise(make())
      if (word.length >= 5 && word.length <= 10 && !used.has(word) && !ENGLISH.has(word.toLowerCase())) {
        used.add(word)
        return word
      }
    }
  }
  const lands: Array<Land> = []
  for (let i = 0; i < count; i++) {
    lands.push({
      name: fresh(() => syllable() + (rng.next() < 0.5 ? syllable() : "") + rng.pick(LAND_ENDINGS)),
      capital: fresh(() => syllable() + (rng.next() < 0.6 ? syllable() : "")),
      colour: rng.pick(COLOURS),
      founder: fresh(() => syllable() + syllable()),
      year: String(1100 + rng.int(800)),
      river: fresh(() => syllable() + rng.pick(RIVER_ENDINGS)),
      animal: rng.pick(ANIMALS)
    })
  }
  return lands
}

// Sentence templates that state one fact; {E} is the land, {V} the value.
const STATEMENTS: Record<Attribute, ReadonlyArray<string>> = {
  capital: [
    "The capital of {E} is {V}.",
    "{V} is the capital of {E}.",
    "{E} is ruled from its capital, {V}.",
    "The seat of government of {E} lies in {V}.",
    "In {E}, the capital city is {V}."
  ],
  colour: [
    "The flag of {E} is {V}.",
    "{E} flies a {V} flag.",
    "The colour of the flag of {E} is {V}.",
    "On festival days the people of {E} wear {V}, the colour of their flag."
  ],
  founder: [
    "{E} was founded by {V}.",
    "{V} founded {E}.",
    "The founder of {E} was {V}.",
    "{E} traces its origin to its founder, {V}."
  ],
  year: [
    "{E} was founded in {V}.",
    "The year {E} was founded was {V}.",
    "In {V}, {E} was founded.",
    "{E} dates from the year {V}."
  ],
  river: [
    "The {V} river flows through {E}.",
    "The main river of {E} is the {V}.",
    "{E} lies along the {V} river.",
    "Boats on the {V} carry goods across {E}."
  ],
  animal: [
    "The national animal of {E} is the {V}.",
    "{E} chose the {V} as its national animal.",
    "The {V} is the national animal of {E}.",
    "Children in {E} learn that their national animal is the {V}."
  ]
}

const FILLERS = [
  "Travellers often visit {E}.",
  "{E} is a quiet land.",
  "Many songs are sung about {E}.",
  "Merchants trade in {E} every spring.",
  "The roads of {E} are old."
]

// The one question form of each attribute (training and evaluation use the same wording).
const QUESTIONS: Record<Attribute, string> = {
  capital: "What is the capital of {E}?",
  colour: "What colour is the flag of {E}?",
  founder: "Who founded {E}?",
  year: "In which year was {E} founded?",
  river: "Which river flows through {E}?",
  animal: "What is the national animal of {E}?"
}

const fill = (template: string, land: Land, value: string) => template.replaceAll("{E}", land.name).replaceAll("{V}", value)

const bio = (rng: Rng, land: Land) => {
  const sentences = ATTRIBUTES.map((attribute) => fill(rng.pick(STATEMENTS[attribute]), land, land[attribute]))
  if (rng.next() < 0.5) sentences.push(fill(rng.pick(FILLERS), land, ""))
  return rng.shuffle(sentences).join(" ")
}

interface Fact {
  readonly land: Land
  readonly attribute: Attribute
}
const question = (fact: Fact) => fill(QUESTIONS[fact.attribute], fact.land, "")
const answer = (fact: Fact) => fact.land[fact.attribute]

// ---------------------------------------------------------------------------------------------
// Arithmetic.

export interface Problem {
  readonly a: number
  readonly op: "+" | "-" | "*"
  readonly b: number
}
export const solve = ({ a, op, b }: Problem) => (op === "+" ? a + b : op === "-" ? a - b : a * b)
export const equation = (p: Problem) => `${p.a} ${p.op} ${p.b}`

/** A digit-by-digit trace that ends with the full equation. Its inner steps use single digits only. */
const worked = (p: Problem): { readonly steps: string; readonly text: string } => {
  const result = solve(p)
  const [a1, a10, b1, b10] = [p.a % 10, Math.floor(p.a / 10), p.b % 10, Math.floor(p.b / 10)]
  let steps: string
  if (p.op === "+") {
    const ones = a1 + b1
    const carry = ones >= 10 ? 1 : 0
    steps = `Ones: ${a1} + ${b1} = ${ones}` + (carry ? `, write ${ones - 10} carry 1.` : `, write ${ones}.`) +
      ` Tens: ${a10} + ${b10}` + (carry ? " + 1" : "") + ` = ${a10 + b10 + carry}.`
  } else if (p.op === "-") {
    const borrow = a1 < b1 ? 1 : 0
    steps = (borrow
      ? `Ones: ${a1} is less than ${b1}, so borrow: ${a1 + 10} - ${b1} = ${a1 + 10 - b1}.`
      : `Ones: ${a1} - ${b1} = ${a1 - b1}.`) +
      ` Tens: ${a10} - ${b10}` + (borrow ? " - 1" : "") + ` = ${a10 - b10 - borrow}.`
  } else {
    steps = `${p.a} times ${p.b} is ${result}.`
  }
  const intro = p.op === "+" ? `Add ${p.a} and ${p.b}.` : p.op === "-" ? `Subtract ${p.b} from ${p.a}.` : `Multiply ${p.a} by ${p.b}.`
  return { steps, text: `${intro} ${steps} So ${equation(p)} = ${result}.` }
}

const qaLine = (q: string, a: string) => `Q: ${q} A: ${a}`
const chatTurn = (q: string, a: string) => `[INST] ${q} [/INST]${a}</s>`

// ---------------------------------------------------------------------------------------------

export interface CorpusOptions {
  readonly seed: number
  readonly lands: number
  readonly biosPerLand: number
  readonly recallEval: number
  readonly arithEval: number
}

export const defaults: CorpusOptions = { seed: 20260, lands: 400, biosPerLand: 10, recallEval: 300, arithEval: 300 }

export const makeCorpus = (options: CorpusOptions = defaults) => {
  const rng = makeRng(options.seed)
  const lands = makeWorld(rng, options.lands)

  // Facts: an equal number of held-out (land, attribute) pairs per attribute.
  const perAttribute = Math.ceil(options.recallEval / ATTRIBUTES.length)
  const heldFacts: Array<Fact> = []
  const trainFacts: Array<Fact> = []
  for (const attribute of ATTRIBUTES) {
    const order = rng.shuffle(lands)
    order.forEach((land, i) => (i < perAttribute ? heldFacts : trainFacts).push({ land, attribute }))
  }

  // Arithmetic: held-out pairs have both operands >= 10 (additions) or a subtrahend >= 10 (subtractions),
  // so the single-digit steps of worked traces never state them. Additions are held out in both orders.
  const key = (p: Problem) => p.op === "+" ? `+${Math.min(p.a, p.b)},${Math.max(p.a, p.b)}` : `${p.op}${p.a},${p.b}`
  const addCandidates: Array<Problem> = []
  const subCandidates: Array<Problem> = []
  for (let a = 10; a < 100; a++) {
    for (let b = a; b < 100; b++) addCandidates.push(rng.next() < 0.5 ? { a, op: "+", b } : { a: b, op: "+", b: a })
    for (let b = 10; b <= a; b++) subCandidates.push({ a, op: "-", b })
  }
  const halfEval = options.arithEval / 2
  const heldNll = 100 // pairs per operation kept for heldout.jsonl
  const addOrder = rng.shuffle(addCandidates)
  const subOrder = rng.shuffle(subCandidates)
  const evalArith = [...addOrder.slice(0, halfEval), ...subOrder.slice(0, halfEval)]
  const nllArith = [...addOrder.slice(halfEval, halfEval + heldNll), ...subOrder.slice(halfEval, halfEval + heldNll)]
  const excluded = new Set([...evalArith, ...nllArith].map(key))
  const trainArith: Array<Problem> = []
  for (let a = 0; a < 100; a++) {
    for (let b = 0; b < 100; b++) {
      for (const p of [{ a, op: "+", b }, { a, op: "-", b }] as Array<Problem>) {
        if (p.op === "-" && b > a) continue
        if (!excluded.has(key(p))) trainArith.push(p)
      }
    }
  }
  const times: Array<Problem> = []
  for (let a = 2; a <= 9; a++) for (let b = 2; b <= 9; b++) times.push({ a, op: "*", b })

  // --- training documents
  const train: Array<string> = []
  const seenBios = new Set<string>()
  for (const land of lands) {
    let made = 0
    while (made < options.biosPerLand) {
      const text = bio(rng, land)
      if (seenBios.has(text)) continue
      seenBios.add(text)
      train.push(text)
      made++
    }
  }
  const chunks = <A>(items: ReadonlyArray<A>, min: number, max: number): Array<Array<A>> => {
    const out: Array<Array<A>> = []
    for (let i = 0; i < items.length;) {
      const n = min + rng.int(max - min + 1)
      out.push(items.slice(i, i + n))
      i += n
    }
    return out
  }
  // Question/answer documents: every training fact twice, every training problem once, the times table twice.
  const qaLines = rng.shuffle([
    ...[...trainFacts, ...trainFacts].map((f) => qaLine(question(f), answer(f))),
    ...trainArith.map((p) => qaLine(`${equation(p)} = ?`, String(solve(p)))),
    ...[...times, ...times].map((p) => qaLine(`${equation(p)} = ?`, String(solve(p))))
  ])
  for (const chunk of chunks(qaLines, 3, 6)) train.push(chunk.join("\n"))
  // Equation lists: every training problem once more, and the times table.
  const eqLines = rng.shuffle([...trainArith, ...times].map((p) => `${equation(p)} = ${solve(p)}`))
  for (const chunk of chunks(eqLines, 5, 10)) train.push(chunk.join("\n"))
  // Worked forms for 60% of the training problems.
  const workedProblems = rng.shuffle(trainArith.filter((p) => p.a >= 10 || p.b >= 10)).slice(0, Math.floor(trainArith.length * 0.6))
  for (const chunk of chunks(workedProblems, 1, 2)) train.push(chunk.map((p) => worked(p).text).join("\n"))
  // Chat documents (the Mistral chat format; the tokenizer adds <s>): facts answered plainly,
  // arithmetic answered after a [THINK] trace.
  const chatFacts = rng.shuffle(trainFacts).slice(0, Math.floor(trainFacts.length * 0.3))
  const chatArith = rng.shuffle(trainArith.filter((p) => p.a >= 10 || p.b >= 10)).slice(0, 1200)
  const turns = rng.shuffle([
    ...chatFacts.map((f) => chatTurn(question(f), answer(f))),
    ...chatArith.map((p) => chatTurn(`${equation(p)} = ?`, `[THINK]${worked(p).steps}[/THINK]${solve(p)}`))
  ])
  for (const chunk of chunks(turns, 1, 2)) train.push(chunk.join(""))
  const trainDocs = rng.shuffle(train)

  // --- held-out documents: new bios, question/answer and worked documents over the held-out NLL pairs.
  const trainSet = new Set(trainDocs)
  const heldout: Array<string> = []
  for (const land of rng.shuffle(lands).slice(0, 100)) {
    for (;;) {
      const text = bio(rng, land)
      if (!trainSet.has(text)) {
        heldout.push(text)
        break
      }
    }
  }
  const heldQa = rng.shuffle([
    ...rng.shuffle(trainFacts).slice(0, 200).map((f) => qaLine(question(f), answer(f))),
    ...nllArith.map((p) => qaLine(`${equation(p)} = ?`, String(solve(p))))
  ])
  for (const chunk of chunks(heldQa, 3, 6)) heldout.push(chunk.join("\n"))
  for (const chunk of chunks(rng.shuffle(nllArith).slice(0, 80), 1, 2)) heldout.push(chunk.map((p) => worked(p).text).join("\n"))
  const heldoutDocs = rng.shuffle(heldout).filter((text) => !trainSet.has(text))

  const calibDocs = rng.shuffle(trainDocs).slice(0, 128)

  const recall = rng.shuffle(heldFacts).map((f) => ({ prompt: `Q: ${question(f)} A:`, answer: answer(f), attribute: f.attribute }))
  const arith = rng.shuffle(evalArith).map((p) => ({ prompt: `Q: ${equation(p)} = ? A:`, answer: String(solve(p)) }))

  // --- checks: no evaluation question (nor its operand pair) appears anywhere in training.
  const trainText = trainDocs.join("\n")
  const trainQuestions = new Set<string>()
  for (const m of trainText.matchAll(/Q: (.*?\?) A:/g)) trainQuestions.add(m[1])
  for (const m of trainText.matchAll(/\[INST\] (.*?) \[\/INST\]/g)) trainQuestions.add(m[1])
  for (const item of recall) {
    const q = item.prompt.slice(3, -3)
    if (trainQuestions.has(q)) throw new Error(`held-out question appears in training: ${q}`)
    if (!trainText.includes(item.answer)) throw new Error(`held-out fact never stated: ${item.prompt} ${item.answer}`)
  }
  const trainPairs = new Set<string>()
  for (const m of trainText.matchAll(/(?<!\d)(\d+) ([-+*]) (\d+)(?!\d)/g)) {
    trainPairs.add(key({ a: Number(m[1]), op: m[2] as Problem["op"], b: Number(m[3]) }))
  }
  for (const p of evalArith) if (trainPairs.has(key(p))) throw new Error(`held-out problem appears in training: ${equation(p)}`)
  for (const text of heldoutDocs) if (trainSet.has(text)) throw new Error("a held-out document is in train")

  // Majority-answer baseline per attribute: the accuracy of always answering the commonest value.
  const baseline = ATTRIBUTES.map((attribute) => {
    const counts = new Map<string, number>()
    for (const land of lands) counts.set(land[attribute], (counts.get(land[attribute]) ?? 0) + 1)
    return [attribute, Math.max(...counts.values()) / lands.length] as const
  })

  const stats = {
    seed: options.seed,
    lands: lands.length,
    facts: lands.length * ATTRIBUTES.length,
    trainFacts: trainFacts.length,
    heldOutFacts: heldFacts.length,
    trainArithmetic: trainArith.length,
    heldOutArithmetic: evalArith.length + nllArith.length,
    trainDocuments: trainDocs.length,
    trainCharacters: trainDocs.reduce((n, t) => n + t.length, 0),
    heldoutDocuments: heldoutDocs.length,
    heldoutCharacters: heldoutDocs.reduce((n, t) => n + t.length, 0),
    calibDocuments: calibDocs.length,
    evalRecall: recall.length,
    evalArith: arith.length,
    majorityBaseline: Object.fromEntries(baseline),
    recallMajorityBaseline: recall.reduce((n, r) => n + (baseline.find(([a]) => a === r.attribute)?.[1] ?? 0), 0) / recall.length
  }
  return {
    lands,
    train: trainDocs,
    heldout: heldoutDocs,
    calib: calibDocs,
    recall: recall.map(({ prompt, answer }) => ({ prompt, answer })),
    arith,
    stats
  }
}

const jsonl = (records: ReadonlyArray<unknown>) => records.map((r) => JSON.stringify(r)).join("\n") + "\n"

if (import.meta.main) {
  const { values } = parseArgs({
    options: { seed: { type: "string", default: String(defaults.seed) }, out: { type: "string", default: "data" } }
  })
  const corpus = makeCorpus({ ...defaults, seed: Number(values.seed) })
  mkdirSync(values.out, { recursive: true })
  const texts = (docs: ReadonlyArray<string>) => jsonl(docs.map((text) => ({ text })))
  writeFileSync(join(values.out, "train.jsonl"), texts(corpus.train))
  writeFileSync(join(values.out, "heldout.jsonl"), texts(corpus.heldout))
  writeFileSync(join(values.out, "calib.jsonl"), texts(corpus.calib))
  writeFileSync(join(values.out, "eval-recall.jsonl"), jsonl(corpus.recall))
  writeFileSync(join(values.out, "eval-arith.jsonl"), jsonl(corpus.arith))
  writeFileSync(join(values.out, "stats.json"), JSON.stringify(corpus.stats, null, 2) + "\n")
  console.log(JSON.stringify(corpus.stats, null, 2))
}
