"""Ternary-preserving LoRA on peft: adapters added before (pre_quant) or after (post_quant) Q(W)."""
