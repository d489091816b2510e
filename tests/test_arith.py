"""The arithmetic chain-of-thought task: solutions are checked by parsing and re-doing the
arithmetic here, independently of the generator."""
from __future__ import annotations

import random
import re

import pytest

from lmstack.tasks import arith as A

STEP = re.compile(r"^(\d+)([+\-*])(\d+)([+\-])(\d+)=(\d+), (\d+)(?: (?:carry |进)(\d)| (?:borrow |借)1)?$")


def check_cot(p: A.Problem, text: str) -> None:
    """Every step line is true arithmetic, partials grow digit by digit, the answer line is right."""
    lines = text.split("\n")
    prefix = "Answer: " if p.lang == "en" else "答案："
    assert lines[-1] == f"{prefix}{p.answer}", text
    steps = lines[:-1]
    n = len(str(p.a)) if p.op == "*" else max(len(str(p.a)), len(str(p.b)))
    assert len(steps) == n, text
    da, db = str(p.a)[::-1], str(p.b)[::-1]
    partial, carry = "", 0
    for i, line in enumerate(steps):
        m = STEP.match(line)
        assert m, f"bad step {line!r} in\n{text}"
        x, op, y, op2, c, res, part, note = m.groups()
        x, y, c, res = int(x), int(y), int(c), int(res)
        assert op == p.op and c == carry, line
        last = i == n - 1
        if p.op == "+":
            assert op2 == "+" and res == x + y + c
            assert x == int(da[i] if i < len(da) else 0) and y == int(db[i] if i < len(db) else 0)
            new = str(res) if last else str(res % 10)
            carry = res // 10
        elif p.op == "*":
            assert op2 == "+" and res == x * y + c and y == p.b and x == int(da[i])
            new = str(res) if last else str(res % 10)
            carry = res // 10
        else:
            assert op2 == "-" and res == x - y - c and 0 <= res <= 9
            top = int(da[i])
            assert x in (top, top + 10) and y == int(db[i] if i < len(db) else 0)
            carry = int(x >= 10)
            assert (" borrow 1" in line or " 借1" in line) == bool(carry)
            new = str(res)
        if p.op != "-":
            assert (note is not None) == (carry > 0 and not last), line
            if note is not None:
                assert int(note) == carry
        assert part == new + partial, line
        partial = part
    assert int(partial) == p.answer


def test_every_cot_solution_is_right():
    rng = random.Random(0)
    for _ in range(1500):
        p = A.make_problem(rng, digits=(1, 4))
        want = {"+": p.a + p.b, "-": p.a - p.b, "*": p.a * p.b}[p.op]
        assert p.answer == want and p.answer >= 0
        if p.op == "*":
            assert 2 <= p.b <= 9
        check_cot(p, A.cot_solution(p))
        assert A.extract_answer(A.cot_solution(p)) == p.answer
        assert A.extract_answer(A.direct_solution(p)) == p.answer
    # borrows all the way down, and leading zeros in the partial
    for a, b in [(1000, 1), (623, 620), (10, 10), (999, 999), (5, 0)]:
        p = A.Problem("", a - b, "-", "en", a, b)
        check_cot(p, A.cot_solution(p))
    for a, b in [(999, 1), (9, 9), (0, 0)]:
        p = A.Problem("", a + b, "+", "zh", a, b)
        check_cot(p, A.cot_solution(p))
    p = A.Problem("", 999 * 9, "*", "zh", 999, 9)
    check_cot(p, A.cot_solution(p))


def test_example_format():
    p = A.Problem("What is 348 plus 275?", 623, "+", "en", 348, 275)
    assert A.cot_solution(p) == "8+5+0=13, 3 carry 1\n4+7+1=12, 23 carry 1\n3+2+1=6, 623\nAnswer: 623"
    assert A.direct_solution(A.Problem("", 12, "+", "zh", 7, 5)) == "答案：12"


def test_extract_answer():
    assert A.extract_answer("blah\nAnswer: 623") == 623
    assert A.extract_answer("答案：45") == 45
    assert A.extract_answer("答案: 45\n") == 45
    assert A.extract_answer("Answer：-7") == -7
    assert A.extract_answer("Answer: 1\nAnswer: 2") == 2  # the last one counts
    for bad in ("", "623", "Answer:", "Answer: abc", "答案是 5", "answer 5"):
        assert A.extract_answer(bad) is None, bad


