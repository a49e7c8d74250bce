"""The training program every FineTuneJob runs (Ray Train + DeepSpeed + transformers + peft)."""
