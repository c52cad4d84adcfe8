"""Queue dual-reference edits through ComfyUI's API: one job, or a batch shared by several servers.

One job::

    python -m comfy_queue --server http://127.0.0.1:8188 --task animal_scene \\
        --image1 park.png --image2 dog.png --instruction "Put the dog from image 2 into the park of image 1" \\
        --out outputs/ [--seed 7] [--workflow my_api_workflow.json]

A batch (JSONL, one job a line: ``{"image1", "image2", "image3"?, "instruction", "task"?, "workflow"?,
"seed"?, "id"?}``, or manifest lines with ``"images": [a, b]`` (``[a, b, c]`` for a three-reference
workflow such as ``--task two_figures_scene``); relative paths are relative to the file),
spread over every ``--server`` (each server pulls the next job when it finishes one, so fast servers
do more; a server that goes down hands its job back to the others)::

    python -m comfy_queue --server http://gpu1:8188 --server http://gpu2:8188 \\
        --batch jobs.jsonl [--split test] --out outputs/

Outputs land in ``--out`` (batch: ``<job id>-<file>``); a batch appends one line per finished job
to ``<out>/results.jsonl`` and a rerun skips the jobs already done. How the workflow is filled (node
titles ``image 1``, ``image 2``, ``instruction``, ``seed``, ``output``) is in ``comfy_queue/fill.py``.

Python::

    from comfy_queue import queue_job, run_batch, Job
    paths = queue_job("http://127.0.0.1:8188", load_workflow("animal_scene"), ["a.png", "b.png"], "…")
    for result in run_batch(servers, jobs, "outputs/"): ...
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue as queue_mod
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .comfy_client import ComfyClient, EventCallback, normalize_server
from .comfy_errors import ComfyError
from .fill import check_node_types, fill_workflow, load_workflow, output_node_ids

from .task_graphs import TEMPLATES

log = logging.getLogger(__name__)


def queue_job(server, workflow: dict, images, instruction: str, seed: int | None = None, out_dir=".",
              prefix: str = "", on_event: EventCallback | None = None, timeout: float | None = None,
              use_websocket: bool = True, on_queued=None, name: str | None = None) -> list[Path]:
    """Run one job on ``server`` (a URL or a :class:`ComfyClient`); returns the downloaded files.

    Checks the node types against ``/object_info`` before queueing, so a missing node is named
    before anything runs. ``name`` saves the outputs as ``<name>.png`` (see ComfyClient.download_outputs)
    instead of ComfyUI's numbered file names. Raises :class:`~comfy_queue.comfy_errors.ComfyError` subclasses.
    """
    client = server if isinstance(server, ComfyClient) else ComfyClient(server, use_websocket=use_websocket)
    try:
        images = list(images)
        for image in images:  # local mistakes first, before any server is asked
            if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():
                raise ComfyError(f"input image not found: {image}")
        fill_workflow(workflow, ["?"] * len(images), instruction, seed)  # title problems show before uploads
        check_node_types(workflow, client.object_info(), client.server)
        names = [client.upload_image(image) for image in images]
        graph = fill_workflow(workflow, names, instruction, seed)
        client_id = uuid.uuid4().hex
        ws = client.open_socket(client_id)
        try:
            prompt_id = client.queue_prompt(graph, client_id)
        except BaseException:
            if ws is not None:
                ws.close()
            raise
        if on_queued is not None:  # run_batch: what to cancel on the server if the run is interrupted
            on_queued(prompt_id)
        entry = client.wait(prompt_id, ws, on_event=on_event, timeout=timeout)
        paths = client.download_outputs(entry, out_dir, prefix=prefix, only_nodes=output_node_ids(graph), name=name)
        if not paths:
            raise ComfyError(
                f"prompt {prompt_id} on {client.server} finished but saved no image "
                "(does the workflow end in SaveImage, and is it titled 'output' if you title one?)"
            )
        return paths
    finally:
        if client is not server:
            client.close()


@dataclass
class Job:
    image1: str
    image2: str
    instruction: str
    task: str | None = None
    workflow: str | None = None  # an API workflow path; overrides the task's
    seed: int | None = None
    id: str | None = None
    image3: str | None = None  # three-reference workflows only

    @property
    def images(self) -> list[str]:
        return [self.image1, self.image2] + ([self.image3] if self.image3 else [])

    def __post_init__(self):
        if self.id is None:
            key = [self.task, self.workflow, self.image1, self.image2, self.instruction, self.seed]
            key = json.dumps(key + ([self.image3] if self.image3 else []))  # two-image ids as before
            self.id = hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class JobResult:
    job: Job
    server: str | None
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        d = asdict(self)
        d["id"] = self.job.id
        return json.dumps(d, sort_keys=True)


def read_jobs(path, split: str | None = None, default_task: str | None = None) -> list[Job]:
    """Jobs from a JSONL file (job lines or manifest lines), paths resolved against its folder."""
    path = Path(path)
    base = path.parent
    jobs = []
    for line_no, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            d = json.loads(text)
            if split is not None and d.get("split", "train") != split:
                continue
            images = d["images"] if "images" in d else [d["image1"], d["image2"]] + ([d["image3"]] if d.get("image3") else [])
            if len(images) not in (2, 3):
                raise ValueError("a job needs two images (three for a three-reference workflow)")
            image1, image2, *image3 = (str(base / p) if not Path(p).is_absolute() else p for p in images)
            workflow = d.get("workflow")
            if workflow is not None and not Path(workflow).is_absolute():
                workflow = str(base / workflow)
            jobs.append(Job(image1, image2, d["instruction"], d.get("task", default_task), workflow,
                            d.get("seed"), str(d["id"]) if "id" in d else None, image3[0] if image3 else None))
        except (ValueError, KeyError, TypeError) as e:
            raise ComfyError(f"{path}:{line_no}: not a job ({e}); a line needs image1, image2 (or images) and instruction") from None
    return jobs


def check_jobs(jobs: list[Job], default_workflow: str | None = None) -> list[str]:
    """Every problem of a batch a client can see before anything is queued: images that are not
    there, a task without a workflow, a workflow file that is missing. Empty when the batch may start."""
    problems = []
    for job in jobs:
        for key in ("image1", "image2") + (("image3",) if job.image3 else ()):
            if not Path(getattr(job, key)).is_file():
                problems.append(f"job {job.id}: {key} not found: {getattr(job, key)}")
        workflow = job.workflow or default_workflow
        if workflow is not None and not Path(workflow).is_file():
            problems.append(f"job {job.id}: workflow not found: {workflow}")
        elif workflow is None and job.task not in TEMPLATES:
            problems.append(f"job {job.id}: task {job.task!r} is not one of {', '.join(TEMPLATES)} (or give a workflow)")
    return problems


def _done_ids(results_path: Path) -> set[str]:
    done = set()
    if results_path.exists():
        for text in results_path.read_text().splitlines():
            try:
                d = json.loads(text)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            if d.get("error") is None:
                done.add(d["id"])
    return done


def run_batch(servers: Iterable[str], jobs: Iterable[Job], out_dir, resume: bool = True,
              timeout: float | None = None, use_websocket: bool = True, progress: bool = True) -> Iterator[JobResult]:
    """Yield one :class:`JobResult` per job as they finish, spreading jobs over ``servers``.

    Each server has a worker thread that pulls the next job when its last one finished (work
    stealing). A job that fails because its *server* is gone is handed back to the others; a job
    that fails on its own (validation, execution) is reported and not retried.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    done = _done_ids(results_path) if resume else set()
    todo = [j for j in jobs if j.id not in done]
    if done:
        log.info("skipping %d jobs already done in %s", len(done), results_path)
    pending: queue_mod.Queue = queue_mod.Queue()
    for job in todo:
        pending.put(job)
    results: queue_mod.Queue = queue_mod.Queue()
    workflows: dict = {}
    lock = threading.Lock()
    outstanding = [len(todo)]  # jobs without a result yet; a worker waits while any may come back
    stop = threading.Event()  # set when the caller stops iterating: take no new jobs
    running: dict[str, str] = {}  # server -> the prompt id of ours it is running (cancelled on Ctrl-C)

    def finish(result: JobResult) -> None:
        with lock:
            outstanding[0] -= 1
        results.put(result)

    def workflow_for(job: Job) -> dict:
        key = job.workflow or job.task
        with lock:
            if key not in workflows:
                workflows[key] = load_workflow(job.task, job.workflow)
            return workflows[key]

    def worker(server: str) -> None:
        client = ComfyClient(server, use_websocket=use_websocket)
        try:
            while not stop.is_set():
                try:
                    job = pending.get(timeout=0.2)
                except queue_mod.Empty:
                    with lock:
                        if outstanding[0] == 0:
                            return
                    continue
                start = time.monotonic()
                try:
                    paths = queue_job(client, workflow_for(job), job.images, job.instruction,
                                      job.seed, out_dir, name=job.id, timeout=timeout,
                                      on_queued=lambda prompt_id: running.__setitem__(client.server, prompt_id))
                    running.pop(client.server, None)
                    outputs = [str(p.relative_to(out_dir)) for p in paths]
                    finish(JobResult(job, client.server, outputs, None, time.monotonic() - start))
                except ComfyError as e:
                    running.pop(client.server, None)
                    if e.server_fault:
                        log.warning("%s; its job %s goes back to the other servers", e, job.id)
                        pending.put(job)
                        return
                    finish(JobResult(job, client.server, [], str(e), time.monotonic() - start))
                except Exception as e:  # a bug or an unexpected answer: report it, keep the batch going
                    log.exception("job %s failed on %s", job.id, client.server)
                    finish(JobResult(job, client.server, [], f"{type(e).__name__}: {e}", time.monotonic() - start))
        finally:
            client.close()
            results.put(None)  # this worker is done

    threads = [threading.Thread(target=worker, args=(s,), daemon=True, name=f"queue-{s}") for s in servers]
    if not threads:
        raise ComfyError("no --server given")
    bar = _tqdm(total=len(todo), desc="jobs", disable=not progress)
    for t in threads:
        t.start()
    try:
        yield from _collect(results, pending, len(threads), results_path, bar)
    finally:
        stop.set()
        bar.close()
        if running:  # stopped early (Ctrl-C): our prompts must not keep the servers busy
            cancel_prompts(dict(running))


