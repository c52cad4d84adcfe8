"""The benchmark: ``python -m training.bench`` (paper Table 2 and Table 1).

- ``cli``: the command line; ``generators``: headless and ComfyUI generation;
  ``run_folder``: one run's folder (samples, outputs, verdicts); ``report``: tables and the HTML report.
"""
