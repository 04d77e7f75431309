"""bdctl: Bellman Distill (temporal-difference imitation learning for LM distillation) on DeepSpeed.

Importing this package is cheap: nothing here imports torch, deepspeed or transformers.
"""

__version__ = "0.1.0"
