"""What a run leaves behind: its final model or adapter folder, and `lmstack export`, which folds a
LoRA / QLoRA adapter into its base model and writes a full HF checkpoint."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.config import ConfigError
from lmstack.log import logger
from lmstack.train.checkpoint import commit_dir
from lmstack.train.config import TrainConfig

# Written next to a PEFT adapter by lmstack (PEFT ignores extra files): how the adapter was trained.
TRAINING_INFO = "lmstack_adapter.json"
FINAL_DIR = "final"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def write_adapter_info(adapter_dir: str | Path, qlora: bool, quantize_embeddings: bool = False) -> None:
    info = {"qlora": qlora, "quantize_embeddings": quantize_embeddings}
    (Path(adapter_dir) / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _adapter_info(adapter_dir: str | Path) -> dict:
    p = Path(adapter_dir) / TRAINING_INFO
    return json.loads(p.read_text()) if p.is_file() else {}


def save_final(cfg: TrainConfig, stage: Any, model: nn.Module, out: Path) -> Path:
    """The trained model (or adapter) + tokenizer files in out/final, written aside and renamed in, fsync'd."""
    final, tmp = out / FINAL_DIR, out / f".tmp_{FINAL_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg.lora is not None:
        from lmstack.model.lora import save_adapter

        save_adapter(model, tmp, base_model_name_or_path=str(Path(cfg.model.path).resolve()) if cfg.model.path else "")
        write_adapter_info(tmp, cfg.lora.qlora, cfg.lora.quantize_embeddings)
    else:
        from lmstack.model.loading import save_model

        save_model(model, tmp)
    src = Path(cfg.model.tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (tmp / name).exists():
            shutil.copy2(src / name, tmp / name)
    if hasattr(stage, "save_final"):
        stage.save_final(model, tmp)
    commit_dir(tmp, final)
    return final


def adapter_was_qlora(adapter_dir: str | Path) -> bool:
    return bool(_adapter_info(adapter_dir).get("qlora", False))


def export_merged(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  qlora: bool | None = None) -> Path:
    """Merge `adapter_dir` (PEFT LoRA folder) into the model at `base_dir`; write an HF folder to `out_dir`.

    An adapter trained with QLoRA saw NF4-quantized base weights, so the base is quantized to NF4 and
    dequantized to bf16 before merging (merging into the original weights would not reproduce the
    trained model); the merged checkpoint is saved in bf16. Otherwise the merge is done in fp32 and
    saved in the base checkpoint's dtype. `qlora=None` reads how the adapter was trained. The base may
    be a .gguf file (converted at its own precision first).
    """
    from lmstack.checkpoint.resolve import hf_folder

    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if out.resolve() in (base_dir.resolve(), adapter_dir.resolve()):
        raise ConfigError(f"--out {out} must differ from the base model and adapter folders")
    with tempfile.TemporaryDirectory(prefix="lmstack-export-") as work:
        return _export_merged(hf_folder(base_dir, work), adapter_dir, out, qlora)


def _export_merged(base_dir: Path, adapter_dir: Path, out: Path, qlora: bool | None) -> Path:
    from lmstack.model.loading import load_model, resolve_dtype, save_model
    from lmstack.model.lora import load_adapter, merge_lora

    if qlora is None:
        qlora = adapter_was_qlora(adapter_dir)
    model = load_model(base_dir, dtype=torch.float32)
    save_dtype = resolve_dtype("auto", model.config)
    if qlora:
        from lmstack.model.quant import quantize_model

        quantize_model(model, "nf4", skip=("lm_head", "score"), compute_dtype=torch.bfloat16)
        quant_emb = bool(_adapter_info(adapter_dir).get("quantize_embeddings", False))
        if quant_emb:  # the adapter also saw NF4 embeddings / head: reproduce them too
            from lmstack.model.quant import dequantize_embeddings, quantize_embeddings_nf4

            quantize_embeddings_nf4(model, torch.bfloat16)
            dequantize_embeddings(model, torch.bfloat16)
        save_dtype = torch.bfloat16
    load_adapter(model, adapter_dir)
    merge_lora(model, dequant_dtype=torch.bfloat16)
    save_model(model, out, dtype=save_dtype)
    for name in TOKENIZER_FILES:
        for src in (adapter_dir / name, base_dir / name):
            if src.is_file():
                shutil.copy2(src, out / name)
                break
    logger.info("merged %s into %s -> %s (%s)", adapter_dir, base_dir, out, "from QLoRA, bf16" if qlora else save_dtype)
    return out
