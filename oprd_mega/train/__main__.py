"""``python -m oprd_mega.train --config FILE.yaml [key.sub=value ...]`` (under torchrun)."""

from oprd_mega.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
