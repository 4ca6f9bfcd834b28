"""trainer: LoRA/QLoRA and full fine-tuning of open LLMs on a small Accelerate loop."""

__version__ = "0.1.0"
