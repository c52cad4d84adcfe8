"""Peak GPU memory of DualRef training on full-size Kontext: ``python -m training.memory``.

- ``model``: exact parameter counts and the per-block activation formula; ``cli``: the tables.
"""
