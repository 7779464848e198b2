"""The documentation runs: every Python block of README.md and docs/*.md, in order per file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import eventctx

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_code_blocks_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative sqlite:/// URLs land in a fresh directory
    monkeypatch.delenv("EVENTCTX_URL", raising=False)
    namespace: dict[str, object] = {"__name__": f"doc_{doc.stem}"}
    for number, block in enumerate(BLOCK.findall(doc.read_text()), 1):
        code = compile(block, f"{doc.name} block {number}", "exec")
        exec(code, namespace)


def test_every_exported_name_is_documented() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in eventctx.__all__ if f"### `{name}`" not in api]
    assert not missing, f"docs/api.md lacks a section for {missing}"


def test_every_command_is_in_the_cli_page() -> None:
    from eventctx.cli import _parser  # noqa: PLC0415

    page = (ROOT / "docs" / "cli.md").read_text()
    subcommands = next(a for a in _parser()._actions if a.dest == "command")
    missing = [name for name in subcommands.choices if f"## `{name}`" not in page]
    assert not missing, f"docs/cli.md lacks {missing} (python -m tools.cli_doc writes it)"
