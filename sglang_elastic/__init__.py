"""sglang_elastic: elastic, fault-tolerant expert parallelism for SGLang MoE serving."""

__version__ = "0.1.0"
