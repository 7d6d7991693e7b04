"""The tune stage: a Ray Tune sweep of fine-tuning trials from a base model, and its winner."""
