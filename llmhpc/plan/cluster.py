"""The machines a plan is for: GPU preset, node count and the two link speeds."""

from __future__ import annotations

from dataclasses import dataclass

from llmhpc.config.schema import ClusterConfig
from llmhpc.config.validate import ConfigError
from llmhpc.plan.gpus import GB, GpuSpec, gpu_spec


@dataclass(frozen=True)
class Cluster:
    """nodes x gpus_per_node GPUs of one kind; bandwidths per GPU and direction in bytes/s."""

    gpu: GpuSpec
    """The GPU preset."""
    nodes: int
    """Number of nodes."""
    gpus_per_node: int
    """GPUs per node, all joined by the intra-node link (NVLink)."""
    intra_bw: float
    """Intra-node bandwidth per GPU and direction (the preset's NVLink unless overridden)."""
    inter_bw: float
    """Inter-node bandwidth per GPU and direction (the preset's InfiniBand unless overridden)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def of(cls, cfg: ClusterConfig) -> Cluster:
        """Check the cluster keys and resolve the GPU preset and bandwidth overrides."""
        for key in ("nodes", "gpus_per_node"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"cluster.{key} must be >= 1, got {getattr(cfg, key)}")
        for key in ("intra_node_gbs", "inter_node_gbs"):
            value = getattr(cfg, key)
            if value is not None and value <= 0:
                raise ConfigError(f"cluster.{key} must be > 0 GB/s (or null for the GPU preset's), got {value}")
        gpu = gpu_spec(cfg.gpu)
        intra = cfg.intra_node_gbs * GB if cfg.intra_node_gbs else gpu.nvlink_bw
        inter = cfg.inter_node_gbs * GB if cfg.inter_node_gbs else gpu.network_bw
        return cls(gpu, cfg.nodes, cfg.gpus_per_node, intra, inter)

    def group_bw(self, size: int, stride: int) -> float:
        """Bandwidth of a collective over `size` ranks that are `stride` apart in rank order: NVLink when
        they all sit in one node, else the per-GPU network link (the slowest hop of the ring)."""
        if size <= 1:
            return float("inf")
        return self.intra_bw if size * stride <= self.gpus_per_node else self.inter_bw
