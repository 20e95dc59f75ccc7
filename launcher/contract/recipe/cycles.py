"""Dependency cycles among a recipe's stages (found while resolving it, before any graph exists)."""

from __future__ import annotations


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as [a, b, ..., a], or None. `edges[x]` are the stages x waits for."""
    white, grey, black = 0, 1, 2
    color = {node: white for node in edges}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for parent in edges.get(node, []):
            if color.get(parent) == grey:
                return stack[stack.index(parent) :] + [parent]
            if color.get(parent) == white:
                found = visit(parent)
                if found:
                    return found
        stack.pop()
        color[node] = black
        return None

    for node in sorted(edges):
        if color[node] == white:
            found = visit(node)
            if found:
                return found
    return None
