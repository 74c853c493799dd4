"""SynerGen-Lightning: train SynerGen-VL (arXiv 2412.09604) with PyTorch Lightning.

One encoder-free decoder-only LLM reads and writes discrete VQ image codes and text tokens:
vision experts (a second FFN per layer for image tokens), token folding (m x n codes -> one LLM
token, unfolded again by a small autoregressive head) and progressive alignment (stage 1, stage 2, SFT).
See docs/architecture.md for where each piece lives.
"""

__version__ = "0.1.0"
