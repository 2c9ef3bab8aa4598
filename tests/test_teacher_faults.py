"""Teacher faults against a real HTTP server on loopback (tests/servers.py) that misbehaves on cue.

What must hold (issue 7): every prompt ends either anchored or listed in
teacher_failures.jsonl; retries are bounded, back off with jitter and honour Retry-After; the
budgets `teacher.max_calls` and `teacher.token_budget` are never exceeded, across restarts;
exactly one successful call per prompt, ever (a rerun makes zero calls). Waits go through an
injected `sleep`, so nothing here actually waits for a backoff.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from servers import FaultServer, closed_port

from edge_pu.anchors import (
    MAX_WAIT_S,
    PROMPT_OVERHEAD_TOKENS,
    AnchorReport,
    AnchorStore,
    anchor_key,
    reserved_tokens,
)
from edge_pu.cli import main
from edge_pu.config import TeacherConfig
from edge_pu.data import Prompt
from edge_pu.errors import EdgePuError
from edge_pu.jsonl import read_jsonl
from edge_pu.teachers.base import TeacherError, generation_settings
from edge_pu.teachers.openai import OpenAITeacher


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def tcfg(server: FaultServer | None = None, **kw: object) -> TeacherConfig:
    base = server.base_url if server else f"http://127.0.0.1:{closed_port()}/v1"
    opts: dict[str, object] = dict(kind="openai", base_url=base, model="m", timeout_s=2.0,
                                   retries=2, backoff_s=1.0, max_tokens=16)
    opts.update(kw)
    return TeacherConfig(**opts)  # type: ignore[arg-type]


def prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i}", f"prompt {i}") for i in range(n)]


def fetch(run_dir: Path, ps: list[Prompt], cfg: TeacherConfig,
          sleeps: list[float] | None = None, **kw: object) -> tuple[AnchorStore, AnchorReport]:
    store = AnchorStore(run_dir)
    sleeps = [] if sleeps is None else sleeps
    report = store.fetch(ps, OpenAITeacher(cfg), cfg, sleep=sleeps.append,
                         rng=random.Random(0), **kw)
    return store, report


def keys(ps: list[Prompt], cfg: TeacherConfig) -> dict[str, str]:
    settings = generation_settings(cfg)
    return {p.id: anchor_key(f"openai:{cfg.model}", p.text, settings) for p in ps}


# ---- one request: how each fault is classified ------------------------------------------------
@pytest.mark.parametrize("cue, retryable, fatal, usage_known", [
    ("500", True, False, False),
    ("503", True, False, False),
    ("429", True, False, True),
    ("garbage", True, False, False),
    ("no-choices", True, False, False),
    ("empty", True, False, True),
    ("truncated-body", True, False, False),
    ("drop", True, False, False),
    ("filter", False, False, True),
    ("refusal", False, False, True),
    ("length-empty", False, False, True),
    ("400", False, False, True),
    ("401", False, True, True),
    ("404", False, True, True),
    ("quota", False, True, True),
])
def test_each_fault_is_classified(cue: str, retryable: bool, fatal: bool,
                                  usage_known: bool) -> None:
    with FaultServer(default=cue) as server:
        teacher = OpenAITeacher(tcfg(server))
        with pytest.raises(TeacherError) as info:
            teacher.answer("hello")
    assert (info.value.retryable, info.value.fatal) == (retryable, fatal), str(info.value)
    assert (teacher.last_usage is not None) == usage_known
    assert server.count() == 1


def test_timeout_is_retryable_and_bounded_by_timeout_s() -> None:
    with FaultServer(default="sleep", sleep_s=1.0) as server:
        teacher = OpenAITeacher(tcfg(server, timeout_s=0.2))
        with pytest.raises(TeacherError, match="timed out after 0.2s") as info:
            teacher.answer("hello")
    assert info.value.retryable and teacher.last_usage is None  # unknown: counted at worst case


def test_connection_refused_is_retryable_and_costs_nothing() -> None:
    teacher = OpenAITeacher(tcfg(None))
    with pytest.raises(TeacherError, match="cannot reach") as info:
        teacher.answer("hello")
    assert info.value.retryable and teacher.last_usage == {"total_tokens": 0}


def test_retry_after_is_parsed_in_seconds_and_as_http_date() -> None:
    with FaultServer(default="429", retry_after=7) as server:
        with pytest.raises(TeacherError) as info:
            OpenAITeacher(tcfg(server)).answer("x")
    assert info.value.retry_after == 7
    with FaultServer(default="429-date", retry_after=30) as server:
        with pytest.raises(TeacherError) as info:
            OpenAITeacher(tcfg(server)).answer("x")
    assert info.value.retry_after is not None and 25 <= info.value.retry_after <= 31


def test_truncated_answer_is_accepted_and_reported() -> None:
    with FaultServer(default="length") as server:
        teacher = OpenAITeacher(tcfg(server))
        assert teacher.answer("hello world") == "anchor:"  # the server cut it at 8 chars
    assert teacher.last_finish_reason == "length"
    assert teacher.last_usage and teacher.last_usage["total_tokens"] > 0


# ---- the anchor stage over many prompts --------------------------------------------------------
def test_mixed_faults_every_prompt_ends_anchored_or_reported(tmp_path: Path) -> None:
    """retries=2 (3 tries per prompt). Expected requests per prompt, from the script:
    p0 1, p1 2, p2 3, p3 2, p4 2, p5 2, p6 1 (filter: not retried), p7 1 (length: accepted),
    p8 2, p9 2, p10 3 (500 x3: gives up), p11 2, p12 1 (refusal), p13 2 (garbage, ok), p14 1
    (400: not retried) -> 27 requests, 11 anchored, 4 failed."""
    script = {"prompt 1": ["500"], "prompt 2": ["503", "503"], "prompt 3": ["429"],
              "prompt 4": ["garbage"], "prompt 5": ["empty"], "prompt 6": ["filter"],
              "prompt 7": ["length"], "prompt 8": ["sleep"], "prompt 9": ["drop"],
              "prompt 10": ["500"] * 5, "prompt 11": ["truncated-body"],
              "prompt 12": ["refusal"], "prompt 13": ["no-choices"], "prompt 14": ["400"]}
    ps = prompts(15)
    sleeps: list[float] = []
    # p8's reply sleeps past the client timeout; a healthy reply must stay well inside it even on
    # a loaded machine (0.25 s made a slow healthy reply time out and be asked twice).
    with FaultServer(script, sleep_s=3.0, retry_after=3) as server:
        cfg = tcfg(server, timeout_s=1.0)
        store, report = fetch(tmp_path, ps, cfg, sleeps)
        assert server.count() == report.requests == store.requests_made() == 27
        assert len(read_jsonl(store.ledger)) == len(read_jsonl(store.sent)) == 27
        anchored = {r["id"] for r in store.by_key.values()}
        failed = {r["id"] for r in read_jsonl(store.failures)}
        assert failed == {"p6", "p10", "p12", "p14"}
        assert anchored | failed == {p.id for p in ps} and not anchored & failed
        assert (report.new, report.failed, report.truncated) == (11, 4, 1)
        assert [r for r in store.by_key.values() if r.get("truncated")][0]["id"] == "p7"
        assert max(server.answered.values()) == 1  # one successful reply per prompt
        assert 3 in sleeps  # p3's Retry-After, exactly
        errors = {r["id"]: r["error"] for r in read_jsonl(store.failures)}
        assert "content_filter" in errors["p6"] and "HTTP 500" in errors["p10"]
        assert "refused" in errors["p12"] and "HTTP 400" in errors["p14"]
        # A rerun (a new store, as after a restart) asks only for the 4 failed prompts; their
        # cues are used up by now, except p10's last two 500s: 1 + 3 + 1 + 1 requests.
        store2, again = fetch(tmp_path, ps, cfg)
        assert again.cached == 11 and again.new == 4 and again.requests == 6
        assert server.count() == 27 + 6 and store2.open_failures() == []
        _, third = fetch(tmp_path, ps, cfg)
        assert third.cached == 15 and third.requests == 0 and server.count() == 33
        assert set(server.answered.values()) == {1} and len(server.answered) == 15


def test_retries_are_bounded_with_exponential_backoff_and_jitter(tmp_path: Path) -> None:
    """retries=3, backoff_s=1: waits 1*2^a*(0.5+u), u in [0,1): a=0 in [0.5,1.5), a=1 in [1,3),
    a=2 in [2,6); no wait after the last try."""
    with FaultServer(default="500") as server:
        cfg = tcfg(server, retries=3)
        sleeps: list[float] = []
        store, report = fetch(tmp_path, prompts(1), cfg, sleeps, give_up_after=0)
        assert server.count() == 4 and report.failed == 1
        assert len(sleeps) == 3
        for a, w in enumerate(sleeps):
            assert 0.5 * 2**a <= w < 1.5 * 2**a
        [fail] = read_jsonl(store.failures)
        assert fail["attempts"] == 4 and "HTTP 500" in fail["error"]
        # Jitter: another client (another rng) waits differently.
        other: list[float] = []
        AnchorStore(tmp_path / "b").fetch(prompts(1), OpenAITeacher(cfg), cfg,
                                          sleep=other.append, rng=random.Random(1))
        assert other != sleeps


def test_retry_after_longer_than_we_wait_ends_the_prompt_without_retrying(tmp_path: Path) -> None:
    with FaultServer({"prompt 0": ["429-long"]}) as server:
        sleeps: list[float] = []
        store, report = fetch(tmp_path, prompts(2), tcfg(server), sleeps)
        assert server.count() == 2 and sleeps == [] and report.new == 1
        [fail] = read_jsonl(store.failures)
        assert "100000" in fail["error"] and f"{MAX_WAIT_S:.0f}s" in fail["error"]


def test_a_teacher_that_is_down_stops_the_stage_and_reports_every_prompt(tmp_path: Path) -> None:
    cfg = tcfg(None, retries=1)
    with pytest.raises(EdgePuError) as info:
        fetch(tmp_path, prompts(6), cfg)
    msg = str(info.value)
    assert "looks down" in msg and "cannot reach" in msg and "teacher_failures.jsonl" in msg
    store = AnchorStore(tmp_path)
    assert store.requests_made() == 3 * 2  # three prompts, two tries each, then stop
    assert {r["id"] for r in store.open_failures()} == {p.id for p in prompts(6)}


def test_failures_at_the_end_do_not_stop_the_stage(tmp_path: Path) -> None:
    """The last three prompts fail after retries, but nothing is left to ask: the stage
    reports them and returns, so `edge-pu run` goes on with what is anchored."""
    with FaultServer({f"prompt {i}": ["500"] * 3 for i in (2, 3, 4)}) as server:
        store, report = fetch(tmp_path, prompts(5), tcfg(server, retries=2))
        assert (report.new, report.failed) == (2, 3) and server.count() == 2 + 9


def test_fatal_401_stops_at_once_with_a_clear_message(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-DISTINCTIVE-401-echo"
    monkeypatch.setenv("EDGE_PU_TEST_KEY", secret)
    with FaultServer(default="401") as server:
        cfg = tcfg(server, api_key_env="EDGE_PU_TEST_KEY")
        with pytest.raises(EdgePuError) as info:
            fetch(tmp_path, prompts(4), cfg)
        assert server.count() == 1  # no retry, no other prompt
        assert server.requests[0].headers["Authorization"] == f"Bearer {secret}"
    msg = str(info.value)
    assert "HTTP 401" in msg and "teacher.api_key_env" in msg
    assert secret not in msg and "[redacted]" in msg  # the server echoed it; we do not
    for f in tmp_path.iterdir():
        assert secret not in f.read_text()
    assert len(AnchorStore(tmp_path).open_failures()) == 4


def test_quota_exhausted_is_fatal(tmp_path: Path) -> None:
    with FaultServer(default="quota") as server:
        with pytest.raises(EdgePuError, match="insufficient quota"):
            fetch(tmp_path, prompts(3), tcfg(server))
        assert server.count() == 1


def test_redirects_are_not_followed(tmp_path: Path) -> None:
    with FaultServer() as elsewhere, FaultServer(default="redirect") as server:
        server.redirect_to = elsewhere.base_url + "/chat/completions"
        with pytest.raises(EdgePuError, match="does not follow redirects"):
            fetch(tmp_path, prompts(2), tcfg(server, api_key_env="HOME"))
        assert elsewhere.count() == 0 and server.count() == 1


def test_a_loopback_teacher_is_never_reached_through_a_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """http_proxy names a port nobody listens on: a request sent through it would be refused."""
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed_port()}")
    with FaultServer() as server:
        for host in ("127.0.0.1", "localhost"):
            teacher = OpenAITeacher(tcfg(server, base_url=f"http://{host}:{server.port}/v1"))
            assert teacher.answer("hello") == "anchor: hello", host
        assert server.count() == 2


def test_a_remote_teacher_still_goes_through_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy is a FaultServer: it gets the request for the remote host (absolute URL as the
    path, as a proxy does) and answers 404, a fatal error for the teacher."""
    with FaultServer() as proxy:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        teacher = OpenAITeacher(tcfg(base_url="http://teacher.example:8000/v1"))
        with pytest.raises(TeacherError) as info:
            teacher.answer("hello")
        assert info.value.fatal
        assert [r.path for r in proxy.requests] == ["http://teacher.example:8000/v1/chat/completions"]


