"""gtvp: a trusted pool of Kubernetes hosts for KubeVirt virtual machines.

Layers (checked by import-linter): `gtvp.core` is pure (policy, verification, resolution,
composition, placement, balancing); everything that talks to the API server, to kopf or to
processes sits outside it and calls into it.
"""

__version__ = "0.1.0"
