# Run the Triton kernel on CPU tensors through Triton's interpreter: this must be set before
# triton is first imported, and conftest.py is imported before any test module.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Triton 3.6's interpreter converts a loop bound with int(array) where the array has shape (1,),
# which NumPy 2.x refuses ("only 0-dimensional arrays can be converted to Python scalars"): every
# `range(...)` with a run-time bound fails there (torch 2.11 + triton 3.6 + numpy 2.5 is the GPU
# machines' stack, whose CPU suite runs under the interpreter). Triton 3.9 converts through
# .squeeze(). The shim below installs that same conversion on any interpreter, once; the compiled
# (GPU) path never goes through it, and the kernels keep their ordinary loops.

def _install_interpreter_shim():
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover
        return False
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_dyt_numpy2_shim", False):
        return orig is not None

    def _index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if getattr(data, "size", 0) == 1 else int(data)

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched._dyt_numpy2_shim = True
    _interp._patch_lang_tensor = patched
    return True


_install_interpreter_shim()
