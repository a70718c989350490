"""Ternary-preserving LoRA on peft (issue 15): adapters added before (pre_quant) or after (post_quant) Q(W)."""
