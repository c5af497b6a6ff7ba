"""Test-only ComfyUI extension, copied into the test server's custom_nodes/ by tests/comfyui_harness.py
(never part of the pack): POST /treerpo-test/validate runs the server's own prompt validation,
exactly as POST /prompt does, without queueing - so validating a workflow never runs it."""

import uuid

import execution
import server
from aiohttp import web

NODE_CLASS_MAPPINGS = {}  # no nodes: only the route


@server.PromptServer.instance.routes.post("/treerpo-test/validate")
async def validate(request):
    data = server.PromptServer.instance.trigger_on_prompt(await request.json())
    ok, error, outputs, node_errors = await execution.validate_prompt(
        str(uuid.uuid4()), data["prompt"], data.get("partial_execution_targets"))
    if ok:
        return web.json_response({"outputs": outputs, "node_errors": node_errors})
    return web.json_response({"error": error, "node_errors": node_errors}, status=400)
