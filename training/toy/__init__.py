"""DualShapes, the embedded toy world: procedurally generated dual-reference edits at 64 px.

- ``scene``: JSON scene descriptions and the renderer (numpy only).
- ``tasks`` / ``single``: the five dual-reference tasks and the single-reference edits, with plans.
- ``templates``: instruction phrasings and the vocabulary they use.
- ``world``: ``make_sample`` in memory, ``generate_world`` / ``python -m training.toy.world`` on disk.
- ``corrupt``: broken outputs (references returned unchanged, noise, wrong place, ...) to
  calibrate judges with.
- ``tables``: judged evaluations (cached) and the Table-2 printouts of ``python -m training.toy``.
- ``probe``: a model's one-step predictions at fixed noise levels, judged (where its edits fail).

The programmatic judge for this world is ``judge.toy.ToyJudge``. Kept import-free here so that
``python -m training.toy.world`` runs cleanly and nothing heavy loads with the package.
"""
