"""Saved workflows for `treerpo run`: reading them, UI -> API conversion, --set overrides.

ComfyUI-free: the conversion takes the node schemas as GET /object_info answers them (built
in-process by cli.comfy_env, or fetched from a server). The UI format is the frontend's litegraph
dump (``nodes`` + ``links``); the API format is ``{id: {class_type, inputs, _meta}}`` as POST
/prompt takes it. The conversion follows what the frontend's graphToPrompt does and what
comfy-cli's workflow_to_api.py does (tests compare the two on every bundled workflow): widget
values mapped in schema order (required, then optional), the hidden control-after-generate values
dropped, muted nodes and UI-only nodes (Note, MarkdownNote, PrimitiveNode, Reroute) left out,
bypassed nodes passed through by socket type, reroutes followed, primitive values inlined, groups
ignored (they are only boxes). Subgraphs (``definitions.subgraphs``) are expanded into their
inner nodes with ids ``<instance id>:<inner id>`` as the frontend does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

MUTED, BYPASSED = 2, 4
UI_ONLY = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})  # frontend-only, never executed
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
TRAINER = "TreeRPOTrainerStep"


class WorkflowError(ValueError):
    """A workflow that cannot be read, converted or overridden; the message names the culprit."""


# ---------------------------------------------------------------------------- reading
def load_workflow(path: str | Path) -> dict:
    from .errors import read_text

    p = Path(path)
    try:
        data = json.loads(read_text(p, "workflow file", error=WorkflowError))
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and not is_ui_format(data):
        data = data["prompt"]  # a saved POST /prompt body
    if not (is_ui_format(data) or is_api_format(data)):
        raise WorkflowError(f"{p}: neither a ComfyUI workflow (with 'nodes' and 'links') nor an API-format "
                            "prompt ({id: {class_type, inputs}})")
    return data


def is_ui_format(wf) -> bool:
    return isinstance(wf, dict) and isinstance(wf.get("nodes"), list) and isinstance(wf.get("links"), list)


def is_api_format(wf) -> bool:
    return (isinstance(wf, dict) and bool(wf) and not is_ui_format(wf)
            and all(isinstance(v, dict) and "class_type" in v for v in wf.values()))


def node_types(wf: dict) -> set[str]:
    """Every node type a workflow uses (subgraph interiors included)."""
    if is_api_format(wf):
        return {v["class_type"] for v in wf.values()}
    out = {n.get("type") for n in wf["nodes"]}
    for sg in _subgraph_defs(wf).values():
        out |= {n.get("type") for n in sg.get("nodes", [])}
    return {t for t in out if isinstance(t, str)}


# ---------------------------------------------------------------------------- schemas
def _spec(info: dict, name: str):
    for group in ("required", "optional"):
        spec = info.get("input", {}).get(group, {}).get(name)
        if spec is not None:
            return spec
    return None


def _input_kind(spec) -> str | None:
    """The widget kind of an input spec (INT, FLOAT, STRING, BOOLEAN, COMBO) or None for a socket."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    t = spec[0]
    if isinstance(t, list):
        return "COMBO"
    return t if t in WIDGET_TYPES else None


