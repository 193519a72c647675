"""Single-file few-step diffusers pipelines (each file imports only torch and diffusers)."""
