"""LoRA: low-rank adapters on a model's linear projections, saved and loaded in Hugging Face PEFT's format.

A wrapped layer stays the layer it was (`LoRALinear` is an `nn.Linear`, `LoRAConv1D` a GPT-2 `Conv1D`), with
its frozen `weight`/`bias` under their Hugging Face names, plus two small trainable matrices:

    y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r        lora_A: (r, in), lora_B: (out, r)

so a model's adapter keys are `<module path>.lora_A.weight` / `.lora_B.weight`, exactly PEFT's names under
its `base_model.model.` prefix. `lora_B` starts at zero, so a fresh adapter leaves the model unchanged.

Files (what `peft.PeftModel.from_pretrained(hf_model, folder)` reads):
- adapter_config.json: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules,
  bias "none", fan_in_fan_out (true when the targets are GPT-2 Conv1D layers, whose weight is (in, out)),
  base_model_name_or_path.
- adapter_model.safetensors: `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight`
  (out, r) for every wrapped module.

`merge_lora` folds the adapters into the base weights (W += scaling * B @ A) and turns the layers back into
plain ones, after which `save_hf_checkpoint` writes a folder transformers loads like the base model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.atomic import atomic_folder
from engine.errors import CheckpointError
from engine.layers import recast, swap_layers
from models.gpt2 import Conv1D
from models.registry import family_of

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the Hugging Face model

# adapter_config.json settings that change the math: any value but those listed is refused, never ignored.
_UNSUPPORTED = {
    "bias": (["none"], "only bias \"none\" is supported"),
    "use_dora": ([False, None], "DoRA adapters are not supported"),
    "modules_to_save": ([None, []], "adapters that also save whole modules (modules_to_save) are not supported"),
    "layers_to_transform": ([None, []], "layers_to_transform is not supported"),
    "rank_pattern": ([None, {}], "per-module ranks (rank_pattern) are not supported"),
    "alpha_pattern": ([None, {}], "per-module alphas (alpha_pattern) are not supported"),
    "lora_bias": ([False, None], "LoRA bias terms (lora_bias) are not supported"),
    "target_parameters": ([None, []], "target_parameters is not supported"),
    "layer_replication": ([None, []], "layer_replication is not supported"),
    "trainable_token_indices": ([None, [], {}], "trainable_token_indices is not supported"),
    "use_qalora": ([False, None], "QALoRA adapters are not supported"),
}


@dataclass
class LoRAConfig:
    r: int = 8  # rank of the update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input while training
    target_modules: list[str] | str = field(default_factory=list)  # module names (suffix match) or one regex
    use_rslora: bool = False  # rank-stabilised scaling

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, module_name: str) -> bool:
        """PEFT's rule: a regex string must match the whole name; a list entry must equal it or end it."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def to_peft(self, base_model_name_or_path: str, fan_in_fan_out: bool) -> dict:
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(set(self.target_modules))
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }


# -- layers --------------------------------------------------------------------------------------------------


class LoRALayer:
    """What LoRALinear and LoRAConv1D add to their base layer (a mixin; see the module docstring)."""

    lora_A: nn.Linear  # (r, in): in -> r
    lora_B: nn.Linear  # (out, r): r -> out
    lora_dropout: nn.Module
    scaling: float
    lora_enabled: bool = True  # False: the layer computes the base projection only (compare base vs tuned)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A dropout(x), computed in the adapter's dtype: (..., in) -> (..., out)."""
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(h)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as an (out, in) matrix: scaling * B @ A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


