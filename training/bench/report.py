"""Benchmark tables (the paper's Table 2 and Table 1, per-question detail, comparisons) and the HTML report.

Tables are plain data (:class:`Table`) rendered as Markdown (printed, ``*.md``) and HTML. The report
shows, per task, one row per sample: reference 1 | reference 2 | target (if any) | the output of
each run, with every judge's verdict under it (or why there is none: unjudged, no output).
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from judge.edit_score import SCORE_ASPECTS
from judge.results import TABLE2_COLUMNS, write_json_atomic
from judge.verdict import QUESTIONS

from ..files import write_text
from .run_folder import RunDir

SCORE_NAMES = {"semantic_consistency": "SC", "perceptual_quality": "PQ", "overall": "Overall"}


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list] = field(default_factory=list)
    note: str = ""
    digits: int = 3  # rewards in [0, 1]: 3 decimals; 0-10 scores: 2

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(_cell(v, self.digits) for v in row) + " |" for row in self.rows]
        return "\n".join(lines + (["", self.note] if self.note else []))

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v, self.digits))}</td>" for v in row) + "</tr>"
                       for row in self.rows)
        note = f"<p class=note>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"

    def to_json(self) -> dict:
        return {"title": self.title, "header": self.header, "rows": self.rows, "note": self.note}


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _judge_title(key: str, summary: dict) -> str:
    return f"{summary.get('profile', key)} ({summary.get('judge', '?')}, {summary.get('mode', '?')})"


def _counts(block: dict) -> str:
    """What was not scored, so a mean over fewer samples is never mistaken for the whole set."""
    parts = [f"{block.get('n_' + s, 0)} {s.replace('_', ' ')}" for s in ("unjudged", "missing", "bad_input")
             if block.get("n_" + s)]
    return ", ".join(parts) or "0"


def table2_row(summary: dict) -> list:
    """Mean reward per task in the paper's column order, then the mean over every judged sample."""
    tasks = summary.get("tasks", {})
    return [tasks.get(task, {}).get("reward") for task in TABLE2_COLUMNS] + [summary.get("overall", {}).get("reward")]


def table2_header(first: str) -> list[str]:
    return [first] + list(TABLE2_COLUMNS.values()) + ["All"]


def run_tables(label: str, summaries: dict[str, dict]) -> list[Table]:
    """Per judge: the Table-2 row of this run and the per-task detail (each question, counts)."""
    tables = []
    for key, summary in summaries.items():
        name = _judge_title(key, summary)
        digits = 2 if summary.get("mode") == "score" else 3
        if summary.get("mode") == "score":
            fields = list(SCORE_ASPECTS) + ["overall"]
            header = ["Task"] + [SCORE_NAMES[f] for f in fields]
        else:
            tables.append(Table(f"Table 2 - mean reward, judge {name}", table2_header("Model"),
                                [[label] + table2_row(summary)]))
            fields = list(QUESTIONS) + ["reward"]
            header = ["Task"] + [f.capitalize() for f in fields]
        header += ["judged", "not scored"]
        tasks = summary.get("tasks", {})
        ordered = [t for t in TABLE2_COLUMNS if t in tasks] + sorted(t for t in tasks if t not in TABLE2_COLUMNS)
        rows = [[task] + [block.get(f) for f in fields] + [block.get("n_judged", 0), _counts(block)]
                for task, block in [(t, tasks[t]) for t in ordered] + [("all", summary.get("overall", {}))]]
        errors = summary.get("generator_errors") or {}
        note = (f"{len(errors)} sample(s) have no output (generator error), e.g. {next(iter(errors))}: "
                f"{next(iter(errors.values()))}" if errors else "")
        tables.append(Table(f"Per task, judge {name}", header, rows, note, digits))
    return tables


