"""Where the kernel tests run: CUDA when present (GPU check), else CPU with the interpreter."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
