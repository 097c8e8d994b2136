import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import * as CodeRunner from "../src/rewards/CodeRunner.ts"
import * as Verifiers from "../src/rewards/Verifiers.ts"

const passes = (response: string, expected: number) => Verifiers.numeric(response, expected).reward === 1

describe("Verifiers.numeric", () => {
  it("reads the final answer after the thinking, a label or a box, else the last number", () => {
    const cases: ReadonlyArray<[string, number]> = [
      ["[THINK]Maybe 41? No.[/THINK]The answer is 42.", 42],
      ["So the total is 42", 42],
      ["Answer: 42. Check: 6 * 7 = 42, and 43 is too many.", 42],
      ["Final answer: x = 17", 17],
      ["Q: how many? A: 9 of them, out of 12", 9],
      ["We get \\boxed{\\frac{3}{4}} since 3 of 4.", 0.75],
      ["\\boxed{x = -2}", -2],
      ["It costs 1,234,567 dollars", 1234567],
      ["It costs 1 234 567 dollars", 1234567],
      ["about 1\\,000 people", 1000],
      ["the result is \u22125", -5],
      ["the result is +7", 7],
      ["12.0", 12],
      [".5", 0.5],
      ["3/4", 0.75],
      ["-3 / 4", -0.75],
      ["2e-3", 0.002],
      ["pages 3-4", 4],
      ["CO2 rose by 5", 5]
    ]
    for (const [response, expected] of cases) {
      const score = Verifiers.numeric(response, expected)
      assert.strictEqual(score.reward, 1, `${response}: ${score.checks[0].note}`)
    }
  })

  it("compares within a relative tolerance", () => {
    assert.isTrue(passes("0.75", 3 / 4))
    assert.isTrue(passes("0.333333", 1 / 3))
    assert.isFalse(passes("0.33", 1 / 3))
    assert.isTrue(passes("1000000.0001", 1e6))
    assert.isFalse(passes("1e-3", 0), "near 0 the tolerance is absolute")
  })

  it("fails wrong, missing and unfinished answers, with a note", () => {
    const wrong = Verifiers.numeric("The answer is 43", 42)
    assert.deepStrictEqual(wrong, { reward: 0, checks: [{ name: "answer", passed: false, note: "answered 43 (43), expected 42" }] })
    assert.strictEqual(Verifiers.numeric("I do not know", 42).checks[0].note, "no number in the final answer")
    assert.isFalse(passes("[THINK]It is 42, I think", 42), "thinking that never closed gave no answer")
    assert.isFalse(passes("42 is close. Answer: none", 42), "a label with no number after it is no answer")
    assert.isFalse(passes("\\boxed{yes}, since 42", 42))
    assert.isFalse(passes("1,2345", 12345), "not a grouping")
  })

  it("exact: the answer before the first newline, thinking stripped, as held-out questions are scored", () => {
    assert.deepStrictEqual(Verifiers.exact("[THINK]blue?[/THINK] red \nbecause", "red"), { reward: 1, checks: [{ name: "answer", passed: true, note: 'answered "red", expected "red"' }] })
    assert.strictEqual(Verifiers.exact("light  blue</s>", "light blue").reward, 1, "whitespace collapsed, EOS ends it")
    assert.strictEqual(Verifiers.exact("red flag", "red").reward, 0, "the whole answer, not a prefix")
    assert.strictEqual(Verifiers.exact("Yes", "yes").reward, 0, "case counts, as in Tasks.score")
    assert.strictEqual(Verifiers.exact("[THINK]red", "red").reward, 0, "thinking that never closed gave no answer")
  })

  it.prop(
    "an integer reads back however it is written: grouped, signed, with a unicode minus or a trailing .0",
    { n: Schema.Int.check(Schema.isBetween({ minimum: -1e9, maximum: 1e9 })), style: Schema.Literals(["plain", "commas", "spaces", "decimal"]) },
    ({ n, style }) => {
      const digits = Math.abs(n).toString()
      const grouped = (separator: string) => digits.replace(/\B(?=(\d{3})+$)/g, separator)
      const body = { plain: digits, commas: grouped(","), spaces: grouped(" "), decimal: `${digits}.0` }[style]
      const sign = n < 0 ? "\u2212" : n > 0 && style === "plain" ? "+" : ""
      return passes(`[THINK]not ${n + 1}[/THINK]The answer is ${sign}${body}.`, n)
    }
  )

  it("lastNumber reads the expected answers of tasks", () => {
    assert.strictEqual(Verifiers.lastNumber("1,234")?.value, 1234)
    assert.strictEqual(Verifiers.lastNumber("-3/4")?.value, -0.75)
    assert.isUndefined(Verifiers.lastNumber("seven"))
    assert.isUndefined(Verifiers.lastNumber("1/0"), "not a finite number")
  })
})

