/**
 * Writes the embedded default's image world: small pictures whose content can be asked about and
 * scored exactly, linked to the lands of the text world (scripts/make_corpus.ts). Deterministic from a
 * seed; no network.
 *
 *   node scripts/make_image_world.ts [--seed 20261] [--out data/vision] [--pixels FILE]
 *
 * The pictures are 32 x 32 PNGs (one Pixtral grid of 4 x 4 image tokens at patch 4, merge 2) of two kinds:
 * - scenes: one to four shapes (square, circle, triangle) in eight colours, each in one cell of a
 *   2 x 2 grid, on a dark ground. Asked: how many shapes, how many of a colour, how many of a kind
 *   (the counting a verifier checks), and the colour of the shape at a corner;
 * - flags: a land's flag as the text world states its colour (a field of the colour, a dark stripe).
 *   Asked: whether it is the flag of a named land (which needs the text world's fact and the
 *   picture), and its colour.
 *
 * Files written to the output folder:
 * - images/*.png        the pictures;
 * - train.jsonl         `{"text": "[IMG]Q: ... A: answer", "images": [file]}`, several questions a picture;
 * - eval.jsonl          `{"prompt": "[IMG]Q: ... A:", "answer", "images", "kind"}`: held-out pictures,
 *                       one question each (visual accuracy);
 * - count.jsonl         `{"prompt", "answer", "images"}`: held-out counting questions for visual GRPO
 *                       (pictures in neither of the above);
 * - distill.jsonl       `{"text", "images"}` 200 lines of train.jsonl for the children's projector step
 *                       and distillation (a slice: the children see what the parent learned from);
 * - sft-visual.jsonl    chat lines (`{"messages"}`, the picture an image part of the user's turn) of
 *                       training pictures' questions, for post-training;
 * - grpo-count.jsonl    `{"prompt", "task": {"kind": "numeric", "answer"}, "images"}`: counting questions
 *                       in chat form on pictures of their own, for visual GRPO with a verifier;
 * - grpo-visual.jsonl   a question of every kind on training pictures (scenes and flags) in chat form,
 *                       counts checked as numbers, colours and yes/no exactly (`"kind": "exact"`): the
 *                       visual GRPO of post-training;
 * - eval-chat.jsonl     eval.jsonl's questions in chat form, for post-training's visual accuracy;
 * - stats.json          counts and majority baselines.
 * With --pixels FILE, also the train and eval pictures' RGB bytes, [N, 32, 32, 3] uint8 in the order of
 * a `pixels.json` beside it (file names), for the parent's trainer on a machine without a PNG decoder.
 */
