/**
 * Writes the post-training data of the embedded default (data/post/): chats for SFT, prompts with
 * verifiable tasks and rubrics for GRPO, preference pairs for the pairwise reward model, prompts for
 * online DPO, and held-out chat evaluations. Deterministic from a seed; no network.
 *
 *   node scripts/make_post_training_data.ts [--seed 20261] [--out data/post]
 *
 * It regenerates the world of scripts/make_corpus.ts (and checks that data/train.jsonl is what that
 * generator writes), then reads from the data what the parent has seen: the question form of each
 * attribute (checked to ask every training fact in the training text), every training arithmetic
 * problem with its answer, and the digit-by-digit traces of the worked and chat documents. Prompts are rendered with the chat template of
 * assets/parent (without the `<s>` the tokenizer adds, as in data/train.jsonl).
 *
 * What stays held out: the 300 facts of eval-recall.jsonl are never asked, described or graded here
 * (only the 2,100 training facts are), and no arithmetic pair of eval-arith.jsonl or heldout.jsonl
 * appears in any training file; the chat evaluations are built from exactly those held-out items.
 * The checks at the end verify both before anything is written.
 *
 * Files (one JSON object a line):
 * - sft-instruct.jsonl    {"messages"}: facts and arithmetic answered directly, some multi-turn,
 *                         some with a format instruction (a full sentence, "Answer: N"), descriptions.
 * - sft-reasoning.jsonl   {"messages"}: every answer after a `[THINK]...[/THINK]` trace: digit-by-digit
 *                         arithmetic, chained problems (a + b - c) worked step by step, facts recalled.
 * - grpo-verifiable.jsonl {"prompt","task"}: numeric tasks (two-operand and chained arithmetic) and a
 *                         few format tasks (a regular expression the response must match).
 * - grpo-rubric.jsonl     {"prompt","task"}: "tell me about <land>" prompts with atomic rubric items.
 * - preferences.jsonl, preferences-heldout.jsonl
 *                         {"prompt","a","b","preferred","kind"}: correct vs wrong, concise vs rambling,
 *                         concise vs looping, answer present vs missing. Responses carry no thinking
 *                         (the PWRM scores responses with their thinking stripped). Held-out pairs
 *                         ask other questions than the training pairs.
 * - odpo-prompts.jsonl    {"prompt"}.
 * - sft-judge.jsonl       {"messages"}: the rubric judge's question about one item of a description
 *                         prompt (layers/Rewards.ts `judgeQuestion`, verbatim) and its verdict, "yes"
 *                         or "no", balanced per kind of item; for fine-tuning a judge.
 * - judge-heldout.jsonl   {"prompt","response","item","verdict","kind"}: the same, about lands no judge
 *                         chat describes, for measuring a judge; kind: fact, sentences or repeats.
 * - eval-rubric-chat.jsonl {"prompt","task"}: description prompts with rubrics that no training file asks.
 * - eval-arith-chat.jsonl {"prompt","answer"}: the operand pairs of data/eval-arith.jsonl, as chats.
 * - eval-chain-chat.jsonl {"prompt","answer"}: a op b op c whose two steps are both held-out pairs.
 * - eval-recall-chat.jsonl {"prompt","answer"}: the facts of data/eval-recall.jsonl, as chats.
 * - stats.json            counts.
 */
