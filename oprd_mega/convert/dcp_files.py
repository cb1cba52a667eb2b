"""Which file of a torch DCP checkpoint directory is damaged: torch's own load errors name
neither the file nor the cause, so a failed load is explained from the ``.metadata`` index
(every ``.distcp`` file must hold the byte ranges it lists)."""

from __future__ import annotations

from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from oprd_mega.errors import CheckpointError


def tensors_metadata(directory: str | Path) -> dict:
    """Megatron's ``load_tensors_metadata`` of ``directory``; an unreadable ``.metadata`` (a
    truncated pickle, garbage) is a :class:`CheckpointError` naming the file, not torch's
    traceback."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_tensors_metadata(str(directory))
    except (FileNotFoundError, CheckpointError):
        raise
    except Exception as exc:  # torch raises several types for a bad index (pickle, EOF, ...)
        raise CheckpointError(
            f"{Path(directory) / '.metadata'} is not a readable checkpoint index "
            f"({type(exc).__name__}: {exc}): the checkpoint is damaged; write it again"
        ) from None


def damaged_files(directory: str | Path) -> list[str]:
    """One line per missing, truncated or unreadable file of the DCP checkpoint in
    ``directory`` (``.metadata`` and the ``.distcp`` files it indexes); empty when the files
    look whole (a corruption that keeps the sizes is not detected here)."""
    directory = Path(directory)
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # torch raises several types for a bad index
        return [f"{directory / '.metadata'} is not a readable index ({type(exc).__name__})"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, size in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size < size:
            problems.append(f"{file} is truncated ({file.stat().st_size} of {size} bytes)")
    return problems
