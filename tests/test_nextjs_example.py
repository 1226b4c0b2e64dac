"""examples/nextjs is the JS guide's code: each code block of docs/js-client.md's Next.js section
that names its file is that file of the example, and the example ships the served client."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "nextjs"
STATIC = ROOT / "orchestrator" / "api" / "static"


def guide_files() -> dict[str, str]:
    text = (ROOT / "docs" / "js-client.md").read_text()
    section = text[text.index("## In a Next.js app") :]
    files = {}
    for code in re.findall(r"```tsx?\n(.*?)```", section, re.S):
        first = code.splitlines()[0]
        assert first.startswith("// "), f"a guide block names no file: {first!r}"
        files[first[3:].split()[0]] = code
    return files


def test_every_guide_block_is_a_file_of_the_example():
    files = guide_files()
    assert {"lib/use-job.ts", "app/api/orchestrator-token/route.ts", "lib/orchestrator-browser.ts"} <= set(files)
    for path, code in files.items():
        assert (EXAMPLE / path).read_text() == code, f"docs/js-client.md and examples/nextjs/{path} differ"


def test_the_example_ships_the_client_the_api_serves():
    for name in ("client.js", "client.d.ts"):
        suffix = name.split(".", 1)[1]
        assert (EXAMPLE / "lib" / f"orchestrator.{suffix}").read_bytes() == (STATIC / name).read_bytes()