def cancel_prompts(running: dict[str, str]) -> None:
    """Take each ``{server: prompt id}`` off its server: deleted from the queue if it waits there,
    interrupted if it runs (``/interrupt`` with the id stops that prompt only, not another user's)."""
    import requests

    for server, prompt_id in running.items():
        try:
            requests.post(f"{server}/queue", json={"delete": [prompt_id]}, timeout=2)
            requests.post(f"{server}/interrupt", json={"prompt_id": prompt_id}, timeout=2)
            log.warning("cancelled prompt %s on %s", prompt_id, server)
        except requests.RequestException as e:
            log.warning("could not cancel prompt %s on %s (%s); it may still run there", prompt_id, server,
                        type(e).__name__)


def _collect(results, pending, alive: int, results_path: Path, bar) -> Iterator[JobResult]:
    """Results as workers report them, each appended to ``results_path`` before it is yielded."""
    with open(results_path, "a") as sink:
        while alive:
            result = results.get()
            if result is None:
                alive -= 1
                continue
            sink.write(result.to_json() + "\n")
            sink.flush()
            bar.update(1)
            yield result
        while True:  # every server is gone: what is left fails, named
            try:
                job = pending.get_nowait()
            except queue_mod.Empty:
                break
            result = JobResult(job, None, [], "no server left to run it (all of them went down)")
            sink.write(result.to_json() + "\n")
            yield result


