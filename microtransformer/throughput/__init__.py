"""Throughput on a GPU: MFU accounting, automatic batch size, a prefetching batch feeder and the
compile / precision / loss choices of the training step. One concern per module:

  mfu.py         FLOPs per token, the dense bf16 peak table, `compute_mfu`, `format_mfu`
  batch_size.py  memory estimate, `choose_batch` ("auto"), OOM binary search
  feeder.py      `BatchFeeder` (background thread, pinned memory, side-stream copies)
  fast_path.py   `prepare_for_gpu` (autocast dtype, TF32, loss kind, torch.compile, CUDA
                 graphs, fused AdamW)

docs/GPU.md describes the whole path and how the training loop calls it.
"""

from microtransformer.throughput.batch_size import BatchChoice, choose_batch, estimate_train_bytes
from microtransformer.throughput.fast_path import FastPathSettings, Prepared, prepare_for_gpu
from microtransformer.throughput.feeder import BatchFeeder
from microtransformer.throughput.mfu import MFU, compute_mfu, format_mfu

__all__ = ["MFU", "BatchChoice", "BatchFeeder", "FastPathSettings", "Prepared", "choose_batch",
           "compute_mfu", "estimate_train_bytes", "format_mfu", "prepare_for_gpu"]
