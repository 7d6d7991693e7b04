"""Fine-tuning any causal LM: the task formats (records to chat windows with an assistant mask)
and the methods (full, LoRA, frozen layers). Plain transformers and peft: no Ray, no DeepSpeed."""
