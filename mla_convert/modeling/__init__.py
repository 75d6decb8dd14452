"""Everything a converted checkpoint needs at load time.

This folder is deliberately flat and imports only torch, transformers and its own siblings
(``from .attention_base import ...``): Hugging Face's remote-code mechanism copies a model's
modeling file *and the sibling files it imports relatively* next to the weights, so a converted
model reloads with ``trust_remote_code=True`` on a machine without mla_convert. The conversion
logic (finding modules, seeding weights from SVD, reports) lives outside this folder and is
never needed to *run* a converted model.
"""
