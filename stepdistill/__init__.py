"""stepdistill: diffusion step distillation on Hugging Face diffusers."""

__version__ = "0.1.0"
