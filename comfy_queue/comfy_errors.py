"""Errors of the queue client, each worded so a person knows what broke and what to do."""
from __future__ import annotations

PACK_NAME = "ComfyUI-DualRef"


class ComfyError(RuntimeError):
    """Base of every queue-client error."""

    # Whether another server of a batch could run the same job (the server, not the job, failed).
    server_fault = False


class ServerUnavailable(ComfyError):
    server_fault = True

    def __init__(self, server: str, reason: str):
        super().__init__(
            f"ComfyUI is not reachable at {server} ({reason}). Start ComfyUI there "
            f"(`python main.py --listen <host> --port <port>` in the ComfyUI folder) or fix --server."
        )
        self.server, self.reason = server, reason


class WorkflowError(ComfyError):
    """The workflow file or its titles do not fit the job."""


class MissingNodes(ComfyError):
    def __init__(self, server: str, missing: dict[str, list[str]], pack_nodes: set[str]):
        lines = [f"ComfyUI at {server} does not have these node types:"]
        ours = False
        for class_type, node_ids in sorted(missing.items()):
            where = f"(node {', '.join(node_ids)})"
            if class_type in pack_nodes:
                ours = True
                lines.append(f"  - {class_type} {where}: provided by {PACK_NAME} (this pack)")
            else:
                lines.append(
                    f"  - {class_type} {where}: install the custom node pack that provides it "
                    "(ComfyUI-Manager > Install Missing Custom Nodes) or update ComfyUI"
                )
        if ours:
            lines.append(
                f"Install {PACK_NAME}: link or clone this repository into ComfyUI/custom_nodes/, "
                "install requirements.txt, restart ComfyUI; if it is there, look for "
                f"'IMPORT FAILED' next to {PACK_NAME} in the ComfyUI log."
            )
        super().__init__("\n".join(lines))
        self.server, self.missing = server, missing


def format_node_errors(node_errors: dict, workflow: dict | None = None) -> str:
    """ComfyUI's ``node_errors`` as lines: node id, class, title, input, message, details."""
    lines = []
    for node_id, entry in sorted((node_errors or {}).items(), key=lambda kv: str(kv[0])):
        class_type = entry.get("class_type", "?")
        title = ((workflow or {}).get(node_id, {}).get("_meta") or {}).get("title")
        head = f"node {node_id} ({class_type}{', ' + repr(title) if title and title != class_type else ''})"
        for err in entry.get("errors", []):
            input_name = (err.get("extra_info") or {}).get("input_name")
            where = f" input {input_name!r}" if input_name else ""
            details = err.get("details") or ""
            lines.append(f"  - {head}{where}: {err.get('message', 'invalid')}" + (f": {details}" if details else ""))
    return "\n".join(lines)


class ValidationFailed(ComfyError):
    def __init__(self, server: str, error: dict | str, node_errors: dict, workflow: dict | None = None):
        if isinstance(error, dict):
            summary = error.get("message", "invalid prompt")
            details = error.get("details", "")
        else:
            summary, details = str(error), ""
        text = f"ComfyUI at {server} rejected the workflow: {summary}"
        listed = format_node_errors(node_errors, workflow)
        if listed:
            text += "\n" + listed
        elif details:
            text += f" ({details})"
        super().__init__(text)
        self.server, self.error, self.node_errors = server, error, node_errors


class ExecutionFailed(ComfyError):
    def __init__(self, server: str, prompt_id: str, message: dict | str):
        if isinstance(message, dict):
            node = f"node {message.get('node_id')} ({message.get('node_type')})"
            what = message.get("exception_message") or "interrupted"
            kind = message.get("exception_type", "")
            text = f"ComfyUI at {server} failed running prompt {prompt_id} at {node}: {kind + ': ' if kind else ''}{what.strip()}"
        else:
            text = f"ComfyUI at {server} failed running prompt {prompt_id}: {message}"
        super().__init__(text)
        self.server, self.prompt_id, self.message = server, prompt_id, message