import { Effect } from "effect"
import { mkdirSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { parseArgs } from "node:util"
import { judgeQuestion } from "../layers/Rewards.ts"
import type { Task } from "../src/rewards/Reward.ts"
import * as Tokenizer from "../src/io/Tokenizer.ts"
import { ATTRIBUTES, type Attribute, defaults, equation, type Land, makeCorpus, makeRng, type Problem, solve } from "./make_corpus.ts"

type Rng = ReturnType<typeof makeRng>

// ---------------------------------------------------------------------------------------------
// The world as the training text states it.

/** Other wordings of the questions, so that SFT teaches more than the one form pretraining saw. */
const PARAPHRASES: Record<Attribute, ReadonlyArray<string>> = {
  capital: ["Name the capital of {E}.", "Which city is the capital of {E}?"],
  colour: ["What is the colour of the flag of {E}?", "Which colour is the flag of {E}?"],
  founder: ["Who was the founder of {E}?", "Name the founder of {E}."],
  year: ["When was {E} founded?", "In what year was {E} founded?"],
  river: ["Name the river that flows through {E}.", "What is the main river of {E}?"],
  animal: ["Which animal is the national animal of {E}?", "Name the national animal of {E}."]
}

/** One statement of each fact, in a wording the bios use. */
const STATEMENTS: Record<Attribute, string> = {
  capital: "The capital of {E} is {V}.",
  colour: "The flag of {E} is {V}.",
  founder: "{E} was founded by {V}.",
  year: "{E} was founded in {V}.",
  river: "The {V} river flows through {E}.",
  animal: "The national animal of {E} is the {V}."
}

/** What a description prompt asks for, and the rubric item that checks it. */
const ASPECTS: Record<Attribute, { readonly noun: string; readonly item: string }> = {
  capital: { noun: "its capital", item: "names {V} as the capital of {E}" },
  colour: { noun: "the colour of its flag", item: "says that the flag of {E} is {V}" },
  founder: { noun: "its founder", item: "names {V} as the founder of {E}" },
  year: { noun: "the year it was founded", item: "gives {V} as the year {E} was founded" },
  river: { noun: "its river", item: "names the {V} as the river of {E}" },
  animal: { noun: "its national animal", item: "names the {V} as the national animal of {E}" }
}

/** The template about `land`, with `claimed` (by default the land's own value of `attribute`) as {V}. */
const fill = (template: string, land: Land, attribute?: Attribute, claimed = attribute === undefined ? "" : land[attribute]) =>
  template.replaceAll("{E}", land.name).replaceAll("{V}", claimed)

/** A question echoed back unanswered. */
const echoed = (question: string) => `${question.replace(/[?.]$/, "")}...`

interface Fact {
  readonly land: Land
  readonly attribute: Attribute
}
const value = (fact: Fact) => fact.land[fact.attribute]
/** The fact's statement, or with `claimed` in place of its value (a false statement). */
const statement = (fact: Fact, claimed = value(fact)) =>
  STATEMENTS[fact.attribute].replaceAll("{E}", fact.land.name).replaceAll("{V}", claimed)

/** Additions are the same problem in either order, as make_corpus.ts holds them out. */
const pairKey = (p: Problem) => (p.op === "+" ? `+${Math.min(p.a, p.b)},${Math.max(p.a, p.b)}` : `${p.op}${p.a},${p.b}`)
const problemKey = (p: Problem) => `${p.a}${p.op}${p.b}`
const asProblem = (a: string, op: string, b: string): Problem => ({ a: Number(a), op: op as Problem["op"], b: Number(b) })

/** The worked form of a problem from its digit steps, as the worked documents write it. */
const workedText = (p: Problem, steps: string) =>
  `${p.op === "+" ? `Add ${p.a} and ${p.b}.` : `Subtract ${p.b} from ${p.a}.`} ${steps} So ${equation(p)} = ${solve(p)}.`

/** Every arithmetic pair a text states (`a op b`, overlapping: "1 + 2 - 3" states 1 + 2 and 2 - 3). */
const statedPairs = (text: string) =>
  [...text.matchAll(/(?<!\d)(\d+) ([-+*]) (?=(\d+)(?!\d))/g)].map((m) => pairKey(asProblem(m[1], m[2], m[3])))

const readWorld = () => {
  const corpus = makeCorpus(defaults)
  const shipped = readFileSync("data/train.jsonl", "utf8").trim().split("\n").map((line) => (JSON.parse(line) as { text: string }).text)
  if (shipped.length !== corpus.train.length || shipped.some((text, i) => text !== corpus.train[i])) {
    throw new Error("data/train.jsonl is not what scripts/make_corpus.ts writes with its default seed")
  }
  const trainText = corpus.train.join("\n")

  // Facts: those of eval-recall.jsonl are held out, every other one is asked in training, each
  // attribute in the one question form that the held-out questions show.
  const heldQuestions = new Set(corpus.recall.map((item) => item.prompt.slice("Q: ".length, -" A:".length)))
  const forms = new Map<Attribute, string>()
  for (const item of corpus.recall) {
    const text = item.prompt.slice("Q: ".length, -" A:".length)
    const land = corpus.lands.find((l) => new RegExp(`\\b${l.name}\\b`).test(text))!
    const attribute = ATTRIBUTES.find((a) => land[a] === item.answer)!
    const form = text.replace(land.name, "{E}")
    if ((forms.get(attribute) ?? form) !== form) throw new Error(`two question forms for the ${attribute}`)
    forms.set(attribute, form)
  }
  const question = (fact: Fact) => fill(forms.get(fact.attribute)!, fact.land)
  const facts = corpus.lands.flatMap((land) => ATTRIBUTES.map((attribute): Fact => ({ land, attribute })))
  const heldFacts = facts.filter((fact) => heldQuestions.has(question(fact)))
  const trainFacts = facts.filter((fact) => !heldQuestions.has(question(fact)))
  for (const fact of trainFacts) {
    if (!trainText.includes(`Q: ${question(fact)} A: ${value(fact)}`)) throw new Error(`not asked in training: ${question(fact)}`)
  }

  // Arithmetic: every training problem is asked once as a Q/A line; traces come from worked and chat documents.
  const problems = new Map<string, Problem>()
  for (const m of trainText.matchAll(/Q: (\d+) ([-+*]) (\d+) = \? A: (\d+)/g)) {
    const p = asProblem(m[1], m[2], m[3])
    if (solve(p) !== Number(m[4])) throw new Error(`a wrong answer in training: ${m[0]}`)
    problems.set(problemKey(p), p)
  }
  const steps = new Map<string, string>()
  for (const m of trainText.matchAll(/\[INST\] (\d+) ([-+]) (\d+) = \? \[\/INST\]\[THINK\](.*?)\[\/THINK\]/g)) {
    steps.set(problemKey(asProblem(m[1], m[2], m[3])), m[4])
  }
  for (const m of trainText.matchAll(/(?:Add \d+ and \d+|Subtract \d+ from \d+)\. (.*?) So (\d+) ([-+]) (\d+) = \d+\./g)) {
    steps.set(problemKey(asProblem(m[2], m[3], m[4])), m[1])
  }
  const qaPairs = (texts: ReadonlyArray<string>) =>
    texts.flatMap((text) => [...text.matchAll(/Q: (\d+) ([-+]) (\d+) = \? A:/g)].map((m) => asProblem(m[1], m[2], m[3])))
  const evalProblems = qaPairs(corpus.arith.map((item) => item.prompt))
  const heldPairs = new Set([...evalProblems, ...qaPairs(corpus.heldout)].map(pairKey))
  for (const p of problems.values()) if (heldPairs.has(pairKey(p))) throw new Error(`a held-out pair is in training: ${equation(p)}`)

  return { corpus, question, heldFacts, trainFacts, problems: [...problems.values()], steps, evalProblems, heldPairs }
}

// ---------------------------------------------------------------------------------------------
// Prompts and answers.

const escapeRegExp = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")

const joinAnd = (items: ReadonlyArray<string>) =>
  items.length === 1 ? items[0] : `${items.slice(0, -1).join(", ")} and ${items[items.length - 1]}`

/** A chain `a op b op c`, worked left to right; every intermediate result stays within 0..99. */
interface Chain {
  readonly first: Problem
  readonly second: Problem
}
const chainText = (c: Chain) => `${equation(c.first)} ${c.second.op} ${c.second.b}`

const makeGenerators = (world: ReturnType<typeof readWorld>, rng: Rng) => {
  const { trainFacts, problems, steps, heldPairs } = world
  const withSteps = problems.filter((p) => steps.has(problemKey(p)))
  const byAttribute = new Map(ATTRIBUTES.map((attribute) => [attribute, trainFacts.filter((f) => f.attribute === attribute)]))
  const trainAttributes = new Map<string, Array<Attribute>>()
  for (const fact of trainFacts) trainAttributes.set(fact.land.name, [...(trainAttributes.get(fact.land.name) ?? []), fact.attribute])
  const describable = world.corpus.lands.filter((land) => (trainAttributes.get(land.name)?.length ?? 0) >= 2)

  const factQuestion = (fact: Fact, paraphrase: number) =>
    rng.next() < paraphrase ? fill(rng.pick(PARAPHRASES[fact.attribute]), fact.land) : world.question(fact)
  const arithQuestion = (p: Problem) => {
    const r = rng.next()
    return r < 0.6 ? `${equation(p)} = ?` : r < 0.85 ? `What is ${equation(p)}?` : `Compute ${equation(p)}.`
  }

  /** A description request over 2-3 of a land's training facts, its answer and its rubric. */
  const description = () => {
    const land = rng.pick(describable)
    const chosen = rng.shuffle(trainAttributes.get(land.name)!).slice(0, 2 + rng.int(2))
    const asked = ATTRIBUTES.filter((attribute) => chosen.includes(attribute))
    const facts = asked.map((attribute): Fact => ({ land, attribute }))
    return {
      land,
      facts,
      question: `Tell me about ${land.name}: ${joinAnd(asked.map((attribute) => ASPECTS[attribute].noun))}.`,
      answer: facts.map((fact) => statement(fact)).join(" "),
      items: [...facts.map((fact) => fill(ASPECTS[fact.attribute].item, fact.land, fact.attribute)), "answers in full sentences", "does not repeat itself"]
    }
  }

  /** A chain of two training problems that both have traces, stating no held-out pair. */
  const trainingChain = (): Chain => {
    for (;;) {
      const first = rng.pick(withSteps)
      const r = solve(first)
      if (r > 99) continue
      const op = rng.next() < 0.5 ? "+" : "-"
      const b = op === "+" ? rng.int(100 - r) : rng.int(r + 1)
      const second: Problem = { a: r, op, b }
      const chain = { first, second }
      if (steps.has(problemKey(second)) && !statedPairs(chainText(chain)).some((key) => heldPairs.has(key))) return chain
    }
  }
  const chainTrace = (c: Chain) =>
    `[THINK]${workedText(c.first, steps.get(problemKey(c.first))!)} ${workedText(c.second, steps.get(problemKey(c.second))!)}[/THINK]${solve(c.second)}`

  /** A plausible wrong answer: another land's value, a near year, a near number. */
  const wrongFact = (fact: Fact) => {
    if (fact.attribute === "year") return String(Number(value(fact)) + rng.pick([-1, 1]) * (1 + rng.int(60)))
    for (;;) {
      const other = value(rng.pick(byAttribute.get(fact.attribute)!))
      if (other !== value(fact)) return other
    }
  }
  const wrongNumber = (n: number) => {
    for (;;) {
      const candidate = n + rng.pick([-10, -2, -1, 1, 2, 10])
      if (candidate >= 0) return String(candidate)
    }
  }

  return { withSteps, describable, factQuestion, arithQuestion, description, trainingChain, chainTrace, wrongFact, wrongNumber }
}

// ---------------------------------------------------------------------------------------------
// The files.

interface Message {
  readonly role: "user" | "assistant"
  readonly content: string
}
type Turn = readonly [question: string, answer: string]
const chat = (...turns: ReadonlyArray<Turn>) => ({
  messages: turns.flatMap(([question, answer]): Array<Message> => [{ role: "user", content: question }, { role: "assistant", content: answer }])
})

const FILLERS = [
  "That is a good question.",
  "Many people ask about this.",
  "Let me say it again to be clear.",
  "I hope this helps.",
  "There is a lot one could say here.",
  "As I said before, this is the answer.",
  "Feel free to ask me more questions."
]

const makeFiles = (world: ReturnType<typeof readWorld>, rng: Rng, prompt: (question: string) => string) => {
  const g = makeGenerators(world, rng)
  const { trainFacts, problems, steps } = world

  // --- SFT, instruct: direct answers.
  const instruct: Array<ReturnType<typeof chat>> = []
  const factTurn = (): Turn => {
    const fact = rng.pick(trainFacts)
    return [g.factQuestion(fact, 0.3), value(fact)]
  }
  const arithTurn = (): Turn => {
    const p = rng.pick(problems)
    return [g.arithQuestion(p), String(solve(p))]
  }
  for (let i = 0; i < 1300; i++) instruct.push(rng.next() < 0.15 ? chat(factTurn(), factTurn()) : chat(factTurn()))
  for (let i = 0; i < 900; i++) instruct.push(rng.next() < 0.15 ? chat(arithTurn(), factTurn()) : chat(arithTurn()))
  for (let i = 0; i < 300; i++) {
    const fact = rng.pick(trainFacts)
    instruct.push(chat([`${world.question(fact)} Answer in a full sentence.`, statement(fact)]))
  }
  for (let i = 0; i < 200; i++) {
    const p = rng.pick(problems)
    instruct.push(chat([`${equation(p)} = ? Reply in the form "Answer: N".`, `Answer: ${solve(p)}`]))
  }
  for (let i = 0; i < 300; i++) {
    const d = g.description()
    instruct.push(chat([d.question, d.answer]))
  }

  // --- SFT, reasoning: every answer after a trace.
  const reasoning: Array<ReturnType<typeof chat>> = []
  for (let i = 0; i < 1200; i++) {
    const p = rng.pick(g.withSteps)
    reasoning.push(chat([`${equation(p)} = ?`, `[THINK]${steps.get(problemKey(p))}[/THINK]${solve(p)}`]))
  }
  for (let i = 0; i < 800; i++) {
    const c = g.trainingChain()
    reasoning.push(chat([`${chainText(c)} = ?`, g.chainTrace(c)]))
  }
  for (let i = 0; i < 800; i++) {
    const fact = rng.pick(trainFacts)
    reasoning.push(chat([g.factQuestion(fact, 0.3), `[THINK]${statement(fact)}[/THINK]${value(fact)}`]))
  }
  for (let i = 0; i < 200; i++) {
    const d = g.description()
    reasoning.push(chat([d.question, `[THINK]${d.facts.map((fact) => statement(fact)).join(" ")}[/THINK]${d.answer}`]))
  }

  // --- GRPO: verifiable tasks and rubrics. The parent solves "a + b = ?" chats nearly always and chains
  // nearly never, so two-operand problems come in the other wordings too, for groups of mixed rewards.
  const verifiable: Array<{ prompt: string; task: Task }> = []
  for (let i = 0; i < 400; i++) {
    const p = rng.pick(problems)
    verifiable.push({ prompt: prompt(g.arithQuestion(p)), task: { kind: "numeric", answer: String(solve(p)) } })
  }
  for (let i = 0; i < 500; i++) {
    const c = g.trainingChain()
    verifiable.push({ prompt: prompt(`${chainText(c)} = ?`), task: { kind: "numeric", answer: String(solve(c.second)) } })
  }
  for (let i = 0; i < 50; i++) {
    const p = rng.pick(problems)
    verifiable.push({ prompt: prompt(`${equation(p)} = ? Reply in the form "Answer: N".`), task: { kind: "format", pattern: "^\\s*Answer: \\d+\\s*$" } })
  }
  for (let i = 0; i < 50; i++) {
    const fact = rng.pick(trainFacts)
    // The sentence with any one word as the value: a format check, not a correctness check.
    const sentence = escapeRegExp(statement(fact, "VALUE")).replace("VALUE", "\\S+")
    verifiable.push({ prompt: prompt(`${world.question(fact)} Answer in a full sentence.`), task: { kind: "format", pattern: `^\\s*${sentence}\\s*$` } })
  }
  const rubric = Array.from({ length: 400 }, () => {
    const d = g.description()
    return { prompt: prompt(d.question), task: { kind: "rubric", items: d.items } satisfies Task }
  })

  // --- Preferences: pairs over questions drawn without replacement, split into training and held-out.
  type Pair = { prompt: string; good: string; bad: string; kind: string }
  const pairFor = (): Pair => {
    const kind = rng.pick(["correct-vs-wrong", "correct-vs-wrong", "concise-vs-rambling", "concise-vs-looping", "present-vs-missing"])
    const r = rng.next()
    let question: string, good: string, wrong: string
    if (r < 0.45) {
      const fact = rng.pick(trainFacts)
      question = g.factQuestion(fact, 0.3)
      good = value(fact)
      wrong = g.wrongFact(fact)
    } else if (r < 0.8) {
      const p = rng.pick(problems)
      question = g.arithQuestion(p)
      good = String(solve(p))
      wrong = g.wrongNumber(solve(p))
    } else {
      const d = g.description()
      question = d.question
      good = d.answer
      const swapped = rng.pick(d.facts)
      wrong = d.facts.map((fact) => (fact === swapped ? statement(fact, g.wrongFact(fact)) : statement(fact))).join(" ")
    }
    const asSentence = /[.!?]$/.test(good) ? good : `${good}.`
    const loop = rng.next() < 0.5 ? asSentence : `The answer is ${asSentence}`
    const bad = kind === "correct-vs-wrong"
      ? wrong
      : kind === "concise-vs-rambling"
      ? [asSentence, ...rng.shuffle(FILLERS).slice(0, 3 + rng.int(3)), `The answer is ${asSentence}`].join(" ")
      : kind === "concise-vs-looping"
      ? Array.from({ length: 6 + rng.int(8) }, () => loop).join(" ")
      : rng.pick(["", "I do not know.", "Let me think about that.", echoed(question)])
    return { prompt: prompt(question), good, bad, kind }
  }
  const seen = new Set<string>()
  const pairs: Array<Pair> = []
  while (pairs.length < 2300) {
    const pair = pairFor()
    if (seen.has(pair.prompt + pair.kind)) continue
    seen.add(pair.prompt + pair.kind)
    pairs.push(pair)
  }
  // Held out by prompt: no held-out prompt is in a training pair.
  const heldPrompts = new Set(rng.shuffle([...new Set(pairs.map((p) => p.prompt))]).slice(0, 280))
  const asRecord = ({ prompt, good, bad, kind }: Pair) =>
    rng.next() < 0.5 ? { prompt, a: good, b: bad, preferred: "a", kind } : { prompt, a: bad, b: good, preferred: "b", kind }
  const preferences = pairs.filter((p) => !heldPrompts.has(p.prompt)).map(asRecord)
  const preferencesHeldout = pairs.filter((p) => heldPrompts.has(p.prompt)).map(asRecord)

  // --- Online DPO prompts.
  const odpo = Array.from({ length: 1000 }, () => {
    const r = rng.next()
    if (r < 0.4) return { prompt: prompt(g.factQuestion(rng.pick(trainFacts), 0.3)) }
    if (r < 0.6) return { prompt: prompt(g.description().question) }
    if (r < 0.85) return { prompt: prompt(g.arithQuestion(rng.pick(problems))) }
    return { prompt: prompt(`${chainText(g.trainingChain())} = ?`) }
  })

  return { instruct, reasoning, verifiable, rubric, preferences, preferencesHeldout, odpo }
}

// ---------------------------------------------------------------------------------------------
// The judge's data: verdicts on rubric items, computed from how each response was made.

const FULL_SENTENCES = "answers in full sentences"
const NO_REPEATS = "does not repeat itself"

/**
 * Judge chats and held-out judge questions, and rubric prompts for evaluation. Lands split: those
 * of `heldLands` are only in the held-out questions. Each question picks a kind of item and a verdict
 * (half yes, half no), then a response that earns it:
 * - a fact item ("names V as the capital of E") is satisfied when the response states V for it:
 *   it is not when the response states another value, leaves the fact out, or the item claims a
 *   value the response does not give;
 * - "answers in full sentences" is not satisfied by a bare list of values, an empty answer or a
 *   question echoed back (it is about form: "I do not know." satisfies it, the fact items not);
 * - "does not repeat itself" is not satisfied when a sentence comes again.
 */
const makeJudgeFiles = (world: ReturnType<typeof readWorld>, rng: Rng, prompt: (question: string) => string, trainedPrompts: ReadonlySet<string>) => {
  const g = makeGenerators(world, rng)
  type Description = ReturnType<typeof g.description>

  const sentences = (facts: ReadonlyArray<Fact>, claimed = new Map<Fact, string>()) =>
    facts.map((fact) => statement(fact, claimed.get(fact) ?? value(fact)))
  const list = (values: ReadonlyArray<string>) => `${values.join(", ")}.`
  const repeated = (parts: ReadonlyArray<string>) => {
    const again = rng.pick(parts)
    const times = 1 + rng.int(3)
    return rng.next() < 0.5 ? [...parts, ...new Array<string>(times).fill(again)] : [...new Array<string>(times + 1).fill(parts.join(" "))]
  }
  const withFillers = (parts: ReadonlyArray<string>) => {
    const out = [...parts]
    for (const filler of rng.shuffle(FILLERS).slice(0, 1 + rng.int(2))) out.splice(rng.int(out.length + 1), 0, filler)
    return out
  }
  const nothing = (d: Description) => rng.pick(["", "I do not know.", echoed(d.question)])

  /** A response to `d` keeping `fact` as stated (or, `keep` false, not stating its value), as sentences in some form. */
  const responseAbout = (d: Description, fact: Fact, keep: boolean): string => {
    const others = d.facts.filter((f) => f !== fact)
    const claimed = new Map<Fact, string>()
    // Sometimes another fact is wrong: the item is about this one only.
    if (others.length > 0 && rng.next() < 0.3) {
      const other = rng.pick(others)
      claimed.set(other, g.wrongFact(other))
    }
    let facts = d.facts
    if (!keep) {
      if (rng.next() < 0.5) claimed.set(fact, g.wrongFact(fact))
      else facts = others
    } else if (others.length > 1 && rng.next() < 0.2) {
      const dropped = rng.pick(others)
      facts = d.facts.filter((f) => f !== dropped)
    }
    if (facts.length === 0) return nothing(d)
    const form = rng.next()
    if (form < 0.15) return list(facts.map((f) => claimed.get(f) ?? value(f)))
    const parts = rng.next() < 0.3 ? rng.shuffle(sentences(facts, claimed)) : sentences(facts, claimed)
    return (form < 0.3 ? repeated(parts) : form < 0.45 ? withFillers(parts) : parts).join(" ")
  }

  const question = (held: boolean) => {
    let d: Description
    do d = g.description()
    while (heldLands.has(d.land.name) !== held)
    const yes = rng.next() < 0.5
    const kind = rng.next()
    if (kind < 0.6) {
      const fact = rng.pick(d.facts)
      const item = fill(ASPECTS[fact.attribute].item, fact.land, fact.attribute)
      if (!yes && rng.next() < 0.3) {
        // The response is right and the item claims another value.
        const claimed = g.wrongFact(fact)
        const wrongItem = fill(ASPECTS[fact.attribute].item, fact.land, fact.attribute, claimed)
        return { d, response: responseAbout(d, fact, true), item: wrongItem, verdict: false, kind: "fact" }
      }
      return { d, response: rng.next() < 0.05 && !yes ? nothing(d) : responseAbout(d, fact, yes), item, verdict: yes, kind: "fact" }
    }
    const parts = sentences(d.facts)
    if (kind < 0.8) {
      const response = yes
        ? rng.pick([parts.join(" "), withFillers(parts).join(" "), repeated(parts).join(" "), "I do not know."])
        : rng.next() < 0.7
        ? list(d.facts.map(value))
        : rng.pick(["", echoed(d.question)])
      return { d, response, item: FULL_SENTENCES, verdict: yes, kind: "sentences" }
    }
    const response = yes
      ? rng.pick([parts.join(" "), withFillers(parts).join(" "), list(d.facts.map(value)), parts.slice(1).join(" ")])
      : repeated(rng.next() < 0.7 ? parts : d.facts.map(value)).join(" ")
    return { d, response, item: NO_REPEATS, verdict: yes, kind: "repeats" }
  }

  const heldLands = new Set(rng.shuffle(g.describable.map((land) => land.name)).slice(0, Math.round(g.describable.length * 0.15)))
  const chats = Array.from({ length: 6000 }, () => {
    const q = question(false)
    return chat([judgeQuestion(prompt(q.d.question), q.response, q.item), q.verdict ? "yes" : "no"])
  })
  const heldout = Array.from({ length: 400 }, () => {
    const q = question(true)
    return { prompt: prompt(q.d.question), response: q.response, item: q.item, verdict: q.verdict, kind: q.kind }
  })
  const evalRubric: Array<{ prompt: string; task: Task }> = []
  while (evalRubric.length < 60) {
    const d = g.description()
    const p = prompt(d.question)
    if (trainedPrompts.has(p) || evalRubric.some((r) => r.prompt === p)) continue
    evalRubric.push({ prompt: p, task: { kind: "rubric", items: d.items } })
  }
  return { chats, heldout, evalRubric }
}

/** Held-out chat evaluations: the eval-arith pairs, chains of two held-out pairs, the eval-recall facts. */
const makeEvals = (world: ReturnType<typeof readWorld>, rng: Rng, prompt: (question: string) => string) => {
  const arith = world.evalProblems.map((p) => ({ prompt: prompt(`${equation(p)} = ?`), answer: String(solve(p)) }))
  const chains: Array<{ prompt: string; answer: string }> = []
  const used = new Set<string>()
  for (const first of rng.shuffle(world.evalProblems)) {
    const r = solve(first)
    if (r > 99) continue
    const seconds: Array<Problem> = []
    for (let b = 0; b < 100; b++) {
      for (const second of [{ a: r, op: "+", b }, { a: r, op: "-", b }] as Array<Problem>) {
        if (solve(second) >= 0 && solve(second) <= 99 && world.heldPairs.has(pairKey(second))) seconds.push(second)
      }
    }
    for (const second of rng.shuffle(seconds).slice(0, 2)) {
      const text = chainText({ first, second })
      if (used.has(text)) continue
      used.add(text)
      chains.push({ prompt: prompt(`${text} = ?`), answer: String(solve(second)) })
    }
  }
  const recall = world.heldFacts.map((fact) => ({ prompt: prompt(world.question(fact)), answer: value(fact) }))
  return { arith, chains: rng.shuffle(chains).slice(0, 300), recall: rng.shuffle(recall) }
}

/** Fails when a training record asks a held-out fact's question or states a held-out pair. */
const checkHeldOut = (world: ReturnType<typeof readWorld>, training: ReadonlyArray<unknown>) => {
  const text = training.map((record) => JSON.stringify(record)).join("\n")
  for (const key of statedPairs(text)) if (world.heldPairs.has(key)) throw new Error(`held-out pair ${key} in the training files`)
  for (const fact of world.heldFacts) {
    const asked = [world.question(fact), ...PARAPHRASES[fact.attribute].map((p) => fill(p, fact.land)), fill(ASPECTS[fact.attribute].item, fact.land, fact.attribute)]
    const found = asked.find((q) => text.includes(q))
    if (found !== undefined) throw new Error(`held-out fact asked in the training files: ${found}`)
  }
}

const jsonl = (records: ReadonlyArray<unknown>) => records.map((r) => JSON.stringify(r)).join("\n") + "\n"

if (import.meta.main) {
  const { values } = parseArgs({
    options: { seed: { type: "string", default: "20261" }, out: { type: "string", default: "data/post" } }
  })
  const tokenizer = await Effect.runPromise(Tokenizer.load("assets/parent"))
  const bos = "<s>"
  const render = (question: string) => {
    const text = Effect.runSync(tokenizer.applyChatTemplate([{ role: "user", content: question }], { addGenerationPrompt: true }))
    // The tokenizer adds <s> itself, as for every text of data/.
    return text.startsWith(bos) ? text.slice(bos.length) : text
  }
  const world = readWorld()
  const rng = makeRng(Number(values.seed))
  const files = makeFiles(world, rng, render)
  const evals = makeEvals(world, rng, render)
  // Its own stream of numbers, so that the files above stay as they were before the judge's data.
  const trainedPrompts = new Set([
    ...[files.verifiable, files.rubric, files.preferences, files.preferencesHeldout, files.odpo].flat().map((r) => r.prompt),
    ...[files.instruct, files.reasoning].flat().flatMap((c) => c.messages.filter((m) => m.role === "user").map((m) => render(m.content)))
  ])
  const judge = makeJudgeFiles(world, makeRng(Number(values.seed) + 1), render, trainedPrompts)
  checkHeldOut(world, [files.instruct, files.reasoning, files.verifiable, files.rubric, files.preferences, files.preferencesHeldout, files.odpo, judge.chats, judge.heldout, judge.evalRubric])

  const outputs: Record<string, ReadonlyArray<unknown>> = {
    "sft-instruct.jsonl": files.instruct,
    "sft-reasoning.jsonl": files.reasoning,
    "grpo-verifiable.jsonl": files.verifiable,
    "grpo-rubric.jsonl": files.rubric,
    "preferences.jsonl": files.preferences,
    "preferences-heldout.jsonl": files.preferencesHeldout,
    "odpo-prompts.jsonl": files.odpo,
    "eval-arith-chat.jsonl": evals.arith,
    "eval-chain-chat.jsonl": evals.chains,
    "eval-recall-chat.jsonl": evals.recall,
    "sft-judge.jsonl": judge.chats,
    "judge-heldout.jsonl": judge.heldout,
    "eval-rubric-chat.jsonl": judge.evalRubric
  }
  mkdirSync(values.out, { recursive: true })
  const stats: Record<string, unknown> = { seed: Number(values.seed) }
  for (const [name, records] of Object.entries(outputs)) {
    const text = jsonl(records)
    writeFileSync(join(values.out, name), text)
    stats[name] = { lines: records.length, bytes: Buffer.byteLength(text) }
  }
  writeFileSync(join(values.out, "stats.json"), JSON.stringify(stats, null, 2) + "\n")
  console.log(JSON.stringify(stats, null, 2))
}
