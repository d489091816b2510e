"""The built-in chain-of-thought task: seeded arithmetic word problems in English and Chinese.

A problem is ``a op b`` with op in + - * (subtraction keeps a >= b; multiplication is a
multi-digit number times one digit), asked with one of a few English or Chinese templates.
Two answer styles:

- direct:            ``Answer: 623``                     / ``答案：623``
- chain of thought:  one line per digit, right to left, each line ``x+y+c=s, PARTIAL`` where
  PARTIAL is the answer's digits known so far, then the final answer line. For 348 + 275:

      8+5+0=13, 3 carry 1
      4+7+1=12, 23 carry 1
      3+2+1=6, 623
      Answer: 623

  Subtraction writes the borrowed ten into the top digit (``14-7-1=6, 63 borrow 1``);
  multiplication adds the carry (``8*7+3=59, 9 carry 5``). Every line has the same shape (the
  incoming carry/borrow is written even when it is 0) and the answer line copies the last
  partial (leading zeros dropped): a tiny model only ever does one-digit arithmetic and copying.
  Chinese uses 进1 / 借1 for carry / borrow and ``答案：N``.

Held-out split: every (op, a, b) is assigned to "test" or "train" by a fixed hash of the problem
itself (commutative pairs share one key), so test problems never appear in any training set
(pretraining corpus, SFT, RL prompts) whatever the seeds and sizes.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

OPS = ("+", "-", "*")
LANGS = ("en", "zh")

# Question templates per (lang, op). {a} {b} are the operands of ``a op b``.
_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("en", "+"): ("What is {a} plus {b}?",
                  "{a} + {b} = ?",
                  "Tom has {a} apples and buys {b} more. How many apples does he have now?"),
    ("en", "-"): ("What is {a} minus {b}?",
                  "{a} - {b} = ?",
                  "Tom has {a} apples and eats {b}. How many apples are left?"),
    ("en", "*"): ("What is {a} times {b}?",
                  "{a} * {b} = ?",
                  "There are {b} boxes with {a} pens in each box. How many pens are there?"),
    ("zh", "+"): ("{a} 加 {b} 是多少？",
                  "{a} 个苹果加 {b} 个苹果是多少？",
                  "小明有 {a} 个苹果，又买了 {b} 个，现在一共有多少个？"),
    ("zh", "-"): ("{a} 减 {b} 是多少？",
                  "{a} - {b} = ?",
                  "小明有 {a} 个苹果，吃了 {b} 个，还剩多少个？"),
    ("zh", "*"): ("{a} 乘 {b} 是多少？",
                  "{a} * {b} = ?",
                  "每盒有 {a} 支笔，{b} 盒一共有多少支笔？"),
}
_ANSWER_PREFIX = {"en": "Answer: ", "zh": "答案："}
_CARRY = {"en": " carry {}", "zh": " 进{}"}
_BORROW = {"en": " borrow 1", "zh": " 借1"}

# Fraction of the problem space reserved for held-out tests (1 in _HELDOUT_MOD).
_HELDOUT_MOD = 10


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    op: str
    lang: str
    a: int
    b: int

    def to_record(self) -> dict:
        """JSON-ready ``{"prompt", "answer", "op", "lang"}`` (the RL / eval record format)."""
        return {"prompt": self.question, "answer": self.answer, "op": self.op, "lang": self.lang}


# --------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------
def is_heldout(op: str, a: int, b: int) -> bool:
    """True if ``a op b`` belongs to the held-out test split (a fixed hash; seeds play no part)."""
    if op in ("+", "*"):
        a, b = min(a, b), max(a, b)  # 3+5 and 5+3 are one problem
    digest = hashlib.md5(f"{op}|{a}|{b}".encode()).digest()
    return digest[0] % _HELDOUT_MOD == 0


def _number(rng: random.Random, n_digits: int) -> int:
    if n_digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (n_digits - 1), 10 ** n_digits - 1)


def _check_digits(digits: tuple[int, int]) -> None:
    lo, hi = digits
    if not (1 <= lo <= hi <= 9):
        raise ValueError(f"digits must be (lo, hi) with 1 <= lo <= hi <= 9, got {digits!r}")


def make_problem(rng: random.Random, ops: tuple[str, ...] = OPS, langs: tuple[str, ...] = LANGS,
                 digits: tuple[int, int] = (1, 3), split: str | None = None) -> Problem:
    """One random problem. Operand lengths are uniform in ``digits`` (the second factor of a
    multiplication is always one digit). ``split``: "train" rejects held-out problems, "test"
    keeps only held-out ones, None takes anything."""
    _check_digits(digits)
    for name, vals, allowed in (("ops", ops, OPS), ("langs", langs, LANGS)):
        if not vals or any(v not in allowed for v in vals):
            raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {vals!r}")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    while True:
        op, lang = rng.choice(ops), rng.choice(langs)
        a = _number(rng, rng.randint(*digits))
        if op == "*":
            b = rng.randint(2, 9)
            if digits[1] > 1 and a < 10:  # keep multiplication multi-digit when allowed
                continue
        else:
            b = _number(rng, rng.randint(*digits))
            if op == "-" and a < b:
                a, b = b, a
        if split is not None and is_heldout(op, a, b) != (split == "test"):
            continue
        template = rng.choice(_TEMPLATES[(lang, op)])
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(template.format(a=a, b=b), answer, op, lang, a, b)


# --------------------------------------------------------------------------------------------
# solutions
# --------------------------------------------------------------------------------------------
def direct_solution(p: Problem) -> str:
    return f"{_ANSWER_PREFIX[p.lang]}{p.answer}"


def cot_solution(p: Problem) -> str:
    """Digit-by-digit working, right to left, then the answer line (format: module docstring)."""
    da = [int(c) for c in reversed(str(p.a))]
    db = [int(c) for c in reversed(str(p.b))]
    lines: list[str] = []
    partial = ""
    carry = 0
    if p.op == "*":
        n = len(da)
        for i in range(n):
            v = da[i] * p.b + carry
            last = i == n - 1
            partial = (str(v) if last else str(v % 10)) + partial
            carry = v // 10
            note = _CARRY[p.lang].format(carry) if carry and not last else ""
            lines.append(f"{da[i]}*{p.b}+{v - da[i] * p.b}={v}, {partial}{note}")
    else:
        n = max(len(da), len(db))
        da += [0] * (n - len(da))
        db += [0] * (n - len(db))
        for i in range(n):
            last = i == n - 1
            if p.op == "+":
                s = da[i] + db[i] + carry
                partial = (str(s) if last else str(s % 10)) + partial
                line = f"{da[i]}+{db[i]}+{carry}={s}, {partial}"
                carry = s // 10
                lines.append(line + (_CARRY[p.lang].format(carry) if carry and not last else ""))
            else:
                borrow_in = carry
                top = da[i]
                borrow_out = int(top - db[i] - borrow_in < 0)
                top += 10 * borrow_out
                d = top - db[i] - borrow_in
                partial = str(d) + partial
                lines.append(f"{top}-{db[i]}-{borrow_in}={d}, {partial}" + (_BORROW[p.lang] if borrow_out else ""))
                carry = borrow_out
    lines.append(f"{_ANSWER_PREFIX[p.lang]}{int(partial)}")
    return "\n".join(lines)


def solution(p: Problem, style: str) -> str:
    if style == "direct":
        return direct_solution(p)
    if style == "cot":
        return cot_solution(p)
    raise ValueError(f"style must be 'direct' or 'cot', got {style!r}")


# --------------------------------------------------------------------------------------------
# answers and rewards
# --------------------------------------------------------------------------------------------
_ANSWER_RE = re.compile(r"(?:Answer|答案)[ \t]*[:：][ \t]*(-?\d+)")
_ANSWER_LINE_RE = re.compile(r"(?:Answer|答案)[ \t]*[:：][ \t]*-?\d+[ \t]*")


def extract_answer(text: str) -> int | None:
    """The integer of the last ``Answer: N`` / ``答案：N`` (either colon) in ``text``; None if none."""
    matches = _ANSWER_RE.findall(text)
    return int(matches[-1]) if matches else None


def format_reward(text: str) -> float:
    """1.0 if the completion ends in exactly one answer line (``Answer: N`` or ``答案：N`` as its
    last non-empty line, and no other answer line before it), else 0.0."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines or not _ANSWER_LINE_RE.fullmatch(lines[-1].strip()):
        return 0.0
    return 1.0 if len(_ANSWER_RE.findall(text)) == 1 else 0.0