# ---- budgets --------------------------------------------------------------------------------
def test_max_calls_is_never_exceeded_across_restarts(tmp_path: Path) -> None:
    """max_calls=5, every prompt's first try fails with 503: prompt 0 and 1 take 2 requests
    each, prompt 2 gets its first (failing) try, then the budget is spent."""
    ps = prompts(6)
    with FaultServer({p.text: ["503"] for p in ps}) as server:
        cfg = tcfg(server, max_calls=5)
        store, report = fetch(tmp_path, ps, cfg)
        assert server.count() == 5 == store.requests_made()
        assert report.new == 2 and report.failed == 4
        assert all("teacher.max_calls = 5" in r["error"] for r in report.failures)
        for _ in range(2):  # restarts under the same budget send nothing
            store, report = fetch(tmp_path, ps, cfg)
            assert server.count() == 5 and report.requests == 0 and report.failed == 4
        # Raising the budget continues where it stopped; each prompt anchored exactly once.
        store, report = fetch(tmp_path, ps, replace(cfg, max_calls=100))
        assert report.new == 4 and report.cached == 2
        assert server.count() == 5 + 1 + 3 * 2
        assert set(server.answered.values()) == {1} and len(server.answered) == 6
        store, report = fetch(tmp_path, ps, replace(cfg, max_calls=100))
        assert report.requests == 0 and report.cached == 6


