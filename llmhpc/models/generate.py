"""Token-by-token decoding with the model's KV cache (greedy or temperature sampling).

Used by the demo, evaluation and RL rollouts; a batch of prompts is decoded in lock-step (prompts of
different lengths left-padded, with their `attention_mask`), and a sequence that has produced an end token
keeps emitting it until all are done.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmhpc.models.llama import Llama


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()  # not inference_mode: FSDP2 reuses its all-gather buffers in training afterwards
def generate(
    model: Llama,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt [B, S] followed by up to max_new_tokens generated tokens, [B, S + n].

    temperature 0 is greedy decoding. Generation stops early once every sequence has produced an
    end token; finished sequences are padded with the (first) end token. `attention_mask` [B, S]
    (1 = token, 0 = padding) marks left padding: each row then decodes exactly as it does alone.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if eos_token_id is None:
        eos = []
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos_ids = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
    batch, prompt_len = input_ids.shape
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(batch, prompt_len + max_new_tokens)
        tokens = [input_ids]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        step_input = input_ids
        mask = attention_mask
        for _ in range(max_new_tokens):
            # Through forward (the head inside it), so that wrappers' hooks run: FSDP2 gathers the embedding,
            # the final norm and the head only while the root module's forward runs.
            last = model(step_input, cache=cache, attention_mask=mask, on_hidden=lambda h: model.logits(h[:, -1]))
            nxt = _next_token(last, temperature, generator)
            if eos:
                nxt = torch.where(done, eos_ids[0], nxt)
                done = done | torch.isin(nxt, eos_ids)
            tokens.append(nxt[:, None])
            if eos and bool(done.all()):
                break
            step_input = nxt[:, None]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)
