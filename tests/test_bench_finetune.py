"""`python -m jaxeff.bench finetune --quick`: the sweep, the final runs (each optimizer in its own
process) and the table, end to end on a tiny GGUF; and the chat set built from the play."""

import json

import pytest
from tiny_gguf import CHAT_TEMPLATE, hf_tiny, write_gguf

from jaxeff.bench import finetune


def test_chat_records_pair_each_speech_with_the_previous_cue():
  text = "FIRST:\nSpeak, speak.\n\nALL:\nSpeak.\nResolved.\n\nnot a speech\n\nFIRST:\nYou are all resolved."
  records = finetune.chat_records(text)
  assert [r["messages"][1]["content"] for r in records] == ["ALL:\nSpeak.\nResolved.", "FIRST:\nYou are all resolved."]
  assert records[1]["messages"][0]["content"] == "Continue the play after: Resolved."


@pytest.mark.slow
def test_quick_run_reports_every_optimizer(tmp_path, monkeypatch, shakespeare_path):
  monkeypatch.setenv("JAXEFF_CACHE_DIR", str(tmp_path / "cache"))
  model = write_gguf(
    tmp_path / "tiny.gguf", hf_tiny("llama", seed=3, tie_word_embeddings=True), "llama", chat_template=CHAT_TEMPLATE
  )
  out = tmp_path / "ft.json"
  argv = ["--quick", "--model", str(model), "--text", str(shakespeare_path), "--kinds", "chat"]
  assert finetune.main(argv + ["--optimizers", "adamw,osd:32", "--json", str(out)]) == 0
  results = json.loads(out.read_text())["results"]
  assert out.with_suffix(".png").stat().st_size > 10_000  # the curves
  assert [(r["kind"], r["optimizer"]) for r in results] == [("chat", "adamw"), ("chat", "osd:32")]
  for r in results:
    assert r["opt_bytes"] > 0 and r["peak_rss"] > 0 and r["step_s"] > 0
    assert set(map(int, r["curve"])) == {0, 2, 4} and all(v > 0 for v in r["curve"].values())
  # A low-rank state is smaller per matrix, but the tiny model's embedding keeps full AdamW moments.
  assert results[1]["opt_bytes"] != results[0]["opt_bytes"]


@pytest.mark.parametrize("curve,target,want", [({0: 5, 10: 3, 20: 1}, 2.0, 15.0), ({0: 5, 10: 4}, 2.0, None)])
def test_steps_to_target_interpolates(curve, target, want):
  assert finetune.steps_to(curve, target) == want
