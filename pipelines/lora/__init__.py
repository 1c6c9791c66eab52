"""LoRA files of every common format, merged exactly into the live pipeline's weights.

We own the merge path instead of diffusers' `load_lora_weights`, which refuses LyCORIS
LoHa/LoKr files and silently drops DoRA magnitudes. A file is parsed once into groups (one
per target module, model-independent and cached), resolved against a pipeline's module
names, and merged as `base + sum(deltas)` computed in fp32 from a CPU backup of the base
weight (as A1111 does): merged weights cost nothing per step, and removing every LoRA
restores the base model bit-exactly instead of trusting fuse/unfuse arithmetic.
"""
