"""The pretrain stage: DeepSpeed ZeRO workers under Ray Train."""
