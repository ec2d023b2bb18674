"""Fail loudly if the environment is not the one the project was built for."""

import importlib
import importlib.util
import sys

FORBIDDEN = ("torchvision", "torchaudio", "torchcodec")
REQUIRED = ("torch", "vllm", "ray", "deepspeed", "transformers", "safetensors", "tokenizers")


def main() -> int:
    problems = []
    for name in FORBIDDEN:
        if importlib.util.find_spec(name) is not None:
            problems.append(f"{name} is installed; it breaks transformers beside the CPU torch")
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report every failure, not just the first
            problems.append(f"cannot import {name}: {type(exc).__name__}: {exc}")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401
    except Exception as exc:
        problems.append(f"transformers cannot import LlamaConfig: {exc}")
    import torch

    if not torch.__version__.startswith("2.13.0"):
        problems.append(f"torch {torch.__version__} installed, expected 2.13.0")
    if problems:
        print("[check_env] FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"[check_env] ok: torch {torch.__version__}, python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
