"""Text: transformer encoders (bundled MiniLM, Hugging Face), tokenizers as data, text data modules, the text modality."""