def reward(completion: str, answer: int, format_weight: float = 0.1) -> float:
    """Verifiable reward used by RL:

        reward = 1.0 · [extract_answer(completion) == answer] + format_weight · format_reward(completion)

    So with the default weight: correct and well formed 1.1, correct but with extra text after
    (or a second answer line) 1.0, wrong but well formed 0.1, no answer line 0.0.
    """
    correct = 1.0 if extract_answer(completion) == int(answer) else 0.0
    return correct + format_weight * format_reward(completion)


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
# Each dataset draws from its own RNG stream (seed mixed with a per-purpose salt) so e.g. the
# SFT set and the RL prompts at the same seed are not the same problems.
def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"lmstack-arith|{purpose}|{seed}")


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def sft_dataset(n: int, style: str = "cot", seed: int = 0, ops: tuple[str, ...] = OPS,
                langs: tuple[str, ...] = LANGS, digits: tuple[int, int] = (1, 3)) -> list[dict]:
    """``n`` OpenAI-style records ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``
    from the train split, answered in ``style`` ("direct" or "cot")."""
    _check_n(n)
    solution(Problem("", 0, "+", "en", 0, 0), style)  # validates style
    rng = _rng(seed, "sft")
    out = []
    for _ in range(n):
        p = make_problem(rng, ops, langs, digits, split="train")
        out.append({"messages": [{"role": "user", "content": p.question},
                                 {"role": "assistant", "content": solution(p, style)}]})
    return out


