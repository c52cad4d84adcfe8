"""Dual-reference dataset synthesis (paper Sec. 3.1): ``python -m training.synth``.

- ``loop``: the run (pairs -> instruction + edit plan -> target -> judge filter -> manifest);
  ``config``: the config file; ``pairs``: theme pools and pair sampling; ``instructions``: asking the
  LLM for an instruction and an edit plan (``plan_schema.json``); ``endpoints``: the request/cost
  budget, chat and image endpoints; ``state``: the append-only run state.
"""
