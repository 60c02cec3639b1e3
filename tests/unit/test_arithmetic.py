"""The shipped arithmetic task: answers checked by an independent solver, splits disjoint, files deterministic.

The checks here do not call the generator's own arithmetic: answers are re-derived from the stored operands by
`solve` below, every `x op y = z` step in a solution is re-computed, and disjointness is re-checked with this
file's own normalization and keys.
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from llmhpc.data import arithmetic
from llmhpc.data.arithmetic import generate, main, parse_final_answer, train_eval_split, write_jsonl

REPO = Path(__file__).resolve().parents[2]
ALL_KINDS = {"addition", "subtraction", "multiplication", "division_remainder", "unit_rate", "distance_speed_time"}
ROW_FIELDS = {"messages", "prompt", "completion", "answer", "kind"}
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
FINAL = re.compile(r"The answer is (\d+)\.")


def exact_div(a: int, b: int) -> int:
    assert b > 0 and a % b == 0, f"{a} / {b} is not exact"
    return a // b


def solve(kind: str, ops: dict[str, int]) -> int:
    """The answer from the operands alone, written independently of the generator."""
    if kind == "addition":
        return ops["a"] + ops["b"]
    if kind == "subtraction":
        assert ops["a"] > ops["b"], ops
        return ops["a"] - ops["b"]
    if kind == "multiplication":
        return ops["a"] * ops["b"]
    if kind == "division_remainder":
        quotient, remainder = divmod(ops["dividend"], ops["divisor"])
        assert quotient >= 1 and remainder > 0, ops
        return remainder
    if kind == "unit_rate":
        return exact_div(ops["total"], ops["count"]) * ops["target"]
    if kind == "distance_speed_time":
        given = set(ops)
        if given == {"distance", "speed"}:
            return exact_div(ops["distance"], ops["speed"])
        if given == {"distance", "time"}:
            return exact_div(ops["distance"], ops["time"])
        if given == {"speed", "time"}:
            return ops["speed"] * ops["time"]
    raise AssertionError(f"unexpected {kind} operands {ops}")


def norm(question: str) -> str:
    return " ".join(question.lower().split())


def arith_key(kind: str, ops: dict[str, int]) -> tuple:
    if kind in ("addition", "multiplication"):  # 23 + 45 and 45 + 23 are the same fact
        return kind, tuple(sorted(ops.values()))
    return kind, tuple(sorted(ops.items()))


def read_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def problems():
    return generate(1200, seed=3)


def test_answers_rederived_from_operands(problems):
    assert len(problems) == 1200
    for p in problems:
        assert p.answer == str(solve(p.kind, p.operands)), p
        for value in p.operands.values():  # the operands are the numbers the question states
            assert re.search(rf"(?<!\d){value}(?!\d)", p.question), (value, p.question)


def test_solution_ends_with_answer_and_every_step_is_right(problems):
    for p in problems:
        assert p.solution.splitlines()[-1] == f"The answer is {p.answer}.", p.solution
        assert re.findall(r"\d+", p.solution)[-1] == p.answer
        assert [m.group(1) for m in FINAL.finditer(p.solution)] == [p.answer]
        assert "The answer is" not in p.question
        steps = STEP.findall(p.solution)
        assert steps, p.solution  # every kind shows its working
        for x, op, y, z in steps:
            x, y, z = int(x), int(y), int(z)
            if op == "/":
                assert z == (x // y if p.kind == "division_remainder" else exact_div(x, y)), p.solution
            else:
                assert z == {"+": x + y, "-": x - y, "*": x * y}[op], p.solution


def test_parse_final_answer_reads_the_convention(problems):
    assert all(parse_final_answer(p.solution) == p.answer for p in problems)
    assert parse_final_answer("12 + 3 = 15.\nThe answer is 14. No wait. The answer is 15.") == "15"
    for text in ("15", "The answer is 3.5.", "The answer is 1,200.", "the answer: 7", "The answer is -4."):
        assert parse_final_answer(text) is None, text
    assert len({p for p in problems[:5]}) == 5  # hashable despite the operands dict


def test_every_kind_has_three_distinct_phrasings(problems):
    counts = Counter(p.kind for p in problems)
    assert set(counts) == ALL_KINDS and max(counts.values()) - min(counts.values()) <= 1
    # A phrasing's skeleton: the words every question it worded shares. Distinct skeletons = distinct templates.
    words: dict[tuple[str, int], set[str]] = {}
    for p in problems:
        tokens = set(re.sub(r"\d+", " ", p.question.lower()).split())
        words[p.kind, p.phrasing] = words.get((p.kind, p.phrasing), tokens) & tokens
    skeletons: dict[str, set[frozenset[str]]] = defaultdict(set)
    for (kind, _), common in words.items():
        skeletons[kind].add(frozenset(common))
    for kind in ALL_KINDS:
        assert len(skeletons[kind]) >= 3, (kind, skeletons[kind])
    # The story words vary too, not only the numbers.
    names = {p.question.split()[0] for p in problems if p.kind == "addition" and p.phrasing == 0}
    assert len(names) >= 10


def test_same_seed_same_problems_different_seed_different():
    assert generate(300, seed=11) == generate(300, seed=11)
    assert generate(300, seed=11) != generate(300, seed=12)
    assert {p.kind for p in generate(50, seed=1, kinds=["unit_rate"])} == {"unit_rate"}
    with pytest.raises(ValueError, match="unknown problem kind"):
        generate(5, seed=0, kinds=["calculus"])


def test_train_eval_disjoint():
    train, eval_set = train_eval_split(2000, 500, seed=0)
    assert (len(train), len(eval_set)) == (2000, 500)
    for split in (train, eval_set):
        assert len({norm(p.question) for p in split}) == len(split)
        assert len({arith_key(p.kind, p.operands) for p in split}) == len(split)
    assert not {norm(p.question) for p in train} & {norm(p.question) for p in eval_set}
    assert not {arith_key(p.kind, p.operands) for p in train} & {arith_key(p.kind, p.operands) for p in eval_set}
    # Control: independent draws of this size do share arithmetic, so the check above is not vacuous.
    a, b = generate(2000, seed=1), generate(500, seed=2)
    assert {arith_key(p.kind, p.operands) for p in a} & {arith_key(p.kind, p.operands) for p in b}
    # The eval set of a seed does not move when the train set grows.
    assert train_eval_split(100, 500, seed=0)[1] == eval_set


def test_jsonl_rows_round_trip(tmp_path):
    train, _ = train_eval_split(60, 0, seed=4)
    path = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    rows = read_rows(path)
    assert len(rows) == 60 and list(tmp_path.joinpath("sub").iterdir()) == [path]
    for row, p in zip(rows, train, strict=True):
        assert ROW_FIELDS <= set(row)
        assert row["messages"] == [{"role": "user", "content": row["prompt"]},
                                   {"role": "assistant", "content": row["completion"]}]
        assert (row["prompt"], row["completion"], row["answer"], row["kind"]) == (
            p.question, p.solution, p.answer, p.kind)
        assert isinstance(row["answer"], str) and row["answer"].isdigit()
        assert row["answer"] == str(solve(row["kind"], row["operands"]))


def test_write_is_atomic(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("old\n")

    def broken():
        yield from generate(3, seed=0)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(broken(), path)
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_cli_writes_deterministic_files(tmp_path, capsys):
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert main(["--out", str(tmp_path / name), "--train", "120", "--eval", "30", "--seed", seed]) == 0
    out = capsys.readouterr().out
    assert "train.jsonl: 120 problems (addition 20," in out and "eval.jsonl: 30 problems" in out
    for split in ("train.jsonl", "eval.jsonl"):
        a, b, c = ((tmp_path / d / split).read_bytes() for d in "abc")
        assert a == b and a != c
    rows = read_rows(tmp_path / "a" / "eval.jsonl")
    assert len(rows) == 30 and {r["kind"] for r in rows} == ALL_KINDS


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train", "-1"], "expected a number >= 0"),
        (["--eval", "many"], "expected a whole number"),
        (["--train", "0", "--eval", "0"], "nothing to write"),
        (["--kinds", "addition,calculus"], "unknown problem kind(s) calculus"),
        (["--kinds", "multiplication", "--train", "3000", "--eval", "0"], "ran out of distinct multiplication"),
        (["--out", "FILE"], "is not a directory"),
        ([], "--out"),
    ],
)
def test_cli_rejects_bad_args(tmp_path, capsys, args, message):
    (tmp_path / "f").write_text("")
    args = [str(tmp_path / "f") if a == "FILE" else a for a in args]
    if "--out" not in args and message != "--out":
        args = ["--out", str(tmp_path / "out"), *args]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_module_entry_point(tmp_path, monkeypatch, capsys):
    """`python -m llmhpc.data.arithmetic ...` runs main() and exits with its code (run in-process: see below)."""
    monkeypatch.setattr(sys, "argv", ["arithmetic", "--out", str(tmp_path), "--train", "6", "--eval", "6"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(arithmetic.__file__, run_name="__main__")
    assert exc.value.code == 0 and "eval.jsonl: 6 problems" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "train.jsonl")) == 6


def test_tool_script_in_a_fresh_process(tmp_path):
    """tools/make_arithmetic.py as a user runs it: writes the same files as the module for the same arguments.

    One subprocess only: importing llmhpc.data in a fresh process loads torch and transformers (the package
    __init__), which costs seconds; the argument errors are covered in-process above.
    """
    args = ["--train", "12", "--eval", "6", "--seed", "1"]
    cmd = [sys.executable, str(REPO / "tools" / "make_arithmetic.py"), "--out", str(tmp_path / "tool"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train.jsonl: 12 problems" in proc.stdout and "eval.jsonl: 6 problems" in proc.stdout
    assert main(["--out", str(tmp_path / "module"), *args]) == 0
    for split in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "tool" / split).read_bytes() == (tmp_path / "module" / split).read_bytes()


def test_stage_training_problems_never_meet_the_held_out_pool():
    from llmhpc.data.arithmetic import HELD_OUT, held_out_problems, training_problems

    pool = held_out_problems(HELD_OUT, seed=7)
    train = training_problems(1500, seed=7)
    assert not {p.question for p in train} & {p.question for p in pool}
    assert not {p.key() for p in train} & {p.key() for p in pool}
    assert held_out_problems(40, seed=7) == pool[:40]  # any eval size asks a prefix of the same pool
    with pytest.raises(ValueError, match="between 1 and"):
        held_out_problems(HELD_OUT + 1, seed=7)
