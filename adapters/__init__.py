"""The adapter system: PEFT store, validation, tiers and the multi-adapter LoRA layer."""
