"""A plain FFN and its tnmoe adapter for tests of non-transformers models. It imports only
torch and tnmoe (the 2-process test's spawned interpreters import it)."""

import contextlib

from torch import nn

import tnmoe.moe as moe


class TinyFFN(nn.Module):
    """``down(gelu(up(x)))``: ``(..., d_model) -> (..., d_model)``."""

    def __init__(self, d_model: int = 8, d_ff: int = 16):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


class TinyFFNAdapter(moe.FFNAdapter):
    def extract(self, module):
        return moe.FFNSpec(up=module.up.weight, down=module.down.weight, activation=nn.functional.gelu,
                           up_bias=module.up.bias, down_bias=module.down.bias)


@contextlib.contextmanager
def tiny_ffn_registered():
    """``TinyFFN`` is convertible inside the block only (the adapter registry is global)."""
    moe.register_adapter(TinyFFN, TinyFFNAdapter())
    try:
        yield
    finally:
        moe.unregister_adapter(TinyFFN)
