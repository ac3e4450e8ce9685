"""The README's promises that a test can hold it to: its first two commands, what CI runs, its
length, its links and the docs pages', and that the commands in both name real CLIs and flags."""

import contextlib
import importlib
import io
import pathlib
import re
import shlex

import pytest

from jaxeff.bench import __main__ as bench_main

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]


def test_first_lines_are_the_two_commands_and_ci_runs_the_second_verbatim():
  block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
  assert block == ["pip install -e . && python -m jaxeff.train", "pip install -e '.[test]' && python -m pytest -q"]
  assert README.index("```bash") < README.index("\n## ")  # before any section
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  assert block[1] in ci and ci[-1] == block[1]  # the tests run last, after the lint


def test_readme_is_a_short_guide_whose_sections_link_to_their_reference():
  assert len(README.splitlines()) < 250
  sections = README.split("\n## ")[1:]
  for section in sections:
    title = section.splitlines()[0]
    if title != "Install":
      assert re.search(r"\]\((docs/|BENCHMARKS\.md|colab)", section), title


def _anchors(path: pathlib.Path) -> set[str]:
  """GitHub's anchors for a markdown file's headings."""
  return {
    re.sub(r"[^\w\- ]", "", h.strip("# ").lower()).replace(" ", "-")
    for h in path.read_text().splitlines()
    if h.startswith("#")
  }


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_local_links_and_anchors_resolve(page):
  for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
    path, _, anchor = target.partition("#")
    if path.startswith("http"):
      continue
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), (page.name, target)
    if anchor and linked.suffix == ".md":
      assert anchor in _anchors(linked), (page.name, target)


def _commands(text: str) -> list[list[str]]:
  """The `python -m jaxeff...` command lines of a page's bash blocks, as argument lists."""
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0]  # a trailing comment
      for part in re.split(r"&&|\|", line):
        words = shlex.split(part.replace("$(", "(").replace("$", ""), posix=True)
        if words[:2] == ["python", "-m"] and words[2].startswith("jaxeff"):
          out.append(words[2:])
  return out


def _help(module: str, args: list[str]) -> str:
  """The --help text of the CLI the command runs (the benchmark's own, for jaxeff.bench NAME)."""
  if module == "jaxeff.bench":
    name, rest = bench_main.split_name(args, bench_main.available())
    assert name is not None, args
    main, argv = importlib.import_module(f"jaxeff.bench.{name}").main, rest
  else:
    target = importlib.import_module(module)
    if hasattr(target, "__path__"):
      target = importlib.import_module(f"{module}.__main__")
    main, argv = target.main, args
  subcommand = [w for w in argv[:1] if not w.startswith("-") and "=" not in w]
  text = io.StringIO()
  with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
    main([*subcommand, "--help"])
  return text.getvalue()


def test_every_command_names_a_real_cli_and_its_flags():
  commands = [c for page in PAGES for c in _commands(page.read_text())]
  assert len(commands) > 20  # the parse found the pages' commands
  for module, *args in commands:
    text = _help(module, args)
    for flag in {a.split("=")[0] for a in args if a.startswith("--")}:
      assert re.search(re.escape(flag) + r"(?![\w-])", text), (module, flag)


def test_every_training_command_is_a_valid_config():
  from jaxeff import training

  commands = [c[1:] for page in PAGES for c in _commands(page.read_text()) if c[0] == "jaxeff.train"]
  assert len(commands) > 5
  for args in commands:
    config = args[args.index("--config") + 1] if "--config" in args else None
    # init_from reads its checkpoint's architecture: the file is a placeholder here.
    overrides = [a for a in args if "=" in a and not a.startswith(("--", "init_from="))]
    training.load_config(str(REPO / config) if config else None, overrides)  # raises ConfigError when wrong


def test_gpu_durations_are_budgets_not_guesses():
  """No GPU run has been timed (BENCHMARKS.md): the README, the docs and the GPU bench may state its
  budget, never an expected duration."""
  texts = [p.read_text() for p in PAGES] + [p.read_text() for p in (REPO / "jaxeff" / "bench" / "gpu").glob("*.py")]
  for text in texts:
    assert not re.search(r"(about|~|roughly|around) ?\d+(\.\d+)? ?(minutes?|min\b|s\b|seconds)", text)
