"""The model side: tokenizer compression, N-gram hashing, the Engram module, training."""
