"""Real Lazy Box guests: reproducible components, the box init, and a qemu boot harness.

`python -m gtvp_local.guest build` builds the components into `<cache>/guest` and prints
their digests; `python -m gtvp_local.guest boot` composes a box from them and boots it.
"""