describe("Verifiers.format, code, verdict, shareOf", () => {
  it("format matches the whole response, a global pattern as well as any", () => {
    const pattern = /\[\/THINK\]\s*\\boxed\{[^}]+\}\s*$/g
    assert.strictEqual(Verifiers.format("[THINK]hm[/THINK] \\boxed{4}", pattern).reward, 1)
    assert.strictEqual(Verifiers.format("[THINK]hm[/THINK] \\boxed{4}", pattern).reward, 1, "lastIndex is not carried over")
    const missed = Verifiers.format("4", pattern)
    assert.deepStrictEqual(missed, { reward: 0, checks: [{ name: `matches ${pattern}`, passed: false }] })
  })

  it("code takes the last JavaScript block of the answer, else the whole answer", () => {
    const fence = "```"
    const response = [
      `[THINK]${fence}js\nfunction f() { return "thinking" }\n${fence}[/THINK]`,
      `${fence}js\nfunction f() { return 1 }\n${fence}`,
      `${fence}javascript\nfunction f() { return 2 }\n${fence}`,
      `${fence}python\ndef f(): return 3\n${fence}`,
      "That is all."
    ].join("\n")
    assert.strictEqual(Verifiers.code(response), "function f() { return 2 }\n")
    assert.strictEqual(Verifiers.code(`${fence}\nconst g = 1\n${fence}`), "const g = 1\n")
    assert.strictEqual(Verifiers.code("[THINK]x[/THINK]function f() {}"), "function f() {}")
  })

  it("verdict reads yes or no, and nothing else", () => {
    const cases: ReadonlyArray<[string, boolean | undefined]> = [
      ["Yes", true],
      ["no.", false],
      ["**No**, it does not.", false],
      ["YES, although no example is given", true],
      ["The answer is: yes", true],
      ["[THINK]no, wait[/THINK]Yes", true],
      ["Not really", undefined],
      ["It is yes and no", undefined],
      ["", undefined]
    ]
    for (const [answer, expected] of cases) assert.strictEqual(Verifiers.verdict(answer), expected, answer)
  })

  it("shareOf counts decided checks only", () => {
    const check = (passed: boolean | undefined) => ({ name: "c", passed })
    assert.strictEqual(Verifiers.shareOf([check(true), check(false), check(undefined)]).reward, 0.5)
    assert.strictEqual(Verifiers.shareOf([check(true), check(undefined)]).reward, 1)
    assert.isUndefined(Verifiers.shareOf([check(undefined)]).reward)
    assert.isUndefined(Verifiers.shareOf([]).reward)
  })
})

