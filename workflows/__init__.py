"""ComfyUI workflows (*.json for drag-and-drop, api/*.json for queueing) and the queue client."""
