"""Parameter-efficient fine-tuning: LoRA / rsLoRA / DoRA adapters on the plain Llama (`lora`)."""
