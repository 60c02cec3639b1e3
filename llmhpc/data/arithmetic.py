"""Verifiable arithmetic word problems: the task that ships with the package.

SFT, GRPO, `llmhpc eval` and the tests need a task whose answers can be checked by a program, that
works offline, and that a 135M-parameter model can learn on a CPU. This module makes one: word
problems of six kinds, each with a worked, step-by-step solution and a single integer answer, written
as JSONL rows that carry the chat form (`messages`) and the prompt/completion form side by side, so
every stage reads the same file and real user data in the same layout loads the same way.

Conventions (rewards and eval rely on them; change them only with the readers):

- The last line of every solution is exactly ``The answer is N.`` (:data:`ANSWER_SENTENCE`), with N a
  plain non-negative integer: no sign, no thousands separator, no unit. :func:`parse_final_answer`
  reads it back. N is also the last number in the solution and equals the row's ``answer``.
- ``division_remainder`` always asks for the remainder, in words ("how many are left over?"), and the
  remainder is never 0; the quotient appears in the worked steps only.
- Operands are chosen so that every division the question implies is exact (unit rates and
  distance / speed / time); numbers stay at 1-3 digits (sums, products and distances may reach 4).

Size: every kind has at least about 2,500 distinct problems (multiplication is the smallest space,
about 2,600; addition and subtraction have hundreds of thousands), so balanced splits of up to about
15,000 problems in all fit. Asking for more raises an error rather than repeating problems.

Determinism: every draw comes from a ``random.Random`` built from the seed; nothing touches global state.

Train / eval separation (:func:`train_eval_split`): no eval problem shares its normalized question
text (:func:`normalize_question`) or its arithmetic (:meth:`Problem.key`: the kind plus the operands,
order-free for addition and multiplication) with any train problem, so the same sum in a different story
cannot leak either. Each split is also free of duplicates within itself. Two independent calls of
:func:`generate` carry no such guarantee.

The writer's entry point::

    python -m llmhpc.data.arithmetic --out DIR --train 2000 --eval 500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS: tuple[str, ...] = (
    "addition",
    "subtraction",
    "multiplication",
    "division_remainder",
    "unit_rate",
    "distance_speed_time",
)
ANSWER_SENTENCE = "The answer is {answer}."
_ANSWER_RE = re.compile(r"The answer is (\d+)\.(?!\d)")
# How many draws in a row may repeat an earlier problem before a kind counts as exhausted.
_MAX_MISSES = 2000


@dataclass(frozen=True)
class Problem:
    """One word problem: what the user sees, the worked answer, and the numbers it was made from.

    ``operands`` holds only the given numbers (never the answer), so a checker can re-derive the answer
    from ``kind`` and ``operands`` alone; ``phrasing`` is the index of the template that worded it.
    """

    kind: str
    question: str
    solution: str
    answer: str
    operands: dict[str, int] = field(default_factory=dict, hash=False)
    phrasing: int = 0

    def key(self) -> tuple[str, tuple[Any, ...]]:
        """The arithmetic identity used for de-duplication: kind + operands, order-free where commutative."""
        if self.kind in ("addition", "multiplication"):
            return self.kind, tuple(sorted(self.operands.values()))
        return self.kind, tuple(sorted(self.operands.items()))

    def to_row(self) -> dict[str, Any]:
        """The JSONL row: chat messages (TRL/OpenAI), prompt/completion, answer, kind and provenance."""
        return {
            "messages": [
                {"role": "user", "content": self.question},
                {"role": "assistant", "content": self.solution},
            ],
            "prompt": self.question,
            "completion": self.solution,
            "answer": self.answer,
            "kind": self.kind,
            "operands": dict(self.operands),
            "phrasing": self.phrasing,
        }


def parse_final_answer(text: str) -> str | None:
    """The N of the last ``The answer is N.`` in ``text``, or None: the strict reader of the convention."""
    found = _ANSWER_RE.findall(text)
    return found[-1] if found else None


def normalize_question(text: str) -> str:
    """Lower-cased, whitespace-collapsed question text: the form two questions are compared in."""
    return " ".join(text.lower().split())


# ---------------------------------------------------------------------------------------------------
# Vocabulary. Counts in every template are >= 2 (or the literal "1 hour"), so plurals are always right.

_NAMES = (
    "Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Leo",
    "Maya", "Noah", "Olga", "Priya", "Quinn", "Ravi", "Sofia", "Tom", "Uma", "Victor", "Wen", "Yusuf", "Zoe",
)  # fmt: skip
_ITEMS = (
    ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("stamp", "stamps"),
    ("shell", "shells"), ("card", "cards"), ("pencil", "pencils"), ("coin", "coins"), ("bead", "beads"),
    ("book", "books"), ("cookie", "cookies"), ("button", "buttons"), ("balloon", "balloons"),
    ("notebook", "notebooks"), ("toy car", "toy cars"), ("orange", "oranges"),
)  # fmt: skip
_PRODUCTS = ("bottles", "toys", "bricks", "cups", "bolts", "boxes", "shirts")
# (mover, distance unit, speed unit, time unit singular, time unit plural, speed range, time range)
_MOVERS = (
    ("train", "km", "km per hour", "hour", "hours", (40, 120), (2, 6)),
    ("car", "km", "km per hour", "hour", "hours", (30, 90), (2, 6)),
    ("cyclist", "km", "km per hour", "hour", "hours", (10, 25), (2, 6)),
    ("boat", "km", "km per hour", "hour", "hours", (10, 40), (2, 8)),
    ("bus", "miles", "miles per hour", "hour", "hours", (20, 60), (2, 6)),
    ("truck", "miles", "miles per hour", "hour", "hours", (30, 70), (2, 6)),
    ("runner", "meters", "meters per second", "second", "seconds", (3, 8), (10, 60)),
    ("drone", "meters", "meters per second", "second", "seconds", (5, 15), (10, 40)),
    ("hiker", "meters", "meters per minute", "minute", "minutes", (50, 90), (5, 20)),
)

# Each template is (question, steps). Both are str.format strings over the fields its maker fills in;
# the final answer sentence is appended by _problem(), never written in a template.
_Template = tuple[str, str]

_ADDITION: tuple[_Template, ...] = (
    ("{name} has {a} {items}. {friend} gives {name} {b} more. How many {items} does {name} have now?",
     "{name} starts with {a} {items} and gets {b} more.\n{a} + {b} = {ans}."),
    ("A shop has {a} {items} in stock. A delivery brings {b} more. How many {items} does the shop have now?",
     "The delivery adds {b} {items} to the {a} already in stock.\n{a} + {b} = {ans}."),
    ("{name} collected {a} {items} last week and {b} {items} this week. "
     "How many {items} did {name} collect altogether?",
     "Add the two weeks together.\n{a} + {b} = {ans}."),
    ("One box holds {a} {items} and another box holds {b} {items}. How many {items} are in both boxes?",
     "Put the two boxes together.\n{a} + {b} = {ans}."),
    ("What is {a} plus {b}?",
     "Add the two numbers.\n{a} + {b} = {ans}."),
)  # fmt: skip
_SUBTRACTION: tuple[_Template, ...] = (
    ("{name} had {a} {items} and gave {b} of them to {friend}. How many {items} does {name} have left?",
     "{name} gives away {b} of the {a} {items}.\n{a} - {b} = {ans}."),
    ("A shop had {a} {items} and sold {b} of them. How many {items} are left in the shop?",
     "Take the {b} sold {items} away from the {a} in the shop.\n{a} - {b} = {ans}."),
    ("{name} has {a} {items} and {friend} has {b}. How many more {items} does {name} have than {friend}?",
     "Find the difference between {a} and {b}.\n{a} - {b} = {ans}."),
    ("A book has {a} pages. {name} has read {b} of them. How many pages does {name} still have to read?",
     "Take the {b} pages already read away from the {a} pages.\n{a} - {b} = {ans}."),
    ("What is {a} minus {b}?",
     "Subtract the second number from the first.\n{a} - {b} = {ans}."),
)  # fmt: skip
_MULTIPLICATION: tuple[_Template, ...] = (
    ("There are {a} boxes with {b} {items} in each box. How many {items} are there in all?",
     "{a} boxes with {b} {items} each.\n{a} * {b} = {ans}."),
    ("{name} buys {a} packs of {items}. Each pack has {b} {items}. How many {items} does {name} buy?",
     "Each of the {a} packs has {b} {items}.\n{a} * {b} = {ans}."),
    ("A hall has {a} rows of chairs with {b} chairs in each row. How many chairs are in the hall?",
     "{a} rows of {b} chairs each.\n{a} * {b} = {ans}."),
    ("{name} saves {b} dollars every week. How many dollars has {name} saved after {a} weeks?",
     "{b} dollars for each of {a} weeks.\n{a} * {b} = {ans}."),
    ("What is {a} times {b}?",
     "Multiply the two numbers.\n{a} * {b} = {ans}."),
)  # fmt: skip
_DIVISION_REMAINDER: tuple[_Template, ...] = (
    ("{name} has {n} {items} and puts them into bags of {d}. After filling as many full bags as possible, "
     "how many {items} are left over?",
     "Fill as many bags of {d} as possible: {q} bags use {q} * {d} = {qd} {items}.\n"
     "{n} - {qd} = {r} {items} are left over."),
    ("{n} students are split into teams of {d}. Students who are not in a full team help the referee. "
     "How many students help the referee?",
     "Make as many teams of {d} as possible: {q} teams use {q} * {d} = {qd} students.\n"
     "{n} - {qd} = {r} students are not in a full team."),
    ("What is the remainder when {n} is divided by {d}?",
     "{n} / {d} = {q} with a remainder, because {q} * {d} = {qd}.\n{n} - {qd} = {r}."),
    ("A baker packs {n} cookies into boxes of {d}. How many cookies are left after filling as many "
     "boxes as possible?",
     "{q} full boxes hold {q} * {d} = {qd} cookies.\n{n} - {qd} = {r} cookies are left."),
    ("A ribbon {n} cm long is cut into as many {d} cm pieces as possible. How many cm of ribbon are left over?",
     "{q} pieces of {d} cm use {q} * {d} = {qd} cm.\n{n} - {qd} = {r} cm are left over."),
)  # fmt: skip
_UNIT_RATE: tuple[_Template, ...] = (
    ("{c} {items} cost {t} dollars. At the same price, how many dollars do {m} {items} cost?",
     "One {item} costs {t} / {c} = {u} dollars.\n{m} {items} cost {m} * {u} = {ans} dollars."),
    ("A machine makes {t} {products} in {c} hours. Working at the same rate, how many {products} does it "
     "make in {m} hours?",
     "In one hour it makes {t} / {c} = {u} {products}.\nIn {m} hours it makes {m} * {u} = {ans} {products}."),
    ("{name} reads {t} pages in {c} days. At the same pace, how many pages does {name} read in {m} days?",
     "Each day {name} reads {t} / {c} = {u} pages.\nIn {m} days that is {m} * {u} = {ans} pages."),
    ("A tap fills {t} liters of water in {c} minutes. How many liters does it fill in {m} minutes?",
     "Each minute it fills {t} / {c} = {u} liters.\nIn {m} minutes it fills {m} * {u} = {ans} liters."),
    ("{name} earns {t} dollars for {c} hours of work. At the same pay, how many dollars does {name} earn "
     "for {m} hours?",
     "One hour pays {t} / {c} = {u} dollars.\n{m} hours pay {m} * {u} = {ans} dollars."),
)  # fmt: skip
# Distance / speed / time: each template says which quantity is unknown ("time", "distance", "speed");
# the operands are the other two.
_DST: tuple[tuple[str, str, str], ...] = (
    ("time",
     "A {mover} travels {s} {du} in 1 {t1}. How long does it take to go {dist} {du}, in {tn}?",
     "The {mover} goes {s} {du} every {t1}.\n{dist} / {s} = {t}, so it takes {t} {tn}."),
    ("time",
     "How many {tn} does a {mover} moving at {s} {su} need to cover {dist} {du}?",
     "time = distance / speed.\n{dist} / {s} = {t}, so the {mover} needs {t} {tn}."),
    ("distance",
     "A {mover} moves at {s} {su} for {t} {tn}. How many {du} does the {mover} cover?",
     "distance = speed * time.\n{s} * {t} = {dist}, so the {mover} covers {dist} {du}."),
    ("distance",
     "If a {mover} keeps a speed of {s} {su}, how far does the {mover} go in {t} {tn}, in {du}?",
     "distance = speed * time.\n{s} * {t} = {dist}, so the {mover} goes {dist} {du}."),
    ("speed",
     "A {mover} covers {dist} {du} in {t} {tn}. What is the {mover}'s average speed in {su}?",
     "speed = distance / time.\n{dist} / {t} = {s}, so the average speed is {s} {su}."),
    ("speed",
     "It takes a {mover} {t} {tn} to go {dist} {du}. How fast does the {mover} go, in {su}?",
     "speed = distance / time.\n{dist} / {t} = {s}, so the {mover} goes {s} {su}."),
)  # fmt: skip


def _problem(
    kind: str, template: _Template, phrasing: int, fields: dict[str, Any], operands: dict[str, int]
) -> Problem:
    question, steps = template
    answer = str(fields["ans"])
    solution = steps.format(**fields) + "\n" + ANSWER_SENTENCE.format(answer=answer)
    return Problem(kind, question.format(**fields), solution, answer, operands, phrasing)


def _people(rng: random.Random) -> dict[str, str]:
    name, friend = rng.sample(_NAMES, 2)
    item, items = rng.choice(_ITEMS)
    return {"name": name, "friend": friend, "item": item, "items": items}


def _addition(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    index = rng.randrange(len(_ADDITION))
    fields = {**_people(rng), "a": a, "b": b, "ans": a + b}
    return _problem("addition", _ADDITION[index], index, fields, {"a": a, "b": b})


def _subtraction(rng: random.Random) -> Problem:
    a = rng.randint(20, 999)
    b = rng.randint(10, a - 1)
    index = rng.randrange(len(_SUBTRACTION))
    fields = {**_people(rng), "a": a, "b": b, "ans": a - b}
    return _problem("subtraction", _SUBTRACTION[index], index, fields, {"a": a, "b": b})


def _multiplication(rng: random.Random) -> Problem:
    # One factor of 2-12, one of 2-3 digits (11-250): products stay at most 3000 and easy to write out,
    # with room for about 2,600 distinct facts.
    small, large = rng.randint(2, 12), rng.randint(11, 250)
    a, b = (small, large) if rng.random() < 0.5 else (large, small)
    index = rng.randrange(len(_MULTIPLICATION))
    fields = {**_people(rng), "a": a, "b": b, "ans": a * b}
    return _problem("multiplication", _MULTIPLICATION[index], index, fields, {"a": a, "b": b})


def _division_remainder(rng: random.Random) -> Problem:
    d = rng.randint(3, 12)
    q = rng.randint(2, 60)
    r = rng.randint(1, d - 1)  # never 0: a remainder question whose answer is always "none" teaches nothing
    n = q * d + r
    index = rng.randrange(len(_DIVISION_REMAINDER))
    fields = {**_people(rng), "n": n, "d": d, "q": q, "qd": q * d, "r": r, "ans": r}
    return _problem("division_remainder", _DIVISION_REMAINDER[index], index, fields, {"dividend": n, "divisor": d})


def _unit_rate(rng: random.Random) -> Problem:
    u = rng.randint(2, 25)
    c = rng.randint(2, 12)
    m = rng.choice([x for x in range(2, 16) if x != c])
    t = u * c  # the total is built from the rate, so total / count is exact
    index = rng.randrange(len(_UNIT_RATE))
    fields = {**_people(rng), "products": rng.choice(_PRODUCTS), "c": c, "t": t, "m": m, "u": u, "ans": u * m}
    return _problem("unit_rate", _UNIT_RATE[index], index, fields, {"count": c, "total": t, "target": m})


def _distance_speed_time(rng: random.Random) -> Problem:
    mover, du, su, t1, tn, speeds, times = rng.choice(_MOVERS)
    s, t = rng.randint(*speeds), rng.randint(*times)
    dist = s * t  # distance is built from speed and time, so either division is exact
    index = rng.randrange(len(_DST))
    unknown, question, steps = _DST[index]
    given = {"distance": dist, "speed": s, "time": t}
    ans = given.pop(unknown)
    fields = {"mover": mover, "du": du, "su": su, "t1": t1, "tn": tn, "s": s, "t": t, "dist": dist, "ans": ans}
    return _problem("distance_speed_time", (question, steps), index, fields, given)


_MAKERS: dict[str, Callable[[random.Random], Problem]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "division_remainder": _division_remainder,
    "unit_rate": _unit_rate,
    "distance_speed_time": _distance_speed_time,
}


def _check_kinds(kinds: Iterable[str] | None) -> tuple[str, ...]:
    chosen = tuple(KINDS if kinds is None else kinds)
    unknown = [k for k in chosen if k not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown problem kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if not chosen:
        raise ValueError(f"no problem kinds given; choose from {', '.join(KINDS)}")
    return tuple(dict.fromkeys(chosen))


def _draw(
    n: int, rng: random.Random, kinds: tuple[str, ...], seen_questions: set[str], seen_keys: set[tuple[Any, ...]]
) -> list[Problem]:
    """``n`` problems that repeat nothing in (and are added to) the seen sets, kinds balanced to within one.

    Kinds are assigned round-robin and the result is shuffled, so every kind gets n // len(kinds) or one
    more. A draw that repeats a question or a key is redrawn for the same kind; ``_MAX_MISSES`` misses in
    a row mean the kind's number space is used up, which is an error rather than a silent short file.
    """
    if n < 0:
        raise ValueError(f"the number of problems must be >= 0, got {n}")
    problems: list[Problem] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        for _ in range(_MAX_MISSES):
            problem = _MAKERS[kind](rng)
            question, key = normalize_question(problem.question), problem.key()
            if question not in seen_questions and key not in seen_keys:
                break
        else:
            made = sum(p.kind == kind for p in problems)
            wanted = len(range(kinds.index(kind), n, len(kinds)))
            raise ValueError(
                f"ran out of distinct {kind} problems after {made} of the {wanted} asked for (each kind has "
                "about 2,500 or more; see llmhpc/data/arithmetic.py): ask for fewer problems or more kinds"
            )
        seen_questions.add(question)
        seen_keys.add(key)
        problems.append(problem)
    rng.shuffle(problems)
    return problems


def generate(n: int, seed: int, kinds: Iterable[str] | None = None) -> list[Problem]:
    """``n`` distinct problems (no repeated question or arithmetic), the same list for the same seed.

    ``kinds`` restricts the mix (default: all of :data:`KINDS`, balanced). For train and eval sets use
    :func:`train_eval_split`: two ``generate`` calls may share problems.
    """
    return _draw(n, random.Random(seed), _check_kinds(kinds), set(), set())


def train_eval_split(
    n_train: int, n_eval: int, seed: int, kinds: Iterable[str] | None = None
) -> tuple[list[Problem], list[Problem]]:
    """Seeded ``(train, eval)`` lists that never share a problem.

    Eval is drawn first from its own stream, so the eval set for a seed does not change when n_train
    does (results stay comparable as training data grows); train is then drawn from a second stream,
    skipping every problem whose normalized question or :meth:`Problem.key` is already in eval.
    """
    chosen = _check_kinds(kinds)
    seen_questions: set[str] = set()
    seen_keys: set[tuple[Any, ...]] = set()
    eval_set = _draw(n_eval, random.Random(f"llmhpc.arithmetic.eval:{seed}"), chosen, seen_questions, seen_keys)
    train = _draw(n_train, random.Random(f"llmhpc.arithmetic.train:{seed}"), chosen, seen_questions, seen_keys)
    return train, eval_set


HELD_OUT = 1000
"""Size of the held-out pool the package's stages share: training draws never use its problems, evaluation
asks the first N of it (so accuracy with any N <= HELD_OUT is on problems no training run has seen)."""


def training_problems(n: int, seed: int) -> list[Problem]:
    """`n` problems for training (`llmhpc sft data.source=arithmetic`), none in the held-out pool of `seed`."""
    return train_eval_split(n, HELD_OUT, seed)[0]


def held_out_problems(n: int, seed: int) -> list[Problem]:
    """The first `n` (at most HELD_OUT) problems of the held-out pool of `seed` (`llmhpc eval task=arithmetic`)."""
    if not 0 < n <= HELD_OUT:
        raise ValueError(f"ask between 1 and {HELD_OUT} held-out problems, not {n}")
    return train_eval_split(0, HELD_OUT, seed)[1][:n]


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike[str]) -> Path:
    """Write one :meth:`Problem.to_row` per line, atomically (:func:`write_rows`)."""
    return write_rows((problem.to_row() for problem in problems), path)


def write_rows(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write one JSON object per line, atomically: a reader sees the old file or the whole new one.

    The rows go to a temporary file next to ``path``, which is flushed to disk and renamed over it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def kind_counts(problems: Iterable[Problem]) -> dict[str, int]:
    """Problems per kind, in :data:`KINDS` order: what the CLI prints after writing a split."""
    counts = Counter(p.kind for p in problems)
    return {k: counts[k] for k in KINDS if counts[k]}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what is wrong> (see --help)`` and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``DIR/train.jsonl`` and ``DIR/eval.jsonl`` and print the problems per kind; return the exit code."""
    parser = _Parser(
        prog="python -m llmhpc.data.arithmetic",
        description="Write seeded, disjoint train/eval JSONL splits of verifiable arithmetic word problems.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=_count, default=2000, help="train problems (default 2000)")
    parser.add_argument("--eval", type=_count, default=500, help="eval problems (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same files")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated subset of: {','.join(KINDS)} (default all)"
    )
    args = parser.parse_args(argv)
    if args.train + args.eval == 0:
        parser.error("--train and --eval are both 0: nothing to write")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        train, eval_set = train_eval_split(args.train, args.eval, args.seed, kinds)
    except ValueError as e:
        parser.error(str(e))
    for name, problems in (("train", train), ("eval", eval_set)):
        try:
            path = write_jsonl(problems, args.out / f"{name}.jsonl")
        except OSError as e:
            print(f"error: cannot write {args.out / f'{name}.jsonl'}: {e.strerror or e}", file=sys.stderr)
            return 1
        counts = ", ".join(f"{k} {v}" for k, v in kind_counts(problems).items()) or "empty"
        print(f"{path}: {len(problems)} problems ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
