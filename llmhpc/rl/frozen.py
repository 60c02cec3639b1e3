"""Frozen models of an RL run (the reference policy, a reward model): how they are stored and where they live.

PPO holds up to four models (actor, critic, reference, reward model), and the last two never train: they are
needed only while a rollout is scored. `FrozenModel` keeps such a model in host memory and copies it to its device
only for the phases that run it (`with frozen.resident(): ...`), so between phases it takes no device memory. The
weights never change, so sending them back costs nothing: the device copies are dropped and the parameters point
at the host copies again (pinned on CUDA, so the next copy in is asynchronous and at full bus speed).

Stored in bf16 (`FROZEN_DTYPES`), its linear layers' weights are kept in bf16 and it runs under bf16 autocast; the
embedding, the norms and the residual stream stay fp32. That is exactly what a `precision=bf16` run computes with
fp32 weights (autocast rounds every product's weight to bf16 anyway), so there it costs nothing in accuracy, while
the matrices take half the bytes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The dtypes a frozen model can be stored in (`ppo.frozen_dtype`, `grpo.frozen_dtype`)."""


class FrozenModel:
    """A model that does not train, on `device` while in use; with `offload`, in host memory between uses."""

    def __init__(self, model: nn.Module, device: torch.device | str, *, dtype: torch.dtype = torch.float32,
                 offload: bool = False) -> None:
        self.model = model.requires_grad_(False).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        if dtype == torch.bfloat16:
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.to(torch.bfloat16)
        elif dtype != torch.float32:
            raise ValueError(f"a frozen model is stored in fp32 or bf16, not {dtype}")
        self.offload = offload and self.device.type != "cpu"
        self._depth = 0
        self._slots: list[tuple[dict, str, torch.Tensor]] = []
        """(the owning module's _parameters or _buffers, the name, the host tensor) of every parameter and
        buffer: tied weights share one host tensor, and so one device copy."""
        if not self.offload:
            self.model.to(self.device)
            return
        pin = self.device.type == "cuda"
        hosts: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in hosts:
                        hosts[id(tensor)] = _copied(tensor, torch.device("cpu"), pin=pin)
                    table[name] = hosts[id(tensor)]
                    self._slots.append((table, name, hosts[id(tensor)]))

    def autocast(self) -> AbstractContextManager:
        """What its forward runs under: bf16 autocast when stored in bf16 (module docstring), else nothing."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def on_device(self) -> bool:
        """Whether the weights are on `device` now."""
        return not self.offload or self._depth > 0

    @contextmanager
    def resident(self) -> Iterator[nn.Module]:
        """The model with its weights on `device` for the body (nested uses share one copy); offloaded, they go
        back to host memory when the outermost body ends (the device copies are dropped: the host copies never
        changed)."""
        if self.offload and self._depth == 0:
            copies: dict[int, torch.Tensor] = {}
            for table, name, host in self._slots:
                if id(host) not in copies:
                    copies[id(host)] = _copied(host, self.device)
                table[name] = copies[id(host)]
        self._depth += 1
        try:
            yield self.model
        finally:
            self._depth -= 1
            if self.offload and self._depth == 0:
                for table, name, host in self._slots:
                    table[name] = host


def _copied(tensor: torch.Tensor, device: torch.device, *, pin: bool = False) -> torch.Tensor:
    """`tensor` copied to `device` (pinned if asked), still a frozen `nn.Parameter` where it was one. Only a copy
    to an accelerator is asynchronous: one to the host must be complete before it is pinned or used."""
    copy = tensor.detach().to(device, non_blocking=device.type != "cpu")
    copy = copy.pin_memory() if pin else copy
    return nn.Parameter(copy, requires_grad=False) if isinstance(tensor, nn.Parameter) else copy


class ReferencePolicy:
    """Log-probs of a micro-batch's labels under the starting model, at the sampling temperature: GRPO's KL term
    and PPO's KL penalty. `model` is either the policy itself with `switch()` turning its adapters off (peft: no
    second model) or a `FrozenModel` of its own; `autocast()` is the run's (a bf16-stored model adds its own);
    `resident()` holds a frozen one on the device around a rollout's micro-batches, so an offloaded reference is
    copied in once per rollout, not once per micro-batch."""

    def __init__(self, model: nn.Module | FrozenModel, *, switch=nullcontext, autocast=nullcontext,
                 temperature: float = 1.0) -> None:
        self.frozen = model if isinstance(model, FrozenModel) else None
        self.model = model.model if isinstance(model, FrozenModel) else model
        self.switch, self.autocast = switch, autocast
        self.temperature = temperature if temperature > 0 else 1.0  # as GRPOObjective: greedy = softmax

    def resident(self) -> AbstractContextManager:
        """The reference's weights on its device for the body (a no-op unless it is an offloaded frozen model)."""
        return self.frozen.resident() if self.frozen is not None else nullcontext()

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, S] log-probs at the labels (0 where none), fp32 on the CPU."""
        from llmhpc.rl.grpo import completion_logprobs
        from llmhpc.train.objective import LMHead, model_inputs

        model = self.model
        was_training = model.training
        model.eval()
        try:
            stored = self.frozen.autocast() if self.frozen is not None else nullcontext()
            with self.resident(), self.switch(), self.autocast(), stored:
                device = next(model.parameters()).device
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = model(**model_inputs(batch), return_hidden=True)
                return completion_logprobs(LMHead(model), hidden, batch["labels"], self.temperature).float().cpu()
        finally:
            model.train(was_training)