def _tqdm(**kwargs):
    from tqdm import tqdm

    return tqdm(**kwargs)


def node_names(graph: dict) -> dict[str, str]:
    """What progress calls each node of an API graph: its title, else its class (never a bare id)."""
    return {str(i): (n.get("_meta") or {}).get("title") or n.get("class_type") or str(i) for i, n in graph.items()}


def _step_progress(enabled: bool, names: dict[str, str] | None = None) -> tuple[EventCallback | None, object]:
    """A ws-event callback that shows the running node's name and its sampler steps on a tqdm bar."""
    if not enabled:
        return None, None
    bar = _tqdm(total=0, desc="queued", leave=False)

    def on_event(kind: str, data: dict) -> None:
        if kind == "executing" and data.get("node") is not None:
            bar.set_description((names or {}).get(str(data["node"]), f"node {data['node']}"))
        elif kind == "progress":
            bar.total = data.get("max", 0)
            bar.n = data.get("value", 0)
            bar.refresh()

    return on_event, bar


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m comfy_queue", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="append", help="ComfyUI URL; repeat to share a batch (default http://127.0.0.1:8188)")
    p.add_argument("--task", choices=TEMPLATES, help="uses comfy_queue/api/<task>.json")
    p.add_argument("--workflow", help="an API-format workflow to use instead of the task's")
    p.add_argument("--image1")
    p.add_argument("--image2")
    p.add_argument("--image3", help="the third picture, for a three-reference workflow (--task two_figures_scene)")
    p.add_argument("--instruction")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch", help="JSONL of jobs (or a manifest) to spread over the servers")
    p.add_argument("--split", choices=("train", "test"), help="with a manifest --batch: only this split")
    p.add_argument("--out", default="outputs", help="folder for the downloaded images (default: outputs)")
    p.add_argument("--timeout", type=float, help="seconds to wait for one job")
    p.add_argument("--no-websocket", action="store_true", help="poll /history instead of following /ws")
    p.add_argument("--no-resume", action="store_true", help="batch: redo jobs already in results.jsonl")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    servers = args.server or ["http://127.0.0.1:8188"]
    try:
        if args.batch:
            jobs = read_jobs(args.batch, args.split, args.task)
            for job in jobs:
                if job.workflow is None and args.workflow:
                    job.workflow = args.workflow
            problems = check_jobs(jobs)
            if problems:  # every bad job named before the first is queued
                print("error: the batch cannot start:\n  " + "\n  ".join(problems), file=sys.stderr)
                return 2
            failed = 0
            for result in run_batch(servers, jobs, args.out, resume=not args.no_resume, timeout=args.timeout,
                                    use_websocket=not args.no_websocket, progress=not args.quiet):
                if result.ok:
                    print(f"{result.job.id}\t{result.server}\t" + " ".join(str(Path(args.out) / o) for o in result.outputs))
                else:
                    failed += 1
                    print(f"{result.job.id}\tFAILED\t{result.error}", file=sys.stderr)
            return 1 if failed else 0
        missing = [f"--{n}" for n in ("image1", "image2", "instruction") if getattr(args, n) is None]
        if missing or not (args.task or args.workflow):
            p.error("give --batch, or --task/--workflow with " + ", ".join(missing or ["--image1 --image2 --instruction"]))
        workflow = load_workflow(args.task, args.workflow)
        on_event, bar = _step_progress(not args.quiet, node_names(workflow))
        running: dict[str, str] = {}
        try:
            images = [args.image1, args.image2] + ([args.image3] if args.image3 else [])
            paths = queue_job(servers[0], workflow, images, args.instruction, args.seed,
                              args.out, on_event=on_event, timeout=args.timeout, use_websocket=not args.no_websocket,
                              on_queued=lambda prompt_id: running.__setitem__(normalize_server(servers[0]), prompt_id))
            running.clear()
        finally:
            if bar is not None:
                bar.close()
            if running:  # interrupted: our prompt must not keep the server busy
                cancel_prompts(running)
        for path in paths:
            print(path)
        return 0
    except ComfyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue (finished batch jobs are skipped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
