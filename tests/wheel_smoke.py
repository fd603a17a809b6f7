"""Run in a fresh venv holding only torch and the installed wheel (see `make wheel-smoke`)."""

import os
import sys

import torch
import torch.nn.functional as F

import hsr

site = os.path.dirname(os.path.dirname(os.path.abspath(hsr.__file__)))
assert site.endswith("site-packages") and sys.prefix in hsr.__file__, f"hsr imported from {hsr.__file__}"
q, k, v = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)
out = hsr.attention(q, k, v)
ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
print(f"wheel smoke test passed: hsr {hsr.__version__} from {hsr.__file__}, built with torch "
      f"{hsr.built_with_torch}, CUDA kernels: {hsr.built_with_cuda}")
