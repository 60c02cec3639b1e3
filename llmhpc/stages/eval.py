"""Recipe: measure a model, optionally beside a baseline measured the same way.

    llmhpc eval model.init_from=exports/x-q4_k.gguf baseline=exports/x-f16.gguf task=perplexity,arithmetic

Perplexity is on the held-out documents of data.source (tokenized with data.tokenizer, which must be the
model's); accuracy is greedy exact-answer accuracy on held-out questions (`llmhpc.scoring`); 'preferences' scores
a reward model (`llmhpc reward`) on the held-out arithmetic pairs: how often chosen scores above rejected. With
best_of=n judge=RUN (a reward model), n answers are sampled per question and the one the reward model scores
highest is graded (best-of-n); with best_of=1, judge=RUN adds the reward model's mean score of the greedy answers
(`judge_score`, what PPO against it should raise). The results are printed as one table, a column per model, and
written as JSON with output=FILE.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmhpc.config import Config, ConfigError
from llmhpc.errors import InputError
from llmhpc.rl.reward_model import RewardScorer, stored_pooling
from llmhpc.scoring.answers import Question, accuracy, best_of_n_accuracy, question_from_row, read_questions
from llmhpc.scoring.perplexity import held_out_windows, perplexity


def _tasks(cfg: Config) -> list[str]:
    return [t.strip() for t in cfg.eval.task.split(",") if t.strip()]


def _questions(cfg: Config, task: str) -> list[Question]:
    e = cfg.eval
    if task == "arithmetic":
        from llmhpc.data.arithmetic import HELD_OUT, held_out_problems

        if e.problems > HELD_OUT:
            raise ConfigError(f"problems={e.problems}: the arithmetic task holds out {HELD_OUT}; ask at most that")
        return [question_from_row(p.to_row()) for p in held_out_problems(e.problems or HELD_OUT, cfg.run.seed)]
    return read_questions(task, e.problems)


def _preference_rows(cfg: Config) -> list[dict]:
    """task=preferences: the package's held-out arithmetic pairs, the ones `llmhpc reward` evaluates on."""
    from llmhpc.data.arithmetic import HELD_OUT, held_out_problems
    from llmhpc.data.arithmetic_preferences import preference_rows

    n = min(cfg.eval.problems or HELD_OUT, HELD_OUT)
    return preference_rows(held_out_problems(n, cfg.run.seed), cfg.run.seed + 1)


def _dtype(cfg: Config) -> torch.dtype:
    if cfg.precision.name == "fp8":
        raise ConfigError("precision=fp8 is for training; evaluate with precision=fp32 or precision=bf16")
    return torch.bfloat16 if cfg.precision.name == "bf16" else torch.float32


def evaluate(cfg: Config) -> dict[str, dict[str, dict[str, float]]]:
    """{model path: {task: its numbers}} for model.init_from and, when given, the baseline."""
    from llmhpc.data.tokenizer import load_tokenizer
    from llmhpc.models import load_pretrained

    if not cfg.model.init_from:
        raise ConfigError("model.init_from is not set: name the model to evaluate (HF dir, .gguf or llmhpc run)")
    e, tasks = cfg.eval, _tasks(cfg)
    windows = held_out_windows(cfg.data, cfg.run.seed, e.seq_len, e.max_windows) if "perplexity" in tasks else None
    questions = {t: _questions(cfg, t) for t in tasks if t not in ("perplexity", "preferences")}
    pairs = _preference_rows(cfg) if "preferences" in tasks else None
    text_vocab = load_tokenizer(cfg.data.tokenizer).get_vocab() if windows is not None else None
    results: dict[str, dict[str, dict[str, float]]] = {}
    # judge=: the reward model, loaded once for every model measured
    scorer = RewardScorer.load(e.judge, batch_size=e.batch_size) if e.judge and questions else None
    for path in [cfg.model.init_from, *([e.baseline] if e.baseline else [])]:
        model, tokenizer = load_pretrained(path, dtype=_dtype(cfg))
        numbers = results.setdefault(path, {})
        if windows is not None:
            if tokenizer is not None and tokenizer.get_vocab() != text_vocab:
                raise InputError(f"{path}: its tokenizer is not data.tokenizer={cfg.data.tokenizer}, so perplexities "
                                 "would not compare; set data.tokenizer to the model's (its .gguf or HF directory)")
            numbers["perplexity"] = perplexity(model, windows, e.batch_size)
        if pairs is not None:
            if tokenizer is None:
                raise InputError(f"{path}: has no tokenizer files, so pairs cannot be rendered; add them")
            try:
                ranker = RewardScorer(model, tokenizer, batch_size=e.batch_size, pooling=stored_pooling(path))
                numbers["preferences"] = ranker.pairwise(pairs)
            except InputError as err:
                raise InputError(f"{path}: {err}") from None
        for task, asked in questions.items():
            if tokenizer is None:
                raise InputError(f"{path}: has no tokenizer files, so questions cannot be asked; add them")
            if e.best_of > 1:
                numbers[task] = best_of_n_accuracy(model, tokenizer, asked, scorer, n=e.best_of,
                                                   temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                                                   batch_size=e.batch_size, seed=cfg.run.seed)
            else:
                numbers[task] = accuracy(model, tokenizer, asked, max_new_tokens=e.max_new_tokens,
                                         batch_size=e.batch_size, scorer=scorer)
        del model
    return results


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: a row per measured number, a column per model."""
    paths = list(results)
    rows = [f"| | {' | '.join(paths)} |", "|---|" + "---:|" * len(paths)]
    first = results[paths[0]]
    for task, numbers in first.items():
        for name in numbers:
            label = name if task == "perplexity" else f"{task} {name}"
            cells = [f"{results[p][task][name]:.4g}" for p in paths]
            rows.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(rows)


def main(cfg: Config, overrides: list[str]) -> int:
    """`llmhpc eval`: measure, print the table, write JSON when asked."""
    results = evaluate(cfg)
    print(table(results))
    if cfg.eval.output:
        out = Path(cfg.eval.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(out)
    return 0
