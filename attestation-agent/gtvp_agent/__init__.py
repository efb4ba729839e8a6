"""gtvp-agent: on every node, reads its TPM 2.0 and answers the operator via the API server.

The only package in gtvp that talks to a TPM (import-linter keeps the operator out of it).
"""

__version__ = "0.1.0"
