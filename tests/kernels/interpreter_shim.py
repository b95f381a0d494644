"""Make Triton 3.6's CPU interpreter work with NumPy >= 2.3 (import before launching a kernel).

The interpreter keeps scalars as 1-element arrays and turns them into Python ints with ``int(array)``,
which NumPy 2.3+ refuses for arrays of ndim > 0; a ``for`` loop with a loaded bound then fails with
"only 0-dimensional arrays can be converted to Python scalars". This re-patches ``__index__`` to take
the single element. Test-only: GPU runs never go through the interpreter.
"""

from __future__ import annotations

import numpy as np
from triton.runtime import interpreter

_original_patch = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor: object, scope: object) -> None:
    _original_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))  # type: ignore[attr-defined]


interpreter._patch_lang_tensor = _patch_lang_tensor
