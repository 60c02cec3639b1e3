"""GPU-free planner: is a layout valid, how much memory per GPU, how fast (see docs/planner.md)."""

from llmhpc.plan.cluster import Cluster
from llmhpc.plan.efficiency import STACKS, Stack
from llmhpc.plan.gpus import GPUS, GpuSpec
from llmhpc.plan.layout import Layout
from llmhpc.plan.memory import MemoryBreakdown, estimate_memory
from llmhpc.plan.shape import ModelShape
from llmhpc.plan.throughput import StepEstimate, estimate_step
from llmhpc.plan.workload import Workload

__all__ = ["GPUS", "STACKS", "Cluster", "GpuSpec", "Layout", "MemoryBreakdown", "ModelShape", "Stack",
           "StepEstimate", "Workload", "estimate_memory", "estimate_step"]
