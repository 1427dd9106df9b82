"""The generation settings of an imported Hugging Face model, carried from `import_hf` through
training to `export_hf`: its special token ids (``bos``, ``eos``, ``pad`` of config.json), its
chat template and its ``generation_config.json``.

megatron's checkpoints have no place for them, so they travel as ``hf_generation.json`` beside
``latest_checkpointed_iteration.txt`` in the checkpoint directory: `import_hf` writes it,
``pretrain_moh.py`` copies it from ``--load`` (or ``--pretrained-checkpoint``) to ``--save``
before training (`carry`), and `export_hf` writes the settings back exactly as they were read.
Without it (a model pretrained here) the export takes the ids from the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from megatron_moh.conversion import ConversionError

HF_GENERATION = "hf_generation.json"
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_hf_model(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """What a Hugging Face model directory says about generation: config.json's special ids, the
    chat template (tokenizer_config.json's, or chat_template.jinja / .json) and
    generation_config.json, all as read (eos may be a list, as in Llama-3-Instruct)."""
    hf_dir = Path(hf_dir)
    config = _read_json(hf_dir / "config.json") or {}
    return dict(
        source=str(hf_dir.resolve()),
        special_token_ids={name: config.get(name) for name in SPECIAL_IDS},
        chat_template=_chat_template(hf_dir),
        generation_config=_read_json(hf_dir / "generation_config.json"),
    )


def _chat_template(hf_dir: Path) -> Any:
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    stored = _read_json(hf_dir / "chat_template.json")
    if stored and "chat_template" in stored:
        return stored["chat_template"]
    return (_read_json(hf_dir / "tokenizer_config.json") or {}).get("chat_template")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err}): repair or remove it") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} does not hold a JSON object: repair or remove it")
    return value


def write(checkpoint_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Store ``settings`` (from `read_hf_model`) in a checkpoint directory."""
    (Path(checkpoint_dir) / HF_GENERATION).write_text(json.dumps(settings, indent=1, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")


def read(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The settings a checkpoint directory carries, or None."""
    return _read_json(Path(checkpoint_dir) / HF_GENERATION)


def carry(sources: list[str | os.PathLike | None], save_dir: str | os.PathLike | None) -> None:
    """Copy the settings of the checkpoint a run starts from (the first of ``sources``, its
    ``--load`` and ``--pretrained-checkpoint``, that carries them) into its ``--save`` directory,
    so an export of what the run saves writes them too. A save directory that already carries
    other settings is refused (ConversionError): it belongs to another model."""
    source = next((Path(s) / HF_GENERATION for s in sources if s and (Path(s) / HF_GENERATION).is_file()), None)
    if source is None or not save_dir:
        return
    target = Path(save_dir) / HF_GENERATION
    if source.resolve() == target.resolve():
        return
    if target.is_file():
        if read(save_dir) != read(source.parent):
            raise ConversionError(f"{target} holds the generation settings of another model than {source}: this "
                                  f"--save directory belongs to another run; choose a new --save directory")
        return
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def special_token_ids(settings: dict[str, Any] | None, tokenizer: Any) -> dict[str, Any]:
    """The config.json ids of an export: the imported model's own where it had them, else the
    exported tokenizer's, else None (never Llama-2's defaults 1 and 2)."""
    recorded = (settings or {}).get("special_token_ids") or {}
    ids = {}
    for name in SPECIAL_IDS:
        value = recorded.get(name)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, name, None)
        ids[name] = value
    return ids


def write_generation_files(out_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """The imported model's generation_config.json as it was, and its chat template when no exported
    tokenizer carries one."""
    out_dir = Path(out_dir)
    if settings.get("generation_config") is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(settings["generation_config"], indent=2) + "\n",
                                                        encoding="utf-8")
    template = settings.get("chat_template")
    has_template = (out_dir / "chat_template.jinja").is_file() or "chat_template" in (
        _read_json(out_dir / "tokenizer_config.json") or {})
    if template and not has_template:
        if isinstance(template, str):
            (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
        else:  # several named templates
            (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n",
                                                       encoding="utf-8")
