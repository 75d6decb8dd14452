"""Importers: checkpoints in other formats (CTranslate2, ...) written as Hugging Face models."""
