"""bitnet-rl: fine-tune and align BitNet b1.58 models (ternary weights, int8 activations)."""

__version__ = "0.1.0"
