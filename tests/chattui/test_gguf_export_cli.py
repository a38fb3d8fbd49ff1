"""`chattui export-gguf`: a model folder, a GGUF file, or a LoRA adapter folder (merged into its base) written
as a GGUF file that runs as the source does; a bad OUT is one error line and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chattui.cli import main
from engine import Engine
from engine.checkpoint import load_weights, read_model_config
from engine.lora import apply_lora, lora_layers, save_adapter
from gguf_files import sample_ids


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["export-gguf", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _logits(path: Path, adapter: Path | None = None) -> torch.Tensor:
    engine = Engine.load(path, device="cpu", dtype="float32", adapter=adapter)
    with torch.inference_mode():
        return engine.model(sample_ids())


@pytest.fixture
def adapter(checkpoint_factory, tmp_path) -> Path:
    """A LoRA adapter on the tiny llama whose B matrices are random (a fresh adapter changes nothing)."""
    base = checkpoint_factory("llama")
    model = load_weights(base, read_model_config(base), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    config = apply_lora(model, ["q_proj", "v_proj", "down_proj"], 4, 8.0, 0.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.2)
    return save_adapter(model, config, tmp_path / "adapter", base)


def test_an_adapter_folder_is_merged_into_its_base(capsys, checkpoint_factory, adapter, tmp_path):
    out = tmp_path / "merged.gguf"
    code, stdout, stderr = _cli(capsys, adapter, out, "--type", "f32")
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out} (F32; tensors: 21 F32; ")
    base = checkpoint_factory("llama")
    expected = _logits(base, adapter)
    assert (expected - _logits(base)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(_logits(out), expected, atol=1e-4, rtol=1e-4)


def test_a_model_folder_is_written_as_q8_0_by_default(capsys, checkpoint_factory, tmp_path):
    out = tmp_path / "m.gguf"
    code, stdout, stderr = _cli(capsys, checkpoint_factory("qwen3"), out, "--name", "tiny tuned")
    assert code == 0, stderr
    assert "(Q8_0; tensors: " in stdout and Engine.load(out, device="cpu", dtype="float32").model is not None


def test_bad_out_paths_are_one_line_and_write_nothing(capsys, checkpoint_factory, adapter, tmp_path):
    base = checkpoint_factory("llama")
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"keep")
    assert _cli(capsys, base, existing)[2] == (
        f"chattui: error: {existing}: already exists; remove it or choose another name (nothing was written)\n")
    assert existing.read_bytes() == b"keep"
    assert _cli(capsys, base, tmp_path / "model.bin")[2] == (
        f"chattui: error: {tmp_path / 'model.bin'}: the output file's name must end in .gguf\n")
    code, _, stderr = _cli(capsys, adapter, tmp_path / "x.gguf", "--adapter", adapter)
    assert code == 1 and "is a LoRA adapter folder; give its base model as MODEL to use --adapter" in stderr
    code, _, stderr = _cli(capsys, checkpoint_factory("gemma3"), tmp_path / "g.gguf")
    assert code == 1 and stderr.startswith("chattui: error: Gemma3ForCausalLM cannot be exported to GGUF yet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "there.gguf"]