def compare_tables(runs: list[tuple[str, dict[str, dict]]]) -> list[Table]:
    """One table per judge with a row per run: Table 2 (rewards) or Table 1 (0-10 scores)."""
    keys = []
    for _, summaries in runs:
        keys += [k for k in summaries if k not in keys]
    tables = []
    for key in keys:
        present = [(label, s[key]) for label, s in runs if key in s]
        summary = present[0][1]
        name = _judge_title(key, summary)
        if summary.get("mode") == "score":
            fields = list(SCORE_ASPECTS) + ["overall"]
            header = ["Model"] + [SCORE_NAMES[f] for f in fields] + ["judged", "not scored"]
            rows = [[label] + [s["overall"].get(f) for f in fields]
                    + [s["overall"].get("n_judged", 0), _counts(s["overall"])] for label, s in present]
            tables.append(Table(f"Table 1 - single-reference edits, 0-10 judge {name}", header, rows,
                                "SC = semantic consistency, PQ = perceptual quality, Overall = mean of sqrt(SC x PQ)",
                                digits=2))
        else:
            rows = [[label] + table2_row(s) + [_counts(s.get("overall", {}))] for label, s in present]
            tables.append(Table(f"Table 2 - mean reward, judge {name}", table2_header("Model") + ["not scored"], rows))
    return tables


def table_text(tables: list[Table]) -> str:
    return "\n\n".join(t.markdown() for t in tables) + "\n"


def write_tables(out_dir: Path, stem: str, tables: list[Table], extra: dict | None = None) -> tuple[Path, Path]:

    md = Path(out_dir) / f"{stem}.md"
    md.write_text(table_text(tables))
    js = Path(out_dir) / f"{stem}.json"
    write_json_atomic(js, {**(extra or {}), "tables": [t.to_json() for t in tables]})
    return md, js


# -- HTML -------------------------------------------------------------------------------------------
_CSS = """body{font:14px sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}th{background:#f2f2f2}
img{width:128px;image-rendering:pixelated;display:block}.v{font:12px monospace;max-width:190px}
.good{color:#070}.bad{color:#b00}.na{color:#888}.note{color:#555;font-size:12px}.ins{max-width:260px}"""


def verdict_text(record: dict | None, generator_error: str | None = None) -> tuple[str, str, str]:
    """(short text, css class, hover text) of one sample's record in a judge's verdicts.jsonl."""
    if record is None:
        why = f"no output: {generator_error}" if generator_error else "not judged yet"
        return why, "na", why
    status = record.get("status")
    if status == "judged" and "score" in record:
        s = record["score"]
        overall = s.get("overall", math.sqrt(s["semantic_consistency"] * s["perceptual_quality"]))
        text = f"SC {s['semantic_consistency']:.1f} PQ {s['perceptual_quality']:.1f} = {overall:.2f}"
        return text, "good" if overall >= 5 else "bad", json.dumps(s.get("answers", {}))
    if status == "judged":
        v = record["verdict"]
        fmt = "{:.0f}" if v.get("mode") == "binary" else "{:.2f}"
        text = " ".join(f"{q[0].upper()} {fmt.format(v[q])}" for q in QUESTIONS) + f" = {v['reward']:.2f}"
        return text, "good" if v["reward"] >= 0.5 else "bad", json.dumps(v.get("answers", {}))
    reason = record.get("reason") or ""
    if status == "missing" and generator_error:
        reason = generator_error
    return f"{status}: {reason}", "na", reason


