"""Writing a model's processor files so that they load like any Hub model's.

``save_pretrained`` of a transformers 5.x Whisper tokenizer writes ``tokenizer.json`` but not the
English spelling map (``normalizer.json``) it was loaded with, so ``tokenizer.normalize()`` of a
reloaded tokenizer has no mapping (and crashes); and it stores some loading arguments
(``is_local``, ``local_files_only``...) in ``tokenizer_config.json`` as if they were settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NORMALIZER_FILE = "normalizer.json"
# from_pretrained arguments that transformers writes into tokenizer_config.json
LOADING_ARGUMENTS = frozenset({"is_local", "local_files_only", "trust_remote_code", "cache_dir", "revision", "token"})


def write_processor_files(processor: Any, directory: str | Path) -> None:
    """``processor.save_pretrained(directory)`` plus the spelling map, without loading arguments."""
    directory = Path(directory)
    processor.save_pretrained(directory)
    tokenizer = getattr(processor, "tokenizer", processor)
    mapping = getattr(tokenizer, "english_spelling_normalizer", None)
    if mapping:
        text = json.dumps(mapping, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (directory / NORMALIZER_FILE).write_text(text, encoding="utf-8")
    clean_tokenizer_config(directory)


def clean_tokenizer_config(directory: Path) -> None:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    settings = json.loads(path.read_text(encoding="utf-8"))
    kept = {name: value for name, value in settings.items() if name not in LOADING_ARGUMENTS}
    if kept != settings:
        path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