class LoRALinear(nn.Linear, LoRALayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.lora_delta(x).to(y.dtype) if self.lora_enabled else y


class LoRAConv1D(Conv1D, LoRALayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = Conv1D.forward(self, x)
        return y + self.lora_delta(x).to(y.dtype) if self.lora_enabled else y


_LORA_CLASS = {nn.Linear: LoRALinear, Conv1D: LoRAConv1D}
_BASE_CLASS = {LoRALinear: nn.Linear, LoRAConv1D: Conv1D}


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LoRALayer)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The wrapped modules by name (names as in model.named_modules())."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape  # stored (in, out)
        return n_in, n_out
    return module.in_features, module.out_features


def _with_adapter(layer: nn.Module, config: LoRAConfig) -> LoRALayer:
    """The Linear/Conv1D as its LoRA subclass (same weight and bias), with a fresh float32 adapter on the
    weight's device."""
    n_in, n_out = _in_out(layer)
    device = layer.weight.device
    module = recast(layer, _LORA_CLASS[type(layer)])
    module.lora_A = nn.Linear(n_in, config.r, bias=False, device=device, dtype=torch.float32)
    module.lora_B = nn.Linear(config.r, n_out, bias=False, device=device, dtype=torch.float32)
    module.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
    module.scaling = config.scaling
    # PEFT's initialisation: A Kaiming-uniform (nn.Linear's default), B zero.
    nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(module.lora_B.weight)
    return module


def apply_lora(
    model: nn.Module,
    targets: list[str] | str,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> LoRAConfig:
    """Freeze the model and wrap every module that `targets` names (PEFT's matching, see LoRAConfig) with a
    fresh adapter; returns the config to save with the adapter (`save_adapter`).

    ValueError (one line) when nothing matches, a match is not a linear layer, or r or dropout is invalid.
    """
    config = LoRAConfig(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=targets, use_rslora=use_rslora)
    apply_lora_config(model, config)
    return config


def apply_lora_config(model: nn.Module, config: LoRAConfig) -> list[str]:
    """apply_lora with a LoRAConfig; returns the wrapped module names."""
    if config.r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {config.r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {config.dropout}")
    if not config.target_modules:
        raise ValueError("no LoRA target modules given")
    model.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules() if name and config.matches(name)]
    if not targets:
        available = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m) in _LORA_CLASS})
        raise ValueError(
            f"target modules {config.target_modules} match no layer of this model "
            f"(its linear layers: {', '.join(available)})"
        )
    for name, module in targets:
        if isinstance(module, LoRALayer):
            raise ValueError(f"{name} already carries a LoRA adapter")
        if type(module) not in _LORA_CLASS:
            raise ValueError(f"{name} is a {type(module).__name__}; LoRA applies to linear layers only")
    names = {name for name, _ in targets}
    swap_layers(model, lambda name, layer: _with_adapter(layer, config) if name in names else None)
    return [name for name, _ in targets]


def default_targets(model: nn.Module) -> list[str]:
    """The module names LoRA adapts by default for the model's family (its registry entry)."""
    return list(family_of(model.config).lora_targets)


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off: the base model's outputs, without unloading anything)."""
    for layer in lora_layers(model).values():
        layer.lora_enabled = enabled


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def _merged(layer: LoRALayer) -> nn.Module:
    """The layer with its adapter folded into the weight (W += scaling * B @ A), as a plain Linear/Conv1D."""
    delta = layer.delta_weight().to(layer.weight.dtype)  # (out, in)
    if isinstance(layer, Conv1D):
        layer.weight += delta.t()  # stored (in, out): PEFT's fan_in_fan_out
    else:
        layer.weight += delta
    plain = recast(layer, _BASE_CLASS[type(layer)])
    for name in ("lora_A", "lora_B", "lora_dropout"):
        delattr(plain, name)
    plain.__dict__.pop("scaling", None)
    plain.__dict__.pop("lora_enabled", None)
    return plain


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and turn the layers back into plain Linear/Conv1D."""
    with torch.no_grad():
        swap_layers(model, lambda name, layer: _merged(layer) if is_lora_layer(layer) else None)
    return model


# -- files ---------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, config: LoRAConfig, out_dir: str | Path, base_model: str | Path) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format) into out_dir, atomically."""
    out_dir = Path(out_dir)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model carries no LoRA adapter")
    fan_in_fan_out = any(isinstance(layer, Conv1D) for layer in layers.values())
    with atomic_folder(out_dir) as tmp:
        state = {k: v.float().contiguous().cpu() for k, v in lora_state(model).items()}
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        peft_config = config.to_peft(str(base_model), fan_in_fan_out)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    return out_dir


