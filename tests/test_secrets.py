"""Security hygiene (issue 7, item 4).

- The API key comes only from the environment (teacher.api_key_env) or a file
  (teacher.api_key_file); it reaches the server as `Authorization: Bearer ...` and is never
  printed or written: every file of the run dir and everything on stdout/stderr is searched for
  it, including when the server echoes it back in an error.
- No network connection except to the configured teacher (every socket connect is recorded).
- trust_remote_code is off unless the config turns it on; weights are read only from
  safetensors (or GGUF): a folder with only pickled .bin weights is refused.
"""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import FaultServer

from edge_pu.cli import main
from edge_pu.config import RunConfig
from edge_pu.errors import EdgePuError


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    key = f"sk-edgepu-{uuid.uuid4().hex}"
    monkeypatch.setenv("EDGE_PU_TEST_API_KEY", key)
    return key


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every address this process connects a socket to."""
    seen: list[Any] = []
    real = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        seen.append(address)
        real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def setup(tmp: Path, server: FaultServer, n: int = 4, **teacher: Any) -> Path:
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"prompt {i}"}) + "\n"
                            for i in range(n)))
    cfg = {"teacher": {"kind": "openai", "base_url": server.base_url, "model": "m",
                       "api_key_env": "EDGE_PU_TEST_API_KEY", "backoff_s": 0, **teacher},
           "data": {"prompts": str(data)}, "run_dir": str(tmp / "run"), "backend": "cpu"}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_nowhere(secret: str, run_dir: Path, *texts: str) -> None:
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files, "the run wrote nothing to search"
    for p in files:
        assert secret.encode() not in p.read_bytes(), f"API key written to {p}"
    for text in texts:
        assert secret not in text, "API key printed"


def test_anchor_stage_never_writes_or_prints_the_key(
        tmp_path: Path, secret: str, capsys: pytest.CaptureFixture[str],
        connections: list[Any]) -> None:
    script = {"prompt 0": ["500"], "prompt 1": ["garbage"], "prompt 2": ["filter", "filter"],
              "prompt 3": ["429"]}
    with FaultServer(script, retry_after=0) as server:
        path = setup(tmp_path, server)
        code = main(["anchors", str(path)])
        code2 = main(["anchors", str(path), "--export", str(tmp_path / "run" / "export.jsonl")])
        out = capsys.readouterr()
        assert (code, code2) == (1, 0)  # prompt 2 was refused: reported, exit 1
        assert server.count() == 7
        assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {secret}"}
    assert_nowhere(secret, tmp_path / "run", out.out, out.err)
    saved = (tmp_path / "run" / "config.resolved.yaml").read_text()
    assert "api_key_env: EDGE_PU_TEST_API_KEY" in saved
    assert {tuple(a)[:2] for a in connections} == {("127.0.0.1", server.port)}


def test_key_echoed_by_the_server_is_scrubbed(tmp_path: Path, secret: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with FaultServer(default="401") as server:
        code = main(["anchors", str(setup(tmp_path, server))])
        out = capsys.readouterr()
        assert server.count() == 1
    assert code == 2 and "HTTP 401" in out.err and "[redacted]" in out.err
    assert_nowhere(secret, tmp_path / "run", out.out, out.err)


def test_api_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = f"sk-file-{uuid.uuid4().hex}"
    keyfile = tmp_path / "secret.txt"
    keyfile.write_text(key + "\n")
    with FaultServer() as server:
        path = setup(tmp_path, server, api_key_env="", api_key_file=str(keyfile))
        assert main(["anchors", str(path)]) == 0
        assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {key}"}
    out = capsys.readouterr()
    assert_nowhere(key, tmp_path / "run", out.out, out.err)


def test_full_run_never_writes_the_key_and_talks_only_to_the_teacher(
        tmp_path: Path, secret: str, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str],
        connections: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """`edge-pu run` on the tiny Llama with the openai teacher, made cheap: 2 prompts, K=2,
    4 new tokens, the random ranker, one training step."""
    import transformers

    loads: list[dict[str, Any]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            loads.append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    with FaultServer({"prompt 0": ["503"]}) as server:
        path = setup(tmp_path, server, n=2)
        cfg = yaml.safe_load(path.read_text())
        cfg.update(student={"path": str(tiny_llama_dir)}, sampling={"k": 2, "max_new_tokens": 4},
                   ranker={"mode": "random"}, train={"steps": 1, "batch_size": 1,
                                                    "micro_batch": 1})
        path.write_text(yaml.safe_dump(cfg))
        assert main(["run", str(path)]) == 0
        out = capsys.readouterr()
        assert server.count() == 3 and set(server.answered.values()) == {1}
        assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {secret}"}
    run_dir = tmp_path / "run"
    assert (run_dir / "adapter").is_dir()
    assert_nowhere(secret, run_dir, out.out, out.err)
    assert {tuple(a)[:2] for a in connections} == {("127.0.0.1", server.port)}
    assert loads and all(kw.get("trust_remote_code") is False for kw in loads)
    assert all(kw.get("use_safetensors") is True for kw in loads if "dtype" in kw)


def test_trust_remote_code_is_off_by_default() -> None:
    assert RunConfig().student.trust_remote_code is False


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    from edge_pu.quant.student import resolve_student

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle runs code when loaded")
    with pytest.raises(EdgePuError, match="never pickled .bin"):
        resolve_student(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_student(str(tmp_path)) == (tmp_path, "none")