describe("CodeRunner", () => {
  const limits = { timeoutMs: 500, memoryMb: 32 }
  const run = (code: string, tests: string) => CodeRunner.run(code, "add", tests, limits)
  const tests = `
    test("small", () => assert.equal(add(1, 2), 3))
    test("negative", () => assert.equal(add(-1, -2), -3))
    test("lists", () => assert.deepEqual([add(1, 1)], [2]))`

  it.live("passes a right function, and fails a wrong one test by test", () =>
    Effect.gen(function*() {
      assert.deepStrictEqual(yield* run("function add(a, b) { return a + b }", tests), [
        { name: "small", passed: true },
        { name: "negative", passed: true },
        { name: "lists", passed: true }
      ])
      assert.deepStrictEqual(yield* run("export const add = (a, b) => Math.abs(a + b)", tests), [
        { name: "small", passed: true },
        { name: "negative", passed: false, note: "Error: expected -3, got 3" },
        { name: "lists", passed: true }
      ])
    }))

  it.live("tests without test() are one test; a test fails when it throws, returns false or a promise", () =>
    Effect.gen(function*() {
      const add = "const add = (a, b) => a + b"
      assert.deepStrictEqual(yield* run(add, "if (add(2, 2) !== 4) throw new Error('no')"), [{ name: "tests", passed: true }])
      assert.deepStrictEqual(yield* run(add, "assert(add(2, 2) === 5, 'two and two')"), [
        { name: "tests", passed: false, note: "Error: two and two" }
      ])
      const results = yield* run(add, `test("false", () => add(1, 1) === 3); test("async", async () => {}); throw new Error("after")`)
      assert.deepStrictEqual(results, [
        { name: "false", passed: false, note: "Error: returned false" },
        { name: "async", passed: false, note: "Error: returned a promise: tests run synchronously" },
        { name: "tests", passed: false, note: "Error: after" }
      ])
    }))

  it.live("a loop times out its test and the next tests still run; a loop while loading fails the load", () =>
    Effect.gen(function*() {
      const results = yield* run("function add(a, b) { while (a > 0) {} return a + b }", tests)
      assert.deepStrictEqual(results, [
        { name: "small", passed: false, note: "Error: Script execution timed out after 500ms" },
        { name: "negative", passed: true },
        { name: "lists", passed: false, note: "Error: Script execution timed out after 500ms" }
      ])
      const loading = yield* run("for (;;) {}", tests)
      assert.deepStrictEqual(loading, [{ name: "load", passed: false, note: "Error: Script execution timed out after 500ms" }])
    }))

  it.live("memory bombs on the heap and in buffers stop the worker: that test fails, later ones were not run", () =>
    Effect.gen(function*() {
      for (const [bomb, note] of [
        ["const kept = []; while (true) kept.push(new Array(1e5).fill(a))", "exceeded its 32 MB heap"],
        ["const kept = []; while (true) kept.push(new Uint8Array(1e7).fill(1))", "exceeded 32 MB of buffer memory"]
      ]) {
        const results = yield* run(`function add(a, b) { if (a < 0) { ${bomb} } return a + b }`, tests)
        assert.deepStrictEqual(results, [
          { name: "small", passed: true },
          { name: "negative", passed: false, note },
          { name: "lists", passed: false, note: "not run: the worker was stopped" }
        ], bomb)
      }
    }))

  it.live("syntax errors, thrown errors, a missing function and Node's APIs are failures with notes", () =>
    Effect.gen(function*() {
      const load = (code: string) => run(code, tests).pipe(Effect.map((results) => results.map(({ name, passed, note }) => `${name} ${passed} ${note}`)))
      assert.deepStrictEqual(yield* load("function add(a, b) {"), ["load false SyntaxError: Unexpected end of input"])
      assert.deepStrictEqual(yield* load("throw new TypeError('at load')"), ["load false TypeError: at load"])
      assert.deepStrictEqual(yield* load("function plus(a, b) { return a + b }"), ["load false Error: the response defines no function add"])
      const escapes = [
        ["require('node:fs')", "ReferenceError: require is not defined"],
        ["process.exit(1)", "ReferenceError: process is not defined"],
        ["this.constructor.constructor('return process')()", "EvalError: Code generation from strings disallowed for this context"],
        ["setTimeout(() => {}, 0)", "ReferenceError: setTimeout is not defined"]
      ]
      for (const [use, note] of escapes) {
        const results = yield* run(`function add(a, b) { console.log(a); return ${use} }`, `test("escape", () => add(1, 2))`)
        assert.deepStrictEqual(results, [{ name: "escape", passed: false, note }], use)
      }
    }))

  it.live("the response's code cannot register tests, replace the harness or fool assert by changing built-ins", () =>
    Effect.gen(function*() {
      const harness = "globalThis[Object.getOwnPropertyNames(globalThis).find((name) => name.startsWith('__cascade'))]"
      const cheats = [
        `${harness}.define(undefined, (test) => test("free", () => {}))`,
        `try { ${harness}.define(undefined, (test) => test("free", () => {})) } catch {}`,
        `${harness}.run = () => {}; Object.freeze = (o) => o`,
        "Object.is = () => true; JSON.stringify = () => '[2]'; Object.keys = () => []; Object.prototype.constructor = null",
        "Array.isArray = () => true; Object.getPrototypeOf = () => null"
      ]
      for (const cheat of cheats) {
        const results = yield* run(`${cheat}\nfunction add(a, b) { return a - b }`, tests)
        assert.isTrue(results.every(({ passed }) => !passed), `${cheat}: ${JSON.stringify(results)}`)
        assert.isAtMost(results.length, 3, cheat)
      }
      const caller = yield* run("function add() { return typeof add.caller }", `test("no caller", () => assert.equal(add(), "object"))`)
      assert.deepStrictEqual(caller, [{ name: "no caller", passed: true }], "strict tests hide themselves from the response: caller is null")
    }))

  it.effect("tests that do not parse, an entry that is not a name or limits too small are the task's fault", () =>
    Effect.gen(function*() {
      const broken = yield* Effect.flip(run("const add = () => 1", "test('x', () => {"))
      assert.strictEqual(broken._tag, "RewardError")
      assert.match(broken.reason, /^the tests do not parse: SyntaxError/)
      const entry = yield* Effect.flip(CodeRunner.run("1", "a b", "", limits))
      assert.strictEqual(entry.reason, 'the entry "a b" is not a JavaScript identifier')
      const small = yield* Effect.flip(CodeRunner.run("1", "a", "", { timeoutMs: 100, memoryMb: 2 }))
      assert.strictEqual(small.reason, "the limits must be a positive time and at least 16 MB, not 100 ms and 2 MB")
    }))
})
