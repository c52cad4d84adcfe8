"""DDPO alignment with the judge (paper Sec. 3.3) and the main job: ``python -m training.ddpo``.

- ``pipeline``: the main job (toy world -> toy base -> SFT -> DDPO -> evaluation); the entry point.
- ``loop``: one DDPO run, read top to bottom; ``config``: its configuration.
- ``rollout``: SDE rollouts and judging; ``update``: the clipped policy gradient;
  ``objective``: advantages, the loss and its diagnostics; ``state``: the policy's weights and checkpoints.
- ``report``: the final Table 2 of base / SFT / SFT+DDPO.
"""
