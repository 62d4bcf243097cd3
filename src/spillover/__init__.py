"""spillover: predict, explain and remove emergent misalignment before fine-tuning."""

__version__ = "0.1.0"
