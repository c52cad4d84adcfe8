"""Queueing DualRef's task workflows on ComfyUI servers, and building them.

``python -m comfy_queue`` queues a task (``comfy_queue/api/<task>.json``, filled by node title) or a
batch; ``python -m comfy_queue.build`` writes the UI templates (``example_workflows/``, the folder
ComfyUI serves to its template browser: workflows and thumbnails only) and their API twins from
``task_graphs.py``. No code lives in ``example_workflows/``: ComfyUI serves that folder as static files.
"""
