# Run the Triton kernel on CPU tensors through Triton's interpreter: this must be set before
# triton is first imported, and conftest.py is imported before any test module.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
