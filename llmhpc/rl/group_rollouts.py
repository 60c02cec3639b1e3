"""GRPO's batch source: prompts -> groups of sampled answers -> rewards -> advantages -> training micro-batches.

The trainer asks a batch source for micro-batches; this one makes them from rollouts on the weights being
trained. Each rollout draws this rank's next prompts, samples `group_size` answers for each with the rollout engine
(one seeded random stream per answer, keyed by the prompt's place in the prompt stream, so a run samples the same
answers on any number of ranks), scores them (`RewardSet`), turns rewards into group-relative advantages and
cuts the rows into the step's micro-batches: `input_ids` = prompt + answer (its last token is never an input),
`labels` = the answer tokens at the positions that predict them, `old_logprobs` = the sampler's log-probs there
(the policy that sampled them: no second forward), `advantages`, and with a reference `ref_logprobs`. The same
micro-batches are served `updates` times (mu optimizer steps per rollout); then the next rollout runs.

Its position (the prompt stream's cursor) and the rollout being trained (its micro-batches and how many were
served) are saved in every checkpoint, so a run killed between two updates of one rollout resumes on the same
rollout and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llmhpc.data.preference import prefix_sharing_mask
from llmhpc.rl.frozen import ReferencePolicy
from llmhpc.rl.grpo import fill_with_informative_groups, group_advantages, informative, overlong_penalty
from llmhpc.rl.rewards import RewardSet
from llmhpc.rl.rollout import Completion, RolloutEngine
from llmhpc.rl.sampling import SamplingParams
from llmhpc.train.losses import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Prompt:
    """One prompt of the prompt set."""

    ids: tuple[int, ...]
    """Its token ids, chat template applied."""
    example: Mapping
    """The row it came from (at least 'answer'), handed to every reward function with each answer."""


@dataclass
class GroupSettings:
    """How rollouts are drawn and turned into training rows (`grpo.*` of the config)."""

    group_size: int
    sampling: SamplingParams
    groups: int
    """Groups (prompts) per rollout on this rank."""
    micro_batches: int
    """Micro-batches of one optimizer step on this rank (the trainer's accumulation steps)."""
    updates: int = 1
    """Optimizer steps on each rollout (mu)."""
    scale_rewards: bool = True
    dynamic_sampling: bool = False
    max_draws: int = 4
    overlong: str = "none"
    overlong_buffer: int = 32
    pad_id: int = 0
    skip_zero_advantage: bool = True
    """Leave answers whose advantage is 0 out of the micro-batches (their loss and gradient are exactly 0 when no
    KL term is trained); they still count in the loss normalizer (`GRPOObjective`), so the step is unchanged."""
    shared_prompt: bool = False
    """One row per prompt in each micro-batch (`shared_prompt_rows`): the prompt once, then each of its answers,
    masked to see the prompt and itself. Only for token-level losses (loss_norm=token, importance=token), whose
    sums do not care which row a token sits in."""


@dataclass
class _Group:
    prompt: Prompt
    completions: list[Completion]
    rewards: torch.Tensor
    """[G] total (with any overlong penalty)."""
    per_function: torch.Tensor
    """[G, functions] before the penalty."""


@dataclass
class _Stats:
    """A rollout's numbers on this rank, before they are reduced over the dp ranks."""

    means: dict[str, list[float]] = field(default_factory=dict)
    """name -> [sum, count]: logged as sum / count over every rank."""
    totals: dict[str, float] = field(default_factory=dict)
    """name -> sum over this rank's generate calls."""
    maxima: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float, count: float = 1.0) -> None:
        pair = self.means.setdefault(name, [0.0, 0.0])
        pair[0] += value
        pair[1] += count

    def total(self, name: str, value: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + value


class GroupRollouts:
    """A `BatchSource` of GRPO micro-batches (module docstring)."""

    def __init__(
        self,
        engine: RolloutEngine,
        prompts: Sequence[Prompt],
        rewards: RewardSet,
        decode: Callable[[list[int]], str],
        settings: GroupSettings,
        *,
        seed: int,
        rank: int = 0,
        ranks: int = 1,
        reference: ReferencePolicy | None = None,
        dp_group: dist.ProcessGroup | None = None,
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        """`reference(batch)` gives the reference policy's log-probs at a micro-batch's labels (beta > 0);
        `context()` is entered around generation (e.g. the training autocast); `dp_group` reduces the metrics."""
        if not prompts:
            raise ValueError("the prompt set is empty")
        self.engine, self.prompts, self.rewards, self.decode = engine, list(prompts), rewards, decode
        self.settings = settings
        self.seed, self.rank, self.ranks, self.reference, self.dp_group = seed, rank, ranks, reference, dp_group
        self.context = context
        self.cursor = 0
        """Prompts this rank has drawn (its k-th draw is the stream's prompt rank + k * ranks)."""
        self.rollouts = 0
        self.batches: list[Batch] = []
        self.served = 0
        self._metrics: dict[str, float] = {}
        self._order: tuple[int, list[int]] = (-1, [])

    # -- the prompt stream -------------------------------------------------------------------------
    def _stream_index(self) -> int:
        index = self.rank + self.cursor * self.ranks
        self.cursor += 1
        return index

    def _prompt_at(self, index: int) -> Prompt:
        """The stream's prompt `index`: epoch after epoch of the prompt set, each in its own seeded order."""
        epoch, position = divmod(index, len(self.prompts))
        if self._order[0] != epoch:
            order = list(range(len(self.prompts)))
            random.Random(f"llmhpc.grpo.prompts:{self.seed}:{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self.prompts[self._order[1][position]]

    # -- BatchSource ---------------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        if self.served == len(self.batches) * self.settings.updates:
            self._rollout()
        batch = self.batches[self.served % len(self.batches)]
        self.served += 1
        return batch

    def state_dict(self) -> dict:
        """The stream's position and the rollout being trained; a shared-prompt row's [S, S] attention mask is left
        out (its segments rebuild it: a checkpoint's meta.json stays the size of the tokens, not their square)."""
        return {"cursor": self.cursor, "rollouts": self.rollouts, "served": self.served,
                "batches": [{k: {"dtype": str(v.dtype).removeprefix("torch."), "data": v.tolist()}
                             for k, v in b.items() if not (k == "attention_mask" and "segment" in b)}
                            for b in self.batches],
                "metrics": self._metrics}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.rollouts, self.served = state["cursor"], state["rollouts"], state["served"]
        self.batches = [{k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])) for k, v in b.items()}
                        for b in state["batches"]]
        for batch in self.batches:
            if "segment" in batch:
                batch["attention_mask"] = prefix_sharing_mask(batch["segment"])
        self._metrics = dict(state["metrics"])

    def metrics(self) -> dict[str, float]:
        """The numbers of the rollout the last step trained on (means over every dp rank)."""
        return dict(self._metrics)

    # -- one rollout ----------------------------------------------------------------------------------
    def _draw(self, n: int, stats: _Stats) -> tuple[list[_Group], torch.Tensor]:
        """n new groups: sampled, scored, penalized; (groups, their rewards [n, G])."""
        s, g = self.settings, self.settings.group_size
        indices = [self._stream_index() for _ in range(n)]
        prompts = [self._prompt_at(i) for i in indices]
        requests = [list(p.ids) for p in prompts for _ in range(g)]
        with self.context():
            completions = self.engine.generate(requests, s.sampling,
                                               request_ids=[i * g + j for i in indices for j in range(g)])
        run = self.engine.stats
        stats.total("rollout_seconds", run.seconds)
        stats.total("rollout_tokens", run.generated_tokens)
        stats.total("gather_seconds", run.gather_seconds)
        texts = [self.decode(c.tokens) for c in completions]
        examples = [p.example for p in prompts for _ in range(g)]
        total, per_function = self.rewards.score(texts, examples)
        lengths = torch.tensor([len(c.tokens) for c in completions])
        if s.overlong == "penalty":
            total = total + overlong_penalty(lengths, s.sampling.max_new_tokens, s.overlong_buffer)
        rewards = total.view(n, g)
        for j, name in enumerate(self.rewards.functions):
            stats.add(f"reward_{name.rsplit('.', 1)[-1]}", float(per_function[:, j].sum()), len(completions))
        stats.add("zero_std_fraction", float((~informative(rewards)).sum()), n)
        groups = [_Group(p, completions[k * g:(k + 1) * g], rewards[k], per_function[k * g:(k + 1) * g])
                  for k, p in enumerate(prompts)]
        return groups, rewards

    def _any_rank_missing(self, missing: int) -> bool:
        """Whether any dp rank still misses groups (every rank then samples another round)."""
        if self.dp_group is None:
            return missing > 0
        most = torch.tensor([missing])
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.dp_group)
        return int(most) > 0

    def _rollout(self) -> None:
        s = self.settings
        stats = _Stats()
        for name in ("reward", "reward_std", "completion_length", "truncated", "entropy"):
            stats.add(name, 0.0, 0.0)  # every rank reports every name, even one left without groups
        stats.maxima["completion_length_max"] = 0.0
        if s.dynamic_sampling:
            groups, rewards, counts = fill_with_informative_groups(lambda n: self._draw(n, stats), s.groups,
                                                                   s.max_draws, self._any_rank_missing)
            stats.add("dynamic_dropped", counts["dropped"], counts["drawn"])
        else:
            groups, rewards = self._draw(s.groups, stats)
        rows = []
        if groups:
            advantages = group_advantages(rewards, scale=s.scale_rewards)
            for group, group_adv in zip(groups, advantages, strict=True):
                for completion, advantage in zip(group.completions, group_adv.tolist(), strict=True):
                    masked = s.overlong == "mask" and completion.finish_reason == "length"
                    rows.append((group.prompt.ids, completion, advantage, masked))
        for group in groups:
            stats.add("reward", float(group.rewards.sum()), len(group.completions))
            stats.add("reward_std", float(group.rewards.std()), 1)
            for c in group.completions:
                stats.add("completion_length", len(c.tokens))
                stats.add("truncated", float(c.finish_reason == "length"))
                stats.add("entropy", c.entropy * len(c.tokens), len(c.tokens))
                stats.maxima["completion_length_max"] = max(stats.maxima["completion_length_max"], len(c.tokens))
        self.batches = self._micro_batches(rows)
        if self.reference is not None:
            with torch.no_grad(), self.reference.resident():  # an offloaded reference comes in once per rollout
                for batch in self.batches:
                    batch["ref_logprobs"] = self.reference(batch).float()
        self.served = 0
        self.rollouts += 1
        self._metrics = self._reduce(stats)
        self._metrics["rollout"] = float(self.rollouts)

    def _micro_batches(self, rows: list[tuple]) -> list[Batch]:
        """The rows, shortest first, split into the step's micro-batches, each padded to its longest row.

        A rank left without rows (dynamic sampling found no informative group, or every advantage was 0) trains on
        one row of padding with no label: no loss, no gradient, but it takes part in every collective of the
        step."""
        s = self.settings
        skipped = torch.zeros(3, dtype=torch.long)  # rows, rows with labelled tokens, labelled tokens
        if s.skip_zero_advantage and self.reference is None:
            for _, completion, _, masked in (r for r in rows if r[2] == 0):
                tokens = 0 if masked else len(completion.tokens)
                skipped += torch.tensor([1, int(tokens > 0), tokens])
            rows = [r for r in rows if r[2] != 0]
        if not s.shared_prompt:  # shortest first; with shared prompts, group order keeps a group in one micro-batch
            rows = sorted(rows, key=lambda r: len(r[0]) + len(r[1].tokens))
        chunks = [rows[i * len(rows) // s.micro_batches:(i + 1) * len(rows) // s.micro_batches]
                  for i in range(s.micro_batches)]
        batches = []
        for chunk in chunks:
            if s.shared_prompt and chunk:
                batches.append({**shared_prompt_rows(chunk, s.pad_id), "skipped": torch.zeros(3, dtype=torch.long)})
                continue
            width = max((len(p) + len(c.tokens) - 1 for p, c, _, _ in chunk), default=1)
            n = max(len(chunk), 1)
            ids = torch.full((n, width), s.pad_id, dtype=torch.long)
            labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
            old = torch.zeros(n, width)
            advantages = torch.zeros(n)
            for row, (prompt, completion, advantage, masked) in enumerate(chunk):
                sequence = list(prompt) + completion.tokens
                ids[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
                start = len(prompt) - 1  # the position that predicts the first answer token
                if not masked:
                    labels[row, start: start + len(completion.tokens)] = torch.tensor(completion.tokens)
                    old[row, start: start + len(completion.tokens)] = torch.tensor(completion.logprobs)
                advantages[row] = advantage
            batches.append({"input_ids": ids, "labels": labels, "old_logprobs": old, "advantages": advantages,
                            "skipped": torch.zeros(3, dtype=torch.long)})
        batches[0]["skipped"] = skipped
        return batches

    def _reduce(self, stats: _Stats) -> dict[str, float]:
        """Means and totals summed over every dp rank, maxima over them (every rank has every name)."""
        means, totals, maxima = sorted(stats.means), sorted(stats.totals), sorted(stats.maxima)
        sums = torch.tensor([v for n in means for v in stats.means[n]] + [stats.totals[n] for n in totals],
                            dtype=torch.float64)
        peaks = torch.tensor([stats.maxima[n] for n in maxima], dtype=torch.float64)
        if self.dp_group is not None:
            dist.all_reduce(sums, group=self.dp_group)
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=self.dp_group)
        values = sums.tolist()
        out = {n: values[2 * i] / max(values[2 * i + 1], 1e-30) for i, n in enumerate(means)}
        total = dict(zip(totals, values[2 * len(means):], strict=True))
        seconds = total["rollout_seconds"] / self.ranks  # the ranks generate at the same time: their mean
        out["rollout_seconds"] = seconds
        out["rollout_tokens_per_s"] = total["rollout_tokens"] / seconds if seconds else 0.0
        out["gather_seconds"] = total["gather_seconds"] / self.ranks
        out.update(zip(maxima, peaks.tolist(), strict=True))
        return out


def shared_prompt_rows(rows: Sequence[tuple], pad_id: int) -> Batch:
    """A micro-batch of (prompt ids, completion, advantage, masked) rows with one row per distinct prompt.

    A row is the prompt without its last token, computed once, then one segment per answer: the prompt's last
    token followed by the answer (its last token never an input), at the positions the answer has after its
    prompt. Each segment sees the shared part and itself only (`prefix_sharing_mask`), so every answer
    token gets exactly the hidden state it gets in a row of its own, while the prompt's tokens go through the
    forward and backward once per group instead of once per answer. `labels` / `old_logprobs` sit at the
    positions that predict each answer token; `advantages` is per token [rows, S] (each answer's own); `segment`
    [rows, S] (0 the shared prompt, k answer k, -1 padding) is what the attention mask is made from."""
    by_prompt: dict[tuple[int, ...], list[tuple]] = {}
    for row in rows:
        by_prompt.setdefault(tuple(row[0]), []).append(row)
    lengths = [len(p) - 1 + sum(len(r[1].tokens) for r in answers) for p, answers in by_prompt.items()]
    n, width = len(by_prompt), max(lengths)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros(n, width)
    advantages = torch.zeros(n, width)
    positions = torch.zeros(n, width, dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # 0: the shared prompt, k: answer k, -1: padding
    for row, (prompt, answers) in enumerate(by_prompt.items()):
        shared = len(prompt) - 1
        ids[row, :shared] = torch.tensor(prompt[:-1], dtype=torch.long)
        positions[row, :shared] = torch.arange(shared)
        segment[row, :shared] = 0
        at = shared
        for k, (_, completion, advantage, masked) in enumerate(answers, start=1):
            span = slice(at, at + len(completion.tokens))
            ids[row, span] = torch.tensor([prompt[-1], *completion.tokens[:-1]])
            positions[row, span] = torch.arange(shared, shared + len(completion.tokens))
            segment[row, span] = k
            if not masked:
                labels[row, span] = torch.tensor(completion.tokens)
                old[row, span] = torch.tensor(completion.logprobs)
            advantages[row, span] = advantage
            at = span.stop
    return {"input_ids": ids, "labels": labels, "old_logprobs": old, "advantages": advantages,
            "position_ids": positions, "attention_mask": prefix_sharing_mask(segment), "segment": segment}
