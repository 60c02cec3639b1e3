"""The rollout engine: batched generation with a KV cache and continuous batching, on the weights being trained.

GRPO and PPO sample from it, `llmhpc eval` scores with it, the server will serve from it. One call,
`RolloutEngine.generate(prompts, params)`, returns one `Completion` per prompt (tokens, the log-probability of each
sampled token, why it stopped), in prompt order.

How it runs: up to `batch_size` requests decode together, one token per row per forward. A row that finishes (an
end token, a stop string, or max_new_tokens) is handed to the next waiting prompt (those joining at one step are
prefilled together, a prompt asked several times at once, as a GRPO group asks it, computed once), so a long
answer never holds a whole batch back; once nothing waits, the rows are halved
whenever half of them are done, so the tail never computes more than twice the rows it needs. The rows share
one KV cache whose columns all rows write together (`_RowCache`): a joining prompt's keys and values are placed
right-aligned before the current column, and each row's attention mask and RoPE positions cover only its own
request. A row's tokens therefore depend on its prompt and its random stream only
(`llmhpc.rl.sampling`): the same whether it ran alone, in a full batch or refilled mid-way.

Everything goes through the model's forward (with `on_hidden` computing the head on the last position only), so
hooks of parallel wrappers run as in training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmhpc.models.llama import KVCache, Llama, head_dim_of
from llmhpc.parallel.fsdp import parameters_gathered
from llmhpc.rl.packed_weights import PackedWeights, packed_linears, packing_available
from llmhpc.rl.sampling import SamplingParams, request_generator, sample


@dataclass
class Completion:
    """What one prompt produced."""

    tokens: list[int]
    """The generated token ids (an end token or the token completing a stop string included)."""
    logprobs: list[float]
    """log p(token) of each generated token under the model's softmax(logits / temperature) (see `sample`)."""
    finish_reason: str
    """'stop' (an end token or a stop string) or 'length' (max_new_tokens reached)."""
    entropy: float = 0.0
    """Mean entropy of the distributions its tokens were drawn from (same softmax as `logprobs`)."""


