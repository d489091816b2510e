"""GGUF import and export (llama.cpp / Ollama interop), built on the `gguf` package.

names.py    tensor names and the llama q/k permutation
hparams.py  `{arch}.*` hyperparameters <-> ModelConfig (Llama 3.1 rope factors included)
pretok.py   llama.cpp's pre-tokenizers: names, split regexes, and which one a tokenizer.json has
tokenizer.py  tokenizer.ggml.* -> an HF tokenizer folder (byte-level and SentencePiece BPE)
tokenizer_kv.py  an HF tokenizer folder (or a GGUF file) -> tokenizer.ggml.* for export
fields.py   reading key-value fields; errors.py: GGUFError
quants.py   tensor types: llama.cpp's per-tensor choice, quantizers, dequantizers
reader.py   opening a file, with every header count, offset and shape checked
export.py   HF folder or GGUF file -> GGUF file
load.py     GGUF file -> ModelConfig + state dict, a model, or an HF folder
"""
