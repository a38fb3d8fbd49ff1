"""What fine-tune jobs produced, for the model picker: LoRA adapters (loaded on top of their base model,
unmerged), merged models and fully fine-tuned models. Reads job folders and JSON only."""

from __future__ import annotations

import json
from pathlib import Path

from chattui import jobs
from chattui.catalog import ModelEntry, adapter_name, display_name, folder_size, inspect_folder, inspect_model


def adapter_base(folder: str | Path) -> str | None:
    """The base model folder of a LoRA adapter folder (PEFT's adapter_config.json), None if it is not one."""
    try:
        config = json.loads((Path(folder).expanduser() / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def trained_models(root: str | Path | None = None) -> list[ModelEntry]:
    """Every job's results under root (default: the user's jobs folder), newest job first. An adapter's entry
    describes its base model (architecture, parameters) and names both; its path is the adapter folder."""
    entries: list[ModelEntry] = []
    for job in jobs.list_jobs(root):
        if job.adapter_dir is not None:
            base = adapter_base(job.adapter_dir) or job.base_model
            entry = inspect_folder(Path(base), "adapter", name=f"{display_name(base)} + {adapter_name(job.adapter_dir)}")
            entry.path, entry.size_bytes = job.adapter_dir, folder_size(job.adapter_dir)
            entries.append(entry)
        if job.merged_dir is not None:
            entries.append(inspect_folder(job.merged_dir, "merged", name=f"{display_name(job.base_model)} merged "
                                                                         f"{job.id}"))
        if job.merged_gguf is not None:
            entries.append(inspect_model(job.merged_gguf, "merged", name=f"{display_name(job.base_model)} merged "
                                                                        f"{job.id} GGUF"))
        if job.model_dir is not None:
            entries.append(inspect_folder(job.model_dir, "tuned", name=f"{display_name(job.base_model)} tuned {job.id}"))
    return entries