@dataclass
class Adapter:
    """A validated adapter folder, read into memory (adapters are small)."""

    path: Path
    config: LoRAConfig
    weights: dict[str, torch.Tensor]  # keys without PEFT's prefix: "<module path>.lora_A.weight"
    base_model_name_or_path: str | None

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 2)[0] for k in self.weights})


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read and check a PEFT LoRA adapter folder; CheckpointError (one line, naming file and key) if invalid."""
    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir}: not a directory (expected a LoRA adapter folder)")
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path}: file not found (a LoRA adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    config = _config_from_peft(raw, config_path)

    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise CheckpointError(
                f"{weights_path}: file not found; only adapter_model.bin is there, and chattui loads safetensors "
                "only (pickle files can run code)"
            )
        raise CheckpointError(f"{weights_path}: file not found")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({e})") from None
    if not weights:
        raise CheckpointError(f"{weights_path}: holds no tensors")
    stripped: dict[str, torch.Tensor] = {}
    pattern = re.compile(r"^(.+)\.(lora_A|lora_B)\.weight$")
    for key, tensor in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = pattern.match(name)
        if m is None:
            hint = " (LoRA on embeddings is not supported)" if "lora_embedding" in key else ""
            raise CheckpointError(
                f"{weights_path}: unexpected key {key}; expected {PEFT_PREFIX}<module>.lora_A.weight "
                f"or .lora_B.weight{hint}"
            )
        if tensor.dim() != 2:
            raise CheckpointError(f"{weights_path}: {key} has shape {list(tensor.shape)}; expected a matrix")
        rank = tensor.shape[0] if m.group(2) == "lora_A" else tensor.shape[1]
        if rank != config.r:
            raise CheckpointError(
                f"{weights_path}: {key} has shape {list(tensor.shape)}, which is not rank r={config.r} "
                f"as {ADAPTER_CONFIG} says"
            )
        stripped[name] = tensor
    for module in {k.rsplit(".", 2)[0] for k in stripped}:
        for part in ("lora_A", "lora_B"):
            if f"{module}.{part}.weight" not in stripped:
                raise CheckpointError(f"{weights_path}: missing key {PEFT_PREFIX}{module}.{part}.weight")
    base = raw.get("base_model_name_or_path")
    return Adapter(adapter_dir, config, stripped, base if isinstance(base, str) else None)


def _config_from_peft(raw: dict, path: Path) -> LoRAConfig:
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    task = raw.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{path}: task_type is {task!r}; expected CAUSAL_LM")
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{path}: 'r' must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    dropout = raw.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise CheckpointError(f"{path}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    targets = raw.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(f"{path}: 'target_modules' must be a list of module names or a regex, got {targets!r}")
    for key, (accepted, message) in _UNSUPPORTED.items():
        value = raw.get(key, accepted[0])
        if value not in accepted:
            raise CheckpointError(f"{path}: {message} ({key} = {json.dumps(value)})")
    return LoRAConfig(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=targets,
                      use_rslora=bool(raw.get("use_rslora", False)))


def apply_adapter(model: nn.Module, adapter: Adapter) -> dict[str, LoRALayer]:
    """Wrap the modules the adapter targets and load its weights; returns the wrapped layers by name.

    Every module the adapter has weights for must be wrapped and vice versa, with matching shapes.
    """
    where = adapter.path / ADAPTER_WEIGHTS
    try:
        apply_lora_config(model, adapter.config)
    except ValueError as e:
        raise CheckpointError(f"{adapter.path / ADAPTER_CONFIG}: {e}") from None
    layers = lora_layers(model)
    unknown = [m for m in adapter.modules if m not in layers]
    if unknown:
        raise CheckpointError(
            f"{where}: {PEFT_PREFIX}{unknown[0]}.lora_A.weight names a module this model does not have or "
            f"that target_modules does not select (was the adapter trained on another base model?)"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                key = f"{name}.{part}.weight"
                if key not in adapter.weights:
                    raise CheckpointError(f"{where}: missing key {PEFT_PREFIX}{key}")
                target = getattr(layer, part).weight
                tensor = adapter.weights[key]
                if tensor.shape != target.shape:
                    raise CheckpointError(
                        f"{where}: shape mismatch for {PEFT_PREFIX}{key}: the adapter has {list(tensor.shape)}, "
                        f"this model needs {list(target.shape)} (was it trained on another base model?)"
                    )
                target.copy_(tensor)
    return layers


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Apply the PEFT LoRA adapter in adapter_dir to model (unmerged); returns its config."""
    adapter = read_adapter(adapter_dir)
    apply_adapter(model, adapter)
    return adapter.config


# -- merged checkpoints --------------------------------------------------------------------------------------

_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|model\.safetensors\.index\.json)$")


def stored_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor in a checkpoint folder's safetensors, if readable."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype)
        except (SafetensorError, OSError):
            return None
    return None


def save_hf_checkpoint(model: nn.Module, base_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write model (plain layers: merge LoRA first) as a Hugging Face folder, atomically.

    model.safetensors holds the state dict under HF's keys (a tied lm_head is left out, as transformers
    does), in `dtype` (default: the base checkpoint's stored dtype); every other file of base_dir
    (config.json, generation_config.json, tokenizer files, ...) is copied as is.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if lora_layers(model):
        raise ValueError("merge the LoRA adapters (merge_lora) before saving a Hugging Face checkpoint")
    dtype = dtype or stored_dtype(base_dir) or torch.float32
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if identity in seen:  # tied weights: keep the first name (the embedding, as transformers does)
            continue
        seen.add(identity)
        state[key] = tensor.detach().to(device="cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    with atomic_folder(out_dir) as tmp:
        for f in base_dir.iterdir():
            if f.is_file() and not _WEIGHT_FILE.search(f.name):
                shutil.copyfile(f, tmp / f.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