def test_reward_values():
    assert A.reward("8+5+0=13, 13\nAnswer: 13", 13) == pytest.approx(1.1)
    assert A.reward("答案：13", 13) == pytest.approx(1.1)
    assert A.reward("Answer: 13\nand more", 13) == pytest.approx(1.0)  # right, badly formed
    assert A.reward("Answer: 12\nAnswer: 13", 13) == pytest.approx(1.0)
    assert A.reward("Answer: 14", 13) == pytest.approx(0.1)  # wrong, well formed
    assert A.reward("13", 13) == 0.0
    assert A.reward("Answer: 13", 13, format_weight=0.0) == 1.0
    assert A.format_reward("  Answer: 5  \n\n") == 1.0
    assert A.format_reward("Answer: 5 apples") == 0.0


def test_seeded_determinism():
    assert A.sft_dataset(30, "cot", seed=3) == A.sft_dataset(30, "cot", seed=3)
    assert A.sft_dataset(30, "cot", seed=3) != A.sft_dataset(30, "cot", seed=4)
    assert A.pretrain_corpus(30, seed=1) == A.pretrain_corpus(30, seed=1)
    assert A.rl_prompts(20, seed=2) == A.rl_prompts(20, seed=2)
    assert A.test_set(20, seed=5) == A.test_set(20, seed=5)
    r1, r2 = random.Random(9), random.Random(9)
    assert [A.make_problem(r1) for _ in range(20)] == [A.make_problem(r2) for _ in range(20)]


def test_dataset_shapes():
    rec = A.sft_dataset(5, "direct", seed=0)
    for r in rec:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert re.fullmatch(r"(Answer: |答案：)\d+", r["messages"][1]["content"])
    cot = A.sft_dataset(50, "cot", seed=0)
    assert sum(r["messages"][0]["content"].isascii() for r in cot) not in (0, 50)  # both languages
    ops = {p.op for p in A.test_set(60, seed=0)}
    assert ops == {"+", "-", "*"}
    for p in A.test_set(60, seed=0, digits=(2, 3)):
        assert p.a >= 10 and (p.op == "*" or p.b >= 10)
    rl = A.rl_prompts(10, seed=0)
    assert all(set(r) == {"prompt", "answer"} and isinstance(r["answer"], int) for r in rl)
    with pytest.raises(ValueError, match="style"):
        A.sft_dataset(1, "verbose")
    with pytest.raises(ValueError, match="digits"):
        A.test_set(1, digits=(0, 3))
    with pytest.raises(ValueError, match="held-out space"):
        A.test_set(100, digits=(1, 1), ops=("+",))


def _numbers_in(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def test_heldout_problems_never_in_training_data():
    test = A.test_set(300, seed=0, digits=(1, 3))
    keys = {(p.op, min(p.a, p.b), max(p.a, p.b)) if p.op != "-" else (p.op, p.a, p.b) for p in test}
    questions = {p.question for p in test}
    train_q = [r["messages"][0]["content"] for s in ("cot", "direct") for r in A.sft_dataset(3000, s, seed=0)]
    train_q += [r["prompt"] for r in A.rl_prompts(3000, seed=0)]
    docs = A.pretrain_corpus(3000, seed=0)
    train_q += [d.split("\n")[0].split("：", 1)[-1].split(": ", 1)[-1] for d in docs if "\n" in d]
    assert not questions & set(train_q)
    op_of = {"+": ("plus", "加", "+", "buys", "买"), "-": ("minus", "减", "-", "eats", "吃"),
             "*": ("times", "乘", "*", "boxes", "每盒")}
    for q in train_q:
        nums = _numbers_in(q)
        op = next(o for o, words in op_of.items() if any(w in q for w in words))
        if op == "*" and ("boxes" in q):
            nums = nums[::-1]
        a, b = nums
        key = (op, min(a, b), max(a, b)) if op != "-" else (op, a, b)
        assert key not in keys, q
    # the held-out split is a real share of the space, not empty
    assert 0.05 < sum(A.is_heldout("+", a, b) for a in range(100) for b in range(100)) / 10000 < 0.15
