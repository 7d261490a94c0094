"""PyTorch interop (needs the `torch` extra): twins of the JAX backbones.

- `create_net1d_by_size(size, in_channels=1)`: Net1D with the released CLEF state_dict layout
  (load a released or exported `.ckpt` after stripping `backbone.`).
- `create_msformer_by_size(size, in_channels=1)`: the multi-scale Transformer, loading the
  state_dict `python -m clef_jax.export` writes for an MSFormer checkpoint.

Nothing else in clef_jax imports torch; import this package only where PyTorch is wanted.
"""

from clef_jax.torch_compat.msformer import MSFORMER_SIZES, MSFormer, create_msformer_by_size
from clef_jax.torch_compat.net1d import NET1D_SIZES, Net1D, Net1DSpec, create_net1d_by_size

__all__ = ["MSFORMER_SIZES", "NET1D_SIZES", "MSFormer", "Net1D", "Net1DSpec",
           "create_msformer_by_size", "create_net1d_by_size"]
