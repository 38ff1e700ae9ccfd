"""Where models come from: the registry of aliases, the embedded model, local folders and the HF cache."""
