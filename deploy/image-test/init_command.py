#!/usr/bin/env python3
"""Prints the command of deploy/k8s/base/deployment.yaml's init container `model`, one argument per
line NUL-separated, so deploy/image-test/run.sh runs in Docker exactly what the pod runs:

    python3 deploy/image-test/init_command.py [deployment.yaml] | xargs -0 ...

Standard library only (a fresh machine has no PyYAML before deploy/check.sh installs it): reads the
block-style YAML this repository writes (a `command:` list of plain scalars and one `|` block) and
fails loudly on anything else, rather than guessing.
"""
from __future__ import annotations

import sys


def indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def init_command(text: str, name: str = "model") -> list[str]:
    lines = text.splitlines()
    i = next((n for n, l in enumerate(lines) if l.strip() == "initContainers:"), None)
    if i is None:
        raise SystemExit("deployment.yaml: no initContainers")
    base = indent(lines[i])
    # the list item `- name: <name>` under initContainers
    start = None
    for n in range(i + 1, len(lines)):
        l = lines[n]
        if l.strip() and not l.lstrip().startswith("#") and indent(l) <= base:
            break
        if l.strip() == f"- name: {name}":
            start = n
            break
    if start is None:
        raise SystemExit(f"deployment.yaml: no init container named {name}")
    item = indent(lines[start]) + 2  # keys of the item
    cmd_line = None
    for n in range(start + 1, len(lines)):
        l = lines[n]
        if l.strip() and not l.lstrip().startswith("#") and indent(l) < item:
            break
        if indent(l) == item and l.strip() == "command:":
            cmd_line = n
            break
    if cmd_line is None:
        raise SystemExit(f"deployment.yaml: init container {name} has no command")
    args: list[str] = []
    n = cmd_line + 1
    while n < len(lines):
        l = lines[n]
        if not l.strip():
            n += 1
            continue
        if indent(l) < item or (indent(l) == item and not l.lstrip().startswith("- ")):
            break
        s = l.strip()
        if not s.startswith("- "):
            raise SystemExit(f"deployment.yaml:{n + 1}: unexpected line in command: {s}")
        value = s[2:].strip()
        if value in ("|", "|-"):
            block: list[str] = []
            n += 1
            block_indent = None
            while n < len(lines):
                b = lines[n]
                if b.strip() and block_indent is None:
                    block_indent = indent(b)
                if b.strip() and indent(b) < (block_indent or 0):
                    break
                block.append(b[block_indent:] if b.strip() else "")
                n += 1
            while block and not block[-1]:
                block.pop()
            args.append("\n".join(block) + ("\n" if value == "|" else ""))
            continue
        if value[:1] in "\"'[{>&*!%@`":
            raise SystemExit(f"deployment.yaml:{n + 1}: only plain scalars and | blocks are read here: {value}")
        args.append(value)
        n += 1
    if not args:
        raise SystemExit(f"deployment.yaml: init container {name} has an empty command")
    return args


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "deploy/k8s/base/deployment.yaml"
    with open(path, encoding="utf-8") as f:
        args = init_command(f.read())
    sys.stdout.write("\0".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
