"""The README's promises that a test can hold it to: its first two commands, what CI runs, its links."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_first_lines_are_the_two_commands_and_ci_runs_the_second_verbatim():
  block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
  assert block == ["pip install -e . && python -m jaxeff.train", "pip install -e '.[test]' && python -m pytest -q"]
  assert README.index("```bash") < README.index("\n## ")  # before any section
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  assert block[1] in ci and ci[-1] == block[1]  # the tests run last, after the lint


def test_local_links_and_anchors_resolve():
  benchmarks = (REPO / "BENCHMARKS.md").read_text()
  anchors = {
    re.sub(r"[^\w\- ]", "", h.strip("# ").lower()).replace(" ", "-")
    for h in benchmarks.splitlines()
    if h.startswith("#")
  }
  for target in re.findall(r"\]\(([^)]+)\)", README):
    path, _, anchor = target.partition("#")
    if path.startswith("http"):
      continue
    assert (REPO / path).exists() if path else True, target
    if path == "BENCHMARKS.md" and anchor:
      assert anchor in anchors, target
