"""RMT: Reinforcement Mid-Training of causal language models."""

__version__ = "0.1.0"
