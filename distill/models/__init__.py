"""Model classes per role (causal LM, sequence classifier), LoRA, compiled layers, tokenizer files."""