def flat_colour(path: Path) -> tuple | None:
    """The colour of an output whose every pixel has it (all black, all grey: a broken model, VAE
    or precision, which a judge may still half-reward), else None."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
    except OSError:
        return None
    first = pixels.reshape(-1, 3)[0]
    return tuple(int(c) for c in first) if (pixels == first).all() else None


def _img(path: Path, report_dir: Path) -> str:
    if not path.is_file():
        return "<span class=na>(missing)</span>"
    src = html.escape(os.path.relpath(path.resolve(), report_dir.resolve()))
    return f'<a href="{src}"><img loading=lazy src="{src}"></a>'


def write_report(path, title: str, runs: list[RunDir], tables: list[Table], max_rows: int | None = None,
                 judge_keys: list[str] | None = None) -> Path:
    """An HTML page: the tables, then per task the samples with both references, target and each run's
    output and verdicts. Images are linked by relative path (the report travels with the run folders).
    ``judge_keys``: the judges whose verdicts are shown (default: every judge with results), which
    must be the judges of ``tables``."""
    path = Path(path)
    report_dir = path.parent
    labels = [r.label() for r in runs]
    verdicts = [{key: r.verdicts(key) for key in r.judge_keys() if judge_keys is None or key in judge_keys}
                for r in runs]
    errors = [{i: g.get("reason") for i, g in r.generation_records().items() if g.get("status") == "error"}
              for r in runs]
    samples, owner = [], {}
    for k, run in enumerate(runs):
        for s in run.samples():
            if s.id not in owner:
                owner[s.id] = k
                samples.append(s)
    by_task: dict[str, list] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{_CSS}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for run, label in zip(runs, labels):
        info = run.info()
        settings = {k: v for k, v in info.get("generator", {}).items() if v not in (None, [], {})}
        parts.append(f"<p><b>{html.escape(label)}</b>: {html.escape(json.dumps(settings))}</p>")
    flat = {}
    for run, label in zip(runs, labels):
        for s in run.samples():
            colour = flat_colour(run.outputs / f"{s.id}.png")
            if colour is not None:
                flat[(run.root, s.id)] = (label, colour)
    if flat:
        listed = ", ".join(f"{label}: {i} {c}" for (_, i), (label, c) in list(flat.items())[:10])
        parts.append(f"<p class=bad>{len(flat)} output(s) are one flat colour (every pixel the same; all black "
                     f"is (0, 0, 0)): {html.escape(listed)}{' ...' if len(flat) > 10 else ''}. Check the model, "
                     "VAE and precision before trusting these scores.</p>")
    parts += [t.html() for t in tables]
    parts.append("<p>" + " · ".join(f'<a href="#{html.escape(t)}">{html.escape(t)} ({len(v)})</a>'
                                   for t, v in by_task.items()) + "</p>")
    for task, rows in by_task.items():
        shown = rows if max_rows is None else rows[:max_rows]
        refs = max(len(s.images) for s in rows)  # single-reference tasks get no empty column
        head = ["sample"] + [f"reference {k + 1}" for k in range(refs)] + ["target"] + labels
        parts.append(f'<h2 id="{html.escape(task)}">{html.escape(task)}</h2><table><tr>'
                     + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
        for s in shown:
            home = runs[owner[s.id]].root
            cells = [f"<td class=ins><b>{html.escape(s.id)}</b><br>{html.escape(s.instruction)}</td>"]
            images = list(s.images) + [None] * (refs - len(s.images))
            cells += [f"<td>{_img(home / p, report_dir) if p else ''}</td>" for p in images]
            cells.append(f"<td>{_img(home / s.target, report_dir) if s.target else ''}</td>")
            for run, judged, errs in zip(runs, verdicts, errors):
                lines = []
                for key, records in judged.items():
                    text, css, hover = verdict_text(records.get(s.id), errs.get(s.id))
                    lines.append(f'<div class="v {css}" title="{html.escape(hover)}">{html.escape(key)}: '
                                 f"{html.escape(text)}</div>")
                out = run.outputs / f"{s.id}.png"
                shown_image = _img(out, report_dir) if out.is_file() else \
                    f"<span class=bad>{html.escape('no output: ' + (errs.get(s.id) or 'not generated'))}</span>"
                if (run.root, s.id) in flat:
                    shown_image += f"<div class=bad>flat colour {flat[run.root, s.id][1]}</div>"
                cells.append(f"<td>{shown_image}{''.join(lines)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
        if len(shown) < len(rows):
            parts.append(f"<p class=note>{len(rows) - len(shown)} more samples not shown (raise --report-rows)</p>")
    return write_text(path, "\n".join(parts) + "\n")
