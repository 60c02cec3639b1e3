"""Config composition and the one-line errors users get for bad keys, types and values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmhpc.config import ConfigError, from_yaml, load_config, to_yaml
from tests.conftest import REPO


def test_presets_compose_with_published_shapes():
    cfg = load_config("pretrain", ["model=llama3_70b", "trainer.lr=3e-4", "trainer.max_steps=50"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads) == (8192, 80, 64, 8)
    assert cfg.model.rope_scaling.type == "llama3" and cfg.model.rope_theta == 500000.0
    assert cfg.trainer.lr == 3e-4 and cfg.trainer.max_steps == 50
    smol = load_config("pretrain", ["model=smollm2_135m"]).model
    assert (smol.dim, smol.n_layers, smol.n_heads, smol.n_kv_heads, smol.ffn_dim) == (576, 30, 9, 3, 1536)


def test_yaml_round_trip():
    cfg = load_config("pretrain", ["model=llama3_8b", "logger.wandb.tags=[a,b]"])
    assert from_yaml(to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.mx_steps=3"], ["unknown config key 'trainer.mx_steps'", "trainer.max_steps"]),
        (["traner.lr=1"], ["unknown config key 'traner.lr'", "trainer.lr"]),
        (["model=tinny"], ["unknown model preset 'tinny'", "tiny"]),
        (["trainer.max_steps=abc"], ["trainer.max_steps", "expected integer", "abc"]),
        (["model.n_heads=7"], ["model.n_heads=7", "model.dim=256"]),
        (["model.n_kv_heads=3"], ["model.n_kv_heads=3", "model.n_heads=8"]),
        (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], ["trainer.global_batch_size=10"]),
        (["trainer.seq_len=4096"], ["trainer.seq_len=4096", "model.max_seq_len"]),
        (["logger.wandb.mode=offlne"], ["logger.wandb.mode", "offline"]),
        (["precision=fp8", "precision.fp8_recipe=blockwise"], ["precision.fp8_recipe='blockwise'", "rowwise"]),
        (["precision=fp8", "parallel.engine=deepspeed"], ["precision=fp8", "parallel.engine=torch"]),
        (["trainer.lr"], ["key=value"]),
    ],
)
def test_bad_config_is_one_clear_error(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config("pretrain", overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_fp8_composes_with_tensor_parallel(monkeypatch):
    """Float8 linears under TP/SP match one process (tests/distributed/test_fp8_tp.py), so no refusal."""
    for world, dp_shard in ((2, 1), (4, 2)):  # TP alone, and FSDP2 x TP
        monkeypatch.setenv("WORLD_SIZE", str(world))  # the layout is checked against the launch's world size
        cfg = load_config("pretrain", ["precision=fp8", "precision.fp8_recipe=rowwise", "parallel.tp=2",
                                       f"parallel.dp_shard={dp_shard}", "trainer.global_batch_size=16"])
        assert (cfg.precision.name, cfg.parallel.tp, cfg.parallel.dp_shard) == ("fp8", 2, dp_shard)


def test_cli_bad_key_exits_nonzero_with_one_line_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "llmhpc", "pretrain", "trainer.mx_steps=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "trainer.max_steps" in lines[0] and "Traceback" not in proc.stderr


def test_cli_missing_init_from_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "llmhpc", "pretrain", f"model.init_from={missing}", f"run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_every_key_with_its_doc():
    proc = subprocess.run(
        [sys.executable, "-m", "llmhpc", "pretrain", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    assert "trainer.global_batch_size" in proc.stdout and "gradient accumulation" in proc.stdout
    assert "llama3_405b" in proc.stdout


def test_every_command_shorthand_key_is_its_own():
    """A command's undotted keys expand into its own section, never into a top-level section of the same name
    (GRPO's `reward=` is its reward functions, not the reward model's section)."""
    from dataclasses import fields

    from llmhpc.config.schema import Config
    from llmhpc.stages.registry import STAGES, load_stage_config

    top = {f.name for f in fields(Config)}
    for spec in STAGES.values():
        if spec.shorthand:
            section = {f.name for f in fields(getattr(Config(), spec.shorthand))}
            assert not section & top, (spec.name, section & top)
    assert load_stage_config("grpo", ["reward=[correct]"]).grpo.reward == ["correct"]
    assert load_stage_config("reward", ["center_coefficient=0.01"]).reward_model.center_coefficient == 0.01
    assert load_stage_config("eval", ["best_of=2", "judge=runs/rm"]).eval.judge == "runs/rm"


def test_a_key_of_another_command_is_refused_naming_that_command():
    from llmhpc.stages.registry import load_stage_config

    with pytest.raises(ConfigError) as info:
        load_stage_config("pretrain", ["plan.top=3"])
    message = str(info.value)
    assert "'plan.top' is not a key of llmhpc pretrain" in message and "belongs to llmhpc plan" in message
    with pytest.raises(ConfigError, match="'cluster' is not a key of llmhpc pretrain.*llmhpc plan"):
        load_stage_config("pretrain", ["cluster=h100_8x8"])
    with pytest.raises(ConfigError, match="'data.source' is not a key of llmhpc plan.*llmhpc pretrain"):
        load_stage_config("plan", ["data.source=x.txt"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer.mx_steps'.*trainer.max_steps"):
        load_stage_config("plan", ["trainer.mx_steps=3"])


def test_stage_help_lists_only_the_keys_that_stage_reads():
    proc = subprocess.run([sys.executable, "-m", "llmhpc", "plan", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "cluster.gpus_per_node" in proc.stdout and "plan.top" in proc.stdout
    assert "data.source" not in proc.stdout and "logger.wandb.mode" not in proc.stdout
    pretrain = subprocess.run([sys.executable, "-m", "llmhpc", "pretrain", "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert "plan.top" not in pretrain.stdout and "trainer.freeze" in pretrain.stdout


def test_the_micro_batch_follows_from_the_global_batch_and_the_layout(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_config("pretrain", ["parallel.dp_shard=2", "trainer.global_batch_size=8"]).trainer.micro_batch_size == 4
    # pipeline: the largest micro-batch that still gives every stage work (a multiple of pp micro-batches)
    pp = load_config("pretrain", ["parallel.pp=2", "parallel.dp_shard=1", "trainer.global_batch_size=8"])
    assert pp.trainer.micro_batch_size == 4
    given = load_config("pretrain", ["parallel.dp_shard=2", "trainer.micro_batch_size=1"])
    assert given.trainer.micro_batch_size == 1
    with pytest.raises(ConfigError, match="cannot be split evenly over 2"):
        load_config("pretrain", ["parallel.dp_shard=2", "trainer.global_batch_size=7"])


def test_convert_takes_its_keys_without_prefix_and_checks_them():
    from llmhpc.stages.registry import load_stage_config

    cfg = load_stage_config("convert", ["src=runs/x", "to=gguf", "quant=q4_k", "dst=out.gguf"])
    c = cfg.convert
    assert (c.src, c.to, c.quant, c.dst) == ("runs/x", "gguf", "q4_k", "out.gguf")
    with pytest.raises(ConfigError, match="quant='q4_k' is not written for to=trtllm; choose one of: none, int8_wo"):
        load_stage_config("convert", ["to=trtllm", "quant=q4_k"])
    with pytest.raises(ConfigError, match="to='onnx' is not one of: hf, trtllm, gguf"):
        load_stage_config("convert", ["to=onnx"])
    with pytest.raises(ConfigError, match="'trainer.max_steps' is not a key of llmhpc convert"):
        load_stage_config("convert", ["trainer.max_steps=3"])


def test_eval_takes_its_keys_without_prefix_beside_preset_choices():
    from llmhpc.stages.registry import load_stage_config

    cfg = load_stage_config("eval", ["model.init_from=x.gguf", "task=perplexity,arithmetic", "precision=bf16",
                                     "baseline=y.gguf", "max_windows=0"])
    assert (cfg.eval.task, cfg.eval.baseline, cfg.eval.max_windows) == ("perplexity,arithmetic", "y.gguf", 0)
    assert cfg.precision.name == "bf16"  # a preset choice is not read as eval.precision
    with pytest.raises(ConfigError,
                       match="task='mmlu' is not a task: choose perplexity, arithmetic, preferences or a .jsonl"):
        load_stage_config("eval", ["task=perplexity,mmlu"])
    with pytest.raises(ConfigError, match="unknown config key 'eval.tsk'; nearest valid keys: eval.task"):
        load_stage_config("eval", ["tsk=perplexity"])
    with pytest.raises(ConfigError, match="'trainer.lr' is not a key of llmhpc eval"):
        load_stage_config("eval", ["trainer.lr=1"])
