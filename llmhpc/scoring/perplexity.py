"""Perplexity of a model on held-out text: exp of the mean negative log-likelihood per predicted token.

The text is the held-out split of a prepared corpus (the documents pretraining holds out for its eval loss),
cut into non-overlapping windows so each token is predicted once, from the context of its own window. Log-probs
come chunk by chunk (`llmhpc.train.logprobs`), so full logits of a batch never exist at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from llmhpc.config.schema import DataConfig
from llmhpc.errors import InputError
from llmhpc.train.logprobs import token_logprobs


def held_out_windows(data: DataConfig, seed: int, seq_len: int, max_windows: int = 0) -> torch.Tensor:
    """The first `max_windows` (0: all) windows [n, seq_len + 1] of the held-out split of data.source."""
    from llmhpc.data.prepare import prepare_corpus
    from llmhpc.data.pretrain import PackedTokens

    tokens = PackedTokens(prepare_corpus(data, seed=seed), "val")
    n = tokens.n_windows(seq_len)
    if n == 0:
        raise InputError(
            f"the held-out split of data.source={data.source} has {len(tokens)} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}; use a larger corpus, a larger data.val_fraction or a smaller seq_len"
        )
    if max_windows:
        n = min(n, max_windows)
    return torch.from_numpy(tokens.windows(np.arange(n), seq_len))


@torch.no_grad()  # not inference_mode: FSDP2 reuses its all-gather buffers in training afterwards
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """{'perplexity', 'nll' (mean per token, nats), 'tokens'} of `model` on token windows [n, seq + 1]."""
    vocab = model.lm_head_weight().shape[0]
    if int(windows.max()) >= vocab:
        raise InputError(
            f"the text holds token id {int(windows.max())} but the model has {vocab} embeddings: data.tokenizer is "
            "not this model's tokenizer; set data.tokenizer to the model's (its .gguf file or HF directory)"
        )
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in windows.split(batch_size):
            hidden = model(batch[:, :-1], return_hidden=True)
            logprobs = token_logprobs(hidden, model.logits, batch[:, 1:])
            total -= float(logprobs.double().sum())
            count += logprobs.numel()
    finally:
        model.train(was_training)
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": float(count)}
