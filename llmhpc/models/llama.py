"""The one Llama-family decoder every stage trains, converts and serves.

It is a plain `nn.Module` with no parallelism in it: tensor, pipeline and data parallelism are
functions applied to a finished model (see `llmhpc.parallel`), so module names here are part of
the checkpoint format and must stay stable. RoPE uses Hugging Face's rotate-half layout, so HF
weights load without any permutation of the query/key projections.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmhpc.config.schema import ModelConfig, RopeScalingConfig
from llmhpc.config.validate import validate_model


def head_dim_of(cfg: ModelConfig) -> int:
    """Per-head size: the explicit `head_dim`, else dim // n_heads."""
    return cfg.head_dim if cfg.head_dim is not None else cfg.dim // cfg.n_heads


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig, device=None) -> torch.Tensor:
    """Inverse frequencies of RoPE, with Llama 3.1's long-context rescaling when asked for.

    Llama 3 scaling divides the low frequencies (wavelength beyond original_ctx / low_freq_factor)
    by `factor`, keeps the high ones (wavelength below original_ctx / high_freq_factor) and blends
    linearly in between.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.type == "none":
        return inv_freq
    if scaling.type != "llama3":
        raise ValueError(f"unsupported rope_scaling.type {scaling.type!r} (expected 'none' or 'llama3')")
    ctx = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_wave = ctx / scaling.low_freq_factor
    short_wave = ctx / scaling.high_freq_factor
    blend = (ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    scaled = torch.where(wavelen > long_wave, inv_freq / scaling.factor, inv_freq)
    in_between = (wavelen >= short_wave) & (wavelen <= long_wave)
    return torch.where(in_between, blended, scaled)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim] in fp32 (both halves repeated, rotate-half layout)."""
    if device is not None and torch.device(device).type == "meta":  # shapes only: `init_rope` computes them
        shape = (cfg.max_seq_len, head_dim_of(cfg))  # (math on meta costs a process a second of set-up)
        return torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
    inv_freq = rope_inv_freq(head_dim_of(cfg), cfg.rope_theta, cfg.rope_scaling, device=device)
    positions = torch.arange(cfg.max_seq_len, dtype=torch.int64, device=device).float()
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by the angles of its positions.

    cos/sin are [S, D] when every row sits at the same positions, or [B, 1, S, D] when each row has
    its own (padding, packing); either broadcasts over the heads.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class KVCache:
    """Keys and values of past positions for incremental decoding, preallocated per layer.

    `length` is the number of positions already written; the model continues positions from it
    and advances it after each forward. It is one number for the whole batch: rows of unequal
    length are left-padded to a common one, and the model's `attention_mask` (padding keys hidden,
    positions counted from each row's first real token) makes every row decode as if alone.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache max_len={max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        shape = (batch, cfg.n_kv_heads, max_len, head_dim_of(cfg))
        self.max_len = max_len
        self.length = 0
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, Hkv, S, D] at positions start.. and return everything cached up to them."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, max_len={self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, S, S]: True where query i may attend key j (j <= i, same document)."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]


def token_positions(
    batch: int,
    seq: int,
    start: int,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """RoPE positions [B, S] (or [1, S]) of the new tokens, or None for the shared start..start+S-1.

    Explicit `position_ids` win. Otherwise a padding mask [B, start+S] counts real tokens, so a
    left-padded row's first real token is position 0 exactly as if the row ran alone (padding gets
    position 0; what it computes is never looked at). None keeps the contiguous table slice, which
    is what the unpadded path (and pretraining's document masking) has always used.
    """
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq:
            raise ValueError(f"position_ids must be [{batch}, {seq}], got {tuple(position_ids.shape)}")
        return position_ids
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            raise ValueError("a 4-D attention_mask needs position_ids: which position each token is at")
        _check_key_shape("attention_mask", attention_mask, batch, start + seq)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
    return None


def rope_at(
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor | None,
    start: int,
    seq: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for `apply_rope`: a table slice [S, D], or per-row rows [B, 1, S, D] gathered at `positions`.

    Raises when a position falls outside the tables (model.max_seq_len); with explicit positions that
    is the largest one used, not start + S, so packed rows may be longer than any one document allows.
    Under torch.compile the explicit positions are not checked here (reading their range would split
    the graph in two): the callers bound them (trainer.seq_len <= model.max_seq_len is checked with the
    config, the rollout engine checks prompt + max_new_tokens), and an index past the tables' end stops the
    process in the compiled kernel's bounds check ("index out of bounds"), not with this ValueError.
    """
    limit = cos_table.shape[0]
    if positions is None:
        if start + seq > limit:
            raise ValueError(f"{start + seq} positions exceed model.max_seq_len={limit}")
        return cos_table[start : start + seq], sin_table[start : start + seq]
    if not torch.compiler.is_compiling():
        low, high = (int(v) for v in positions.aminmax())
        if low < 0 or high >= limit:
            raise ValueError(f"position ids span {low}..{high}, outside 0..{limit - 1} (model.max_seq_len={limit})")
    return cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)


