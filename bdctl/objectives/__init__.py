"""Training objectives as pure functions of tensors (they import only torch).

* `bellman`: Bellman Distill, paper and released variants, dense reference and lean path.
* `kd`: word-level knowledge distillation, exact (live teacher) and top-k (sparse cache).
* `lm`: cross-entropy for SFT and the pretraining term, plus the chunked-vocabulary helpers
  that let the lean objectives work from hidden states without ``[B, T, V]`` logits.

Import the submodules directly; this package imports nothing so that importing it is free.
"""
