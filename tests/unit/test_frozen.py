"""Frozen models of RL runs (`llmhpc.rl.frozen`): an offloaded model's weights are on its device only inside
`resident()` (nested uses share one copy) and point at their untouched host copies after, an error included; the
reference's log-probs are log_softmax(logits / T) at the labels, computed here from the logits; a bf16 reference
holds half the matrix bytes and gives the fp32 one's log-probs, bit for bit under bf16 autocast; a bf16 reward model
scores as the fp32 one within bf16's rounding. On a CUDA device (skipped without one) an offloaded reference takes
no device memory between rollouts and scores as on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from llmhpc.config.schema import ModelConfig
from llmhpc.models import build_model
from llmhpc.rl.frozen import FrozenModel, ReferencePolicy
from llmhpc.train.losses import IGNORE_INDEX

VOCAB = 96


def _tiny(seed: int = 0, score_head: bool = False, vocab: int = VOCAB):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                   max_seq_len=256, score_head=score_head))


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 4:-1] = ids[:, 5:]
    labels[2, 9:] = IGNORE_INDEX  # a shorter answer
    return {"input_ids": ids, "labels": labels}


def _devices(model) -> set[str]:
    return {t.device.type for t in [*model.parameters(), *model.buffers()]}


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_an_offloaded_model_is_on_its_device_only_while_resident():
    model = _tiny()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    frozen = FrozenModel(model, "meta", offload=True)  # a device other than the host's, on any machine
    assert _devices(model) == {"cpu"} and not frozen.on_device
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with frozen.resident() as inside:
        assert inside is model and _devices(model) == {"meta"} and frozen.on_device
        with frozen.resident():
            assert _devices(model) == {"meta"}
        assert _devices(model) == {"meta"}  # the outer body still uses it
    assert _devices(model) == {"cpu"} and not frozen.on_device
    with pytest.raises(RuntimeError, match="boom"), frozen.resident():
        raise RuntimeError("boom")
    assert _devices(model) == {"cpu"}
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    host = FrozenModel(_tiny(), "cpu", offload=True)  # nothing to offload from: the host is the device
    assert not host.offload and host.on_device


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_reference_logprobs_are_the_log_softmax_at_the_labels(temperature):
    model, batch = _tiny(seed=2), _batch()
    got = ReferencePolicy(FrozenModel(copy.deepcopy(model), "cpu"), temperature=temperature)(batch)
    mask = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        logits = model(batch["input_ids"]) / (temperature or 1.0)  # greedy is scored as softmax, as the objective
    want = torch.log_softmax(logits, dim=-1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(got[mask], want[mask], atol=1e-5)


def _linear_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_a_bf16_reference_holds_half_the_matrix_bytes_and_is_exact_under_bf16_autocast():
    """Stored in bf16, the linear layers' weights take half the bytes; under a precision=bf16 run's autocast its
    log-probs are the fp32 reference's bit for bit (autocast rounds those weights to bf16 anyway), and in an fp32
    run they are within bf16's rounding."""
    model, batch = _tiny(seed=2), _batch()
    fp32 = FrozenModel(copy.deepcopy(model), "cpu")
    bf16 = FrozenModel(copy.deepcopy(model), "cpu", dtype=torch.bfloat16)
    assert 2 * _linear_bytes(bf16.model) == _linear_bytes(fp32.model)
    assert bf16.model.tok_embeddings.weight.dtype == torch.float32  # and so the residual stream
    run_bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731 (what a precision=bf16 run enters)
    assert torch.equal(ReferencePolicy(bf16, autocast=run_bf16)(batch), ReferencePolicy(fp32, autocast=run_bf16)(batch))
    mask = batch["labels"] != IGNORE_INDEX
    error = (ReferencePolicy(bf16)(batch) - ReferencePolicy(fp32)(batch))[mask].abs().max().item()
    assert 0 < error < 0.05, error  # an fp32 run: products in bf16, log-probs near log(96) = -4.6
    with pytest.raises(ValueError, match="fp32 or bf16"):
        FrozenModel(_tiny(), "cpu", dtype=torch.float16)


def test_a_bf16_reward_model_scores_as_the_fp32_one():
    from llmhpc.data.tokenizer import load_tokenizer
    from llmhpc.rl.reward_model import RewardScorer

    tokenizer = load_tokenizer("smollm2")
    model = _tiny(seed=3, score_head=True, vocab=len(tokenizer))
    prompts = ["What is 12 + 30?", "A train goes 60 km in 2 hours. How fast is it?", "What is 7 * 8?"]
    answers = ["12 + 30 = 42. The answer is 42.", "60 / 2 = 30. The answer is 30.", "The answer is 54."]
    want = RewardScorer(copy.deepcopy(model), tokenizer, pooling="sum")(prompts, answers)
    bf16 = RewardScorer(model, tokenizer, pooling="sum", dtype=torch.bfloat16)
    got = bf16(prompts, answers)
    assert bf16.model.score.weight.dtype == torch.bfloat16
    spread = max(want) - min(want)
    assert spread > 0 and got != want
    assert got == pytest.approx(want, abs=0.05 * spread + 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: offloading moves weights between host and device memory")
def test_an_offloaded_reference_frees_its_device_memory_between_rollouts():
    model, batch = _tiny(seed=2), _batch()
    want = ReferencePolicy(FrozenModel(copy.deepcopy(model), "cpu"))(batch)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    reference = ReferencePolicy(FrozenModel(model, "cuda", offload=True))
    assert torch.cuda.memory_allocated() == base and all(p.is_pinned() for p in model.parameters())
    with reference.resident():
        assert torch.cuda.memory_allocated() >= base + _bytes(model)
        got = reference(batch)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base
    assert torch.allclose(got, want, atol=1e-3)
