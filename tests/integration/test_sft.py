"""`llmhpc sft`: the loss it trains is transformers' cross-entropy on the assistant tokens; LoRA runs checkpoint
only the adapters, resume bitwise, and leave an adapter `peft` loads onto the base with the merged run's logits.

The base is the tiny model trained two steps under tp=2 x pp=2 (the session's `tp2_pp2_checkpoint`): its
tokenizer is SmolLM2's, chat template included. The data are the package's arithmetic problems.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmhpc.checkpoint import latest_checkpoint, read_meta
from llmhpc.data.arithmetic import train_eval_split, write_jsonl
from llmhpc.data.sft import SFTLoader, load_sft_examples, split_examples
from llmhpc.data.tokenizer import load_tokenizer
from llmhpc.models import load_pretrained
from llmhpc.models.hf import config_to_hf, save_hf, state_dict_to_hf
from tests.conftest import run_cli
from tests.distributed.launch import copy_run_stopped_at, step_losses

SFT = ["trainer.seq_len=128", "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_every=0",
       "logger.progress_bar=false", "run.device=cpu"]


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_data") / "train.jsonl"
    write_jsonl(train_eval_split(64, 0, seed=5)[0], path)
    return path


def _hf(model) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(model.cfg))).eval()
    hf.load_state_dict(state_dict_to_hf(model.state_dict()), strict=False)
    hf.tie_weights()
    return hf


def test_full_sft_trains_transformers_loss_on_assistant_tokens(tp2_pp2_checkpoint, problems, llmhpc_cache, tmp_path):
    run = tmp_path / "full"
    run_cli(["sft", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={problems}", "data.pack=false",
             "trainer.max_steps=2", "data.val_fraction=0", *SFT, f"run.dir={run}"], llmhpc_cache)
    losses = step_losses(run)

    # The first optimizer step's batch, rebuilt from the loader; its loss recomputed by transformers.
    tokenizer = load_tokenizer("smollm2")
    examples, _ = load_sft_examples(problems, tokenizer, 128)
    train, _ = split_examples(examples, 0.0, 1234)
    loader = SFTLoader(train, 128, 2, 1234, pack=False, pad_id=tokenizer.pad_token_id)
    base, _ = load_pretrained(tp2_pp2_checkpoint)
    hf = _hf(base)
    total = every = count = every_count = positions = 0.0
    for _ in range(2):  # two micro-batches, each padded to its own longest conversation
        batch = loader.next_batch()
        ids, labels = batch["input_ids"], batch["labels"]
        assert 0 < (labels != -100).sum() < labels.numel()
        with torch.no_grad():
            logits = hf(ids).logits
        ce = torch.nn.functional.cross_entropy
        total += float(ce(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
        count += float((labels != -100).sum())
        positions += ids.numel()
        every += float(ce(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        every_count += ids[:, 1:].numel()
    assert losses[1] == pytest.approx(total / count, rel=1e-5)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss_token_fraction"] == pytest.approx(count / positions) and 0 < count / positions < 1
    # Only the assistant tokens count: the loss over every token is another number.
    assert abs(every / every_count - losses[1]) > 1e-2

    trained, tokenizer = load_pretrained(run)  # the checkpoint names the model's tokenizer, template included
    assert tokenizer.chat_template and any(not torch.equal(a, b) for a, b in
                                           zip(trained.state_dict().values(), base.state_dict().values(), strict=True))


def test_lora_sft_keeps_adapters_only_resumes_bitwise_and_exports_them(
    tp2_pp2_checkpoint, problems, llmhpc_cache, tmp_path
):
    common = ["sft", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={problems}", "peft=lora", "peft.rank=4",
              "peft.dropout=0", "trainer.lr=1e-2", "trainer.max_steps=4", "trainer.ckpt_every=2", *SFT]
    run, resumed = tmp_path / "lora", tmp_path / "resumed"
    run_cli([*common, f"run.dir={run}"], llmhpc_cache)

    # Checkpoints: the adapters and their AdamW moments, the base referenced by its fingerprint.
    step_dir = latest_checkpoint(run / "checkpoints")
    component = read_meta(step_dir)["components"]["model"]
    assert component["base"]["source"] == str(tp2_pp2_checkpoint / "checkpoints" / "step_0000002")
    assert all(".lora_" not in name for name in component["frozen"])
    adapter_bytes = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    on_disk = sum(f.stat().st_size for f in step_dir.glob("*.distcp"))
    assert 3 * adapter_bytes * 0.99 < on_disk < 3 * adapter_bytes + 256 * 1024

    # Stopped after step 2 and started again: the same losses, bit for bit.
    copy_run_stopped_at(run, resumed, 2)
    proc = run_cli([*common, f"run.dir={resumed}"], llmhpc_cache)
    assert "resumed from" in proc.stdout
    assert step_losses(resumed) == step_losses(run)

    # peft loads the adapter onto transformers' copy of the base and gives the logits of the merged run.
    merged, _ = load_pretrained(run)
    base_dir = tmp_path / "base_hf"
    base, _ = load_pretrained(tp2_pp2_checkpoint)
    save_hf(base, base_dir)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run / "adapter")(ids).logits
        ours = merged(ids)
        moved = (ours - base(ids)).abs().max()
    assert (theirs - ours).abs().max() <= 1e-4 < moved
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4

    # The converter folds the adapters into the weights it writes; with keep_adapters=true it writes the base as it
    # was and the adapters beside it, which peft puts back on.
    run_cli(["convert", f"src={run}", "to=hf", f"dst={tmp_path / 'merged_hf'}"], llmhpc_cache)
    kept = tmp_path / "kept_hf"
    run_cli(["convert", f"src={run}", "to=hf", "keep_adapters=true", f"dst={kept}"], llmhpc_cache)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf")(ids).logits
        kept_base = AutoModelForCausalLM.from_pretrained(kept)
        unmerged = kept_base(ids).logits
        with_adapter = PeftModel.from_pretrained(kept_base, kept / "adapter")(ids).logits
    assert (exported - ours).abs().max() <= 1e-4
    assert (unmerged - base(ids)).abs().max() <= 1e-4
    assert (with_adapter - ours).abs().max() <= 1e-4
    assert load_file(kept / "adapter" / "adapter_model.safetensors").keys() == load_file(
        run / "adapter" / "adapter_model.safetensors").keys()


def test_arithmetic_runs_log_held_out_answer_accuracy(tp2_pp2_checkpoint, llmhpc_cache, tmp_path):
    """data.source=arithmetic (the default): each eval also answers held-out problems greedily and logs how many
    were right; the two-step Shakespeare model gets none and never ends an answer within the token budget."""
    run = tmp_path / "arith"
    run_cli(["sft", f"model.init_from={tp2_pp2_checkpoint}", "trainer.max_steps=1", *SFT, "trainer.eval_every=1",
             f"run.dir={run}"], llmhpc_cache)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (record["eval_accuracy"], record["eval_truncated"]) == (0.0, 1.0)
    assert record["eval_loss"] > 0


def test_qlora_run_reads_back_as_its_adapters_on_the_nf4_base_and_trains_alike_under_fsdp2_and_tp2(
    tp2_pp2_checkpoint, problems, llmhpc_cache, tmp_path
):
    from llmhpc.models.adapters import fold_adapter, nf4_values
    from llmhpc.peft.lora import read_peft_adapter
    from tests.distributed.launch import run_torchrun

    run, sharded, split = tmp_path / "qlora", tmp_path / "qlora_fsdp2", tmp_path / "qlora_tp2"
    common = ["sft", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={problems}", "peft=qlora",
              "peft.rank=4", "peft.dropout=0", "trainer.lr=1e-2", "trainer.max_steps=2", *SFT]
    run_cli([*common, f"run.dir={run}"], llmhpc_cache)
    # FSDP2 shards the NF4 base (each rank holds half of every NF4 weight) and gives one process's losses.
    run_torchrun(2, [*common, "parallel.dp_shard=2", f"run.dir={sharded}"], llmhpc_cache)
    one, two = step_losses(run), step_losses(sharded)
    assert one.keys() == two.keys() == {1, 2} and all(abs(one[s] - two[s]) <= 1e-5 for s in one), (one, two)
    theirs = load_file(sharded / "adapter" / "adapter_model.safetensors")
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)
    # Under tp=2 each rank quantizes its own shard: other NF4 values (tests/distributed/test_lora_parallel.py
    # shows they are exactly what the ranks compute with), so nearly, not exactly, one process's losses.
    run_torchrun(2, [*common, "parallel.tp=2", f"run.dir={split}"], llmhpc_cache)
    tp2 = step_losses(split)
    assert tp2.keys() == one.keys() and all(0 < abs(one[s] - tp2[s]) <= 1e-2 * one[s] for s in one), (one, tp2)
    base, _ = load_pretrained(tp2_pp2_checkpoint)
    for directory, shards in ((run, 1), (split, 2)):
        merged, _ = load_pretrained(directory)
        cfg, adapters = read_peft_adapter(directory / "adapter")
        expected = base.state_dict()
        for module, tensors in adapters.items():
            weight = expected[f"{module}.weight"]
            values = nf4_values(weight, shards, dim=1 if module.endswith(("wo", "w2")) else 0)
            expected[f"{module}.weight"] = fold_adapter(values, tensors["lora_A"], tensors["lora_B"], cfg.scaling)
        assert len(adapters) == 2 * 7
        for name, value in merged.state_dict().items():
            assert torch.allclose(value, expected[name], atol=1e-6), (directory.name, name)
    # Trained on the NF4 base: folding into the original weights gives another model.
    wq = adapters["layers.0.attention.wq"]
    on_original = fold_adapter(base.state_dict()["layers.0.attention.wq.weight"], wq["lora_A"], wq["lora_B"],
                               cfg.scaling)
    assert (on_original - merged.state_dict()["layers.0.attention.wq.weight"]).abs().max() > 1e-4


@pytest.mark.slow  # CI time: tier 1 trains QLoRA's adapters alike under fsdp2 and tp2
def test_lora_sft_under_fsdp2_and_tp2_gives_the_losses_of_one_process(
    tp2_pp2_checkpoint, problems, llmhpc_cache, tmp_path
):
    """Unpacked batches as wide as their longest conversation: odd widths, which tp=2's sequence split pads."""
    from tests.distributed.launch import run_torchrun

    common = ["sft", f"model.init_from={tp2_pp2_checkpoint}", f"data.source={problems}", "peft=lora", "peft.rank=4",
              "peft.dropout=0", "data.pack=false", "trainer.lr=1e-2", "trainer.max_steps=3", *SFT]
    run_cli([*common, f"run.dir={tmp_path / 'one'}"], llmhpc_cache)
    one = step_losses(tmp_path / "one")
    assert one.keys() == {1, 2, 3}
    adapter = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for layout in ("parallel.dp_shard=2", "parallel.tp=2"):
        run = tmp_path / layout.replace("parallel.", "").replace("=", "")
        run_torchrun(2, [*common, layout, f"run.dir={run}"], llmhpc_cache)
        losses = step_losses(run)
        assert losses.keys() == one.keys() and all(abs(one[s] - losses[s]) <= 1e-5 for s in one), (layout, losses)
        # The same adapter, gathered from the shards by rank 0.
        theirs = load_file(run / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == theirs.keys()
        assert all(torch.allclose(adapter[k], theirs[k], atol=1e-5) for k in adapter), layout


@pytest.mark.slow  # CI time: tier 1 trains QLoRA on a tiny model
def test_qlora_on_smollm2_lowers_its_loss_and_checkpoints_only_small_adapters(llmhpc_cache, tmp_path):
    """QLoRA on the real SmolLM2-135M-Instruct (the package's GGUF) at the default rank 16 on all seven projections:
    four arithmetic conversations form every step's whole batch, so each logged loss is the same batch's and must
    fall (1.36 -> 0.58 in three steps). The checkpoint holds the adapters (3.6% of the base's weights) and their
    moments (3.6% of a full fine-tune's checkpoint), and resumes bitwise."""
    from llmhpc.assets import smollm2_gguf
    from llmhpc.models import build_model
    from llmhpc.models.sharded_load import model_config_of

    data = tmp_path / "four.jsonl"
    write_jsonl(train_eval_split(4, 0, seed=9)[0], data)
    common = ["sft", f"model.init_from={smollm2_gguf()}", f"data.source={data}", "peft=qlora", "peft.dropout=0",
              "data.pack=false", "data.val_fraction=0", "trainer.seq_len=256", "trainer.global_batch_size=4",
              "trainer.micro_batch_size=4", "trainer.lr=1e-3", "trainer.warmup_steps=0", "trainer.max_steps=3",
              "trainer.ckpt_every=2", "trainer.eval_every=0", "logger.progress_bar=false", "run.device=cpu"]
    run, resumed = tmp_path / "qlora", tmp_path / "resumed"
    run_cli([*common, f"run.dir={run}"], llmhpc_cache)
    losses = step_losses(run)
    assert losses[3] < 0.8 * losses[1], losses

    base = build_model(model_config_of(smollm2_gguf()), device="meta")  # its shape only
    base_params = sum(p.numel() for p in base.parameters())
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    adapter_params = sum(t.numel() for t in adapter.values())
    assert len(adapter) == 2 * 7 * base.cfg.n_layers and adapter_params < 0.05 * base_params
    step_dir = latest_checkpoint(run / "checkpoints")
    on_disk = sum(f.stat().st_size for f in step_dir.glob("*.distcp"))
    adapter_bytes = 4 * adapter_params  # fp32 adapters + AdamW's two fp32 moments and step; not the NF4 base
    assert 3 * adapter_bytes <= on_disk < 3 * adapter_bytes + 3 * 4096 * len(adapter)
    # Like for like: under 5% of the base's own checkpoint (fp32 weights and two moments, what full SFT writes).
    assert on_disk < 0.05 * 3 * 4 * base_params, (on_disk, base_params)

    copy_run_stopped_at(run, resumed, 2)
    assert "resumed from" in run_cli([*common, f"run.dir={resumed}"], llmhpc_cache).stdout
    assert step_losses(resumed) == losses
