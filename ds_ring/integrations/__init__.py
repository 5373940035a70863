"""Integrations with other libraries' objects: the transformers attention patch, DeepSpeed (config, mpu,
ZeRO gradient factor), FSDP2 (``fully_shard`` with the gradient rule), the Trainer mixin.

Imports: every layer below (op, parallel, training, planning); the libraries it integrates.
"""
