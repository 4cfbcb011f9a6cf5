"""The embedded demo: a small base model trained here and tenants' adapters trained with QLoRA."""