@dataclass
class RolloutStats:
    """Counters of the last `generate` call."""

    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    """Prompt tokens the prefills computed (a prompt asked several times at once is computed once)."""
    generated_tokens: int = 0
    forwards: int = 0
    """Model forwards: one per decode step plus one per prefill batch."""
    seconds: float = 0.0
    packed_bytes: int = 0
    """The most bytes of packed weights held while decoding (`llmhpc.rl.packed_weights`; 0 without packing)."""
    gather_seconds: float = 0.0
    """Time spent gathering FSDP2-sharded parameters before decoding (once per call; 0 without FSDP2)."""
    timeline: list[int] = field(default_factory=list)
    """Active rows at each decode step (how full the batch stayed)."""

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class _RowCache(KVCache):
    """A KV cache of `rows` slots that requests take and leave.

    All rows write their next key / value at the same column (`length`), so a decode step is one forward.
    The request in row r occupies columns start[r]..length-1: a joining request's prefill is copied into a free row
    right-aligned to end at `length` (the whole cache is shifted right first if the prompt is longer than
    `length`), and the mask hides every column before start[r]. Positions are counted per row
    (length - start[r]), not by column. When the columns run out, those before every row's start are dropped (or
    the capacity grows). A freed row keeps computing garbage that nothing reads until a request takes it, or until
    `keep_rows` drops it.
    """

    def __init__(self, model: Llama, rows: int, capacity: int) -> None:  # not KVCache.__init__: other bookkeeping
        weight = model.tok_embeddings.weight
        self._like = {"dtype": model.cache_dtype(), "device": weight.device}
        self.max_len, self.length = capacity, 0
        shape = (rows, model.cfg.n_kv_heads, capacity, head_dim_of(model.cfg))
        self.keys = [torch.zeros(shape, **self._like) for _ in range(model.cfg.n_layers)]
        self.values = [torch.zeros(shape, **self._like) for _ in range(model.cfg.n_layers)]
        self.start = torch.zeros(rows, dtype=torch.long, device=weight.device)
        self.live = torch.zeros(rows, dtype=torch.bool, device=weight.device)
        """Rows that hold a request (a free row's columns may be dropped at any compaction)."""

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [rows, Hkv, S, D] at columns start.. and return every column up to them (KVCache's contract;
        the attention mask of `step_inputs` hides the columns a row does not own)."""
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _reallocate(self, capacity: int, shift: int, first: int) -> None:
        """Copy columns first..length-1 to shift.. of a cache `capacity` columns wide."""
        kept = self.length - first
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = torch.zeros(old.shape[0], old.shape[1], capacity, old.shape[3], **self._like)
                new[:, :, shift : shift + kept] = old[:, :, first : self.length]
                store[i] = new
        self.max_len, self.length = capacity, shift + kept
        self.start = (self.start - first + shift).clamp(min=0)

    def make_room(self, columns: int) -> None:
        """Ensure `columns` more columns fit after `length`: drop the dead ones on the left, or grow."""
        if self.length + columns <= self.max_len:
            return
        first = int(self.start[self.live].min()) if bool(self.live.any()) else self.length
        self._reallocate(max(self.max_len, self.length - first + columns), 0, first)

    def fill(self, rows: list[int], prefill: KVCache, lengths: torch.Tensor, source: torch.Tensor) -> None:
        """Copy rows `source` of a left-padded prefill cache (its row i: a prompt in its last lengths[i] columns)
        into `rows` (several rows may take the same prefill row: one prompt sampled several times)."""
        width = prefill.length
        if width > self.length:  # room on the left for the longer prompt
            self._reallocate(max(self.max_len, width + 1), width - self.length, 0)
        index = torch.tensor(rows, device=self.start.device)
        for store, new in ((self.keys, prefill.keys), (self.values, prefill.values)):
            for layer, cached in enumerate(store):
                cached[index, :, self.length - width : self.length] = new[layer][source, :, :width]
        self.start[index] = self.length - lengths[source].to(self.start.device)
        self.live[index] = True

    def free(self, row: int) -> None:
        """Hide every column written so far from `row` (its request has finished)."""
        self.start[row] = self.length
        self.live[row] = False

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order)."""
        index = torch.tensor(rows, device=self.start.device)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                store[i] = old[index]
        self.start, self.live = self.start[index], self.live[index]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask [rows, length + 1], position_ids [rows, 1]) for a one-token decode step."""
        columns = torch.arange(self.length + 1, device=self.start.device)
        return columns[None, :] >= self.start[:, None], (self.length - self.start)[:, None]


class RolloutEngine:
    """Generates completions for many prompts with one model, `batch_size` rows at a time (module docstring)."""

    def __init__(
        self,
        model: Llama,
        *,
        batch_size: int = 16,
        eos_token_ids: Sequence[int] = (),
        decode: Callable[[list[int]], str] | None = None,
        pack_weights: bool = True,
    ) -> None:
        """`eos_token_ids` end a completion; `decode` (token ids -> text) is needed for stop strings only;
        `pack_weights` lays fp32 weights out once per call for MKL's packed GEMM, or under bf16 autocast casts them
        to bf16 once per call, and lays bf16 ones out for oneDNN where it computes bf16 (`llmhpc.rl.packed_weights`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size, self.decode = model, batch_size, decode
        self.pack_weights = pack_weights and packing_available()
        self._packer: PackedWeights | None = None
        self.eos_token_ids = set(eos_token_ids)
        self.stats = RolloutStats()

    @torch.no_grad()  # not inference_mode: FSDP2 reuses its all-gather buffers in training afterwards
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        request_ids: Sequence[int] | None = None,
    ) -> list[Completion]:
        """One `Completion` per prompt (token ids, non-empty), in prompt order.

        Prompt i samples from the random stream of request `request_ids[i]` (default i) of `params.seed`, so the
        same (seed, request id, prompt) gives the same completion in any call, alone or among others."""
        params = params or SamplingParams()
        request_ids = list(range(len(prompts))) if request_ids is None else list(request_ids)
        if len(request_ids) != len(prompts):
            raise ValueError(f"{len(request_ids)} request_ids for {len(prompts)} prompts")
        params.validate()
        if params.stop and self.decode is None:
            raise ValueError("stop strings need the engine's decode function (token ids -> text)")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max((len(p) for p in prompts), default=0)
        limit = self.model.cfg.max_seq_len
        if longest + params.max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                             f"model.max_seq_len={limit}; shorten the prompt or lower max_new_tokens")
        was_training = self.model.training
        self.model.eval()
        began = time.perf_counter()
        self.stats = RolloutStats(prompt_tokens=sum(len(p) for p in prompts))
        try:
            # Eager even where parallel.compile compiled the blocks: every decode step has another cache length
            # (a recompile each, until dynamo gives up), and inductor cannot lower the packed products (it takes
            # MKL's packed weights for frozen constants only).
            with torch.compiler.set_stance("force_eager"), parameters_gathered(self.model) as gather:
                if self.pack_weights:
                    self._packer = PackedWeights(min(self.batch_size, len(prompts)))
                    with packed_linears(self.model, self._packer):
                        completions = self._run(prompts, params, longest, request_ids)
                    self.stats.packed_bytes = self._packer.peak_bytes
                else:
                    completions = self._run(prompts, params, longest, request_ids)
        finally:
            self._packer = None
            self.model.train(was_training)
        self.stats.gather_seconds = gather.seconds
        self.stats.seconds = time.perf_counter() - began
        self.stats.generated_tokens = sum(len(c.tokens) for c in completions)
        return completions

    def _forward_last(self, ids: torch.Tensor, cache: KVCache, **inputs) -> torch.Tensor:
        """Logits [rows, vocab] of the last position, through the model's forward."""
        self.stats.forwards += 1
        model, packer = self.model, self._packer
        if packer is None:
            return model(ids, cache=cache, on_hidden=lambda h: model.logits(h[:, -1]), **inputs)
        return model(ids, cache=cache, on_hidden=lambda h: packer.linear(h[:, -1], model.lm_head_weight()), **inputs)

    def _prefill(self, prompts: list[Sequence[int]]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Left-padded prefill of a few prompts: (their cache, their lengths, last-position logits)."""
        device = self.model.tok_embeddings.weight.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        self.stats.prefilled_tokens += int(lengths.sum())
        width = int(lengths.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt, device=device)
            mask[row, width - len(prompt) :] = True
        cache = self.model.new_cache(len(prompts), width)
        logits = self._forward_last(ids, cache, attention_mask=mask if not bool(mask.all()) else None)
        return cache, lengths, logits

    def _run(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, longest: int, request_ids: list[int]
    ) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        waiting = list(range(len(prompts)))[::-1]  # popped from the end: prompt order
        rows = min(self.batch_size, len(prompts))
        cache = _RowCache(self.model, rows, longest + params.max_new_tokens + 1)
        owner: list[int | None] = [None] * rows  # the prompt each row decodes, None when free
        generators: list[torch.Generator | None] = [None] * rows
        out_tokens: list[list[int]] = [[] for _ in range(rows)]
        out_logprobs: list[list[float]] = [[] for _ in range(rows)]
        out_entropy: list[float] = [0.0] * rows
        device = self.model.tok_embeddings.weight.device
        pending = torch.zeros(rows, dtype=torch.long, device=device)  # each row's last token, not yet cached
        while waiting or any(o is not None for o in owner):
            free = [r for r in range(len(owner)) if owner[r] is None]
            if free and waiting:
                joining = free[: len(waiting)]
                new = [waiting.pop() for _ in joining]
                distinct: dict[tuple[int, ...], int] = {}  # a prompt sampled G times is prefilled once
                source = [distinct.setdefault(tuple(prompts[i]), len(distinct)) for i in new]
                prefill, lengths, logits = self._prefill(list(distinct))
                source_rows = torch.tensor(source, device=device)
                cache.fill(joining, prefill, lengths, source_rows)
                new_generators = [request_generator(params.seed, request_ids[i]) for i in new]
                tokens, logprobs, entropy = sample(logits[source_rows], params, new_generators)
                pending[joining] = tokens.to(device)
                for row, i, gen, token, logprob, ent in zip(joining, new, new_generators, tokens.tolist(),
                                                            logprobs.tolist(), entropy.tolist(), strict=True):
                    owner[row], generators[row] = i, gen
                    out_tokens[row], out_logprobs[row], out_entropy[row] = [token], [logprob], ent
                active = joining
            else:
                active = [r for r in range(len(owner)) if owner[r] is not None]
                if not waiting and len(active) <= len(owner) // 2:  # the tail: halve the rows computed
                    cache.keep_rows(active)
                    owner, generators = [owner[r] for r in active], [generators[r] for r in active]
                    out_tokens, out_logprobs = [out_tokens[r] for r in active], [out_logprobs[r] for r in active]
                    out_entropy = [out_entropy[r] for r in active]
                    pending = pending[torch.tensor(active, device=device)]
                    active = list(range(len(active)))
                    if self._packer is not None:
                        self._packer.rows = len(active)
                cache.make_room(1)
                mask, positions = cache.step_inputs()
                self.stats.timeline.append(len(active))
                logits = self._forward_last(pending[:, None], cache, attention_mask=mask, position_ids=positions)
                index = torch.tensor(active, device=device)
                tokens, logprobs, entropy = sample(logits[index], params, [generators[r] for r in active])
                pending[index] = tokens
                for row, token, logprob, ent in zip(active, tokens.tolist(), logprobs.tolist(), entropy.tolist(),
                                                    strict=True):
                    out_tokens[row].append(token)
                    out_logprobs[row].append(logprob)
                    out_entropy[row] += ent
            for row in active:
                reason = self._finish_reason(out_tokens[row], params)
                if reason is not None:
                    entropy = out_entropy[row] / len(out_tokens[row])
                    results[owner[row]] = Completion(out_tokens[row], out_logprobs[row], reason, entropy)
                    owner[row] = generators[row] = None
                    cache.free(row)
        return [r for r in results if r is not None]

    def _finish_reason(self, tokens: list[int], params: SamplingParams) -> str | None:
        """'stop' / 'length' once a row is done, else None."""
        if tokens[-1] in self.eos_token_ids:
            return "stop"
        if params.stop and self.decode is not None:
            tail = self.decode(tokens[-_STOP_WINDOW:])
            if any(s in tail for s in params.stop):
                return "stop"
        return "length" if len(tokens) >= params.max_new_tokens else None


_STOP_WINDOW = 32
"""Tokens decoded from the end of a completion to look for stop strings (one is never longer than this)."""