def test_a_request_cut_short_by_a_crash_still_counts(tmp_path: Path) -> None:
    class Killed(BaseException):  # stands for SIGKILL: the process dies mid-request
        pass

    class Dying:
        identity = "openai:m"

        def answer(self, prompt: str) -> str:
            raise Killed("SIGKILL")

    cfg = tcfg(None, max_calls=1)
    with pytest.raises(Killed):
        AnchorStore(tmp_path).fetch(prompts(2), Dying(), cfg, sleep=lambda s: None)
    store = AnchorStore(tmp_path)
    assert store.requests_made() == 1 and read_jsonl(store.ledger) == []  # sent, never back
    assert store.tokens_spent() == reserved_tokens("prompt 0", cfg)  # unknown: worst case
    with FaultServer() as server:
        _, report = fetch(tmp_path, prompts(2), replace(cfg, base_url=server.base_url))
        assert server.count() == 0 and report.failed == 2


def test_token_budget_is_never_exceeded_across_restarts(tmp_path: Path) -> None:
    """A request reserves bytes(prompt) + 64 + max_tokens 16: 88 for "prompt 0".."prompt 9",
    89 from "prompt 10" on. The server reports 10 tokens per reply (2 words + 5 in, 3 out).
    With token_budget = 300, request k (0-based) goes out while 10k + reserve <= 300, i.e. for
    k <= 21: 22 anchored, 220 tokens. Request 22 would need 220 + 89 = 309 > 300."""
    ps = prompts(30)
    with FaultServer() as server:
        cfg = tcfg(server, token_budget=300)
        assert reserved_tokens("prompt 0", cfg) == 8 + PROMPT_OVERHEAD_TOKENS + 16
        store, report = fetch(tmp_path, ps, cfg)
        assert server.tokens_reported() == store.tokens_spent() == report.tokens == 220
        assert report.new == 22 and report.failed == 8
        assert "teacher.token_budget = 300" in report.failures[0]["error"]
        store, report = fetch(tmp_path, ps, cfg)  # a restart: nothing more fits
        assert report.requests == 0 and server.tokens_reported() == 220
        store, report = fetch(tmp_path, ps, replace(cfg, token_budget=10_000))
        assert report.new == 8 and server.tokens_reported() == store.tokens_spent() == 300
        assert server.tokens_reported() <= 10_000


