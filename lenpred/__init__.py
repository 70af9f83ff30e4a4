"""LenPred: predict an LLM's output length (mean, std, bin) from a prompt."""
