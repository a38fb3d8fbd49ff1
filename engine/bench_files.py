"""Make the files of the README's llama.cpp comparison with llama.cpp's own converter and quantizer.

    python -m engine.bench_files OUT_DIR --tokenizer-from "$(chattui pull smollm2-135m-instruct)"
        [--converter convert_hf_to_gguf.py | --sdist llama_cpp_python-0.3.36.tar.gz]

Two random-weight Llama checkpoints (transformers, seed 0, SmolLM2's tokenizer and vocabulary):
smollm-shape/ (SmolLM-135M's widths: 576, 1536) and wide256-shape/ (768, 2048: multiples of 256,
so K-quants do not fall back to Q5_0/Q8_0). convert_hf_to_gguf.py makes smollm-shape-{f32,bf16,q8_0}
and wide256-shape-f32; llama_model_quantize (llama-cpp-python, the bench extra) makes
smollm-shape-{q4_0,q4_k_m,q5_k_m} (their K-quant mixes mostly Q5_0, Q5_1 and Q8_0 on these rows) and
wide256-shape-{q4_k_m,q6_k} from the F32 files. Without --converter, the
llama-cpp-python 0.3.36 sdist is fetched with pip and its vendored converter extracted. Files that
exist are kept; each is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from engine.bench_llamacpp import import_llama_cpp
from engine.errors import EngineError

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VENDORED = "vendor/llama.cpp/"
# The converter imports its sibling package conversion/ and prefers its own gguf-py/ to the installed gguf.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
SHAPES = {
    "smollm-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3),
    "wide256-shape": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=24,
                          num_attention_heads=12, num_key_value_heads=4),
}
CONVERTED = {"smollm-shape": ("f32", "bf16", "q8_0"), "wide256-shape": ("f32",)}
# from the F32 file; on smollm-shape's 576-wide rows llama.cpp's K-quant mixes fall back to Q5_0, Q5_1 and Q8_0
QUANTIZED = {"smollm-shape": ("q4_0", "q4_k_m", "q5_k_m"), "wide256-shape": ("q4_k_m", "q6_k")}


def fetch_converter(out_dir: Path, sdist: Path | None = None) -> Path:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (fetched with pip unless given), extracted
    under out_dir/llama.cpp."""
    dest = out_dir / "llama.cpp"
    converter = dest / CONVERTER_PARTS[0]
    if converter.exists():
        return converter
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            LLAMA_CPP_PYTHON, "-d", tmp], check=True)
            (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                inside = member.name.split("/", 1)[-1]  # drop the sdist's top folder
                if inside.startswith(VENDORED) and inside[len(VENDORED):].startswith(CONVERTER_PARTS):
                    member.name = inside[len(VENDORED):]
                    archive.extract(member, staging, filter="data")
        staging.rename(dest)
    return converter


def tokenizer_folder(out_dir: Path, tokenizer_gguf: Path) -> Path:
    """The HF tokenizer files of a GGUF (transformers reads them from its metadata), saved once."""
    import transformers

    dest = out_dir / "tokenizer"
    if not (dest / "tokenizer.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_gguf.parent), gguf_file=tokenizer_gguf.name)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tokenizer.save_pretrained(tmp)
            Path(tmp).rename(dest)
    return dest


def random_checkpoint(out_dir: Path, name: str, tokenizer: Path) -> Path:
    """A random Llama of SHAPES[name] in SmolLM2's vocabulary, as safetensors, with the tokenizer files."""
    import torch
    import transformers

    dest = out_dir / name
    if (dest / "config.json").exists():
        return dest
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.02, **SHAPES[name],
    )
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        transformers.LlamaForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
        for f in tokenizer.iterdir():
            shutil.copy(f, Path(tmp) / f.name)
        Path(tmp).rename(dest)
    return dest


def convert(converter: Path, checkpoint: Path, outtype: str) -> Path:
    out = checkpoint.parent / f"{checkpoint.name}-{outtype}.gguf"
    if not out.exists():
        partial = out.with_suffix(".gguf.partial")
        subprocess.run([sys.executable, str(converter), str(checkpoint), "--outtype", outtype,
                        "--outfile", str(partial)], check=True)
        partial.rename(out)
    return out


def quantize(f32_file: Path, ftype: str) -> Path:
    """llama.cpp's quantizer on an F32 GGUF; ftype as in llama-quantize (q4_0, q4_k_m, q6_k)."""
    llama_cpp = import_llama_cpp()
    out = f32_file.with_name(f32_file.name.replace("-f32.gguf", f"-{ftype}.gguf"))
    if not out.exists():
        partial = out.with_suffix(".gguf.partial")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
        params.nthread = 2
        status = llama_cpp.llama_model_quantize(str(f32_file).encode(), str(partial).encode(), params)
        if status != 0:
            raise EngineError(f"{f32_file}: llama_model_quantize to {ftype} failed with status {status}")
        partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, required=True, metavar="FILE.gguf",
                        help="a GGUF whose tokenizer the checkpoints use (SmolLM2-135M-Instruct: chattui pull "
                        "smollm2-135m-instruct prints its path)")
    parser.add_argument("--converter", type=Path, help="convert_hf_to_gguf.py of llama.cpp (default: from the sdist)")
    parser.add_argument("--sdist", type=Path, metavar="FILE.tar.gz",
                        help=f"the {LLAMA_CPP_PYTHON} sdist to take the converter from (default: pip download)")
    args = parser.parse_args(argv)
    import_llama_cpp()  # the quantizer; fail before minutes of converting
    args.out_dir.mkdir(parents=True, exist_ok=True)
    converter = args.converter or fetch_converter(args.out_dir, args.sdist)
    tokenizer = tokenizer_folder(args.out_dir, args.tokenizer_from)
    for name in SHAPES:
        checkpoint = random_checkpoint(args.out_dir, name, tokenizer)
        for outtype in CONVERTED[name]:
            print(convert(converter, checkpoint, outtype))
        for ftype in QUANTIZED[name]:
            print(quantize(convert(converter, checkpoint, "f32"), ftype))


if __name__ == "__main__":
    try:
        main()
    except EngineError as e:
        raise SystemExit(f"error: {e}") from None
