"""`edge-pu report` on a real tiny run (SFT, then 2 DPO rounds, before/after evaluation, a
verified f16 GGUF export: the `finished_run` fixture), opened in a real headless browser
(Debian's chromium, which .ci/run installs): every plot is an embedded PNG that the browser
decodes (naturalWidth > 0, read by a script in the page and written into its DOM)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from edge_pu.cli import main

pytest.importorskip("matplotlib", reason="the report's plots need matplotlib")

PLOTS = {"training_steps", "candidates", "score_spread", "anchors", "evaluation"}
PROBE = """<script>window.addEventListener('load', function () {
  var rows = Array.prototype.map.call(document.images, function (im) {
    return {id: im.id, w: im.naturalWidth, h: im.naturalHeight, complete: im.complete};
  });
  var pre = document.createElement('pre');
  pre.id = 'img-check';
  pre.textContent = JSON.stringify(rows);
  document.body.appendChild(pre);
});</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    why = "no headless chromium here (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI"):  # CI installs it: a skip there would hide the check
        pytest.fail(why)
    pytest.skip(why)


def _browser(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--no-first-run",
                           f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(finished_run: Path) -> Path:
    assert main(["report", str(finished_run)]) == 0  # again: the export came after the demo
    return finished_run / "report.html"


def test_report_holds_every_stage_and_is_self_contained(report: Path, finished_run: Path
                                                        ) -> None:
    page = report.read_text()
    assert {p.stem for p in (finished_run / "report_plots").glob("*.png")} == PLOTS
    assert len(re.findall(r'<img id="fig-[a-z_]+" alt="[^"]*" src="data:image/png;base64,',
                          page)) == len(PLOTS)
    # Nothing the page needs lives elsewhere: no external script, style, image or link.
    assert not re.search(r'(src|href)="(?!data:)', page)
    exported = (finished_run / "export").exists()  # needs llama-cpp-python (the fixture)
    for text in ("SFT: 3 steps on 54 anchors", "PU round", "kl_to_reference_end",
                 "reward_accuracy", "unfinished", "Anchors", "teacher requests",
                 "after SFT", "after PU", "Export gate",
                 *(("gguf-f16", "logits_max_abs", "passed") if exported else ())):
        assert text in page, text
    metrics = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()]
    ends = [m for m in metrics if m.get("event") == "round_end"]
    assert [m["round"] for m in ends] == [1, 2]
    assert ends[0]["kl_to_reference"] == 0.0  # round 1 samples from the reference (SFT)
    assert ends[0]["kl_to_reference_end"] > 0.0 and ends[1]["kl_to_reference"] > 0.0


def test_report_renders_its_plots_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _browser(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="img-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page's script did not run: {dom.stderr[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert {im["id"].removeprefix("fig-") for im in images} == PLOTS
    for im in images:
        assert im["complete"] and im["w"] > 100 and im["h"] > 100, im
    shot = tmp_path / "shot.png"
    _browser(tmp_path, "--hide-scrollbars", "--window-size=1000,1400",
             f"--screenshot={shot}", report.as_uri())
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1000, 1400)


def test_report_refuses_a_folder_that_is_no_run(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) != 0
    assert "not a run dir" in capsys.readouterr().err


def test_round_end_kl_is_importance_weighted_over_sampled_candidates_only() -> None:
    """Two DPO units of one prompt: (anchor, cand 2) and (cand 0, cand 2). The anchor row is no
    sample of the policy and cand 2 counts once, so the rows are cand 2 and cand 0.
    cand 2: old sum -2, ref sum -3, trained sum -1.5 -> log w = 0.5, log-ratio 1.5;
    cand 0: old = ref = trained = -3 -> log w = 0, log-ratio 0.
    KL = (e^0.5 * 1.5 + 1 * 0) / (e^0.5 + 1) = 0.9337..."""
    import math

    from edge_pu.pipeline import _candidate_rows, _trained_kl
    from edge_pu.train import ANCHOR, Unit

    a = Unit("p", [1], [[7], [8, 9]], ref=[[-1.0], [-2.0, -1.0]], old=[[-1.0], [-1.0, -1.0]])
    b = Unit("p", [1], [[5], [8, 9]], ref=[[-3.0], [-2.0, -1.0]], old=[[-3.0], [-1.0, -1.0]])
    rows = _candidate_rows([a, b], [{"chosen": ANCHOR, "rejected": 2},
                                    {"chosen": 0, "rejected": 2}])
    assert [(u.completions[j]) for u, j in rows] == [[8, 9], [5]]

    class Trained:
        def logprobs(self, prompts, comps, adapter=True):  # noqa: ANN001, ANN202
            return [{(8, 9): [-1.0, -0.5], (5,): [-3.0]}[tuple(c)] for c in comps]

    want = math.exp(0.5) * 1.5 / (math.exp(0.5) + 1)
    assert abs(_trained_kl(Trained(), rows, batch=1) - want) < 1e-12


def test_report_of_a_run_stopped_after_its_anchors(tmp_path: Path) -> None:
    """A run dir with anchors only (one cut at teacher.max_tokens), one prompt the teacher
    refused and one failure later anchored: the page counts what is there and says what is
    not; plots are drawn only for what was logged."""
    from edge_pu.jsonl import append_jsonl
    from edge_pu.report import write_report

    d = tmp_path / "run"
    d.mkdir()
    (d / "config.resolved.yaml").write_text("teacher: {kind: openai, model: m}\n")
    append_jsonl(d / "anchors.jsonl", [
        {"key": "k1", "id": "a", "prompt": "p1", "anchor": "one two three", "teacher": "t"},
        {"key": "k2", "id": "b", "prompt": "p2", "anchor": "one two", "teacher": "t",
         "truncated": True}])
    append_jsonl(d / "teacher_failures.jsonl", [
        {"key": "k3", "id": "c", "error": "refused (content_filter)", "attempts": 1},
        {"key": "k2", "id": "b", "error": "HTTP 500", "attempts": 3}])
    page = write_report(d).read_text()
    assert "<td>truncated at teacher.max_tokens</td><td>1 (50%)</td>" in page
    assert "<td>prompts with no anchor (open teacher failures)</td><td>1</td>" in page
    assert "refused (content_filter)" in page and "HTTP 500" not in page
    assert "length, words: mean / median / max</td><td>2.5 / 2.5 / 3" in page
    assert "No optimizer step logged yet" in page and "No export yet" in page
    assert {p.stem for p in (d / "report_plots").glob("*.png")} == {"anchors"}