import { mkdirSync, writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { parseArgs } from "node:util"
import pngjs from "pngjs"
import { defaults as corpusDefaults, makeCorpus, makeRng } from "./make_corpus.ts"

export const SIZE = 32
const CELL = SIZE / 2
const GROUND: Rgb = [28, 28, 36]

type Rgb = readonly [number, number, number]

/** The colours a picture is drawn in: those of the text world's flag colours that read apart on the ground. */
export const PALETTE: Readonly<Record<string, Rgb>> = {
  red: [220, 40, 40],
  blue: [40, 90, 230],
  green: [40, 180, 70],
  yellow: [235, 215, 40],
  white: [240, 240, 240],
  orange: [245, 140, 30],
  purple: [150, 60, 190],
  pink: [245, 140, 190]
}
const COLOURS = Object.keys(PALETTE)
const KINDS = ["square", "circle", "triangle"] as const
type Kind = (typeof KINDS)[number]
const PLURAL: Record<Kind, string> = { square: "squares", circle: "circles", triangle: "triangles" }
const CORNERS = ["top left", "top right", "bottom left", "bottom right"]

interface Shape {
  readonly kind: Kind
  readonly colour: string
  /** 0..3: top left, top right, bottom left, bottom right. */
  readonly cell: number
}

/** Whether pixel (x, y) of a cell (0..CELL-1 each) lies in the shape. */
const inside = (kind: Kind, x: number, y: number): boolean => {
  const [cx, cy] = [x + 0.5 - CELL / 2, y + 0.5 - CELL / 2]
  switch (kind) {
    case "square":
      return Math.abs(cx) <= 5 && Math.abs(cy) <= 5
    case "circle":
      return cx * cx + cy * cy <= 5.8 * 5.8
    case "triangle":
      // Apex up, base 12 pixels wide at the bottom.
      return cy >= -5.5 && cy <= 5.5 && Math.abs(cx) <= (cy + 5.5) * 0.55
  }
}

const blank = (): Uint8Array => {
  const rgb = new Uint8Array(SIZE * SIZE * 3)
  for (let i = 0; i < SIZE * SIZE; i++) rgb.set(GROUND, i * 3)
  return rgb
}

export const drawScene = (shapes: ReadonlyArray<Shape>): Uint8Array => {
  const rgb = blank()
  for (const { kind, colour, cell } of shapes) {
    const [ox, oy] = [(cell % 2) * CELL, Math.floor(cell / 2) * CELL]
    for (let y = 0; y < CELL; y++) {
      for (let x = 0; x < CELL; x++) if (inside(kind, x, y)) rgb.set(PALETTE[colour], ((oy + y) * SIZE + ox + x) * 3)
    }
  }
  return rgb
}

/** A flag: a field of its colour with a dark stripe across the middle third and a dark border. */
export const drawFlag = (colour: string): Uint8Array => {
  const rgb = blank()
  for (let y = 4; y < SIZE - 4; y++) {
    for (let x = 2; x < SIZE - 2; x++) {
      const stripe = y >= 13 && y < 19
      if (!stripe) rgb.set(PALETTE[colour], (y * SIZE + x) * 3)
    }
  }
  return rgb
}

export const png = (rgb: Uint8Array): Buffer => {
  const image = new pngjs.PNG({ width: SIZE, height: SIZE, colorType: 2, inputColorType: 2, inputHasAlpha: false })
  image.data = Buffer.from(rgb)
  return pngjs.PNG.sync.write(image, { colorType: 2, inputColorType: 2, inputHasAlpha: false })
}

interface Question {
  readonly question: string
  readonly answer: string
  readonly kind: string
}

const sceneQuestions = (shapes: ReadonlyArray<Shape>, rng: ReturnType<typeof makeRng>): Array<Question> => {
  const colour = rng.pick(COLOURS)
  const kind = rng.pick(KINDS)
  const corner = rng.pick(shapes)
  return [
    { question: "How many shapes are in the picture?", answer: String(shapes.length), kind: "count" },
    { question: `How many ${colour} shapes are in the picture?`, answer: String(shapes.filter((s) => s.colour === colour).length), kind: "count-colour" },
    { question: `How many ${PLURAL[kind]} are in the picture?`, answer: String(shapes.filter((s) => s.kind === kind).length), kind: "count-kind" },
    { question: `What colour is the shape at the ${CORNERS[corner.cell]}?`, answer: corner.colour, kind: "colour-at" }
  ]
}

export interface ImageWorldOptions {
  readonly seed: number
  readonly trainScenes: number
  readonly trainFlags: number
  readonly evalPictures: number
  readonly countPrompts: number
  readonly distillLines: number
  readonly sftLines: number
  readonly grpoPrompts: number
}

export const defaults: ImageWorldOptions = { seed: 20261, trainScenes: 2400, trainFlags: 1200, evalPictures: 300, countPrompts: 200, distillLines: 200, sftLines: 800, grpoPrompts: 400 }

export interface Picture {
  readonly file: string
  readonly rgb: Uint8Array
  readonly questions: ReadonlyArray<Question>
}

export const makeImageWorld = (options: ImageWorldOptions) => {
  const rng = makeRng(options.seed)
  const lands = makeCorpus(corpusDefaults).lands.filter((land) => land.colour in PALETTE)
  const scene = (): { rgb: Uint8Array; questions: Array<Question> } => {
    const cells = rng.shuffle([0, 1, 2, 3]).slice(0, 1 + rng.int(4))
    const shapes = cells.map((cell) => ({ kind: rng.pick(KINDS), colour: rng.pick(COLOURS), cell }))
    return { rgb: drawScene(shapes), questions: sceneQuestions(shapes, rng) }
  }
  const flag = (): { rgb: Uint8Array; questions: Array<Question> } => {
    const land = rng.pick(lands)
    // Half the time the land asked about is another with another colour: the answer is "no".
    const others = lands.filter((other) => other.colour !== land.colour)
    const asked = rng.next() < 0.5 ? land : rng.pick(others)
    return {
      rgb: drawFlag(land.colour),
      questions: [
        { question: `Is this the flag of ${asked.name}?`, answer: asked === land ? "yes" : "no", kind: "flag-of" },
        { question: "What colour is this flag?", answer: land.colour, kind: "flag-colour" }
      ]
    }
  }
  const pictures = (prefix: string, count: number, make: () => { rgb: Uint8Array; questions: Array<Question> }): Array<Picture> =>
    Array.from({ length: count }, (_, i) => ({ file: `images/${prefix}-${String(i).padStart(5, "0")}.png`, ...make() }))
  const train = [...pictures("scene", options.trainScenes, scene), ...pictures("flag", options.trainFlags, flag)]
  const held = rng.shuffle([...pictures("eval-scene", Math.round(options.evalPictures * 2 / 3), scene), ...pictures("eval-flag", options.evalPictures - Math.round(options.evalPictures * 2 / 3), flag)])
  const count = pictures("count", options.countPrompts, scene)
  const line = (question: Question) => `[IMG]Q: ${question.question} A:`
  const trainLines = rng.shuffle(train.flatMap((picture) => picture.questions.map((q) => ({ text: `${line(q)} ${q.answer}`, images: [picture.file] }))))
  const evalQuestions = held.map((picture) => rng.pick(picture.questions))
  const evalTasks = held.map((picture, i) => ({ prompt: line(evalQuestions[i]), answer: evalQuestions[i].answer, images: [picture.file], kind: evalQuestions[i].kind }))
  const countTasks = count.map((picture) => {
    const q = rng.pick(picture.questions.filter((question) => question.kind.startsWith("count")))
    return { prompt: line(q), answer: q.answer, images: [picture.file], question: q.question }
  })
  const byKind = new Map<string, Map<string, number>>()
  for (const task of evalTasks) {
    const answers = byKind.get(task.kind) ?? new Map<string, number>()
    answers.set(task.answer, (answers.get(task.answer) ?? 0) + 1)
    byKind.set(task.kind, answers)
  }
  const majority = [...byKind.values()].reduce((n, answers) => n + Math.max(...answers.values()), 0) / evalTasks.length
  const stats = {
    seed: options.seed,
    trainPictures: train.length,
    trainLines: trainLines.length,
    evalTasks: evalTasks.length,
    evalByKind: Object.fromEntries([...byKind].map(([kind, answers]) => [kind, [...answers.values()].reduce((a, b) => a + b)])),
    evalMajorityBaseline: majority,
    countTasks: countTasks.length,
    flagLands: lands.length
  }
  // The chat forms: the question is the user's turn after the picture, the answer the assistant's.
  const chatPrompt = (question: string) => `[INST] [IMG]${question} [/INST]`
  const sftLines = rng.shuffle(train.flatMap((picture) => picture.questions.map((q) => ({ picture, q })))).slice(0, options.sftLines).map(({ picture, q }) => ({
    messages: [
      { role: "user", content: [{ type: "image", image: picture.file }, { type: "text", text: q.question }] },
      { role: "assistant", content: q.answer }
    ]
  }))
  const grpoCount = count.map((picture, i) => ({ prompt: chatPrompt(countTasks[i].question), task: { kind: "numeric", answer: countTasks[i].answer }, images: [picture.file] }))
  // Drawn last, so that the files above stay as they were before it.
  const grpoVisual = rng.shuffle([...train]).slice(0, options.grpoPrompts).map((picture) => {
    const q = rng.pick(picture.questions)
    return { prompt: chatPrompt(q.question), task: q.kind.startsWith("count") ? { kind: "numeric", answer: q.answer } : { kind: "exact", answer: q.answer }, images: [picture.file] }
  })
  const evalChat = held.map((picture, i) => ({ prompt: chatPrompt(evalQuestions[i].question), answer: evalQuestions[i].answer, images: [picture.file], kind: evalQuestions[i].kind }))
  return {
    pictures: [...train, ...held, ...count],
    train,
    held,
    trainLines,
    evalTasks,
    countTasks: countTasks.map(({ prompt, answer, images }) => ({ prompt, answer, images })),
    distillLines: trainLines.slice(0, options.distillLines),
    sftLines,
    grpoCount,
    grpoVisual,
    evalChat,
    stats
  }
}

const jsonl = (records: ReadonlyArray<unknown>) => records.map((r) => JSON.stringify(r)).join("\n") + "\n"

if (import.meta.main) {
  const { values } = parseArgs({
    options: { seed: { type: "string", default: String(defaults.seed) }, out: { type: "string", default: "data/vision" }, pixels: { type: "string" } }
  })
  const world = makeImageWorld({ ...defaults, seed: Number(values.seed) })
  mkdirSync(join(values.out, "images"), { recursive: true })
  for (const picture of world.pictures) writeFileSync(join(values.out, picture.file), png(picture.rgb))
  const files = {
    "train.jsonl": world.trainLines,
    "eval.jsonl": world.evalTasks,
    "count.jsonl": world.countTasks,
    "distill.jsonl": world.distillLines,
    "sft-visual.jsonl": world.sftLines,
    "grpo-count.jsonl": world.grpoCount,
    "grpo-visual.jsonl": world.grpoVisual,
    "eval-chat.jsonl": world.evalChat
  }
  for (const [name, records] of Object.entries(files)) writeFileSync(join(values.out, name), jsonl(records))
  writeFileSync(join(values.out, "stats.json"), JSON.stringify(world.stats, null, 2) + "\n")
  if (values.pixels !== undefined) {
    const shipped = [...world.train, ...world.held]
    mkdirSync(dirname(values.pixels), { recursive: true })
    writeFileSync(values.pixels, Buffer.concat(shipped.map((picture) => Buffer.from(picture.rgb))))
    writeFileSync(join(dirname(values.pixels), "pixels.json"), JSON.stringify(shipped.map((picture) => picture.file)))
  }
  console.log(JSON.stringify(world.stats, null, 2))
}
