"""LoRAFleet serving engine: continuous batching of many LoRA adapters over one base model."""