def rl_prompts(n: int, seed: int = 0, ops: tuple[str, ...] = OPS, langs: tuple[str, ...] = LANGS,
               digits: tuple[int, int] = (1, 3)) -> list[dict]:
    """``n`` training-split records ``{"prompt": question, "answer": int}`` for PPO / GRPO."""
    _check_n(n)
    rng = _rng(seed, "rl")
    return [{"prompt": p.question, "answer": p.answer}
            for p in (make_problem(rng, ops, langs, digits, split="train") for _ in range(n))]


def test_set(n: int, seed: int = 0, digits: tuple[int, int] = (2, 3), ops: tuple[str, ...] = OPS,
             langs: tuple[str, ...] = LANGS) -> list[Problem]:
    """``n`` distinct held-out problems (by default both operands of + and - have 2-3 digits)."""
    _check_n(n)
    _check_digits(digits)
    rng = _rng(seed, "test")
    seen: set[tuple[str, int, int]] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        p = make_problem(rng, ops, langs, digits, split="test")
        tries += 1
        if (p.op, p.a, p.b) in seen:
            if tries > 50 * (n + 10):
                raise ValueError(f"cannot draw {n} distinct held-out problems with digits={digits}, "
                                 f"ops={ops}: the held-out space is too small")
            continue
        seen.add((p.op, p.a, p.b))
        out.append(p)
    return out


_PROSE_EN = (
    "{a} plus {b} is {s}.",
    "{a} + {b} = {s}",
    "If you add {b} to {a} you get {s}.",
    "{x} minus {y} is {d}.",
    "{x} - {y} = {d}",
    "{a} times {k} is {m}.",
    "{a} * {k} = {m}",
)
_PROSE_ZH = (
    "{a} 加 {b} 等于 {s}。",
    "{a} 个苹果加 {b} 个苹果是 {s} 个苹果。",
    "{x} 减 {y} 等于 {d}。",
    "{a} 乘 {k} 等于 {m}。",
)


def _prose(rng: random.Random, digits: tuple[int, int]) -> str:
    """A short document of arithmetic facts or counting, for token statistics."""
    kind = rng.random()
    if kind < 0.2:
        start = rng.randint(0, 990)
        nums = " ".join(str(i) for i in range(start, start + rng.randint(5, 12)))
        return ("Counting: " if rng.random() < 0.5 else "数数：") + nums
    sents = []
    for _ in range(rng.randint(2, 5)):
        while True:
            a, b = _number(rng, rng.randint(*digits)), _number(rng, rng.randint(*digits))
            k = rng.randint(2, 9)
            x, y = max(a, b), min(a, b)
            if not (is_heldout("+", a, b) or is_heldout("-", x, y) or is_heldout("*", a, k)):
                break
        pool = _PROSE_EN if rng.random() < 0.5 else _PROSE_ZH
        sents.append(rng.choice(pool).format(a=a, b=b, s=a + b, x=x, y=y, d=x - y, k=k, m=a * k))
    return " ".join(sents)


def pretrain_corpus(n: int, seed: int = 0, ops: tuple[str, ...] = OPS, langs: tuple[str, ...] = LANGS,
                    digits: tuple[int, int] = (1, 3), prose_frac: float = 0.2) -> list[str]:
    """``n`` plain-text documents: train-split problems followed by a direct or a chain-of-thought
    solution (``Question: ...`` / ``问题：...``), plus a ``prose_frac`` share of arithmetic-fact and
    counting prose, so a tiny model learns the token statistics before SFT."""
    _check_n(n)
    if not 0.0 <= prose_frac <= 1.0:
        raise ValueError(f"prose_frac must be in [0, 1], got {prose_frac}")
    rng = _rng(seed, "pretrain")
    docs = []
    for _ in range(n):
        if rng.random() < prose_frac:
            docs.append(_prose(rng, digits))
            continue
        p = make_problem(rng, ops, langs, digits, split="train")
        head = "Question: " if p.lang == "en" else "问题："
        docs.append(f"{head}{p.question}\n{solution(p, rng.choice(('direct', 'cot')))}")
    return docs


test_set.__test__ = False  # not a pytest test when imported by name into a test module
