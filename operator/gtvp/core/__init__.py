"""The pure core of gtvp: policy, verification, resolution, composition, placement, balancing.

Nothing in here performs I/O or imports kopf, kubernetes or the agent: functions take
values and return values (or raise typed errors), so they are unit- and property-tested
without a cluster. import-linter enforces this (see pyproject.toml).
"""