def attention_mask_for(
    batch: int,
    seq: int,
    start: int,
    *,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean SDPA mask (True = may attend) for S new queries after `start` cached keys, or None.

    None means plain causal attention, left to SDPA's `is_causal` kernel without a materialized mask
    (the pretraining path). Otherwise query i (at cache index start+i) may see key j when j <= start+i,
    j is in the same document (`document_ids` [B, start+S]) and j is not padding (`attention_mask`
    [B, start+S], 1 = real). A padding query could then see no key at all and SDPA would return NaN
    (which poisons gradients even where the loss ignores it), so every query may always see itself.
    Result: [S, start+S] for the chunked-prefill case, [B, 1, S, start+S] otherwise.

    A 4-D boolean `attention_mask` [B, 1, S, start+S] is the mask itself, used as given (e.g. two answers that
    share one copy of their prompt in a row); it must let every query see at least itself.
    """
    total = start + seq
    if attention_mask is not None and attention_mask.dim() == 4:
        if tuple(attention_mask.shape) != (batch, 1, seq, total) or document_ids is not None:
            raise ValueError(f"a 4-D attention_mask must be [{batch}, 1, {seq}, {total}] (without document_ids), "
                             f"got {tuple(attention_mask.shape)}")
        return attention_mask.bool()
    if attention_mask is None and document_ids is None:
        if start > 0 and seq > 1:
            # Chunked prefill after cached positions: query i sees every key up to start + i.
            key_pos = torch.arange(total, device=device)
            query_pos = torch.arange(start, total, device=device)
            return key_pos[None, :] <= query_pos[:, None]
        return None
    if document_ids is not None and start == 0 and attention_mask is None:
        _check_key_shape("document_ids", document_ids, batch, total)
        return document_mask(document_ids)
    key_idx = torch.arange(total, device=device)
    query_idx = torch.arange(start, total, device=device)
    allowed = (key_idx[None, :] <= query_idx[:, None])[None]  # [1, S, T]
    if document_ids is not None:
        _check_key_shape("document_ids", document_ids, batch, total)
        allowed = allowed & (document_ids[:, start:, None] == document_ids[:, None, :])
    if attention_mask is not None:
        _check_key_shape("attention_mask", attention_mask, batch, total)
        allowed = allowed & attention_mask.bool()[:, None, :]
        allowed = allowed | (key_idx[None, :] == query_idx[:, None])[None]
    return allowed[:, None]


def _check_key_shape(name: str, t: torch.Tensor, batch: int, total: int) -> None:
    """Masks describe every key a query may see: the cached positions and the new ones."""
    if tuple(t.shape) != (batch, total):
        raise ValueError(f"{name} must be [batch, cached + new positions] = [{batch}, {total}], got {tuple(t.shape)}")


class Attention(nn.Module):
    """Grouped-query self-attention through `scaled_dot_product_attention`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = head_dim_of(cfg)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 instead of the configured head count keeps this valid when TP shards the projections.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, start)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) built from a `ModelConfig`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        # On the meta device, where every stage builds the model first, without the embedding's own N(0, 1) draw
        # (a process's first normal_ there costs a second of set-up; `init_weights` or a load fills it anyway).
        # Elsewhere the draw stays: seeded callers rely on the random stream it consumes.
        shell = torch.empty(cfg.vocab_size, cfg.dim) if torch.empty(0).is_meta else None
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=shell)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.score = nn.Linear(cfg.dim, 1, bias=False) if cfg.score_head else None
        cos, sin = rope_tables(cfg, device=self.tok_embeddings.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_state_dict(
        cls,
        cfg: ModelConfig,
        state: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Llama:
        """Build on the meta device and adopt `state` (llmhpc names) without a random init first."""
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.load_state_dict(state, strict=True, assign=True)
        model.to(dtype)
        model.init_rope()
        return model

    # ---- initialization -------------------------------------------------------------------------

    @torch.no_grad()
    def init_rope(self) -> None:
        """Recompute the RoPE tables in place (after `to_empty` they hold garbage)."""
        cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter and buffer, e.g. after a meta-device build + `to_empty`.

        Linears and embeddings ~ N(0, init_std); the projections that write into the residual
        stream (wo, w2) are scaled down by 1/sqrt(2 n_layers) so its variance does not grow with depth.

        Also works after the model was split and sharded on the meta device (pipeline stages pruned,
        TP / FSDP2 DTensor weights): each weight's full values are drawn in the order of the whole
        model and every rank keeps its own shard, so any layout starts from exactly the weights of a
        single-process run, with one full weight in memory at a time instead of the whole model. A tied
        model that also holds an `output` (the last pipeline stage's copy of the embedding) fills it with
        the embedding's draw.
        """
        device = self.rope_cos.device
        tied_copy = self.cfg.tie_embeddings and self.output is not None
        for name, shape, std in _random_weights(self.cfg):
            values = torch.empty(shape, device=device).normal_(0.0, std)
            targets = [name, "output.weight"] if tied_copy and name == "tok_embeddings.weight" else [name]
            for target in targets:
                param = self._parameter_or_none(target)
                if param is not None:  # None: another pipeline stage holds it (the draw keeps the RNG in step)
                    _copy_own_shard(param, values)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                _copy_own_shard(param, torch.ones(param.shape, device=device))
        self.init_rope()

    def _parameter_or_none(self, name: str) -> nn.Parameter | None:
        try:
            return self.get_parameter(name)
        except AttributeError:
            return None

    # ---- forward ---------------------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, S, dim]; `logits` turns (a subset of) them into logits.

        Without the optional arguments every row is one causal sequence at positions 0..S-1 (after
        the cache's positions), computed by SDPA's causal kernel with no mask in memory.

        - `attention_mask` [B, cached + S] (1 = real token, 0 = padding): padding keys are never
          attended to, and unless `position_ids` are given a row's positions count only its real
          tokens, so a left-padded row gets exactly the logits it has alone. With a KV cache pass the
          mask of every position so far (prefill mask, then one more column per decode step).
        - `position_ids` [B, S] (or [1, S]): RoPE positions per row, e.g. restarting per packed document.
        - `document_ids` [B, cached + S]: a query sees only keys of its own document. Positions stay
          global unless `position_ids` restart them (pretraining's document masking keeps them global).
        All three combine: a key is visible when causal, same document and not padding.
        """
        batch, seq = input_ids.shape
        start = cache.length if cache is not None else 0
        positions = token_positions(batch, seq, start, position_ids=position_ids, attention_mask=attention_mask)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, positions, start, seq)
        mask = attention_mask_for(
            batch, seq, start, attention_mask=attention_mask, document_ids=document_ids, device=input_ids.device
        )
        h = self.tok_embeddings(input_ids)
        for name, block in self.layers.items():
            h = block(h, cos, sin, mask, cache, int(name), start)
        if cache is not None:
            cache.length = start + seq
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states onto the vocabulary (through the embedding when tied)."""
        if self.output is None:
            return F.linear(hidden, self.tok_embeddings.weight)
        return self.output(hidden)

    def lm_head_weight(self) -> torch.Tensor:
        """The [vocab, dim] matrix `logits` multiplies by, for losses that fuse the head with softmax."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def score_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """The scalar head's value at every position [..., S] of hidden states [..., S, dim], in fp32."""
        if self.score is None:
            raise ValueError("this model has no score head (model.score_head=false); a reward model has one")
        return self.score(hidden).squeeze(-1).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        on_hidden: Callable[[torch.Tensor], Any] | None = None,
    ) -> Any:
        """Logits [B, S, vocab] of input_ids [B, S]; the final hidden states if return_hidden; or
        `on_hidden(hidden)` computed inside this forward.

        The keywords are those of `hidden_states`. return_hidden goes through forward (not
        `hidden_states`) so that `model.compile()` and forward hooks (FSDP) still apply when the loss
        computes the head itself. `on_hidden` is for engines that gather weights only while a module's
        forward runs (DeepSpeed ZeRO-3): an objective that reads the head's weight runs in there.
        """
        hidden = self.hidden_states(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, document_ids=document_ids, cache=cache
        )
        if on_hidden is not None:
            return on_hidden(hidden)
        return hidden if return_hidden else self.logits(hidden)

    # ---- accounting ------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied matrix once); optionally without the input embedding table."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 N (matmul weights incl. output projection) + attention scores."""
        n = self.num_params(exclude_embeddings=True)
        if self.output is None:
            n += self.tok_embeddings.weight.numel()
        cfg = self.cfg
        return 6 * n + 12 * cfg.n_layers * cfg.n_heads * head_dim_of(cfg) * seq_len

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache on this model's device, in `cache_dtype()`."""
        weight = self.tok_embeddings.weight
        return KVCache(self.cfg, batch, max_len, dtype=self.cache_dtype(), device=weight.device)

    def cache_dtype(self) -> torch.dtype:
        """What a KV cache holds: the weights' dtype, or autocast's where it is on for fp32 weights. Under autocast
        attention casts its keys and values to that dtype on every call, so a cache kept in it gives the same
        attention bit for bit, at half the bytes, without casting the whole cache again at every decode step."""
        weight = self.tok_embeddings.weight
        device = weight.device.type
        if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return weight.dtype


SCORE_HEAD = "score.weight"
"""The scalar head's weight (`ModelConfig.score_head`)."""


def score_head_draw(cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The score head [1, dim] a reward model started from weights without one gets: N(0, init_std) from `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.empty(1, cfg.dim).normal_(0.0, cfg.init_std, generator=generator)


@torch.no_grad()
def init_score_head(model: nn.Module, seed: int) -> None:
    """Set the score head to `score_head_draw(seed)` (every rank the same draw, each keeping its shard)."""
    param = model.get_parameter(SCORE_HEAD)
    _copy_own_shard(param, score_head_draw(model.cfg, seed).to(param.device))


def stored_names(model: nn.Module) -> dict[str, str]:
    """{parameter: the name its values are stored under in weight files and checkpoints}, where they differ.

    A tied model holds one matrix, stored as the embedding; the last pipeline stage of a tied model also holds
    a copy of it as its head (`output.weight`), read from and saved as the embedding.
    """
    cfg = getattr(model, "cfg", None)
    tied_copy = getattr(cfg, "tie_embeddings", False) and getattr(model, "output", None) is not None
    return {"output.weight": "tok_embeddings.weight"} if tied_copy else {}


def _random_weights(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], float]]:
    """Every randomly initialized weight of the whole model in draw order: (name, full shape, std)."""
    std, residual_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    q, kv = cfg.n_heads * head_dim_of(cfg), cfg.n_kv_heads * head_dim_of(cfg)
    block = [("attention.wq", (q, cfg.dim), std), ("attention.wk", (kv, cfg.dim), std),
             ("attention.wv", (kv, cfg.dim), std), ("feed_forward.w1", (cfg.ffn_dim, cfg.dim), std),
             ("feed_forward.w3", (cfg.ffn_dim, cfg.dim), std), ("attention.wo", (cfg.dim, q), residual_std),
             ("feed_forward.w2", (cfg.dim, cfg.ffn_dim), residual_std)]
    draws = [("tok_embeddings.weight", (cfg.vocab_size, cfg.dim), std)]
    for index in range(cfg.n_layers):
        draws += [(f"layers.{index}.{name}.weight", shape, scale) for name, shape, scale in block]
    if not cfg.tie_embeddings:
        draws.append(("output.weight", (cfg.vocab_size, cfg.dim), std))
    if cfg.score_head:  # drawn last, so a model with the head shares every other weight with one without it
        draws.append((SCORE_HEAD, (1, cfg.dim), std))
    return draws


def _copy_own_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `param` (a plain tensor, or a TP / FSDP2 DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):  # every rank drew the same `full`: slice locally, no communication
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
