"""Parameter and FLOP counts of a Llama config, from its shape alone (no tensors).

The planner has to size 405B models in microseconds, so it counts analytically; tests check the
counts against `build_model(cfg, device="meta")` and `Llama.flops_per_token`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmhpc.config.schema import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory and time model needs, derived from a `ModelConfig`."""

    dim: int
    """Hidden size h."""
    n_heads: int
    """Attention query heads."""
    kv_dim: int
    """n_kv_heads x head_dim: width of the K and V projections."""
    q_dim: int
    """n_heads x head_dim: width of the Q projection and the attention output."""
    ffn_dim: int
    """SwiGLU inner size f."""
    n_layers: int
    """Transformer blocks."""
    vocab: int
    """Vocabulary size."""
    tied: bool
    """Embedding and output head share one matrix."""

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelShape:
        head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
        return cls(cfg.dim, cfg.n_heads, cfg.n_kv_heads * head_dim, cfg.n_heads * head_dim, cfg.ffn_dim, cfg.n_layers,
                   cfg.vocab_size, cfg.tie_embeddings)

    @property
    def block_matmul_params(self) -> int:
        """Weights of the seven linears of one block (q, k, v, o, w1, w2, w3)."""
        h = self.dim
        return h * self.q_dim * 2 + h * self.kv_dim * 2 + 3 * h * self.ffn_dim

    @property
    def block_params(self) -> int:
        """All parameters of one block: the linears plus two RMSNorm weights."""
        return self.block_matmul_params + 2 * self.dim

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.dim

    @property
    def head_params(self) -> int:
        """Output projection (0 extra when tied: it is the embedding)."""
        return 0 if self.tied else self.vocab * self.dim

    @property
    def total_params(self) -> int:
        return self.n_layers * self.block_params + self.embedding_params + self.head_params + self.dim

    def model_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token by the MFU convention of `Llama.flops_per_token` (and torchtitan's): 6 x the
        non-embedding weights plus the head, plus 12 L x q_dim x seq for attention scores without causal halving."""
        n = self.n_layers * self.block_params + self.dim + self.vocab * self.dim
        return 6 * n + 12 * self.n_layers * self.q_dim * seq_len
