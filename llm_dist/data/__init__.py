"""The data stage: read, clean, quarantine, tokenize, pack and shard a corpus with Ray Data."""