def test_unknown_usage_counts_at_its_worst_case(tmp_path: Path) -> None:
    """A 500 carries no usage: it counts 88 tokens (its reservation), the next ok counts 10."""
    with FaultServer({"prompt 0": ["500"]}) as server:
        cfg = tcfg(server, token_budget=1000)
        store, report = fetch(tmp_path, prompts(1), cfg)
        assert report.new == 1 and store.tokens_spent() == 88 + 10


# ---- through the command line -----------------------------------------------------------------
def test_cli_anchors_reports_failures_and_exits_non_zero(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "prompt": "prompt {i}"}}\n' for i in range(4)))
    with FaultServer({"prompt 2": ["filter", "filter"]}) as server:
        cfgfile = tmp_path / "run.yaml"
        cfgfile.write_text(f"teacher: {{kind: openai, base_url: '{server.base_url}', model: m,"
                           f" backoff_s: 0}}\ndata: {{prompts: '{data}'}}\n"
                           f"run_dir: '{tmp_path / 'run'}'\n")
        assert main(["anchors", str(cfgfile)]) == 1
        out = capsys.readouterr().out
        assert "3 new, 1 failed" in out and "teacher_failures.jsonl" in out
        assert main(["anchors", str(cfgfile)]) == 1  # the refused prompt is asked once more
        assert server.count() == 5 and server.count("prompt 2") == 2
        assert "3 already anchored" in capsys.readouterr().out


def test_cli_raising_the_budget_continues_in_the_same_run_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "prompt {i}"}}\n' for i in range(4)))
    with FaultServer() as server:
        cfgfile = tmp_path / "run.yaml"
        cfgfile.write_text(f"teacher: {{kind: openai, base_url: '{server.base_url}', model: m,"
                           f" max_calls: 2}}\ndata: {{prompts: '{data}'}}\n"
                           f"run_dir: '{tmp_path / 'run'}'\n")
        assert main(["anchors", str(cfgfile)]) == 1
        assert server.count() == 2 and "2 new, 2 failed" in capsys.readouterr().out
        code = main(["anchors", str(cfgfile), "--set", "teacher.max_calls=10"])
        assert "different config" not in capsys.readouterr().err
        assert code == 0 and server.count() == 4
