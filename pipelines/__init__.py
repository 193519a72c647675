"""Single-file few-step diffusers pipelines: each file imports only diffusers, torch, transformers,
safetensors (and peft for LoRA, as diffusers does) and the standard library, never a sibling file or
stepdistill, so that a copy in an exported folder loads with ``trust_remote_code=True`` alone."""
