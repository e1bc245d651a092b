"""fnx Python SDK; the Client and Executor come in a later version.

The worker runtime (``fnx/worker.py``) is a self-contained script that the node manager
embeds and runs; it is deliberately not imported here.
"""

__version__ = "0.1.0"