def _options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo_values(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else list(_options(spec).get("options", []))


def widget_names(info: dict) -> list[str]:
    """Widget inputs in the order the frontend stores their values (required, then optional)."""
    order = info.get("input_order") or {g: list(info.get("input", {}).get(g, {})) for g in ("required", "optional")}
    names = [*order.get("required", []), *order.get("optional", [])]
    return [n for n in names
            if _input_kind(_spec(info, n)) is not None and not _options(_spec(info, n)).get("forceInput")]


def _has_control(spec) -> bool:
    return bool(_options(spec).get("control_after_generate"))


# ---------------------------------------------------------------------------- UI -> API
def _links(raw) -> dict:
    """link id -> (origin id, origin slot, target id, target slot, type)."""
    out = {}
    for l in raw or []:
        if isinstance(l, dict):
            out[l["id"]] = (l["origin_id"], l["origin_slot"], l["target_id"], l["target_slot"], l.get("type"))
        elif isinstance(l, (list, tuple)) and len(l) >= 5:
            out[l[0]] = (l[1], l[2], l[3], l[4], l[5] if len(l) > 5 else None)
    return out


def _subgraph_defs(wf: dict) -> dict:
    defs = (wf.get("definitions") or {}).get("subgraphs") or []
    return {d["id"]: d for d in defs if isinstance(d, dict) and "id" in d}


def _expand_subgraphs(nodes: list, links: dict, defs: dict) -> tuple[list, dict]:
    """Replace subgraph instances by their inner nodes (ids '<instance>:<inner>'), rewiring the
    instance's input and output sockets to the inner nodes they lead to. Nested subgraphs are
    expanded by repeating until none is left."""
    for _ in range(32):
        instances = [n for n in nodes if n.get("type") in defs]
        if not instances:
            return nodes, links
        for inst in instances:
            sg = defs[inst["type"]]
            pre = f"{inst['id']}:"
            inner_links = _links(sg.get("links"))
            new_nodes = []
            for n in sg.get("nodes", []):
                n = copy.deepcopy(n)
                n["id"] = pre + str(n["id"])
                if inst.get("mode") in (MUTED, BYPASSED) and n.get("mode", 0) == 0:
                    n["mode"] = inst["mode"]
                new_nodes.append(n)
            next_id = max([k for k in links if isinstance(k, int)] + [0]) + 1
            # instance input slot -> link feeding it from outside
            feed = {tl: lid for lid, (_, _, tid, tl, _) in links.items() if str(tid) == str(inst["id"])}
            remap = {}
            for lid, (oid, oslot, tid, tslot, typ) in inner_links.items():
                if str(oid) == "-10":  # from the subgraph's input box: the instance's input slot oslot
                    outer = feed.get(oslot)
                    if outer is None:
                        continue
                    o = links[outer]
                    src = (o[0], o[1])
                else:
                    src = (pre + str(oid), oslot)
                if str(tid) == "-20":  # to the output box: instance output tslot is produced here
                    remap[tslot] = src
                    continue
                links[next_id] = (src[0], src[1], pre + str(tid), tslot, typ)
                for n in new_nodes:
                    if n["id"] == pre + str(tid):
                        for inp in n.get("inputs", []):
                            if inp.get("link") == lid:
                                inp["link"] = next_id
                next_id += 1
            for lid, (oid, oslot, tid, tslot, typ) in list(links.items()):
                if str(oid) == str(inst["id"]):
                    if oslot in remap:
                        links[lid] = (remap[oslot][0], remap[oslot][1], tid, tslot, typ)
                    else:
                        del links[lid]
            for lid in [k for k, v in links.items() if str(v[2]) == str(inst["id"])]:
                del links[lid]
            nodes = [n for n in nodes if n is not inst] + new_nodes
    raise WorkflowError("subgraphs nest more than 32 levels deep (a cycle?)")


def ui_to_api(wf: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API-format prompt with the node schemas ``object_info``.
    Raises WorkflowError naming the node for a node type without a schema."""
    defs = _subgraph_defs(wf)
    nodes = [copy.deepcopy(n) for n in wf["nodes"] if isinstance(n, dict)]
    links = _links(wf.get("links"))
    nodes, links = _expand_subgraphs(nodes, links, defs)
    by_id = {str(n["id"]): n for n in nodes}

    def source(link_id, depth=0):
        """(node id, slot) producing the value of ``link_id``, a literal ('value', v), or None."""
        if link_id is None or link_id not in links or depth > 100:
            return None
        oid, oslot, _, _, typ = links[link_id]
        node = by_id.get(str(oid))
        if node is None:
            return None
        kind, mode = node.get("type"), node.get("mode", 0)
        if kind == "Reroute":
            ins = node.get("inputs") or [{}]
            return source(ins[0].get("link"), depth + 1)
        if kind == "PrimitiveNode":
            vals = node.get("widgets_values") or [None]
            return ("value", vals[0] if isinstance(vals, list) else next(iter(vals.values()), None))
        if mode == MUTED or kind in UI_ONLY:
            return None
        if mode == BYPASSED:  # pass through: the input of the output's type (same slot first)
            outs = node.get("outputs") or []
            out_type = outs[oslot].get("type") if oslot < len(outs) else typ
            ins = [i for i in node.get("inputs") or [] if i.get("link") is not None]
            same = [i for k, i in enumerate(node.get("inputs") or []) if k == oslot and i.get("type") == out_type]
            for inp in same + [i for i in ins if i.get("type") == out_type]:
                if inp.get("link") is not None:
                    return source(inp["link"], depth + 1)
            return None
        return (str(oid), oslot)

    prompt: dict = {}
    for node in nodes:
        nid, kind, mode = str(node["id"]), node.get("type"), node.get("mode", 0)
        if not kind or kind in UI_ONLY or mode in (MUTED, BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {nid} ({kind}): unknown node type (not installed in this ComfyUI)")
        inputs: dict = {}
        values = node.get("widgets_values")
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if _spec(info, k) is not None})
        else:
            values = list(values or [])
            i = 0
            for name in widget_names(info):
                if i >= len(values):
                    break
                spec = _spec(info, name)
                inputs[name] = values[i]
                i += 1
                # the frontend stores the seed widgets' control_after_generate mode right after the value
                if i < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES and (
                        _has_control(spec) or _input_kind(spec) == "INT"):
                    i += 1
        for inp in node.get("inputs") or []:
            name, link = inp.get("name"), inp.get("link")
            if link is None or _spec(info, name) is None:
                continue
            src = source(link)
            if src is None:  # fed by a muted or missing node: a socket gets nothing, a widget keeps its value
                if _input_kind(_spec(info, name)) is None:
                    inputs.pop(name, None)
            elif src[0] == "value":  # a primitive node: the frontend mirrors its value into the widget
                inputs.setdefault(name, src[1])
            else:
                inputs[name] = [src[0], src[1]]
        title = node.get("title") or info.get("display_name") or kind
        prompt[nid] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    # links into nodes that were left out (muted) leave dangling references: drop them
    for entry in prompt.values():
        for name, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in prompt and v[0] in by_id:
                del entry["inputs"][name]
    return prompt


def to_api(wf: dict, object_info: dict) -> dict:
    return copy.deepcopy(wf) if is_api_format(wf) else ui_to_api(wf, object_info)


# ---------------------------------------------------------------------------- --set
def parse_value(text: str):
    """A --set value: JSON where it parses (numbers, true/false, lists, quoted strings), else the text."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def find_node(prompt: dict, ref: str) -> str:
    """The id of the node ``ref`` names: an id, a title, or a node type used once."""
    if ref in prompt:
        return ref
    for what, key in (("title", lambda v: v.get("_meta", {}).get("title")), ("type", lambda v: v["class_type"])):
        hits = [k for k, v in prompt.items() if key(v) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"--set: {ref!r} is the {what} of nodes {', '.join(sorted(hits))}: use a node id")
    have = ", ".join(f"{k} {v['class_type']}" for k, v in sorted(prompt.items(), key=_id_key))
    raise WorkflowError(f"--set: no node {ref!r} (give a node id, title or type; the workflow has {have})")


def apply_set(prompt: dict, item: str, object_info: dict | None = None) -> tuple[str, str, object]:
    """Apply one ``NODE.INPUT=VALUE`` to ``prompt`` (in place); returns (node id, input, value)."""
    if "=" not in item:
        raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE")
    path, text = item.split("=", 1)
    if "." not in path:
        raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE (node id or title, a dot, the input name)")
    ref, name = path.rsplit(".", 1)
    nid = find_node(prompt, ref.strip())
    name = name.strip()
    node = prompt[nid]
    value = parse_value(text)
    info = (object_info or {}).get(node["class_type"])
    if info is not None:
        spec = _spec(info, name)
        if spec is None:
            known = [*info.get("input_order", {}).get("required", []), *info.get("input_order", {}).get("optional", [])]
            raise WorkflowError(f"--set {item!r}: node {nid} ({node['class_type']}) has no input {name!r} "
                                f"(inputs: {', '.join(known)})")
        kind = _input_kind(spec)
        if kind is None:
            raise WorkflowError(f"--set {item!r}: {nid}.{name} is a {spec[0]} socket, not a widget value")
        value = _coerce(value, text, kind, spec, f"--set {item!r}")
    elif name not in node["inputs"]:
        raise WorkflowError(f"--set {item!r}: node {nid} ({node['class_type']}) has no input {name!r}")
    if isinstance(node["inputs"].get(name), list) and info is None:
        raise WorkflowError(f"--set {item!r}: {nid}.{name} is connected to another node, not a widget value")
    node["inputs"][name] = value
    return nid, name, value


def _coerce(value, text, kind, spec, what):
    if kind == "STRING":
        return text
    if kind == "BOOLEAN":
        if isinstance(value, bool):
            return value
        raise WorkflowError(f"{what}: expected true or false")
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise WorkflowError(f"{what}: expected an integer")
        return int(value)
    if kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkflowError(f"{what}: expected a number")
        return float(value)
    options = _combo_values(spec)
    if options and text in [str(o) for o in options]:
        return next(o for o in options if str(o) == text)
    if options and value not in options:
        raise WorkflowError(f"{what}: expected one of {', '.join(map(str, options))}")
    return value


# ---------------------------------------------------------------------------- reading a prompt
def _id_key(item):
    k = item[0]
    return (0, int(k), "") if k.isdigit() else (1, 0, k)


def upstream(prompt: dict, nid: str) -> list[str]:
    """Ids of the nodes ``nid`` takes links from."""
    return [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and v[0] in prompt]


def execution_order(prompt: dict) -> list[str]:
    """A topological order (dependencies first, ids ascending among equals)."""
    order, seen = [], set()

    def visit(n, stack=()):
        if n in seen:
            return
        if n in stack:
            raise WorkflowError(f"node {n} ({prompt[n]['class_type']}) is part of a cycle")
        for u in upstream(prompt, n):
            visit(u, (*stack, n))
        seen.add(n)
        order.append(n)

    for k, _ in sorted(prompt.items(), key=_id_key):
        visit(k)
    return order


def trainer_nodes(prompt: dict) -> list[str]:
    return [n for n in execution_order(prompt) if prompt[n]["class_type"] == TRAINER]


def build_prompt(wf: dict, object_info: dict, sets, source, where: str) -> tuple[dict, list[str], list[tuple]]:
    """The API prompt of workflow ``wf`` (read from ``source``) with the --set overrides applied, its
    trainer nodes in execution order, and the overrides as (node, input, value). An unknown node type
    (``where``: the ComfyUI that lacks it) or a workflow without a trainer step is a WorkflowError."""
    if is_api_format(wf):
        for nid, v in sorted(wf.items()):
            if v["class_type"] not in object_info:
                raise WorkflowError(f"node {nid} ({v['class_type']}): unknown node type (not installed {where})")
    prompt = to_api(wf, object_info)
    applied = [apply_set(prompt, item, object_info) for item in sets]
    trainers = trainer_nodes(prompt)
    if not trainers:
        raise WorkflowError(f"{source}: no GRPO trainer step ({TRAINER}) in this workflow: nothing to train")
    return prompt, trainers, applied


def show_value(v) -> str:
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
        return f"<- node {v[0]} output {v[1]}"
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + '..."'
