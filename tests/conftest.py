import os

import torch

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors (fp32 only).
# It is read when a kernel module is imported, so it must be set before stmd_fast is imported.
# Models on CPU still use the PyTorch references (backend "auto"); only the kernel tests force
# the Triton path.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
